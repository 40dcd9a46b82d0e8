"""Backbone families by name (timm, open_clip, torchvision, custom factories): any layer by module path,
checked against each library's own intermediate outputs; presets equal their family spelling."""
import json
import os
import sys
import textwrap

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from encoders.backbones import FrozenBackbone, build_backbone, main
from encoders.feature_cache import weights_fingerprint
from encoders.weights import WeightsError

SMALL = 64  # image size for the models that allow it (fast on 2 cores)


@pytest.fixture(scope="module", autouse=True)
def _small_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)


def seeded(seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_backbone(**{"pretrained": False, **kwargs})


def photo(size=None) -> np.ndarray:
    """A real photograph (matplotlib's sample Grace Hopper, 512 x 600), optionally resized square."""
    import matplotlib.cbook as cbook
    from PIL import Image

    image = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    return np.asarray(image.resize((size, size), Image.BICUBIC) if size else image)


def batch(bb, n=2):
    return torch.stack([bb.transform(photo()), bb.transform(photo(425))][:n])


# ----------------------------------------------------------------------------- timm


def test_timm_resnet_layers_match_forward_intermediates_and_stop_early():
    bb = seeded(family="timm", model="resnet18", layers=["layer2", "layer4.1.act2", "embed"], image_size=SMALL)
    p = bb.preprocess  # timm's resnet18 (a1_in1k) cfg: crop_pct 0.95, bicubic
    assert (p.crop_size, p.resize_size, p.interpolation) == (SMALL, int(SMALL / 0.95), "bicubic")
    assert list(bb.spec.layers)[:6] == ["act1", "layer1", "layer2", "layer3", "layer4", "embed"]
    assert bb.feature_dims == {"layer2": 128, "layer4.1.act2": 512, "embed": 512}
    x = batch(bb)
    feats = bb.forward_layers(x)
    model = bb.model
    with torch.no_grad():
        stages = model.forward_intermediates(x, indices=[2, 4], intermediates_only=True)
        embed = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(feats["layer2"], stages[0].mean(dim=(2, 3)))
    torch.testing.assert_close(feats["layer4.1.act2"], stages[1].mean(dim=(2, 3)))
    torch.testing.assert_close(feats["embed"], embed)

    ran = []
    handle = model.layer3.register_forward_hook(lambda *a: ran.append(1))
    try:
        early = build_backbone(family="timm", model="resnet18", layers=["layer2"], image_size=SMALL)
        early.model.load_state_dict(model.state_dict())
        torch.testing.assert_close(early(x), feats["layer2"])
        early.model.layer3.register_forward_hook(lambda *a: ran.append(2))
        early(x)
        assert 2 not in ran  # the forward stopped after layer2
    finally:
        handle.remove()


def test_timm_vit_tokens_and_poolings():
    bb = seeded(family="timm", model="vit_tiny_patch16_224", model_kwargs={"img_size": SMALL}, layers=["blocks.3"])
    assert bb.preprocess.crop_size == SMALL  # follows the model's patch grid, not the pretrained cfg's 224
    layer = bb.spec.layers["blocks.3"]
    assert (layer.kind, layer.shape, layer.n_prefix) == ("tokens", (17, 192), 1)
    x = batch(bb)
    tokens = FrozenBackbone(bb.spec, bb.model, layers=["blocks.3"], pooling="flatten")(x).reshape(2, 17, 192)
    with torch.no_grad():
        patches = bb.model.forward_intermediates(x, indices=[3], output_fmt="NLC", intermediates_only=True)[0]
    torch.testing.assert_close(tokens[:, 1:], patches)  # timm's own intermediate (prefix tokens dropped)
    torch.testing.assert_close(bb(x), tokens[:, 0])  # auto: CLS
    grid = patches.reshape(2, 4, 4, 192).permute(0, 3, 1, 2)
    for pooling, expected in {"avg": patches.mean(1), "max": patches.amax(1),
                              "avg2x2": grid.reshape(2, 192, 2, 2, 2, 2).mean(dim=(3, 5)).flatten(1)}.items():
        other = FrozenBackbone(bb.spec, bb.model, layers=["blocks.3"], pooling=pooling)
        torch.testing.assert_close(other(x), expected, msg=pooling)


def test_timm_swin_channels_last_maps_are_recognised():
    bb = seeded(family="timm", model="swin_tiny_patch4_window7_224",
                model_kwargs={"img_size": SMALL, "window_size": 2}, layers=["layers.2"], pooling="avg2x2")
    layer = bb.spec.layers["layers.2"]
    assert (layer.kind, layer.layout, layer.shape) == ("conv", "nhwc", (384, 4, 4))
    x = batch(bb)
    with torch.no_grad():
        stage = bb.model.forward_intermediates(x, indices=[2], intermediates_only=True)[0]  # NCHW
    assert stage.shape == (2, 384, 4, 4)
    torch.testing.assert_close(bb(x), stage.reshape(2, 384, 2, 2, 2, 2).mean(dim=(3, 5)).flatten(1))


def test_timm_weights_path_round_trip(tmp_path):
    bb = seeded(family="timm", model="resnet18", layers=["layer3"], image_size=SMALL)
    path = tmp_path / "resnet18.safetensors"
    from safetensors.torch import save_file

    save_file(bb.model.state_dict(), str(path))
    loaded = seeded(seed=5, family="timm", model="resnet18", layers=["layer3"], image_size=SMALL,
                    weights_path=str(path))
    x = batch(bb)
    assert torch.equal(loaded(x), bb(x))


# ----------------------------------------------------------------------------- open_clip


@pytest.fixture(scope="module")
def tiny_open_clip_configs(tmp_path_factory):
    """Two toy open_clip architectures registered by name (a user's own config works the same way)."""
    import open_clip

    text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    configs = {
        "test-tiny-ViT": {"embed_dim": 32, "vision_cfg": {"image_size": SMALL, "layers": 2, "width": 32,
                                                          "head_width": 16, "patch_size": 16}, "text_cfg": text},
        "test-tiny-RN": {"embed_dim": 32, "vision_cfg": {"image_size": SMALL, "layers": [1, 1, 1, 1], "width": 8},
                         "text_cfg": text},
    }
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, cfg in configs.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return list(configs)


def test_open_clip_vit_family(tiny_open_clip_configs):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    bb = seeded(family="open_clip", model="test-tiny-ViT", layers=["blocks.1", "embed"])
    assert list(bb.spec.layers) == ["blocks.0", "blocks.1", "embed"]
    assert bb.spec.layers["blocks.1"].module == "visual.transformer.resblocks.1"
    library = image_transform_v2(PreprocessCfg(**bb.model.visual.preprocess_cfg), is_train=False)
    ours, theirs = bb.transform(photo()), library(Image.fromarray(photo()))
    assert ours.shape == theirs.shape == (3, SMALL, SMALL)
    assert ((ours - theirs) * torch.tensor(bb.preprocess.std).view(3, 1, 1) * 255).abs().max() <= 2
    x = batch(bb)
    feats = bb.forward_layers(x)
    with torch.no_grad():
        torch.testing.assert_close(feats["embed"], bb.model.encode_image(x))
        text = bb.model.encode_text(open_clip.tokenize(["a face"]))  # the text tower travels with the model
    assert text.shape == (1, 32)
    by_tower_path = build_backbone(family="open_clip", model="test-tiny-ViT", layers=["transformer.resblocks.1"])
    assert by_tower_path.spec.layers["transformer.resblocks.1"].module == "visual.transformer.resblocks.1"


def test_open_clip_resnet_family(tiny_open_clip_configs):
    bb = seeded(family="open_clip", model="test-tiny-RN", layers="all")
    assert list(bb.spec.layers) == ["layer1", "layer2", "layer3", "layer4", "embed"]
    x = batch(bb)
    feats = bb.forward_layers(x)
    with torch.no_grad():  # open_clip's own intermediates: stem, layer1..layer4
        stages = bb.model.visual.forward_intermediates(x, indices=[1, 2, 3, 4],
                                                       intermediates_only=True)["image_intermediates"]
        for name, stage in zip(("layer1", "layer2", "layer3", "layer4"), stages):
            torch.testing.assert_close(feats[name], stage.mean(dim=(2, 3)), msg=name)
        torch.testing.assert_close(feats["embed"], bb.model.encode_image(x))


def test_open_clip_unknown_names():
    with pytest.raises(ValueError, match="no open_clip architecture 'ViT-B-33'; close: ViT-B-32"):
        build_backbone(family="open_clip", model="ViT-B-33")
    with pytest.raises(ValueError, match="no pretrained tag 'nope'"):
        build_backbone(family="open_clip", model="RN50", tag="nope")


# ----------------------------------------------------------------------------- torchvision


def test_torchvision_resnet_shared_relu_reads_its_last_call():
    bb = seeded(family="torchvision", model="resnet18", layers=["layer4.1.relu", "layer4"], image_size=SMALL)
    # weights DEFAULT = IMAGENET1K_V1: resize 256, crop 224; at 64 px the ratio is kept
    assert (bb.preprocess.crop_size, bb.preprocess.resize_size) == (SMALL, SMALL * 256 // 224)
    feats = bb.forward_layers(batch(bb))
    torch.testing.assert_close(feats["layer4.1.relu"], feats["layer4"])  # relu runs twice; its last output
    assert bb.spec.layers["layer4.1.relu"].calls == 2


def test_preset_equals_its_family_spelling(make_cfg):
    """backbone=alexnet and backbone=torchvision backbone.model=alexnet: the same weights, transform, features."""
    def built(overrides):
        cfg = make_cfg(["backbone.pretrained=false", *overrides])
        torch.manual_seed(0)
        return instantiate(cfg.backbone)

    preset = built(["backbone=alexnet", "backbone.layers=[conv5,fc6,pool5]"])
    family = built(["backbone=torchvision", "backbone.model=alexnet",
                    "backbone.layers=[features.11,classifier.2,avgpool]", "backbone.pooling={avgpool: flatten}"])
    assert preset.preprocess == family.preprocess
    assert (preset.preprocess.resize_size, preset.preprocess.crop_size) == (256, 224)
    assert weights_fingerprint(preset.model) == weights_fingerprint(family.model)
    x = batch(preset)
    assert torch.equal(preset(x), family(x))
    full = built(["backbone=alexnet", "backbone.crop_pct=1.0"])  # the full field of a square image
    assert (full.preprocess.resize_size, full.preprocess.crop_size) == (224, 224)


# ----------------------------------------------------------------------------- custom


class ToyNet(nn.Module):
    """(n, 3, S, S) -> stem conv map, a channels-last view of it, and a 10-d embedding."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU())
        self.to_nhwc = Permute()
        self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(10))

    def forward(self, x):
        h = self.stem(x)
        self.to_nhwc(h)
        return self.head(h)


class Permute(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


def toy_factory(width: int = 6, pretrained: bool = False):
    """A user factory: the model and its preprocessing as a dict."""
    if pretrained:
        raise RuntimeError("the toy has no pretrained weights")
    model = ToyNet()
    model(torch.zeros(1, 3, 32, 32))  # materialise the lazy layer
    return model, {"crop_size": 32, "resize_size": 36, "interpolation": "bicubic", "mean": [0.5] * 3,
                   "std": [0.25] * 3}


def toy_with_transform():
    from torchvision import transforms

    transform = transforms.Compose([transforms.Resize(40), transforms.CenterCrop(32), transforms.ToTensor(),
                                    transforms.Normalize([0.4, 0.4, 0.4], [0.2, 0.2, 0.2])])
    return toy_factory()[0], transform


def test_custom_factory_from_a_test_module():
    bb = seeded(family="custom", factory="tests.test_backbone_families:toy_factory",
                layers=["stem", "to_nhwc", "embed"])
    assert bb.spec.name == "custom:tests.test_backbone_families:toy_factory"
    p = bb.preprocess
    assert (p.crop_size, p.resize_size, p.interpolation, p.mean, p.std) == (32, 36, "bicubic", (0.5,) * 3, (0.25,) * 3)
    assert bb.spec.layers["to_nhwc"].layout == "nhwc" and bb.feature_dims == {"stem": 6, "to_nhwc": 6, "embed": 10}
    x = batch(bb)
    feats = bb.forward_layers(x)
    with torch.no_grad():
        stem = bb.model.stem(x)
        torch.testing.assert_close(feats["stem"], stem.mean(dim=(2, 3)))
        torch.testing.assert_close(feats["to_nhwc"], feats["stem"])
        torch.testing.assert_close(feats["embed"], bb.model(x))
    parsed = seeded(family="custom", factory="tests.test_backbone_families:toy_with_transform")
    assert (parsed.preprocess.crop_size, parsed.preprocess.resize_size, parsed.preprocess.mean) == (32, 40, (0.4,) * 3)
    with pytest.raises(RuntimeError, match="the toy has no pretrained weights"):  # the factory decides
        build_backbone(family="custom", factory="tests.test_backbone_families:toy_factory", pretrained=True)


def test_custom_factory_from_the_working_directory_and_a_file(tmp_path, monkeypatch):
    (tmp_path / "my_models_i17.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build(channels=4):
            return nn.Sequential(nn.Conv2d(3, channels, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_models_i17", raising=False)
    bb = seeded(family="custom", factory="my_models_i17:build", model_kwargs={"channels": 5}, layers=["1"])
    assert bb.feature_dims == {"1": 5}
    assert bb.preprocess.crop_size == 224 and bb.preprocess.crop_pct == 1.0  # the documented default
    from_file = seeded(family="custom", factory=f"{tmp_path / 'my_models_i17.py'}:build")
    assert from_file.n_features == 4  # embed: the model's output
    with pytest.raises(WeightsError, match="takes no 'pretrained' argument"):
        build_backbone(family="custom", factory="my_models_i17:build", pretrained=True)
    for factory, message in [("no_such_module_i17:build", "cannot import no_such_module_i17"),
                             ("my_models_i17:nope", "has no callable 'nope'"), ("my_models_i17", "module:callable")]:
        with pytest.raises(ValueError, match=message) as err:
            build_backbone(family="custom", factory=factory)
        assert "\n" not in str(err.value)


def test_custom_weights_path_round_trip(tmp_path):
    bb = seeded(family="custom", factory="tests.test_backbone_families:toy_factory", layers=["stem"])
    torch.save(bb.model.state_dict(), tmp_path / "toy.pt")
    loaded = seeded(seed=3, family="custom", factory="tests.test_backbone_families:toy_factory", layers=["stem"],
                    weights_path=str(tmp_path / "toy.pt"))
    x = batch(bb)
    assert torch.equal(loaded(x), bb(x))


@pytest.mark.parametrize("source", [dict(family="timm", model="resnet18"),
                                    dict(family="open_clip", model="RN50", tag="openai"),
                                    dict(family="torchvision", model="alexnet")], ids=lambda s: s["family"])
def test_family_pretrained_offline_fails_fast(tmp_path, monkeypatch, source):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(WeightsError, match="weights_path"):
        build_backbone(pretrained=True, **source)


# ----------------------------------------------------------------------------- the module lister


def test_modules_lister(capsys):
    main(["--modules", "timm:resnet18", "--image-size", str(SMALL)])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:] if line and not line.startswith(("(", "named"))}
    assert rows["layer4.1.act2"] == ["ReLU", "512x2x2"] and rows["layer2"] == ["Sequential", "128x8x8"]
    assert "fc" not in rows and "(1 modules do not run" in out  # timm's embed is the pre-logits: no classifier
    assert "named layers: act1, layer1" in out
    main(["--modules", "alexnet"])
    assert "features.11  [= conv5]" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="error: .*neither a preset"):
        main(["--modules", "foo:bar"])
    with pytest.raises(ValueError, match=r"'layer5': close matches layer1, layer2, layer3, layer4"):
        build_backbone(family="timm", model="resnet18", layers=["layer5"], image_size=SMALL)


# ----------------------------------------------------------------------------- train.py


FAST = ["experiment=demo", "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "logger=none"]


@pytest.mark.parametrize("backbone", [
    ["backbone=timm", "backbone.model=resnet18", "backbone.layers=[layer2,layer3]", "backbone.image_size=32",
     "head=ridge"],
    ["backbone=custom", "backbone.factory=tests.test_backbone_families:toy_factory", "backbone.layers=[stem,embed]",
     "head=linear"],
], ids=["timm", "custom"])
def test_train_and_reload_a_family_backbone(make_cfg, synthetic_root, tmp_path, backbone):
    """The issue's commands, on the synthetic data; the run records the backbone and is reloaded from it."""
    from encoders.trained import load_trained
    from train import train

    cfg = make_cfg(FAST + [f"data.root={synthetic_root}", "data.synthetic=null", "backbone.pretrained=false",
                           *backbone])
    result = train(cfg, tmp_path / "run")
    info = json.loads((result.run_dir / "run.json").read_text())
    described = info["backbone_spec"]
    assert described == result.model.backbone.describe()
    assert set(described["layers"]) == set(cfg.backbone.layers) and described["preprocess"]["crop_size"] == 32
    assert np.isfinite(json.loads((result.run_dir / "metrics.json").read_text())["test"]["r_mean"])
    encoder = load_trained(result.run_dir)  # rebuilt from config.yaml; its weights checked against the cache's
    assert encoder.backbone.describe() == described
    assert weights_fingerprint(encoder.backbone.model) == weights_fingerprint(result.model.backbone.model)
