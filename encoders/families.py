"""Model families: build any timm, open_clip or torchvision model by name, or a user's own, with its
library's preprocessing and its named layers.

    built = build_family(Source("timm", "resnet18", pretrained=False))
    built.model, built.preprocess, built.catalog          # nn.Module, Preprocess, {"layer1": "layer1", ...}

* ``timm``: ``model`` any timm name, with or without its pretrained tag (``resnet50.tv_in1k``; or ``tag``);
  preprocessing: ``timm.data.resolve_data_config`` (the tag's pretrained cfg) and timm's eval transform;
  named layers: the model's ``feature_info`` stages.
* ``open_clip``: ``model`` an architecture (``ViT-B-32``), ``tag`` its pretrained tag (``laion2b_s34b_b79k``);
  the whole CLIP is built (the text tower stays available to the analyses), features come from the image
  tower; preprocessing: the tag's preprocess cfg at the tower's image size; named layers ``blocks.N`` (ViT
  towers) or ``layer1..4`` (ResNet towers). A tag trained with QuickGELU (OpenAI's) builds QuickGELU.
* ``torchvision``: ``model`` a ``torchvision.models`` name, ``tag`` a weights enum member (``IMAGENET1K_V1``,
  ``AlexNet_Weights.IMAGENET1K_V1``; default ``DEFAULT``); preprocessing: ``weights.transforms()``.
* ``custom``: ``factory`` = ``module:callable`` (or ``path/file.py:callable``), importable from the working
  directory or an installed package; called with ``model_kwargs`` (and ``pretrained`` if it takes that
  argument); returns an ``nn.Module`` or ``(module, preprocessing)`` where preprocessing is a Preprocess, a
  dict of its fields, a timm-style data config, or a library eval transform. Without one: the module's own
  timm ``pretrained_cfg`` or open_clip ``preprocess_cfg`` if it has one, else ImageNet mean/std at 224 px,
  full field, bilinear.

``weights_path`` loads a local state dict into any of them (strict, with the library's own checkpoint
conversion where one exists); ``pretrained=False`` builds the same architecture at random.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from encoders.layers import close_matches
from encoders.preprocess import (
    Preprocess, from_mapping, from_open_clip_cfg, from_timm_config, from_torchvision_weights, from_transform,
)
from encoders.weights import (
    WeightsError, adapt_open_clip_state_dict, adapt_timm_state_dict, cached_hf_file, hf_cache_dir, hf_endpoint,
    load_weights_file, not_cached_error, torch_hub_checkpoint, unreachable_reason,
)

__all__ = ["FAMILIES", "Source", "Built", "build_family", "display_name", "run_embedding", "embedding_kind",
           "model_hints"]

FAMILIES = ("timm", "open_clip", "torchvision", "custom")
CUSTOM_DEFAULT = Preprocess(224, 224, "shortest", "bilinear")


@dataclass(frozen=True)
class Source:
    """Where a model comes from. family: timm | open_clip | torchvision | custom; model: the library's name;
    tag: its pretrained weights (timm tag, open_clip pretrained tag, torchvision weights enum); factory:
    ``module:callable`` (custom); model_kwargs: constructor kwargs; label: the name used in messages."""

    family: str
    model: str | None = None
    tag: str | None = None
    factory: str | None = None
    pretrained: bool = False
    weights_path: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or display_name(self.family, self.model, self.tag, self.factory)


@dataclass
class Built:
    """A built model and what the library says about it.

    preprocess: the library's eval preprocessing (with ``image_size`` applied); preprocess_source: where it
    came from; catalog: the named layers {name: module path}, in forward order ("" = the embedding);
    embedding: how to run it ("open_clip" encode_image | "timm" pre-logits | "call").
    """

    model: nn.Module
    preprocess: Preprocess
    preprocess_source: str
    catalog: dict[str, str]
    embedding: str


def display_name(family: str, model: str | None, tag: str | None = None, factory: str | None = None) -> str:
    """timm:resnet50.tv_in1k, open_clip:ViT-B-32/laion2b_s34b_b79k, torchvision:alexnet, custom:mod:fn."""
    if family == "custom":
        return f"custom:{factory}"
    if family == "timm":
        return f"timm:{model}" + (f".{tag}" if tag else "")
    return f"{family}:{model}" + (f"/{tag}" if tag and tag != "DEFAULT" else "")


# ----------------------------------------------------------------------------- running a model


def embedding_kind(model: nn.Module) -> str:
    """How to get the model's own image embedding: open_clip, timm pre-logits, or model(x)."""
    if hasattr(model, "encode_image"):
        return "open_clip"
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return "timm"
    return "call"


def run_embedding(kind: str) -> Callable[[nn.Module, torch.Tensor], Any]:
    """(model, images (n, 3, S, S)) -> the model's image embedding (its final output)."""
    if kind == "open_clip":
        return lambda model, images: model.encode_image(images)
    if kind == "timm":
        return lambda model, images: model.forward_head(model.forward_features(images), pre_logits=True)
    return lambda model, images: model(images)


def _prefix_tokens(model: nn.Module) -> int:
    """Prefix tokens (CLS, registers) of a model's token sequences: timm num_prefix_tokens, an open_clip
    tower's class embedding or timm trunk, torchvision's class_token; 0 otherwise."""
    for owner in (model, getattr(model, "visual", None), getattr(getattr(model, "visual", None), "trunk", None)):
        if owner is None:
            continue
        if isinstance(getattr(owner, "num_prefix_tokens", None), int):
            return int(owner.num_prefix_tokens)
        if getattr(owner, "class_embedding", None) is not None or getattr(owner, "class_token", None) is not None:
            return 1
    return 0


def _num_patches(model: nn.Module) -> int | None:
    for owner in (model, getattr(model, "visual", None), getattr(getattr(model, "visual", None), "trunk", None)):
        n = getattr(getattr(owner, "patch_embed", None), "num_patches", None)
        if isinstance(n, int):
            return n
        grid = getattr(owner, "grid_size", None)
        if isinstance(grid, (tuple, list)) and len(grid) == 2:
            return int(grid[0]) * int(grid[1])
    return None


def model_hints(model: nn.Module) -> dict[str, Any]:
    """What reading a model's layers needs to know about it: its prefix tokens, the patch tokens of its
    grid (None if unknown) and whether it declares channels-last (NHWC) maps (timm ``output_fmt``)."""
    return {"n_prefix": _prefix_tokens(model), "num_patches": _num_patches(model),
            "nhwc_hint": getattr(model, "output_fmt", "") == "NHWC"}


def _children_catalog(model: nn.Module) -> dict[str, str]:
    return {name: name for name, _ in model.named_children()}


def _feature_info_catalog(model: nn.Module, prefix: str = "") -> dict[str, str]:
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list):
        return {}
    out = {}
    for entry in info:
        module = entry.get("module") if isinstance(entry, dict) else None
        if module:
            try:
                model.get_submodule(module)
            except AttributeError:
                continue
            out[module] = prefix + module
    return out


def _with_embed(catalog: dict[str, str]) -> dict[str, str]:
    return {**catalog, "embed": ""}


# ----------------------------------------------------------------------------- timm


def _timm_name(src: Source) -> str:
    if not src.model:
        raise ValueError("backbone.model: a timm model name is needed (e.g. resnet18, vit_small_patch14_dinov2.lvd142m)")
    if src.tag:
        if "." in src.model:
            raise ValueError(f"backbone.model={src.model} already names a pretrained tag; drop backbone.tag={src.tag}")
        return f"{src.model}.{src.tag}"
    return src.model


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


def _timm_model(src: Source, pretrained: bool) -> nn.Module:
    """timm model by "arch.tag" name (so its pretrained_cfg is that of the weights)."""
    import timm

    name = _timm_name(src)
    if not timm.is_model(name.split(".")[0]):
        close = close_matches(name.split(".")[0], timm.list_models())
        raise ValueError(f"backbone.model: no timm model {name!r}" + (f"; close: {', '.join(close)}" if close else ""))
    if not pretrained:
        return timm.create_model(name, pretrained=False, **src.model_kwargs)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise WeightsError(f"backbone '{src.name}': timm has no pretrained weights {name!r}")
    cached = _timm_cached_file(cfg)
    if cached is not None:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": cached}, **src.model_kwargs)
    repo = getattr(cfg, "hf_hub_id", None)
    reason = unreachable_reason(hf_endpoint() if repo else cfg.url)
    if reason:
        raise not_cached_error(src.name, f"timm {name}", f"hub repo {repo or cfg.url}", reason)
    return timm.create_model(name, pretrained=True, **src.model_kwargs)


def _timm_preprocess(model: nn.Module, image_size: int | None) -> tuple[Preprocess, str]:
    """timm's data config for the model; the input size follows a fixed patch grid built at another size
    (e.g. DINOv2 at img_size=224, whose pretrained cfg says 518) or ``image_size``."""
    from timm.data import resolve_data_config

    args: dict[str, Any] = {}
    patch_embed = getattr(model, "patch_embed", None)
    built = getattr(patch_embed, "img_size", None)
    if image_size is not None:
        args["input_size"] = (3, int(image_size), int(image_size))
    elif isinstance(built, (tuple, list)) and not getattr(patch_embed, "dynamic_img_size", False):
        args["input_size"] = (3, int(built[0]), int(built[1]))
    cfg = resolve_data_config(args, model=model)
    return from_timm_config(cfg), "timm resolve_data_config + transforms_imagenet_eval"


def _build_timm(src: Source, image_size: int | None) -> Built:
    model = _load(src, _timm_model, adapt_timm_state_dict)
    pre, where = _timm_preprocess(model, image_size)
    catalog = _feature_info_catalog(model) or _children_catalog(model)
    return Built(model, pre, where, _with_embed(catalog), embedding_kind(model))


# ----------------------------------------------------------------------------- open_clip


def _open_clip_tag_cfg(arch: str, tag: str | None) -> dict:
    from open_clip import get_pretrained_cfg, list_pretrained_tags_by_model

    if not tag:
        return {}
    cfg = get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = list_pretrained_tags_by_model(arch)
        raise ValueError(f"backbone.tag: open_clip has no pretrained tag {tag!r} for {arch}"
                         + (f"; its tags: {', '.join(tags)}" if tags else ""))
    return cfg


def open_clip_preprocess_overrides(arch: str, tag: str | None) -> dict[str, Any]:
    """The preprocess keys a pretrained tag sets (mean, std, interpolation, resize_mode, ...), not the size."""
    from open_clip.transform import PreprocessCfg

    keys = {f.name for f in fields(PreprocessCfg)} - {"size"}
    return {k: v for k, v in _open_clip_tag_cfg(arch, tag).items() if k in keys}


def _open_clip_hub_files(filename: str) -> list[str]:
    """Files open_clip would fetch for an hf_hub entry, safetensors alternatives first."""
    if not filename:
        return ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def _open_clip_source(src: Source) -> str:
    """Local checkpoint path or the pretrained tag to download; WeightsError if neither works."""
    cfg = _open_clip_tag_cfg(src.model, src.tag)
    hf_hub = cfg.get("hf_hub", "")
    where = f"open_clip {src.model}/{src.tag}"
    if hf_hub:
        repo, filename = os.path.split(hf_hub)  # "org/repo/" -> ("org/repo", ""), as open_clip
        cached = cached_hf_file(repo, _open_clip_hub_files(filename))
        if cached:
            return cached
        reason = unreachable_reason(hf_endpoint())
        if reason:
            raise not_cached_error(src.name, where, f"hub repo {repo}", reason)
        return src.tag
    url = cfg.get("url", "")
    local = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
    if os.path.isfile(local):
        return local
    reason = unreachable_reason(url)
    if reason:
        raise not_cached_error(src.name, where, f"url {url}", reason)
    return src.tag


def _open_clip_model(src: Source, pretrained: bool) -> nn.Module:
    """Full open_clip model (both towers), with the tag's preprocess cfg attached."""
    import open_clip

    if not src.model:
        raise ValueError("backbone.model: an open_clip architecture is needed (e.g. ViT-B-32; "
                         "python -c 'import open_clip; print(open_clip.list_models())')")
    if src.model not in open_clip.list_models():
        close = close_matches(src.model, open_clip.list_models())
        raise ValueError(f"backbone.model: no open_clip architecture {src.model!r}"
                         + (f"; close: {', '.join(close)}" if close else ""))
    if pretrained and not src.tag:
        raise ValueError(f"backbone.tag: open_clip {src.model} needs a pretrained tag "
                         f"({', '.join(open_clip.list_pretrained_tags_by_model(src.model)) or 'none known'}), "
                         f"or backbone.pretrained=false")
    tag_cfg = _open_clip_tag_cfg(src.model, src.tag)
    kwargs = dict(src.model_kwargs)
    if tag_cfg.get("quick_gelu") and not src.model.endswith("-quickgelu"):
        kwargs.setdefault("force_quick_gelu", True)  # the architecture the weights were trained with
    source = _open_clip_source(src) if pretrained else None
    return open_clip.create_model(
        src.model, pretrained=source, cache_dir=hf_cache_dir() if pretrained else None,
        force_preprocess_cfg=open_clip_preprocess_overrides(src.model, src.tag), **kwargs,
    )


def _open_clip_catalog(model: nn.Module) -> dict[str, str]:
    visual = getattr(model, "visual", model)
    prefix = "visual." if visual is not model else ""
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):
        return {f"blocks.{i}": f"{prefix}transformer.resblocks.{i}" for i in range(len(visual.transformer.resblocks))}
    if all(hasattr(visual, f"layer{i}") for i in range(1, 5)):
        return {f"layer{i}": f"{prefix}layer{i}" for i in range(1, 5)}
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:
        return _feature_info_catalog(trunk, f"{prefix}trunk.") or {
            n: f"{prefix}trunk.{n}" for n, _ in trunk.named_children()}
    return {n: f"{prefix}{n}" for n, _ in visual.named_children()}


def _open_clip_preprocess(model: nn.Module, image_size: int | None) -> tuple[Preprocess, str]:
    cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None)
    if not cfg:
        raise ValueError("open_clip model without a preprocess_cfg on its image tower")
    pre = from_open_clip_cfg(cfg)
    return (pre.with_overrides(image_size=image_size) if image_size else pre), "open_clip preprocess cfg"


def _build_open_clip(src: Source, image_size: int | None) -> Built:
    model = _load(src, _open_clip_model, adapt_open_clip_state_dict, allow_torchscript=True)
    pre, where = _open_clip_preprocess(model, image_size)
    return Built(model, pre, where, _with_embed(_open_clip_catalog(model)), "open_clip")


# ----------------------------------------------------------------------------- torchvision


def _torchvision_weights(src: Source) -> Any | None:
    """The weights enum member of ``tag`` (default DEFAULT), or None for a model without weights."""
    from torchvision.models import get_model_weights, get_weight

    try:
        enum = get_model_weights(src.model)
    except (ValueError, KeyError):
        if src.tag and src.tag != "DEFAULT":
            raise ValueError(f"backbone.tag: torchvision {src.model} has no weights {src.tag!r}") from None
        return None
    tag = src.tag or "DEFAULT"
    if "." in tag:
        try:
            weights = get_weight(tag)
        except (ValueError, KeyError, AttributeError):
            weights = None
        if weights is None or type(weights) is not enum:
            raise ValueError(f"backbone.tag: {tag} is not a weights enum of torchvision {src.model} "
                             f"({', '.join(m.name for m in enum)})")
        return weights
    try:
        return enum[tag] if tag != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise ValueError(f"backbone.tag: torchvision {src.model} has no weights {tag!r} "
                         f"({', '.join(['DEFAULT', *(m.name for m in enum)])})") from None


def _torchvision_model(src: Source, pretrained: bool) -> nn.Module:
    """torchvision model; pretrained weights from the torch hub cache or download."""
    import torchvision

    if not src.model:
        raise ValueError("backbone.model: a torchvision model name is needed (e.g. alexnet, resnet50, vgg16)")
    if src.model not in torchvision.models.list_models():
        close = close_matches(src.model, torchvision.models.list_models())
        raise ValueError(f"backbone.model: no torchvision model {src.model!r}"
                         + (f"; close: {', '.join(close)}" if close else ""))
    if not pretrained:
        return torchvision.models.get_model(src.model, weights=None, **src.model_kwargs)
    weights = _torchvision_weights(src)
    if weights is None:
        raise WeightsError(f"backbone '{src.name}': torchvision has no pretrained weights for {src.model}")
    cache_file = torch_hub_checkpoint(weights.url)
    if not cache_file.is_file():
        reason = unreachable_reason(weights.url)
        if reason:
            raise not_cached_error(src.name, f"torchvision {weights}", f"url {weights.url}, cache file {cache_file}",
                                   reason)
    return torchvision.models.get_model(src.model, weights=weights, **src.model_kwargs)


def _build_torchvision(src: Source, image_size: int | None) -> Built:
    model = _load(src, _torchvision_model, None)
    weights = _torchvision_weights(src)
    if weights is not None:
        pre, where = from_torchvision_weights(weights), f"torchvision {weights}.transforms()"
    else:
        pre, where = Preprocess(224, 256, "shortest", "bilinear"), "torchvision ImageNet default (no weights enum)"
    if image_size:
        pre = pre.with_overrides(image_size=image_size)
    return Built(model, pre, where, _with_embed(_children_catalog(model)), "call")


# ----------------------------------------------------------------------------- custom


def import_factory(spec: str) -> Callable[..., Any]:
    """``module:callable`` (importable from the working directory or an installed package) or
    ``path/to/file.py:callable`` -> the callable. ValueError (one line) if it cannot be found."""
    module_name, sep, attr = str(spec).rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"backbone.factory={spec!r}: expected module:callable (e.g. my_models:build)")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser().resolve()
            if not path.is_file():
                raise ValueError(f"backbone.factory={spec!r}: file not found: {path}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[path.stem] = module  # so its classes pickle and unpickle
            module_spec.loader.exec_module(module)
        else:
            cwd = os.getcwd()
            if cwd not in sys.path and "" not in sys.path:
                sys.path.append(cwd)  # the user's working directory, after the installed packages
            module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"backbone.factory={spec!r}: cannot import {module_name} ({err}); run from the "
                         f"directory that holds it, or install it") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"backbone.factory={spec!r}: {module_name} has no callable {attr!r}")
    return factory


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _custom_model(src: Source, pretrained: bool) -> tuple[nn.Module, Any]:
    factory = import_factory(src.factory or "")
    kwargs = dict(src.model_kwargs)
    if _accepts(factory, "pretrained"):
        kwargs["pretrained"] = bool(pretrained)
    elif pretrained:
        raise WeightsError(f"backbone '{src.name}': the factory takes no 'pretrained' argument, so it has no "
                           f"pretrained weights; set backbone.pretrained=false, or pass "
                           f"backbone.weights_path=/path/to/state_dict.pt")
    out = factory(**kwargs)
    model, pre = (out[0], out[1]) if isinstance(out, tuple) and len(out) == 2 else (out, None)
    if not isinstance(model, nn.Module):
        raise ValueError(f"backbone.factory={src.factory}: returned {type(model).__name__}, not an nn.Module "
                         f"(or a (module, preprocessing) pair)")
    return model, pre


def _custom_preprocess(model: nn.Module, given: Any, image_size: int | None) -> tuple[Preprocess, str]:
    if isinstance(given, Preprocess):
        pre, where = given, "the factory's Preprocess"
    elif isinstance(given, Mapping):
        pre, where = from_mapping(given), "the factory's preprocessing dict"
    elif given is not None:
        pre, where = from_transform(given), f"the factory's {type(given).__name__}"
    elif isinstance(getattr(model, "pretrained_cfg", None), Mapping) and "input_size" in model.pretrained_cfg:
        return _timm_preprocess(model, image_size)
    elif getattr(getattr(model, "visual", None), "preprocess_cfg", None):
        pre, where = _open_clip_preprocess(model, None)
    else:
        pre, where = CUSTOM_DEFAULT, "default (ImageNet mean/std, 224 px, full field, bilinear)"
    return (pre.with_overrides(image_size=image_size) if image_size else pre), where


def _build_custom(src: Source, image_size: int | None) -> Built:
    if not src.factory:
        raise ValueError("backbone.factory: a module:callable that returns the model is needed (e.g. my_models:build)")
    given: list[Any] = []

    def make(s: Source, pretrained: bool) -> nn.Module:
        model, pre = _custom_model(s, pretrained)
        given.append(pre)
        return model

    model = _load(src, make, None)
    pre, where = _custom_preprocess(model, given[0], image_size)
    catalog = _feature_info_catalog(model) or _children_catalog(model)
    return Built(model, pre, where, _with_embed(catalog), embedding_kind(model))


# ----------------------------------------------------------------------------- entry


def _load(src: Source, make: Callable[[Source, bool], nn.Module], adapt, allow_torchscript: bool = False) -> nn.Module:
    """Random init, pretrained, or random init + ``weights_path`` (which wins: no hub access then)."""
    if src.weights_path is not None:
        model = make(src, False)
        load_weights_file(model, src.weights_path, src.name, adapt=adapt, allow_torchscript=allow_torchscript)
        return model
    return make(src, bool(src.pretrained))


_BUILDERS = {"timm": _build_timm, "open_clip": _build_open_clip, "torchvision": _build_torchvision,
             "custom": _build_custom}


def build_family(src: Source, image_size: int | None = None) -> Built:
    """Build the model of ``src`` with its library's preprocessing (at ``image_size`` if given)."""
    if src.family not in _BUILDERS:
        raise ValueError(f"backbone.family: unknown family {src.family!r}; valid: {', '.join(FAMILIES)}")
    return _BUILDERS[src.family](src, image_size)
