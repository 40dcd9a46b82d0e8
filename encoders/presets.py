"""The named backbones (``backbone=alexnet`` ...): a family model with named layers and their widths.

A preset is a family spelling plus names for some of its layers: ``alexnet`` is torchvision ``alexnet``
with weights ``IMAGENET1K_V1`` whose ``conv5`` is module ``features.11``. Its preprocessing is its library's
(torchvision ``weights.transforms()``, timm's data config, open_clip's preprocess cfg), except where a
preset says otherwise (``preprocess``: the tiny test models, which have no library). The widths here are
documentation (``python -m encoders.backbones``); a built backbone reads them from a dummy forward, and
tests/test_backbones.py checks that the two agree.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from encoders.layers import EMBED, LayerSpec
from encoders.preprocess import Preprocess

__all__ = ["BackboneSpec", "REGISTRY", "list_backbones", "get_spec"]


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone: how to build it, preprocess for it, and read it.

    library: its family (timm | open_clip | torchvision | custom); model_id: the library's architecture name
    (the factory for custom); hub_weights: the pretrained tag (timm tag, open_clip pretrained tag,
    torchvision weights enum), or None; layers: named layers {name: LayerSpec}; default_layers: read when
    ``layers`` is null; model_kwargs: constructor kwargs; n_prefix_tokens: prefix tokens (CLS, registers)
    of its token layers; preprocess: the resolved preprocessing (None in the static preset table: the
    library gives it when the model is built); preprocess_defaults: a preset's own overrides
    (image_size, crop_pct, interpolation, mean, std); preprocess_source: where the preprocessing came from.
    """

    name: str
    library: str
    model_id: str
    hub_weights: str | None
    layers: dict[str, LayerSpec]
    default_layers: tuple[str, ...] = (EMBED,)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    n_prefix_tokens: int = 0
    factory: str | None = None
    preprocess: Preprocess | None = None
    preprocess_defaults: dict[str, Any] = field(default_factory=dict)
    preprocess_source: str = ""

    def _resolved(self) -> Preprocess:
        if self.preprocess is None:
            raise AttributeError(f"backbone '{self.name}': the preprocessing is resolved when the model is built "
                                 f"(build_backbone({self.name!r}).spec)")
        return self.preprocess

    # the preprocessing fields earlier callers read
    input_size = property(lambda self: self._resolved().crop_size)
    mean = property(lambda self: self._resolved().mean)
    std = property(lambda self: self._resolved().std)
    interpolation = property(lambda self: self._resolved().interpolation)


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
_TINY = {"image_size": 64, "crop_pct": 1.0}


def _clip_vit(name: str, model_id: str) -> BackboneSpec:
    return BackboneSpec(name, "open_clip", model_id, "openai",
                        {**_blocks("visual.transformer.resblocks.", 12, 768), **_embed(512)})


def _timm_vit(name: str, model_id: str, tag: str, **kw: Any) -> BackboneSpec:
    return BackboneSpec(name, "timm", model_id, tag, {**_blocks("blocks.", 12, 768), **_embed(768)},
                        model_kwargs=dict(kw))


# OpenAI CLIP weights were trained with QuickGELU; the "-quickgelu" configs build that architecture.
_SPECS = [
    BackboneSpec("tiny", "custom", "tiny_cnn", None,
                 {**_convs("", ("conv1", "conv2", "conv3"), (16, 32, 64)), **_embed(64)},
                 factory="encoders.tiny:build_tiny_cnn", preprocess_defaults={**_TINY, "interpolation": "bilinear"}),
    BackboneSpec("tiny_vit", "custom", "tiny_vit", None, {**_blocks("blocks.", 2, 64), **_embed(64)},
                 factory="encoders.tiny:build_tiny_vit", preprocess_defaults=_TINY),
    BackboneSpec("tiny_clip", "custom", "tiny_clip", None,
                 {**_blocks("visual.transformer.resblocks.", 2, 64), **_embed(64)},
                 factory="encoders.tiny:build_tiny_clip", preprocess_defaults=_TINY),
    BackboneSpec("resnet50", "timm", "resnet50", "tv_in1k",
                 {**_convs("", _RESNET_STAGES, _RESNET_WIDTHS), "pool": LayerSpec("global_pool", 2048, "vector")},
                 ("pool",)),
    BackboneSpec("alexnet", "torchvision", "alexnet", "IMAGENET1K_V1",
                 {**{f"conv{i + 1}": LayerSpec(f"features.{m}", w, "conv")
                     for i, (m, w) in enumerate(zip((1, 4, 7, 9, 11), (64, 192, 384, 256, 256)))},
                  "pool5": LayerSpec("avgpool", 256 * 6 * 6, "conv", pool="flatten"),
                  "fc6": LayerSpec("classifier.2", 4096, "vector"),
                  "fc7": LayerSpec("classifier.5", 4096, "vector")},
                 ("pool5",)),
    BackboneSpec("clip_rn50", "open_clip", "RN50-quickgelu", "openai",
                 {**_convs("visual.", _RESNET_STAGES, _RESNET_WIDTHS), **_embed(1024)}),
    _clip_vit("clip_vitb32", "ViT-B-32-quickgelu"),
    _clip_vit("clip_vitb16", "ViT-B-16-quickgelu"),
    _timm_vit("dino_vitb16", "vit_base_patch16_224", "dino"),
    _timm_vit("dinov2_vitb14", "vit_base_patch14_dinov2", "lvd142m", img_size=224),
    BackboneSpec("siglip_vitb16", "open_clip", "ViT-B-16-SigLIP", "webli",
                 {**_blocks("visual.trunk.blocks.", 12, 768), **_embed(768)}),
]
REGISTRY: dict[str, BackboneSpec] = {s.name: s for s in _SPECS}


def list_backbones() -> list[str]:
    """Preset names, in registry order."""
    return list(REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The preset ``name``; ValueError listing the valid names if unknown."""
    if name not in REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; presets: {', '.join(REGISTRY)}; or a family: "
                         f"backbone=timm|open_clip|torchvision|custom backbone.model=...")
    return REGISTRY[name]
