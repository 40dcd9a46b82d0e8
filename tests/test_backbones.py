"""Backbone presets: widths, freezing, pooling, weights files, offline behaviour, preprocessing."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import replace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from encoders.backbones import (  # noqa: E402
    REGISTRY, FrozenBackbone, build_backbone, list_backbones, main, pool_features, registry_table,
)
from encoders.weights import WeightsError, read_state_dict  # noqa: E402

ALL = list_backbones()
# Built once per session and shared (read-only) by several tests; others are built per test.
SHARED = ("tiny", "tiny_vit", "resnet50", "alexnet", "clip_rn50", "clip_vitb32")
_CACHE: dict[str, FrozenBackbone] = {}


def shared(name: str) -> FrozenBackbone:
    """A random-init backbone with every layer selected, built once (seeded)."""
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = build_backbone(name, layers="all")
    return _CACHE[name]


def rewrap(bb: FrozenBackbone, **kwargs) -> FrozenBackbone:
    """Another FrozenBackbone (other layers / pooling) around the same wrapped model."""
    return FrozenBackbone(bb.spec, bb.model, **kwargs)


def images(name: str, n: int = 2, seed: int = 0) -> torch.Tensor:
    size = shared(name).preprocess.crop_size if name in SHARED else NSD_PREPROCESS[name][0]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def _small_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)
    _CACHE.clear()


# ----------------------------------------------------------------------------- library configs


def library_preprocess(bb: FrozenBackbone) -> dict:
    """crop/resize/interpolation/mean/std as the library itself resolves them for this model."""
    spec, model = bb.spec, bb.model
    if spec.library == "open_clip":
        cfg = model.visual.preprocess_cfg  # open_clip attaches the tag's cfg at the tower's size
        size = cfg["size"][0] if isinstance(cfg["size"], tuple) else cfg["size"]
        return dict(mean=cfg["mean"], std=cfg["std"], interpolation=cfg["interpolation"], crop=size,
                    resize=size, mode=cfg["resize_mode"])
    if spec.library == "torchvision":
        import torchvision

        tf = torchvision.models.get_model_weights(spec.model_id)[spec.hub_weights].transforms()
        return dict(mean=tf.mean, std=tf.std, interpolation=tf.interpolation.value, crop=tf.crop_size[0],
                    resize=tf.resize_size[0], mode="shortest")
    if spec.name == "tiny":
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        return dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, interpolation="bilinear", crop=64,
                    resize=64, mode="shortest")
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    # timm keeps the pretrained cfg's input_size (518 for DINOv2) when a model is built with another
    # img_size: the size the model really takes is patch_embed's.
    size = model.patch_embed.img_size[0] if hasattr(model, "patch_embed") else cfg["input_size"][1]
    return dict(mean=cfg["mean"], std=cfg["std"], interpolation=cfg["interpolation"], crop=size,
                resize=math.floor(size / cfg["crop_pct"]), mode="shortest")


# What a square 425x425 NSD image goes through for each preset (the README's table):
# (crop, resize, resize mode, interpolation).
NSD_PREPROCESS = {
    "tiny": (64, 64, "shortest", "bilinear"), "tiny_vit": (64, 64, "shortest", "bicubic"),
    "tiny_clip": (64, 64, "shortest", "bicubic"),
    "resnet50": (224, 256, "shortest", "bilinear"), "alexnet": (224, 256, "shortest", "bilinear"),
    "clip_rn50": (224, 224, "shortest", "bicubic"), "clip_vitb32": (224, 224, "shortest", "bicubic"),
    "clip_vitb16": (224, 224, "shortest", "bicubic"), "dino_vitb16": (224, 248, "shortest", "bicubic"),
    "dinov2_vitb14": (224, 224, "shortest", "bicubic"), "siglip_vitb16": (224, 224, "squash", "bicubic"),
}


def library_prefix_tokens(bb: FrozenBackbone) -> int:
    model = bb.model
    if hasattr(model, "num_prefix_tokens"):
        return model.num_prefix_tokens
    visual = getattr(model, "visual", None)
    if visual is not None and hasattr(visual, "trunk"):
        return visual.trunk.num_prefix_tokens
    if visual is not None and hasattr(visual, "class_embedding"):
        return 1
    return 0


# ----------------------------------------------------------------------------- every entry


def test_registry_names_and_specs():
    assert set(ALL) >= {"tiny", "tiny_vit", "resnet50", "alexnet", "clip_rn50", "clip_vitb32",
                        "clip_vitb16", "dino_vitb16", "dinov2_vitb14", "siglip_vitb16"}
    for spec in REGISTRY.values():
        assert set(spec.default_layers) <= set(spec.layers)
        assert all(ls.kind in ("conv", "tokens", "vector") for ls in spec.layers.values())
    text = registry_table()
    assert all(name in text for name in ALL) and "pool5 (9216)" in text


@pytest.mark.parametrize("name", ALL)
def test_entry_builds_with_spec_widths_and_preprocessing(name):
    spec = REGISTRY[name]  # the declared widths, checked against the built model's
    bb = shared(name) if name in SHARED else build_backbone(name, layers="all")
    x = images(name)
    feats = bb.forward_layers(x)
    assert list(feats) == list(spec.layers)
    assert {k: v.shape for k, v in feats.items()} == \
        {k: (2, ls.width) for k, ls in spec.layers.items()}
    assert bb.feature_dims == {k: ls.width for k, ls in spec.layers.items()}
    out = bb(x)
    assert out.shape == (2, bb.n_features) and bb.n_features == sum(ls.width for ls in spec.layers.values())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out, torch.cat(list(feats.values()), dim=1))
    assert out[:, bb.feature_slices["embed" if "embed" in spec.layers else spec.default_layers[0]]].shape[1] \
        == spec.layers["embed" if "embed" in spec.layers else spec.default_layers[0]].width

    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    t = bb.transform(image)
    crop, resize, mode, interpolation = NSD_PREPROCESS[name]
    assert type(t) is torch.Tensor and t.shape == (3, crop, crop) and t.dtype == torch.float32

    p, lib = bb.preprocess, library_preprocess(bb)
    assert (p.crop_size, p.resize_size, p.resize_mode, p.interpolation) == (crop, resize, mode, interpolation)
    assert (lib["crop"], lib["resize"], lib["mode"], lib["interpolation"]) == (crop, resize, mode, interpolation)
    assert p.mean == pytest.approx(tuple(lib["mean"])) and p.std == pytest.approx(tuple(lib["std"]))
    assert bb.spec.input_size == crop and bb.spec.mean == p.mean  # the fields analyses read
    assert bb.spec.n_prefix_tokens == library_prefix_tokens(bb)
    if bb.spec.n_prefix_tokens == 0 and "blocks.1" in spec.layers:  # no CLS: auto = patch-token mean
        tokens = rewrap(bb, layers=["blocks.1"], pooling="flatten")(x).reshape(2, -1, 768)
        torch.testing.assert_close(feats["blocks.1"], tokens.mean(dim=1))


@pytest.mark.parametrize("name", ["tiny_vit", "clip_vitb32"])
def test_auto_token_pooling_is_cls_or_patch_mean(name):
    bb = shared(name)
    spec = bb.spec
    x = images(name)
    auto = rewrap(bb, layers=["blocks.1"])(x)
    tokens = rewrap(bb, layers=["blocks.1"], pooling="flatten")(x).reshape(2, -1, spec.layers["blocks.1"].width)
    expected = tokens[:, 0] if spec.n_prefix_tokens else tokens.mean(dim=1)
    torch.testing.assert_close(auto, expected)
    patch_mean = rewrap(bb, layers=["blocks.1"], pooling="avg")(x)
    torch.testing.assert_close(patch_mean, tokens[:, spec.n_prefix_tokens:].mean(dim=1))


# ----------------------------------------------------------------------------- frozen


@pytest.mark.parametrize("name", ["tiny", "resnet50", "clip_rn50"])
def test_frozen_in_train_mode(name):
    bb = shared(name)
    assert not any(p.requires_grad for p in bb.parameters())
    buffers = {k: v.clone() for k, v in bb.model.named_buffers()}
    assert any("running_mean" in k for k in buffers)
    try:
        assert bb.train() is bb and not bb.training
        assert not any(m.training for m in bb.model.modules())
        x = images(name) * 3 + 1
        out = bb(x)
        bb.model.train()  # even a direct .train() on the wrapped model is undone at forward
        bb(x)
        assert not any(m.training for m in bb.model.modules())
    finally:
        bb.eval()
    assert not out.requires_grad
    for key, value in bb.model.named_buffers():
        assert torch.equal(value, buffers[key]), key


# ----------------------------------------------------------------------------- pooling


def test_pooling_modes_tiny_cnn():
    bb = shared("tiny")
    x = images("tiny")
    conv1 = bb.model.conv1(x)
    avg = rewrap(bb, layers=["conv1"], pooling="avg")
    torch.testing.assert_close(avg(x), conv1.mean(dim=(2, 3)))
    flat = rewrap(bb, layers=["conv1", "embed"], pooling="flatten")
    assert flat.feature_dims == {"conv1": 16 * 32 * 32, "embed": 64}
    torch.testing.assert_close(flat.forward_layers(x)["conv1"], conv1.flatten(1))
    torch.testing.assert_close(rewrap(bb, layers=["conv1"], pooling="max")(x), conv1.amax(dim=(2, 3)))
    grid = rewrap(bb, layers=["conv1"], pooling="avg2x2")  # 32x32 map -> 2x2 blocks of 16x16
    assert grid.n_features == 16 * 4
    blocks = conv1.reshape(2, 16, 2, 16, 2, 16).mean(dim=(3, 5))
    torch.testing.assert_close(grid(x), blocks.flatten(1))
    per_layer = rewrap(bb, layers=["conv1", "conv3"], pooling={"conv1": "flatten"})  # conv3: auto = avg
    assert per_layer.feature_dims == {"conv1": 16 * 32 * 32, "conv3": 64}
    with pytest.raises(ValueError, match="cls"):
        rewrap(bb, layers=["conv2"], pooling="cls")
    with pytest.raises(ValueError, match="pooling"):
        rewrap(bb, pooling="median")
    with pytest.raises(ValueError, match="not in backbone.layers"):
        rewrap(bb, layers=["conv1"], pooling={"conv2": "avg"})


def test_pooling_modes_tiny_vit():
    bb = shared("tiny_vit")
    x = images("tiny_vit")
    flat = rewrap(bb, layers=["blocks.0"], pooling="flatten")
    assert flat.n_features == 65 * 64
    tokens = flat(x).reshape(2, 65, 64)
    torch.testing.assert_close(rewrap(bb, layers=["blocks.0"], pooling="cls")(x), tokens[:, 0])
    torch.testing.assert_close(rewrap(bb, layers=["blocks.0"], pooling="avg")(x), tokens[:, 1:].mean(1))
    torch.testing.assert_close(rewrap(bb, layers=["blocks.0"], pooling="max")(x), tokens[:, 1:].amax(1))
    grid = tokens[:, 1:].reshape(2, 8, 8, 64).permute(0, 3, 1, 2)  # the 8x8 patch grid, row-major
    torch.testing.assert_close(rewrap(bb, layers=["blocks.0"], pooling="avg4x4")(x),
                               grid.reshape(2, 64, 4, 2, 4, 2).mean(dim=(3, 5)).flatten(1))
    embed = rewrap(bb, layers=["embed"])(x)
    torch.testing.assert_close(embed, bb.model.forward_head(bb.model.forward_features(x), pre_logits=True))


@pytest.mark.parametrize("name", ["tiny", "tiny_vit"])
def test_normalize_gives_unit_norm_per_layer(name):
    bb = shared(name)
    normed = rewrap(bb, layers="all", normalize=True)
    feats = normed.forward_layers(images(name) * 5)
    for layer, f in feats.items():
        torch.testing.assert_close(f.norm(dim=1), torch.ones(2), msg=layer)
    out = normed(images(name) * 5)
    for layer, sl in normed.feature_slices.items():
        torch.testing.assert_close(out[:, sl].norm(dim=1), torch.ones(2), msg=layer)


def test_unknown_names_raise_one_line_with_close_matches():
    with pytest.raises(ValueError, match=r"'conv9': close matches conv1, conv2, conv3") as err:
        build_backbone("tiny", layers=["conv9"])
    assert "\n" not in str(err.value) and "--modules tiny" in str(err.value)
    with pytest.raises(ValueError, match=r"'blocks\.7': close matches blocks\.0, blocks\.1"):
        rewrap(shared("tiny_vit"), layers=["blocks.7", "embed"])
    with pytest.raises(ValueError, match="resnet50"):
        build_backbone("resnet5")
    with pytest.raises(ValueError, match="is a preset"):
        build_backbone("alexnet", model="vgg16")


def test_preset_layers_by_module_path():
    """A preset reads any module of its model too: conv3's ReLU in-place output equals the named conv3."""
    bb = shared("alexnet")
    x = images("alexnet")
    by_path = rewrap(bb, layers=["features.7", "conv3", "features.8"])
    feats = by_path.forward_layers(x)
    torch.testing.assert_close(feats["features.7"], feats["conv3"])
    torch.testing.assert_close(feats["features.8"], bb.model.features[:9](x).mean(dim=(2, 3)))
    assert by_path.spec.layers["features.8"].shape == (256, 13, 13)


def test_tiny_backbones_are_tiny():
    """The test backbones stay small enough for 2-core CI (a size check, not a timing)."""
    assert sum(p.numel() for p in shared("tiny").parameters()) < 50_000
    assert sum(p.numel() for p in shared("tiny_vit").parameters()) < 200_000
    assert shared("tiny")(images("tiny", n=2)).shape == (2, shared("tiny").n_features)


def test_pool_features_shapes():
    x = torch.randn(2, 5, 3, 4)
    assert pool_features(x, "conv", "avg").shape == (2, 5)
    assert pool_features(x, "conv", "flatten").shape == (2, 60)
    tokens = torch.randn(2, 7, 8)
    torch.testing.assert_close(pool_features(tokens, "tokens", "avg", 2), tokens[:, 2:].mean(1))
    with pytest.raises(ValueError):
        pool_features(x, "conv", "cls")


# ----------------------------------------------------------------------------- library specifics


def test_alexnet_inplace_relu_hooks_match_manual_features():
    bb = shared("alexnet")
    x = images("alexnet")
    convs = rewrap(bb, layers=[f"conv{i}" for i in range(1, 6)] + ["pool5", "fc6"], pooling="flatten")
    feats = convs.forward_layers(x)
    features = bb.model.features
    for i, k in enumerate((1, 4, 7, 9, 11), start=1):
        manual = features[:k + 1](x)
        assert (feats[f"conv{i}"] >= 0).all()
        torch.testing.assert_close(feats[f"conv{i}"], manual.flatten(1))
        avg = rewrap(bb, layers=[f"conv{i}"]).forward_layers(x)[f"conv{i}"]
        torch.testing.assert_close(avg, manual.mean(dim=(2, 3)))
    pool5 = bb.model.avgpool(features(x)).flatten(1)
    torch.testing.assert_close(feats["pool5"], pool5)
    torch.testing.assert_close(feats["fc6"], torch.relu(bb.model.classifier[1](pool5)))
    assert rewrap(bb, layers=["pool5"], pooling="avg").feature_dims == {"pool5": 256}


def test_open_clip_sequence_first_transformer_gives_batch_first_tokens():
    bb = shared("clip_vitb32")
    x = images("clip_vitb32")
    reference = rewrap(bb, layers=["blocks.2"], pooling="flatten")(x)
    transformer = bb.model.visual.transformer
    attns = [blk.attn for blk in transformer.resblocks]
    try:  # the same weights run sequence-first (L, n, d), as older open_clip models do
        transformer.batch_first = False
        for attn in attns:
            attn.batch_first = False
        # a fresh probe of the module (a built spec records each layer's layout)
        seq_first = FrozenBackbone(replace(bb.spec, layers={}), bb.model,
                                   layers=["visual.transformer.resblocks.2"], pooling="flatten")
        assert seq_first.spec.layers["visual.transformer.resblocks.2"].layout == "lnd"
        torch.testing.assert_close(seq_first(x), reference, rtol=1e-4, atol=1e-5)
    finally:
        transformer.batch_first = True
        for attn in attns:
            attn.batch_first = True
    assert reference.shape == (2, 50 * 768)


def test_open_clip_family_spelling_of_an_openai_preset_builds_quickgelu():
    """open_clip RN50 + tag openai = the clip_rn50 preset (RN50-quickgelu): OpenAI's weights were trained with
    QuickGELU, which the family spelling builds too (the text tower's activations show it)."""
    from encoders.feature_cache import weights_fingerprint

    preset = shared("clip_rn50")
    torch.manual_seed(0)
    family = build_backbone(family="open_clip", model="RN50", tag="openai", layers="all")
    assert family.spec.name == "open_clip:RN50/openai" and family.preprocess == preset.preprocess
    assert weights_fingerprint(family.model) == weights_fingerprint(preset.model)
    x = images("clip_rn50", n=1)
    assert torch.equal(family(x), rewrap(preset, layers="all")(x))
    text = torch.zeros(1, 77, dtype=torch.long)
    text[0, :3] = torch.tensor([49406, 320, 49407])
    with torch.no_grad():
        assert torch.equal(family.model.encode_text(text), preset.model.encode_text(text))


# ----------------------------------------------------------------------------- weights files


def test_weights_path_round_trip_tiny(tmp_path):
    bb = shared("tiny")
    x = images("tiny")
    expected = rewrap(bb, layers="all")(x)
    wrapped = tmp_path / "ddp_checkpoint.pt"  # {"state_dict": ...} with DDP "module." keys
    torch.save({"state_dict": {f"module.{k}": v for k, v in bb.model.state_dict().items()}}, wrapped)
    from safetensors.torch import save_file

    safe = tmp_path / "tiny.safetensors"
    save_file(bb.model.state_dict(), str(safe))
    for path in (wrapped, safe):
        torch.manual_seed(123)
        loaded = build_backbone("tiny", weights_path=str(path), layers="all")
        assert torch.equal(loaded(x), expected)


@pytest.mark.parametrize("name,suffix", [("alexnet", ".pth"), ("clip_rn50", ".pt")])
def test_weights_path_round_trip_large(tmp_path, name, suffix):
    bb = shared(name)
    x = images(name, n=1)
    path = tmp_path / f"{name}{suffix}"
    torch.save(bb.model.state_dict(), path)
    torch.manual_seed(123)
    loaded = build_backbone(name, weights_path=str(path), layers="all")
    path.unlink()
    assert torch.equal(loaded(x), rewrap(bb, layers="all")(x))
    if name == "clip_rn50":  # the text tower travels with the model
        text = torch.zeros(1, 77, dtype=torch.long)
        assert torch.equal(loaded.model.encode_text(text), bb.model.encode_text(text))


def test_weights_path_errors(tmp_path):
    missing = tmp_path / "nope" / "weights.pt"
    with pytest.raises(WeightsError, match="weights file not found") as err:
        build_backbone("tiny", weights_path=str(missing))
    assert str(missing) in str(err.value)

    state = dict(shared("tiny").model.state_dict())
    state["conv1.0.wrong"] = state.pop("conv1.0.weight")
    bad_key = tmp_path / "bad_key.pt"
    torch.save(state, bad_key)
    with pytest.raises(WeightsError, match=r"conv1\.0\.wrong") as err:
        build_backbone("tiny", weights_path=str(bad_key))
    assert str(bad_key) in str(err.value) and "conv1.0.weight" in str(err.value)

    state = dict(shared("tiny").model.state_dict())
    state["fc.weight"] = torch.zeros(3, 3)
    bad_shape = tmp_path / "bad_shape.pt"
    torch.save(state, bad_shape)
    with pytest.raises(WeightsError, match=r"fc\.weight: file \(3, 3\) vs model \(64, 64\)"):
        build_backbone("tiny", weights_path=str(bad_shape))

    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read") as err:
        build_backbone("tiny", weights_path=str(garbage))
    assert str(garbage) in str(err.value)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_torchscript_archives_are_read_for_open_clip_only(tmp_path):
    """OpenAI's original CLIP checkpoints are TorchScript archives."""
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(torch.nn.Linear(2, 3)).save(str(path))
    state = read_state_dict(path, "clip_x", allow_torchscript=True)
    assert set(state) == {"weight", "bias"} and state["weight"].shape == (3, 2)
    with pytest.raises(WeightsError, match="cannot read"):
        read_state_dict(path, "tiny")


# ----------------------------------------------------------------------------- pretrained


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path


@pytest.mark.parametrize("name", ALL)
def test_pretrained_offline_fails_fast(empty_caches, name):
    start = time.perf_counter()
    with pytest.raises(WeightsError, match="weights_path"):
        build_backbone(name, pretrained=True)
    assert time.perf_counter() - start < 10


def test_pretrained_loads_from_local_hf_cache(empty_caches):
    """A timm checkpoint already in the HF cache is loaded offline, through timm."""
    from safetensors.torch import save_file

    source = shared("resnet50")
    snapshot = empty_caches / "hf" / "hub" / "models--timm--resnet50.tv_in1k"
    commit = "0" * 40
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text(commit)
    (snapshot / "snapshots" / commit).mkdir(parents=True)
    save_file(source.model.state_dict(), str(snapshot / "snapshots" / commit / "model.safetensors"))
    torch.manual_seed(7)
    loaded = build_backbone("resnet50", pretrained=True)
    x = images("resnet50", n=1)
    assert torch.equal(loaded(x), rewrap(source, layers=["pool"])(x))


def test_backbone_survives_deepcopy_and_pickle():
    import copy
    import pickle

    bb = rewrap(shared("tiny_vit"), layers=["blocks.0", "embed"])
    x = images("tiny_vit")
    for clone in (copy.deepcopy(bb), pickle.loads(pickle.dumps(bb))):
        assert clone.model is not bb.model
        torch.testing.assert_close(clone(x), bb(x))
        clone.model.blocks[0].attn.qkv.weight.data.zero_()  # the clone runs its own model
        assert not torch.allclose(clone(x), bb(x))
    image = np.zeros((10, 12, 3), dtype=np.uint8)
    assert torch.equal(pickle.loads(pickle.dumps(bb.transform))(image), bb.transform(image))


def test_cli_prints_registry(capsys):
    main([])
    out = capsys.readouterr().out
    assert all(name in out for name in ALL) and "blocks.11 (768)" in out and "families: timm" in out
