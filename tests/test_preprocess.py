"""The preprocessing spec: read from each library, and the transform built from it against the library's
own transform object on real photographs.

Tolerance: the libraries resize PIL images, we resize uint8 tensors with the same antialiased kernels.
Measured on these photographs (torch 2.14 / torchvision 0.29 / PIL, 2 cores): at most 2 uint8 levels on
one pixel, 1 level on all others, 0.005 levels on average. Asserted with margin: <= 3 levels, under 0.1 %
of the values more than 1 level apart, < 0.02 levels on average.
"""
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

from encoders.preprocess import (
    IMAGENET_MEAN, IMAGENET_STD, ImageTransform, Preprocess, from_mapping, from_open_clip_cfg, from_timm_config,
    from_torchvision_weights, from_transform,
)

MAX_LEVELS, MEAN_LEVELS, SHARE_OVER_ONE = 3.0, 0.02, 1e-3


def photographs() -> dict[str, Image.Image]:
    """matplotlib's sample photograph (512 x 600 portrait), a square 425 x 425 version (NSD's size), a
    landscape crop, and a small one (upsampled by every transform)."""
    import matplotlib.cbook as cbook

    image = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    return {"portrait": image, "nsd_square": image.resize((425, 425), Image.BICUBIC),
            "landscape": image.crop((0, 100, 512, 400)), "small": image.resize((50, 60), Image.BICUBIC)}


def levels(ours: torch.Tensor, theirs: torch.Tensor, std) -> torch.Tensor:
    """|difference| in uint8 levels (undoing the normalisation's division by std)."""
    return ((ours - theirs) * torch.tensor(std).view(3, 1, 1) * 255).abs()


def library_cases():
    import torchvision
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from timm.data import create_transform

    cases = {}
    for name in ("AlexNet_Weights.IMAGENET1K_V1", "ResNet50_Weights.IMAGENET1K_V2", "Swin_T_Weights.IMAGENET1K_V1"):
        weights = torchvision.models.get_weight(name)
        cases[f"torchvision {name}"] = (weights.transforms(), from_torchvision_weights(weights))
    timm_cfgs = {  # resnet50.tv_in1k, vit_base_patch16_224.dino, a squash crop
        "timm bilinear 0.875": dict(input_size=(3, 224, 224), interpolation="bilinear", crop_pct=0.875),
        "timm bicubic 0.9": dict(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=0.9),
        "timm squash 1.0": dict(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=1.0, crop_mode="squash"),
    }
    for name, cfg in timm_cfgs.items():
        cfg = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_mode": "center", **cfg}
        cases[name] = (create_transform(**cfg), from_timm_config(cfg))
    for mode in ("shortest", "squash"):  # OpenAI CLIP, SigLIP
        cfg = PreprocessCfg(size=224, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic", resize_mode=mode)
        cases[f"open_clip {mode}"] = (image_transform_v2(cfg, is_train=False), from_open_clip_cfg(asdict(cfg)))
    return cases


@pytest.mark.parametrize("case", list(library_cases()))
def test_transform_matches_the_library_transform_on_photographs(case):
    library, spec = library_cases()[case]
    transform = ImageTransform.from_preprocess(spec)
    for label, image in photographs().items():
        theirs = library(image)
        ours = transform(np.asarray(image))
        assert ours.shape == theirs.shape == (3, spec.crop_size, spec.crop_size), label
        diff = levels(ours, theirs, spec.std)
        assert diff.max() <= MAX_LEVELS and diff.mean() < MEAN_LEVELS, (label, float(diff.max()), float(diff.mean()))
        assert (diff > 1.01).float().mean() < SHARE_OVER_ONE, label
        assert torch.equal(transform(image), ours)  # PIL in, the same


def test_library_transform_objects_read_back_into_the_same_spec():
    for case, (library, spec) in library_cases().items():
        assert from_transform(library) == spec, case


def test_spec_values():
    import torchvision

    alexnet = from_torchvision_weights(torchvision.models.get_weight("AlexNet_Weights.IMAGENET1K_V1"))
    assert alexnet == Preprocess(224, 256, "shortest", "bilinear", True, IMAGENET_MEAN, IMAGENET_STD)
    assert alexnet.crop_pct == 0.875
    full = alexnet.with_overrides(crop_pct=1.0)
    assert (full.crop_size, full.resize_size) == (224, 224)
    assert alexnet.with_overrides(image_size=112).resize_size == 128  # the ratio kept
    assert from_timm_config({"input_size": (3, 224, 224), "crop_pct": 0.9}).resize_size == 248  # floor(224 / 0.9)
    assert alexnet.with_overrides(image_size=224, crop_pct=0.9).resize_size == 248
    assert from_mapping({"crop_size": 32}).resize_size == 32
    assert from_mapping({"input_size": (3, 64, 64), "crop_pct": 1.0, "interpolation": "bicubic"}).crop_size == 64
    assert Preprocess(**{**alexnet.to_dict()}) == alexnet  # the recorded dict rebuilds the spec


@pytest.mark.parametrize("bad, message", [
    (dict(crop_size=224, resize_size=200), "crop_pct > 1"),
    (dict(crop_size=224, resize_size=256, resize_mode="longest"), "resize_mode"),
    (dict(crop_size=224, resize_size=256, interpolation="lanczos"), "interpolation"),
    (dict(crop_size=224.5, resize_size=256), "positive integer"),
    (dict(crop_size=224, resize_size=256, std=(0.2, 0.0, 0.2)), "std"),
])
def test_bad_specs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        Preprocess(**bad)


def test_unreadable_transforms_and_keys_are_refused():
    from torchvision import transforms

    with pytest.raises(ValueError, match="RandomHorizontalFlip has no equivalent"):
        from_transform(transforms.Compose([transforms.Resize(8), transforms.RandomHorizontalFlip(),
                                           transforms.ToTensor(), transforms.Normalize([0] * 3, [1] * 3)]))
    with pytest.raises(ValueError, match="cannot read"):
        from_transform(lambda image: image)
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        from_mapping({"crop_size": 32, "size": 32})
    with pytest.raises(ValueError, match="crop_pct"):
        Preprocess(224, 256).with_overrides(crop_pct=1.5)


def test_grey_and_rgba_images_become_rgb():
    transform = ImageTransform.from_preprocess(Preprocess(8, 8))
    grey = np.random.default_rng(0).integers(0, 256, (10, 12), dtype=np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    assert torch.equal(transform(grey), transform(rgb))
    rgba = np.concatenate([rgb, np.full((10, 12, 1), 7, np.uint8)], axis=2)
    assert torch.equal(transform(rgba), transform(rgb))
    assert torch.equal(transform(Image.fromarray(grey)), transform(rgb))
    with pytest.raises(ValueError, match="uint8"):
        transform(rgb.astype(np.float32))
