"""Preprocessing as data: a small spec that fully determines how an image becomes a backbone's input.

    p = Preprocess(crop_size=224, resize_size=256, interpolation="bilinear")   # torchvision's ResNet/AlexNet
    p = from_timm_config(timm.data.resolve_model_data_config(model))          # timm's eval transform
    p = p.with_overrides(crop_pct=1.0)                                         # full field: resize 224, crop 224
    x = ImageTransform.from_preprocess(p)(uint8_image)                         # (H, W, 3) uint8 -> (3, 224, 224)
    x = BatchTransform(p)(decoded, device="cuda")                              # uint8 (B, H, W, 3) -> (B, 3, 224, 224)
    p.to_dict()                                                                # what run.json and the cache key record

The libraries' own eval transforms are read into this spec (timm ``resolve_data_config`` + its eval
transform, torchvision ``weights.transforms()``, open_clip's preprocess cfg), and the per-image transform
is built from the spec alone, so two runs with equal specs preprocess identically and the spec can be
applied elsewhere (e.g. as batched tensor ops). The libraries apply their transforms to PIL images; this
one resizes uint8 tensors with the same interpolation kernels (antialiased, rounded back to uint8 like
PIL): on photographs the two agree within 1 uint8 level for all but a few pixels (at most 2 levels;
0.005 levels on average), measured against each library's transform object in tests/test_preprocess.py.

``BatchTransform`` is the same spec as batched tensor ops on any device, for images only decoded by the
loader (``decode_rgb``: uint8 (H, W, 3)). On the CPU it runs the very kernels of the per-image transform
(identical output); elsewhere (CUDA) the resize is float32 interpolation in two passes, each rounded back
to uint8 levels, which differs from the CPU's fixed-point uint8 kernel by 1 level on under 0.5 % of the
values (at most 2 levels; ``resize_arithmetic`` names which one runs; tests/test_preprocess_batch.py gives
the measured figures and the asserted tolerance).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch

__all__ = ["Preprocess", "ImageTransform", "BatchTransform", "decode_rgb", "resize_arithmetic", "from_timm_config",
           "from_torchvision_weights", "from_open_clip_cfg", "from_transform", "from_mapping", "IMAGENET_MEAN",
           "IMAGENET_STD"]

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

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of an image after step 2 (torchvision's rule for "shortest")."""
        r = self.resize_size
        if self.resize_mode == "squash":
            return r, r
        if width <= height:
            return int(r * height / width), r
        return r, int(r * width / height)

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


# ----------------------------------------------------------------------------- decoding, and the batched transform


def decode_rgb(image: Any) -> torch.Tensor:
    """What a loader worker does on the device path: PIL / numpy (H, W[, C]) uint8 -> uint8 tensor (H, W, 3),
    channels last as decoded (no copy for an RGB array; grey repeated to 3 channels, an alpha channel dropped).
    The checks of the per-image transform (uint8 only; 1, 3 or 4 channels)."""
    x = _to_rgb_tensor(image).permute(1, 2, 0)  # (H, W, 3), a view of the array for RGB input
    return x if x.is_contiguous() else x.contiguous()


def _native_uint8_on_cpu(interpolation: str) -> bool:
    """Whether torchvision resizes uint8 CPU tensors with torch's fixed-point uint8 kernel (as the per-image
    transform does) rather than through float32 (bilinear on CPUs without AVX2)."""
    from torchvision.transforms import InterpolationMode
    try:
        from torchvision.transforms.v2.functional._geometry import _do_native_uint8_resize_on_cpu
    except ImportError:  # torchvision's rule as of 0.17-0.29
        import platform
        return interpolation == "bicubic" or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") \
            or platform.machine() in ("aarch64", "arm64")
    return bool(_do_native_uint8_resize_on_cpu(InterpolationMode(interpolation)))


def resize_arithmetic(preprocess: Preprocess, device: str | torch.device = "cpu") -> str:
    """How the resize of a uint8 image computes its pixels on ``device`` (recorded with the features: the
    arithmetic, not the code path, decides the values).

    "nearest": pixels are picked, the same everywhere. On the CPU, the per-image and the batched transform
    alike: "uint8", torch's fixed-point uint8 kernel (PIL's algorithm: a horizontal then a vertical pass,
    each rounded to uint8), or "float32" where torchvision resizes uint8 through float32 in one pass
    (bilinear on CPUs without AVX2). Elsewhere (CUDA), ``BatchTransform``: "float32-separable", the two
    passes in float32, each clamped to 0..255 and rounded half up."""
    if preprocess.interpolation == "nearest":
        return "nearest"
    if torch.device(device).type == "cpu":
        return "uint8" if _native_uint8_on_cpu(preprocess.interpolation) else "float32"
    return _FLOAT_PASSES


_FLOAT_PASSES = "float32-separable"  # BatchTransform's own float arithmetic (CUDA, or float_resize=True)


class BatchTransform:
    """A Preprocess as batched tensor ops on any device: decoded uint8 images -> normalised float32.

    ``__call__(images, device)``: images uint8 (B, H, W, 3) (one size), or a sequence of uint8 (H, W, 3)
    tensors of any sizes (e.g. JPEGs) -> (B, 3, crop_size, crop_size) float32 on ``device``, in input order,
    contiguous. Images are moved to the device (non_blocking: pin them first for CUDA), grouped by size, and
    each group is resized in one call; then crop, scale and normalise as ``ImageTransform`` does:

    - on the CPU the very torchvision calls of the per-image transform on the batch, hence the same values;
    - elsewhere (CUDA) torch's float32 interpolation in PIL's order, a horizontal then a vertical pass, each
      clamped to 0..255 and rounded half up to a whole level as PIL's uint8 passes are ("float32-separable").
      On photographs one float pass rounded once differs from the CPU's uint8 kernel by 1 level on 11-20 %
      of the values and, for bicubic, by up to 17 levels where the kernel clips its intermediate image; the
      two passes differ by 1 level on under 0.5 % of them, at most 2 levels (against the libraries' PIL
      transforms at most 1; tests/test_preprocess_batch.py). ``float_resize=True`` runs this arithmetic on
      the CPU too (to test it without a GPU).

    ``arithmetic(device)`` names the resize arithmetic used there (``resize_arithmetic``).
    """

    def __init__(self, preprocess: Preprocess, float_resize: bool = False):
        self.preprocess = preprocess
        self.float_resize = bool(float_resize)
        p = preprocess
        self._size = [p.resize_size] if p.resize_mode == "shortest" else [p.resize_size, p.resize_size]

    def arithmetic(self, device: str | torch.device) -> str:
        """resize_arithmetic of this transform on ``device``."""
        if self.float_resize and self.preprocess.interpolation != "nearest":
            return _FLOAT_PASSES
        return resize_arithmetic(self.preprocess, device)

    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor],
                 device: str | torch.device | None = None) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"BatchTransform expects uint8 images (B, H, W, 3), got {images.dtype} "
                                 f"{tuple(images.shape)}")
            device = torch.device(device) if device is not None else images.device
            return self._group(images.to(device, non_blocking=True), device).contiguous()
        images = list(images)
        if not images:
            raise ValueError("BatchTransform got no images")
        for x in images:
            if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 3 or x.shape[-1] != 3:
                raise ValueError(f"BatchTransform expects uint8 images (H, W, 3), got "
                                 f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
        device = torch.device(device) if device is not None else images[0].device
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(images):
            groups.setdefault(tuple(x.shape), []).append(i)
        moved = [x.to(device, non_blocking=True) for x in images]
        if len(groups) == 1:
            return self._group(torch.stack(moved), device).contiguous()
        s = self.preprocess.crop_size
        out = torch.empty((len(images), 3, s, s), dtype=torch.float32, device=device)
        for rows in groups.values():
            out[torch.tensor(rows, device=device)] = self._group(torch.stack([moved[i] for i in rows]), device)
        return out

    def _group(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        """uint8 (b, H, W, 3) of one size on ``device`` -> (b, 3, S, S) float32."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        p = self.preprocess
        x = x.permute(0, 3, 1, 2)  # (b, 3, H, W), channels last in memory as the per-image transform has it
        if self.arithmetic(device) != _FLOAT_PASSES:  # the per-image transform's own calls
            x = TF.resize(x, self._size, interpolation=InterpolationMode(p.interpolation), antialias=p.antialias)
            x = TF.to_dtype(TF.center_crop(x, [p.crop_size]), torch.float32, scale=True)
        else:
            x = TF.center_crop(self._float_resize(x), [p.crop_size]).mul_(1.0 / 255)  # to_dtype(scale=True)
        return TF.normalize(x, list(p.mean), list(p.std))

    def _float_resize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (b, 3, H, W) -> the resized uint8 values as float32 (b, 3, h, w): torch's float32 interpolation,
        horizontal then vertical pass, each clamped and rounded half up, as PIL's uint8 passes."""
        p = self.preprocess
        height, width = x.shape[-2:]
        new_h, new_w = p.resized_shape(height, width)
        passes = [(height, new_w), (new_h, new_w)]
        x = x.float()
        for size in passes:
            if tuple(x.shape[-2:]) != size:
                x = torch.nn.functional.interpolate(x, size=size, mode=p.interpolation, align_corners=False,
                                                    antialias=p.antialias)
                x = x.clamp_(0, 255).add_(0.5).floor_()
        return x

    def __repr__(self) -> str:
        return f"BatchTransform({self.preprocess}, float_resize={self.float_resize})"


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
