"""Preprocessing as data: a small spec that fully determines how an image becomes a backbone's input.

    p = Preprocess(crop_size=224, resize_size=256, interpolation="bilinear")   # torchvision's ResNet/AlexNet
    p = from_timm_config(timm.data.resolve_model_data_config(model))          # timm's eval transform
    p = p.with_overrides(crop_pct=1.0)                                         # full field: resize 224, crop 224
    x = ImageTransform.from_preprocess(p)(uint8_image)                         # (H, W, 3) uint8 -> (3, 224, 224)
    p.to_dict()                                                                # what run.json and the cache key record

The libraries' own eval transforms are read into this spec (timm ``resolve_data_config`` + its eval
transform, torchvision ``weights.transforms()``, open_clip's preprocess cfg), and the per-image transform
is built from the spec alone, so two runs with equal specs preprocess identically and the spec can be
applied elsewhere (e.g. as batched tensor ops). The libraries apply their transforms to PIL images; this
one resizes uint8 tensors with the same interpolation kernels (antialiased, rounded back to uint8 like
PIL): on photographs the two agree within 1 uint8 level for all but a few pixels (at most 2 levels;
0.005 levels on average), measured against each library's transform object in tests/test_preprocess.py.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch

__all__ = ["Preprocess", "ImageTransform", "from_timm_config", "from_torchvision_weights", "from_open_clip_cfg",
           "from_transform", "from_mapping", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("shortest", "squash")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocess:
    """How one image becomes the backbone's input (3, crop_size, crop_size) float32; these fields determine it.

    1. RGB uint8 (H, W, 3): a grey image (H, W) or (H, W, 1) is repeated to 3 channels, an alpha channel dropped.
    2. Resize, as uint8 (rounded, as PIL): ``resize_mode`` "shortest": the shorter side to ``resize_size``, the
       longer one to int(resize_size * long / short) (torchvision's rule); "squash": both sides to
       ``resize_size``. ``interpolation`` nearest | bilinear | bicubic, ``antialias`` (PIL always antialiases).
    3. Centre crop crop_size x crop_size (top = round((h - crop_size) / 2), torchvision's rounding).
    4. float32 / 255, then (x - mean) / std per channel.

    crop_pct = crop_size / resize_size: 1.0 keeps the whole field (of a square image), 0.875 is
    torchvision's 256 -> 224.
    """

    crop_size: int
    resize_size: int
    resize_mode: str = "shortest"
    interpolation: str = "bilinear"
    antialias: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        for key in ("crop_size", "resize_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"preprocess {key} must be a positive integer, got {value!r}")
            object.__setattr__(self, key, int(value))
        if self.resize_size < self.crop_size:
            raise ValueError(f"preprocess resize_size {self.resize_size} < crop_size {self.crop_size} "
                             f"(crop_pct > 1 would pad the image)")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"preprocess resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"preprocess interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"preprocess mean/std must be 3 values each (std > 0), got {self.mean} / {self.std}")

    @property
    def crop_pct(self) -> float:
        return self.crop_size / self.resize_size

    def with_overrides(self, image_size: int | None = None, crop_pct: float | None = None,
                       interpolation: str | None = None, mean: Sequence[float] | None = None,
                       std: Sequence[float] | None = None, resize_mode: str | None = None) -> "Preprocess":
        """This spec with user overrides. image_size: the crop size (the crop_pct is kept unless given);
        crop_pct: resize_size = floor(image_size / crop_pct) (timm's rule), in (0, 1]."""
        size = self.crop_size if image_size is None else int(image_size)
        if crop_pct is not None and not 0 < float(crop_pct) <= 1:
            raise ValueError(f"backbone.crop_pct must be in (0, 1], got {crop_pct}")
        if crop_pct is not None:
            resize = math.floor(size / float(crop_pct))
        elif image_size is not None:  # keep the ratio resize_size / crop_size
            resize = size * self.resize_size // self.crop_size
        else:
            resize = self.resize_size
        return replace(self, crop_size=size, resize_size=resize,
                       resize_mode=resize_mode or self.resize_mode,
                       interpolation=interpolation or self.interpolation,
                       mean=tuple(mean) if mean is not None else self.mean,
                       std=tuple(std) if std is not None else self.std)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (lists for mean/std)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def transform(self) -> "ImageTransform":
        return ImageTransform.from_preprocess(self)


# ----------------------------------------------------------------------------- the per-image transform


def _to_rgb_tensor(image: Any) -> torch.Tensor:
    """PIL / numpy (H, W[, C]) uint8 / tensor (C, H, W) uint8 -> uint8 tensor (3, H, W)."""
    if isinstance(image, torch.Tensor):
        x = image if image.ndim == 3 else image[None]
    else:
        arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        if arr.dtype != np.uint8:  # a float image in 0..255 (or 0..1) would pass the scaling step unscaled
            raise ValueError(f"image array has dtype {arr.dtype}, expected uint8 (H, W, 3) RGB 0..255")
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if not arr.flags.writeable:
            arr = arr.copy()
        if arr.ndim != 3:
            raise ValueError(f"expected an image (H, W) or (H, W, C), got shape {arr.shape}")
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    if x.dtype != torch.uint8:
        raise ValueError(f"image tensor has dtype {x.dtype}, expected uint8 (3, H, W) RGB 0..255")
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    elif x.shape[0] == 4:
        x = x[:3]
    elif x.shape[0] != 3:
        raise ValueError(f"expected 1, 3 or 4 channels, got {x.shape[0]}")
    return x


class ImageTransform:
    """uint8 image (H, W, 3) numpy / PIL -> normalised float32 tensor (3, S, S), as a Preprocess says.

    ``ImageTransform(size, mean, std, interpolation)`` is the full-field transform (resize the shorter
    side to S, centre crop S x S); ``ImageTransform.from_preprocess(p)`` any spec (``.preprocess``).
    """

    def __init__(self, size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 interpolation: str = "bilinear", resize_size: int | None = None, resize_mode: str = "shortest",
                 antialias: bool = True):
        from torchvision.transforms import InterpolationMode, v2

        self.preprocess = Preprocess(size, resize_size or size, resize_mode, interpolation, antialias, mean, std)
        p = self.preprocess
        resize = p.resize_size if p.resize_mode == "shortest" else [p.resize_size, p.resize_size]
        self.pipeline = v2.Compose([
            v2.Resize(resize, interpolation=InterpolationMode(p.interpolation), antialias=p.antialias),
            v2.CenterCrop(p.crop_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(p.mean), std=list(p.std)),
            v2.ToPureTensor(),
        ])

    @classmethod
    def from_preprocess(cls, p: Preprocess) -> "ImageTransform":
        return cls(p.crop_size, p.mean, p.std, p.interpolation, p.resize_size, p.resize_mode, p.antialias)

    # the fields earlier callers read
    size = property(lambda self: self.preprocess.crop_size)
    mean = property(lambda self: self.preprocess.mean)
    std = property(lambda self: self.preprocess.std)
    interpolation = property(lambda self: self.preprocess.interpolation)

    def __call__(self, image: Any) -> torch.Tensor:
        """image (H, W, 3) uint8 -> (3, S, S) float32."""
        from torchvision import tv_tensors

        return self.pipeline(tv_tensors.Image(_to_rgb_tensor(image)))

    def __repr__(self) -> str:
        p = self.preprocess
        return (f"ImageTransform(crop_size={p.crop_size}, resize_size={p.resize_size}, resize_mode={p.resize_mode!r}, "
                f"interpolation={p.interpolation!r}, antialias={p.antialias}, mean={p.mean}, std={p.std})")


# ----------------------------------------------------------------------------- from the libraries


def _square(size: Any, what: str) -> int:
    """An int from 224, (224, 224), [224] or (3, 224, 224); ValueError for a non-square size."""
    if isinstance(size, (int, np.integer)):
        return int(size)
    values = [int(v) for v in size][-2:]
    if len(set(values)) != 1:
        raise ValueError(f"{what}: non-square input size {tuple(size)} is not supported")
    return values[0]


def from_timm_config(cfg: Mapping[str, Any]) -> Preprocess:
    """timm's resolved data config (input_size, crop_pct, crop_mode, interpolation, mean, std) -> the spec
    of timm's eval transform: resize floor(S / crop_pct), centre crop S ("center": shorter side; "squash":
    both sides)."""
    size = _square(cfg["input_size"], "timm data config")
    crop_pct = float(cfg.get("crop_pct") or 0.875)  # timm's DEFAULT_CROP_PCT
    mode = cfg.get("crop_mode") or "center"
    if mode not in ("center", "squash"):
        raise ValueError(f"timm crop_mode {mode!r} is not supported (center, squash)")
    return Preprocess(size, math.floor(size / crop_pct), "shortest" if mode == "center" else "squash",
                      str(cfg.get("interpolation") or "bilinear"), True,
                      tuple(cfg.get("mean") or IMAGENET_MEAN), tuple(cfg.get("std") or IMAGENET_STD))


def from_torchvision_weights(weights: Any) -> Preprocess:
    """A torchvision weights enum member -> the spec of ``weights.transforms()`` (ImageClassification)."""
    return from_transform(weights.transforms())


def from_open_clip_cfg(cfg: Mapping[str, Any]) -> Preprocess:
    """open_clip's PreprocessCfg dict (size, mean, std, interpolation, resize_mode) -> the spec of its eval
    transform (``image_transform_v2(..., is_train=False)``): resize to the size, centre crop it (crop 100 %)."""
    size = _square(cfg["size"], "open_clip preprocess cfg")
    mode = cfg.get("resize_mode") or "shortest"
    if mode not in RESIZE_MODES:
        raise ValueError(f"open_clip resize_mode {mode!r} is not supported ({', '.join(RESIZE_MODES)})")
    return Preprocess(size, size, mode, str(cfg.get("interpolation") or "bicubic"), True,
                      tuple(cfg["mean"]), tuple(cfg["std"]))


_PASS_STEPS = ("ToTensor", "MaybeToTensor", "PILToTensor", "ConvertImageDtype", "ToImage", "ToDtype",
               "MaybeConvertMode", "_convert_to_rgb", "ToPureTensor", "ToImageTensor")


def _floats(values: Any) -> tuple[float, ...]:
    """Values (a float32 tensor, as timm stores them, or floats) -> the shortest floats that give them."""
    if isinstance(values, torch.Tensor):
        return tuple(float(str(np.float32(v))) for v in values.tolist())
    return tuple(float(v) for v in values)


def _interp_name(mode: Any) -> str:
    return str(getattr(mode, "value", mode)).lower()


def from_transform(transform: Any) -> Preprocess:
    """A library eval transform object -> its spec: torchvision's ImageClassification preset, or a (v1/v2)
    Compose of Resize, CenterCrop, tensor conversions and Normalize (timm's and open_clip's eval
    transforms). ValueError naming the step that has no equivalent in the spec."""
    name = type(transform).__name__
    if name == "ImageClassification":
        return Preprocess(_square(transform.crop_size, name), _square(transform.resize_size, name), "shortest",
                          _interp_name(transform.interpolation), bool(transform.antialias if transform.antialias
                                                                      is not None else True),
                          tuple(transform.mean), tuple(transform.std))
    steps = getattr(transform, "transforms", None)
    if steps is None:
        raise ValueError(f"cannot read the preprocessing of a {name}: give a Preprocess, a dict of its fields, "
                         f"torchvision's weights.transforms() or a Compose(Resize, CenterCrop, ToTensor, Normalize)")
    resize = crop = mean = std = None
    mode, interpolation, antialias = "shortest", "bilinear", True
    for step in steps:
        kind = getattr(step, "__name__", type(step).__name__)
        if kind == "Resize":
            size = step.size
            if isinstance(size, (list, tuple)) and len(size) == 2:
                if size[0] != size[1]:
                    raise ValueError(f"Resize to a non-square size {tuple(size)} is not supported")
                mode = "squash"
            if getattr(step, "max_size", None):
                raise ValueError("Resize with max_size is not supported")
            resize = _square(size, "Resize")
            interpolation = _interp_name(step.interpolation)
            antialias = True if step.antialias is None else bool(step.antialias)
        elif kind == "CenterCrop":
            crop = _square(step.size, "CenterCrop")
        elif kind == "Normalize":
            mean, std = _floats(step.mean), _floats(step.std)
        elif kind not in _PASS_STEPS:
            raise ValueError(f"transform step {kind} has no equivalent in the preprocessing spec "
                             f"(Resize, CenterCrop, tensor conversions, Normalize)")
    if resize is None or mean is None:
        raise ValueError(f"transform {name} lacks a Resize or a Normalize step")
    return Preprocess(crop or resize, resize, mode, interpolation, antialias, mean, std)


def from_mapping(d: Mapping[str, Any]) -> Preprocess:
    """A dict: the Preprocess fields (crop_size, resize_size, ...), or a timm-style data config (input_size,
    crop_pct, ...). ValueError naming unknown keys."""
    if "input_size" in d:
        return from_timm_config(d)
    known = {f.name for f in fields(Preprocess)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown preprocessing keys {unknown}; valid: {sorted(known)}")
    if "crop_size" not in d:
        raise ValueError("preprocessing dict needs crop_size (or a timm-style input_size)")
    return Preprocess(**{"resize_size": d["crop_size"], **d})
