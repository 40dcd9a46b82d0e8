"""Registry of named frozen vision backbones with layer-wise pooled features.

    >>> bb = build_backbone("clip_vitb32", layers=["blocks.5", "embed"])
    >>> x = torch.stack([bb.transform(img) for img in images])   # (n, 3, 224, 224)
    >>> bb(x).shape                                              # (n, 768 + 512)

Intermediate layers are read with forward hooks on named modules of the wrapped
library model; the pseudo-layer ``embed`` is the model's own image embedding.
``python -m encoders.backbones`` prints the registry.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from encoders import tiny
from encoders.weights import (
    WeightsError,
    adapt_open_clip_state_dict,
    adapt_timm_state_dict,
    cached_hf_file,
    hf_cache_dir,
    hf_endpoint,
    load_weights_file,
    not_cached_error,
    torch_hub_checkpoint,
    unreachable_reason,
)

__all__ = [
    "LayerSpec", "BackboneSpec", "REGISTRY", "list_backbones", "FrozenBackbone",
    "ImageTransform", "build_backbone", "pool_features", "WeightsError",
]

KINDS = ("conv", "tokens", "vector")
POOLINGS = ("auto", "avg", "cls", "flatten")
EMBED = "embed"


@dataclass(frozen=True)
class LayerSpec:
    """One readable layer.

    module: dotted path of the module to hook, relative to the wrapped model, or ""
        for the model's final output (the ``embed`` pseudo-layer).
    width: feature width after the layer's default pooling.
    kind: "conv" (n, c, h, w) | "tokens" (n, L, d) | "vector" (n, d).
    pool: default pooling for this layer; "auto" = avg for conv maps, CLS (or the
        patch-token mean without CLS) for tokens, identity for vectors.
    """

    module: str
    width: int
    kind: str
    pool: str = "auto"


@dataclass(frozen=True)
class BackboneSpec:
    """A named backbone: how to build it, preprocess for it, and read it.

    model_id: the library's architecture name (timm / open_clip / torchvision / tiny).
    hub_weights: the pretrained weights (timm "name.tag", open_clip pretrained tag,
        torchvision "Enum.MEMBER"), or None if there are none.
    model_kwargs: extra constructor kwargs (e.g. timm ``img_size``).
    """

    name: str
    library: str
    model_id: str
    hub_weights: str | None
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    n_prefix_tokens: int
    layers: dict[str, LayerSpec]
    default_layers: tuple[str, ...]
    model_kwargs: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- registry

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_OPENAI = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _blocks(prefix: str, depth: int, width: int) -> dict[str, LayerSpec]:
    """``blocks.0`` .. ``blocks.{depth-1}`` token layers hooked at ``{prefix}{i}``."""
    return {f"blocks.{i}": LayerSpec(f"{prefix}{i}", width, "tokens") for i in range(depth)}


def _convs(prefix: str, names: Sequence[str], widths: Sequence[int]) -> dict[str, LayerSpec]:
    """Conv layers named ``names`` hooked at ``{prefix}{name}``."""
    return {n: LayerSpec(f"{prefix}{n}", w, "conv") for n, w in zip(names, widths)}


def _embed(width: int) -> dict[str, LayerSpec]:
    return {EMBED: LayerSpec("", width, "vector")}


_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
_RESNET_WIDTHS = (256, 512, 1024, 2048)


def _spec(name: str, library: str, model_id: str, hub_weights: str | None, size: int,
          norm: tuple, interpolation: str, n_prefix: int, layers: dict[str, LayerSpec],
          default: tuple[str, ...] = (EMBED,), **model_kwargs: Any) -> BackboneSpec:
    return BackboneSpec(name, library, model_id, hub_weights, size, norm[0], norm[1],
                        interpolation, n_prefix, layers, default, dict(model_kwargs))


def _clip_vit(name: str, model_id: str) -> BackboneSpec:
    return _spec(name, "open_clip", model_id, "openai", 224, _OPENAI, "bicubic", 1,
                 {**_blocks("visual.transformer.resblocks.", 12, 768), **_embed(512)})


def _timm_vit(name: str, model_id: str, hub_weights: str, **kw: Any) -> BackboneSpec:
    return _spec(name, "timm", model_id, hub_weights, 224, _IMAGENET, "bicubic", 1,
                 {**_blocks("blocks.", 12, 768), **_embed(768)}, **kw)


# OpenAI CLIP weights were trained with QuickGELU.  open_clip >= 2.x no longer
# special-cases pretrained="openai": create_model("ViT-B-32", pretrained="openai")
# builds nn.GELU and only warns.  The "-quickgelu" configs build the right model.
_SPECS = [
    _spec("tiny", "tiny", "tiny_cnn", None, tiny.TINY_INPUT_SIZE, _IMAGENET, "bilinear", 0,
          {**_convs("", ("conv1", "conv2", "conv3"), (16, 32, 64)), **_embed(64)}),
    _spec("tiny_vit", "tiny", "tiny_vit", None, tiny.TINY_INPUT_SIZE, _IMAGENET, "bicubic", 1,
          {**_blocks("blocks.", 2, 64), **_embed(64)}),
    _spec("tiny_clip", "tiny", "tiny_clip", None, tiny.TINY_INPUT_SIZE, _OPENAI, "bicubic", 1,
          {**_blocks("visual.transformer.resblocks.", 2, 64), **_embed(64)}),
    _spec("resnet50", "timm", "resnet50", "resnet50.tv_in1k", 224, _IMAGENET, "bilinear", 0,
          {**_convs("", _RESNET_STAGES, _RESNET_WIDTHS),
           "pool": LayerSpec("global_pool", 2048, "vector")}, ("pool",)),
    _spec("alexnet", "torchvision", "alexnet", "AlexNet_Weights.IMAGENET1K_V1", 224, _IMAGENET,
          "bilinear", 0,
          {**{f"conv{i + 1}": LayerSpec(f"features.{m}", w, "conv")
              for i, (m, w) in enumerate(zip((1, 4, 7, 9, 11), (64, 192, 384, 256, 256)))},
           "pool5": LayerSpec("avgpool", 256 * 6 * 6, "conv", pool="flatten"),
           "fc6": LayerSpec("classifier.2", 4096, "vector"),
           "fc7": LayerSpec("classifier.5", 4096, "vector")},
          ("pool5",)),
    _spec("clip_rn50", "open_clip", "RN50-quickgelu", "openai", 224, _OPENAI, "bicubic", 0,
          {**_convs("visual.", _RESNET_STAGES, _RESNET_WIDTHS), **_embed(1024)}),
    _clip_vit("clip_vitb32", "ViT-B-32-quickgelu"),
    _clip_vit("clip_vitb16", "ViT-B-16-quickgelu"),
    _timm_vit("dino_vitb16", "vit_base_patch16_224", "vit_base_patch16_224.dino"),
    _timm_vit("dinov2_vitb14", "vit_base_patch14_dinov2", "vit_base_patch14_dinov2.lvd142m",
              img_size=224),
    _spec("siglip_vitb16", "open_clip", "ViT-B-16-SigLIP", "webli", 224, _INCEPTION, "bicubic", 0,
          {**_blocks("visual.trunk.blocks.", 12, 768), **_embed(768)}),
]
REGISTRY: dict[str, BackboneSpec] = {s.name: s for s in _SPECS}


def list_backbones() -> list[str]:
    """Registered backbone names, in registry order."""
    return list(REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The spec of ``name``; ValueError listing the valid names if unknown."""
    if name not in REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(REGISTRY)}")
    return REGISTRY[name]


# ----------------------------------------------------------------------------- preprocessing


class ImageTransform:
    """uint8 image (H, W, 3) numpy / PIL -> normalised float32 tensor (3, S, S).

    Resize the shorter side to S (antialiased, the spec's interpolation), centre
    crop S x S, scale to [0, 1], normalise with mean / std (torchvision v2).
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], interpolation: str):
        from torchvision.transforms import InterpolationMode, v2

        self.size, self.mean, self.std, self.interpolation = size, tuple(mean), tuple(std), interpolation
        self.pipeline = v2.Compose([
            v2.ToImage(),
            v2.Resize(size, interpolation=InterpolationMode(interpolation), antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
            v2.ToPureTensor(),
        ])

    def __call__(self, image: Any) -> torch.Tensor:
        """image (H, W, 3) uint8 -> (3, S, S) float32. Arrays of any other dtype are refused: a float
        image in 0..255 (or 0..1) would pass through the scaling step unscaled and give other features."""
        if isinstance(image, np.ndarray) and image.dtype != np.uint8:
            raise ValueError(f"image array has dtype {image.dtype}, expected uint8 (H, W, 3) RGB 0..255")
        return self.pipeline(image)

    def __repr__(self) -> str:
        return (f"ImageTransform(size={self.size}, interpolation={self.interpolation!r}, "
                f"mean={self.mean}, std={self.std})")


# ----------------------------------------------------------------------------- pooling


def pool_features(x: torch.Tensor, kind: str, pool: str, n_prefix_tokens: int = 0) -> torch.Tensor:
    """Pool one layer's output to (n, width) float32 (always a fresh tensor).

    conv (n, c, h, w): avg -> (n, c), flatten -> (n, c*h*w);
    tokens (n, L, d): cls -> token 0, avg -> mean of tokens[n_prefix_tokens:], flatten -> (n, L*d);
    vector (n, d): unchanged.
    """
    if kind == "vector":
        out = x
    elif pool == "flatten":
        out = x.flatten(1)
    elif kind == "conv" and pool == "avg":
        out = x.mean(dim=(2, 3))
    elif kind == "tokens" and pool == "avg":
        out = x[:, n_prefix_tokens:].mean(dim=1)
    elif kind == "tokens" and pool == "cls":
        out = x[:, 0]
    else:
        raise ValueError(f"pooling {pool!r} is not defined for {kind!r} layers")
    return out.to(dtype=torch.float32, copy=True)


def _default_pool(spec: BackboneSpec, layer: str) -> str:
    """The layer's own pooling: LayerSpec.pool, else auto by kind."""
    ls = spec.layers[layer]
    if ls.pool != "auto":
        return ls.pool
    if ls.kind == "conv":
        return "avg"
    if ls.kind == "tokens":
        return "cls" if spec.n_prefix_tokens >= 1 else "avg"
    return "none"


def _effective_pool(spec: BackboneSpec, layer: str, pooling: str) -> str:
    """The pooling used for ``layer`` given the requested ``pooling``; ValueError if invalid."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
    kind = spec.layers[layer].kind
    if pooling == "auto" or kind == "vector":
        return _default_pool(spec, layer)
    if pooling == "cls" and (kind != "tokens" or spec.n_prefix_tokens < 1):
        raise ValueError(
            f"pooling 'cls' needs a token layer with a CLS token; {spec.name}.{layer} is a "
            f"{kind} layer with {spec.n_prefix_tokens} prefix tokens"
        )
    return pooling


def _static_width(spec: BackboneSpec, layer: str, pool: str) -> int | None:
    """Width known without running the model, or None (e.g. flatten of a conv map)."""
    ls = spec.layers[layer]
    default = _default_pool(spec, layer)
    if pool == default or ls.kind == "vector":
        return ls.width
    if ls.kind == "tokens" and {pool, default} <= {"cls", "avg"}:
        return ls.width
    return None


# ----------------------------------------------------------------------------- the wrapper


def _resolve_layers(spec: BackboneSpec, layers: str | Sequence[str] | None) -> list[str]:
    """None -> defaults, "all" -> every layer, a name or list -> checked names."""
    if layers is None:
        return list(spec.default_layers)
    if isinstance(layers, str):
        layers = list(spec.layers) if layers == "all" else [layers]
    layers = list(layers)
    if not layers:
        raise ValueError(f"no layers selected for backbone '{spec.name}'; valid layers: "
                         f"{', '.join(spec.layers)}")
    unknown = [name for name in layers if name not in spec.layers]
    if unknown:
        raise ValueError(
            f"unknown layer(s) {unknown} for backbone '{spec.name}'; valid layers: "
            f"{', '.join(spec.layers)}"
        )
    if len(set(layers)) != len(layers):
        raise ValueError(f"duplicate layers in {layers}")
    return layers


def _is_batch_first(model: nn.Module, module_path: str) -> bool:
    """batch_first of the nearest module on the path (itself or an ancestor) that says.

    open_clip transformers may run sequence-first (L, n, d); their ``Transformer``
    carries a ``batch_first`` attribute.  Default: batch first.
    """
    parts = module_path.split(".") if module_path else []
    for depth in range(len(parts), -1, -1):
        flag = getattr(model.get_submodule(".".join(parts[:depth])), "batch_first", None)
        if isinstance(flag, bool):
            return flag
    return True


def _embedding_kind(model: nn.Module) -> str:
    """How to get the model's own image embedding: open_clip, timm pre-logits, or model(x)."""
    if hasattr(model, "encode_image"):
        return "open_clip"
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return "timm"
    return "call"


def _run_embedding(model: nn.Module, kind: str, images: torch.Tensor) -> torch.Tensor:
    """images (n, 3, S, S) -> the model's image embedding (its final output)."""
    if kind == "open_clip":
        return model.encode_image(images)
    if kind == "timm":
        return model.forward_head(model.forward_features(images), pre_logits=True)
    return model(images)


def _freeze(model: nn.Module) -> nn.Module:
    """eval() and requires_grad=False on every parameter."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


class FrozenBackbone(nn.Module):
    """A frozen library model that returns pooled features of selected layers.

    Attributes: spec, model (the wrapped library model, e.g. the full open_clip CLIP
    with its text tower), layers, pooling, normalize, feature_dims {layer: width},
    feature_slices {layer: slice into forward()'s output}, n_features, transform.
    The wrapped model is always in eval mode and never receives gradients.
    """

    def __init__(self, spec: BackboneSpec, model: nn.Module, layers: str | Sequence[str] | None = None,
                 pooling: str = "auto", normalize: bool = False):
        super().__init__()
        self.spec = spec
        self.model = _freeze(model)
        self.layers = _resolve_layers(spec, layers)
        self.pooling = pooling
        self.normalize = bool(normalize)
        self._pools = {name: _effective_pool(spec, name, pooling) for name in self.layers}
        self._check_modules()
        self._batch_first = {name: _is_batch_first(model, spec.layers[name].module)
                             for name in self.layers}
        self._embedding_kind = _embedding_kind(model)
        self.transform = ImageTransform(spec.input_size, spec.mean, spec.std, spec.interpolation)
        self.feature_dims = self._resolve_dims()
        self.n_features = sum(self.feature_dims.values())
        starts = [0]
        for name in self.layers:
            starts.append(starts[-1] + self.feature_dims[name])
        self.feature_slices = {n: slice(a, b) for n, a, b in zip(self.layers, starts, starts[1:])}

    # -- setup ----------------------------------------------------------------
    def _check_modules(self) -> None:
        """Every hooked module path must exist in the wrapped model."""
        for name in self.layers:
            path = self.spec.layers[name].module
            try:
                self.model.get_submodule(path)
            except AttributeError as err:
                raise RuntimeError(
                    f"backbone '{self.spec.name}': layer {name!r} hooks module {path!r}, "
                    f"which the {self.spec.library} model does not have"
                ) from err

    def _resolve_dims(self) -> dict[str, int]:
        """Widths per layer; one dummy forward if a pooling makes a width data-dependent."""
        dims = {n: _static_width(self.spec, n, self._pools[n]) for n in self.layers}
        if any(d is None for d in dims.values()):
            size = self.spec.input_size
            probe = self.forward_layers(torch.zeros(1, 3, size, size, device=self._device()))
            dims = {n: int(f.shape[1]) for n, f in probe.items()}
        return dims

    def _device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    # -- modes -----------------------------------------------------------------
    @property
    def training(self) -> bool:
        """Always False: a frozen backbone is in eval mode, whoever sets the flag (Lightning restores modes)."""
        return False

    @training.setter
    def training(self, value: bool) -> None:
        pass

    def train(self, mode: bool = True) -> "FrozenBackbone":
        """Frozen: the wrapper and the wrapped model stay in eval() whatever ``mode`` asks."""
        self.model.eval()
        return self

    def _ensure_eval(self) -> None:
        """Undo any direct .train() on the wrapped model's submodules."""
        if any(m.training for m in self.model.modules()):
            self.model.eval()

    # -- forward ---------------------------------------------------------------
    def _hook(self, name: str, store: dict[str, torch.Tensor], _module: nn.Module,
              _inputs: Any, output: Any) -> None:
        store[name] = self._pool(name, output)

    def _pool(self, name: str, output: Any) -> torch.Tensor:
        """Raw module output -> (n, width) float32 for ``name``."""
        x = output[0] if isinstance(output, (tuple, list)) else output
        kind = self.spec.layers[name].kind
        if kind == "tokens" and not self._batch_first[name]:
            x = x.transpose(0, 1)
        expected_ndim = {"conv": 4, "tokens": 3, "vector": 2}[kind]
        if x.ndim != expected_ndim:
            raise RuntimeError(
                f"backbone '{self.spec.name}': layer {name!r} ({kind}) produced shape "
                f"{tuple(x.shape)}, expected {expected_ndim} dims"
            )
        return pool_features(x, kind, self._pools[name], self.spec.n_prefix_tokens)

    def forward_layers(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (n, 3, S, S) normalised -> {layer: (n, width) float32}, in ``layers`` order."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (n, 3, S, S), got {tuple(images.shape)}")
        self._ensure_eval()
        store: dict[str, torch.Tensor] = {}
        handles = []
        try:
            for name in self.layers:
                path = self.spec.layers[name].module
                if path:
                    hook = functools.partial(self._hook, name, store)
                    handles.append(self.model.get_submodule(path).register_forward_hook(hook))
            param = next(self.model.parameters(), None)
            if param is not None:
                images = images.to(device=param.device, dtype=param.dtype)
            with torch.no_grad():
                final = _run_embedding(self.model, self._embedding_kind, images)
                for name in self.layers:
                    if not self.spec.layers[name].module:
                        store[name] = self._pool(name, final)
        finally:
            for handle in handles:
                handle.remove()
        feats = {name: store[name] for name in self.layers}
        if self.normalize:
            feats = {name: F.normalize(f, dim=1) for name, f in feats.items()}
        return feats

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (n, 3, S, S) normalised -> (n, n_features) float32 (layers concatenated)."""
        return torch.cat(list(self.forward_layers(images).values()), dim=1)

    def extra_repr(self) -> str:
        return (f"name={self.spec.name!r}, layers={self.layers}, pooling={self.pooling!r}, "
                f"normalize={self.normalize}, n_features={self.n_features}")


# ----------------------------------------------------------------------------- builders


def _timm_cached_file(cfg: Any) -> str | None:
    """A local copy of a timm pretrained cfg's weights (HF cache, then torch hub cache)."""
    repo = getattr(cfg, "hf_hub_id", None)
    filename = getattr(cfg, "hf_hub_filename", None)
    if repo:
        cached = cached_hf_file(repo, [filename] if filename else ["model.safetensors", "pytorch_model.bin"])
        if cached:
            return cached
    url = getattr(cfg, "url", None)
    if url and torch_hub_checkpoint(url).is_file():
        return str(torch_hub_checkpoint(url))
    return None


def _timm_model(spec: BackboneSpec, pretrained: bool) -> nn.Module:
    """timm model by "arch.tag" name (so its pretrained_cfg is that of the weights)."""
    import timm

    name = spec.hub_weights or spec.model_id
    if not pretrained:
        return timm.create_model(name, pretrained=False, **spec.model_kwargs)
    cfg = timm.models.get_pretrained_cfg(name)
    cached = _timm_cached_file(cfg)
    if cached is not None:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": cached},
                                 **spec.model_kwargs)
    repo = getattr(cfg, "hf_hub_id", None)
    reason = unreachable_reason(hf_endpoint() if repo else cfg.url)
    if reason:
        raise not_cached_error(spec.name, f"timm {name}", f"hub repo {repo or cfg.url}", reason)
    return timm.create_model(name, pretrained=True, **spec.model_kwargs)


def open_clip_preprocess_cfg(spec: BackboneSpec) -> dict[str, Any]:
    """The preprocess cfg open_clip attaches for (model_id, pretrained tag)."""
    from dataclasses import asdict

    from open_clip import get_pretrained_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    tag_cfg = get_pretrained_cfg(spec.model_id, spec.hub_weights) if spec.hub_weights else {}
    return merge_preprocess_dict(asdict(PreprocessCfg()), tag_cfg)


def _open_clip_hub_files(filename: str) -> list[str]:
    """Files open_clip would fetch for an hf_hub entry, safetensors alternatives first."""
    if not filename:
        return ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def _open_clip_source(spec: BackboneSpec) -> str:
    """Local checkpoint path or the pretrained tag to download; WeightsError if neither works."""
    import os

    from open_clip import get_pretrained_cfg

    cfg = get_pretrained_cfg(spec.model_id, spec.hub_weights)
    hf_hub = cfg.get("hf_hub", "")
    where = f"open_clip {spec.model_id}/{spec.hub_weights}"
    if hf_hub:
        repo, filename = os.path.split(hf_hub)  # "org/repo/" -> ("org/repo", ""), as open_clip
        cached = cached_hf_file(repo, _open_clip_hub_files(filename))
        if cached:
            return cached
        reason = unreachable_reason(hf_endpoint())
        if reason:
            raise not_cached_error(spec.name, where, f"hub repo {repo}", reason)
        return spec.hub_weights
    url = cfg.get("url", "")
    local = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
    if os.path.isfile(local):
        return local
    reason = unreachable_reason(url)
    if reason:
        raise not_cached_error(spec.name, where, f"url {url}", reason)
    return spec.hub_weights


def _open_clip_model(spec: BackboneSpec, pretrained: bool) -> nn.Module:
    """Full open_clip model (both towers), with the tag's preprocess cfg attached."""
    import open_clip

    source = _open_clip_source(spec) if pretrained else None
    return open_clip.create_model(
        spec.model_id, pretrained=source, cache_dir=hf_cache_dir() if pretrained else None,
        force_preprocess_cfg=open_clip_preprocess_cfg(spec), **spec.model_kwargs,
    )


def _torchvision_model(spec: BackboneSpec, pretrained: bool) -> nn.Module:
    """torchvision model; pretrained weights from the torch hub cache or download."""
    import torchvision

    if not pretrained:
        return torchvision.models.get_model(spec.model_id, weights=None, **spec.model_kwargs)
    weights = torchvision.models.get_weight(spec.hub_weights)
    cache_file = torch_hub_checkpoint(weights.url)
    if not cache_file.is_file():
        reason = unreachable_reason(weights.url)
        if reason:
            raise not_cached_error(spec.name, f"torchvision {spec.hub_weights}",
                                   f"url {weights.url}, cache file {cache_file}", reason)
    return torchvision.models.get_model(spec.model_id, weights=weights, **spec.model_kwargs)


_TINY_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "tiny_cnn": tiny.build_tiny_cnn,
    "tiny_vit": tiny.build_tiny_vit,
    "tiny_clip": tiny.build_tiny_clip,
}


def _tiny_model(spec: BackboneSpec, pretrained: bool) -> nn.Module:
    if pretrained:
        raise WeightsError(f"backbone '{spec.name}' has no pretrained weights; train it or "
                           f"pass backbone.weights_path=/path/to/state_dict.pt")
    return _TINY_BUILDERS[spec.model_id](**spec.model_kwargs)


_BUILDERS: dict[str, Callable[[BackboneSpec, bool], nn.Module]] = {
    "timm": _timm_model,
    "open_clip": _open_clip_model,
    "torchvision": _torchvision_model,
    "tiny": _tiny_model,
}
_ADAPTERS = {"timm": adapt_timm_state_dict, "open_clip": adapt_open_clip_state_dict}


def build_model(spec: BackboneSpec, pretrained: bool = False, weights_path: str | None = None
                ) -> nn.Module:
    """The bare library model: random init, pretrained, or loaded from ``weights_path``.

    ``weights_path`` wins over ``pretrained`` (no hub access at all then).
    """
    if weights_path is not None:
        model = _BUILDERS[spec.library](spec, False)
        load_weights_file(model, weights_path, spec.name, adapt=_ADAPTERS.get(spec.library),
                          allow_torchscript=spec.library == "open_clip")
        return model
    return _BUILDERS[spec.library](spec, bool(pretrained))


def build_backbone(name: str, pretrained: bool = False, weights_path: str | None = None,
                   layers: str | Sequence[str] | None = None, pooling: str = "auto",
                   normalize: bool = False) -> FrozenBackbone:
    """Build the registered backbone ``name`` as a FrozenBackbone.

    pretrained=False and no weights_path: random init (current torch RNG).
    weights_path: a local state dict of the wrapped model (strict).
    pretrained=True: the library's weights from the local cache, or downloaded if the
    hub is reachable; otherwise WeightsError within seconds.
    layers: None (defaults), "all", a layer name, or a list; pooling: auto|avg|cls|flatten.
    """
    spec = get_spec(name)
    for layer in _resolve_layers(spec, layers):  # fail fast, before any model is built
        _effective_pool(spec, layer, pooling)
    model = build_model(spec, pretrained=pretrained, weights_path=weights_path)
    return FrozenBackbone(spec, model, layers=layers, pooling=pooling, normalize=normalize)


# ----------------------------------------------------------------------------- CLI


def registry_table(registry: Mapping[str, BackboneSpec] = REGISTRY) -> str:
    """A plain-text table of the registry."""
    header = ("name", "library", "model", "size", "default layers", "layers (width)")
    rows = [header]
    for spec in registry.values():
        weights = f"{spec.model_id}/{spec.hub_weights}" if spec.library == "open_clip" \
            else (spec.hub_weights or spec.model_id)
        layers = ", ".join(f"{n} ({ls.width})" for n, ls in spec.layers.items())
        rows.append((spec.name, spec.library, weights, str(spec.input_size),
                     ",".join(spec.default_layers), layers))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main() -> None:
    """``python -m encoders.backbones``: print the registry."""
    print(registry_table())


if __name__ == "__main__":
    main()
