"""Frozen vision backbones with layer-wise pooled features: presets by name, or any model of a family.

    >>> bb = build_backbone("clip_vitb32", layers=["blocks.5", "embed"])            # a preset
    >>> bb = build_backbone(family="timm", model="resnet18", layers=["layer2", "layer4.1.act2"])
    >>> bb = build_backbone(family="custom", factory="my_models:build", layers=["encoder.3"])
    >>> x = torch.stack([bb.transform(img) for img in images])   # (n, 3, S, S): the library's preprocessing
    >>> bb(x).shape                                              # (n, n_features): layers pooled, concatenated
    >>> bb.describe()                                            # family, model, layers -> modules, pooling, preprocess

A layer is a preset's name (``conv5``), a family's named layer (timm ``feature_info`` stages, open_clip
``blocks.N``), ``embed`` (the model's own image embedding), or any module path of the model; widths are
known from one dummy forward when the backbone is built, and a forward stops after the last requested
layer. ``python -m encoders.backbones`` prints the presets; ``--modules timm:resnet18`` every module path
of a model with its output shape.
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from encoders.families import (
    FAMILIES, Source, build_family, display_name, embedding_kind, model_hints, run_embedding,
)
from encoders.layers import (
    EMBED, POOLINGS, HookedForward, LayerSpec, check_pooling, close_matches, effective_pool, module_table,
    pool_features, pooled_width, probe_layers,
)
from encoders.preprocess import ImageTransform, Preprocess
from encoders.presets import REGISTRY, BackboneSpec, get_spec, list_backbones
from encoders.weights import WeightsError

__all__ = [
    "LayerSpec", "BackboneSpec", "REGISTRY", "list_backbones", "get_spec", "FrozenBackbone", "ImageTransform",
    "Preprocess", "build_backbone", "pool_features", "WeightsError", "EMBED", "POOLINGS", "FAMILIES",
]

Pooling = str | Mapping[str, str]


def _plain(value: Any) -> Any:
    """Config containers (e.g. OmegaConf's, as Hydra passes them) -> plain dicts / lists, recursively."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


def _freeze(model: nn.Module) -> nn.Module:
    """eval() and requires_grad=False on every parameter."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


class FrozenBackbone(nn.Module):
    """A frozen model that returns pooled features of selected layers.

    Attributes: spec (BackboneSpec: name, library, model_id, layers, preprocess, n_prefix_tokens, ...),
    model (the wrapped library model, e.g. the full open_clip CLIP with its text tower), layers (names),
    pooling (a name, or {layer: name}), normalize, feature_dims {layer: width}, feature_slices {layer: slice
    into forward()'s output}, n_features, preprocess (Preprocess), transform (its ImageTransform).
    The wrapped model is always in eval mode and never receives gradients.
    """

    def __init__(self, spec: BackboneSpec, model: nn.Module, layers: str | Sequence[str] | None = None,
                 pooling: Pooling = "auto", normalize: bool = False):
        super().__init__()
        if spec.preprocess is None:
            raise ValueError(f"backbone '{spec.name}': FrozenBackbone needs a built spec (build_backbone)")
        self.model = _freeze(model)
        self.spec = spec
        self.layers = self._resolve_layers(layers)
        self.pooling = dict(pooling) if isinstance(pooling, Mapping) else pooling
        self.normalize = bool(normalize)
        self._pools = {name: effective_pool(self.spec.layers[name], self._requested_pool(name),
                                            f"{self.spec.name}.{name}") for name in self.layers}
        self._embedding_kind = embedding_kind(model)
        self.preprocess = spec.preprocess
        self.transform = ImageTransform.from_preprocess(spec.preprocess)
        self.feature_dims = {n: pooled_width(self.spec.layers[n], self._pools[n]) for n in self.layers}
        self.n_features = sum(self.feature_dims.values())
        starts = [0]
        for name in self.layers:
            starts.append(starts[-1] + self.feature_dims[name])
        self.feature_slices = {n: slice(a, b) for n, a, b in zip(self.layers, starts, starts[1:])}

    # -- setup ----------------------------------------------------------------
    def _requested_pool(self, name: str) -> str:
        if isinstance(self.pooling, Mapping):
            unknown = sorted(set(self.pooling) - set(self.layers))
            if unknown:
                raise ValueError(f"backbone.pooling names layers {unknown} that are not in backbone.layers "
                                 f"{self.layers}")
            return str(self.pooling.get(name, "auto"))
        return str(self.pooling)

    def _module_path(self, name: str) -> str | None:
        """The module path ``name`` denotes in the wrapped model (as given, or inside an open_clip
        image tower), or None."""
        for path in (name, f"visual.{name}"):
            try:
                self.model.get_submodule(path)
            except AttributeError:
                continue
            return path
        return None

    def _resolve_layers(self, layers: str | Sequence[str] | None) -> list[str]:
        """None -> defaults, "all" -> every named layer, a name or list -> checked; unknown module paths are
        probed (one dummy forward) and added to the spec's layers."""
        spec = self.spec
        if layers is None:
            layers = list(spec.default_layers)
        elif isinstance(layers, str):
            layers = list(spec.layers) if layers == "all" else [layers]
        layers = [str(n) for n in layers]
        if not layers:
            raise ValueError(f"no layers selected for backbone '{spec.name}'; named layers: {', '.join(spec.layers)}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"duplicate layers in {layers}")
        new: dict[str, str] = {}
        unknown = []
        for name in layers:
            if name in spec.layers:
                continue
            path = "" if name == EMBED else self._module_path(name)
            if path is None:
                unknown.append(name)
            else:
                new[name] = path
        if unknown:
            candidates = [*spec.layers, *(p for p, _ in self.model.named_modules() if p)]
            hints = {n: close_matches(n, candidates) for n in unknown}
            listed = "; ".join(f"{n!r}: close matches {', '.join(h)}" if h else f"{n!r}: no close match"
                               for n, h in hints.items())
            raise ValueError(f"unknown layer(s) for backbone '{spec.name}' ({listed}); named layers: "
                             f"{', '.join(spec.layers)}; every module path: python -m encoders.backbones "
                             f"--modules {spec.name}")
        if new:
            probed = probe_layers(self.model, new, run_embedding(embedding_kind(self.model)),
                                  spec.preprocess.crop_size, **model_hints(self.model))
            self.spec = replace(spec, layers={**spec.layers, **probed})
        return layers

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
    def _pool(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One layer's canonical output -> (n, width) float32."""
        layer = self.spec.layers[name]
        expected = {"conv": 4, "tokens": 3, "vector": 2}.get(layer.kind)
        if expected is not None and x.ndim != expected:
            raise RuntimeError(f"backbone '{self.spec.name}': layer {name!r} ({layer.kind}) produced shape "
                               f"{tuple(x.shape)}, expected {expected} dims")
        return pool_features(x, layer.kind, self._pools[name], layer.n_prefix)

    def forward_layers(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (n, 3, S, S) normalised -> {layer: (n, width) float32}, in ``layers`` order."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (n, 3, S, S), got {tuple(images.shape)}")
        self._ensure_eval()
        param = next(self.model.parameters(), None)
        if param is not None:
            images = images.to(device=param.device, dtype=param.dtype)
        targets = {name: self.spec.layers[name] for name in self.layers}
        with torch.no_grad():
            feats = HookedForward(self.model, run_embedding(self._embedding_kind), targets, self._pool)(images)
        if self.normalize:
            feats = {name: F.normalize(f, dim=1) for name, f in feats.items()}
        return feats

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (n, 3, S, S) normalised -> (n, n_features) float32 (layers concatenated)."""
        return torch.cat(list(self.forward_layers(images).values()), dim=1)

    # -- record ----------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What determines the features, as plain data (run.json, the feature cache key)."""
        spec = self.spec
        return {
            "name": spec.name, "family": spec.library, "model": spec.model_id, "tag": spec.hub_weights,
            "factory": spec.factory, "model_kwargs": dict(spec.model_kwargs),
            "layers": {n: {"module": spec.layers[n].module, "pooling": self._pools[n], "width": self.feature_dims[n]}
                       for n in self.layers},
            "normalize": self.normalize, "preprocess": spec.preprocess.to_dict(),
            "preprocess_source": spec.preprocess_source,
        }

    def extra_repr(self) -> str:
        return (f"name={self.spec.name!r}, layers={self.layers}, pooling={self.pooling!r}, "
                f"normalize={self.normalize}, n_features={self.n_features}")


# ----------------------------------------------------------------------------- builders


def parse_name(name: str) -> tuple[str, str | None, str | None, str | None]:
    """``timm:resnet18`` / ``open_clip:ViT-B-32/laion2b_s34b_b79k`` / ``torchvision:alexnet[/IMAGENET1K_V1]`` /
    ``custom:module:callable`` -> (family, model, tag, factory)."""
    family, _, rest = name.partition(":")
    if family not in FAMILIES or not rest:
        raise ValueError(f"{name!r} is neither a preset ({', '.join(REGISTRY)}) nor family:model "
                         f"({', '.join(FAMILIES)})")
    if family == "custom":
        return family, None, None, rest
    if family in ("open_clip", "torchvision") and "/" in rest:
        model, _, tag = rest.partition("/")
        return family, model, tag, None
    return family, rest, None, None


def _preset_source(preset: BackboneSpec, family, model, tag, factory) -> None:
    """A preset name with family keys that name another model is a mistake: say how to spell it."""
    given = {"family": family, "model": model, "tag": tag, "factory": factory}
    own = {"family": preset.library, "model": preset.model_id if preset.library != "custom" else None,
           "tag": preset.hub_weights, "factory": preset.factory}
    differ = [k for k, v in given.items() if v is not None and v != own[k]]
    if differ:
        what = display_name(preset.library, preset.model_id, preset.hub_weights, preset.factory)
        raise ValueError(f"backbone.name={preset.name} is a preset ({what}) but backbone.{differ[0]}="
                         f"{given[differ[0]]}; for another model drop the name: "
                         f"backbone={family or preset.library} backbone.model=...")


def build_backbone(name: str | None = None, pretrained: bool = False, weights_path: str | None = None,
                   layers: str | Sequence[str] | None = None, pooling: Pooling = "auto", normalize: bool = False,
                   *, family: str | None = None, model: str | None = None, tag: str | None = None,
                   factory: str | None = None, model_kwargs: Mapping[str, Any] | None = None,
                   image_size: int | None = None, crop_pct: float | None = None, interpolation: str | None = None,
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> FrozenBackbone:
    """Build a FrozenBackbone: a preset ``name``, or ``family`` + ``model`` (+ ``tag``) / ``factory``.

    The keys are those of conf/backbone/base.yaml (one Hydra config section), in three groups:
    the model (name | family, model, tag, factory, model_kwargs; pretrained; weights_path),
    the readout (layers: None = defaults, "all", a name or list of names / module paths; pooling: auto |
    avg | max | cls | flatten | avgKxK, or {layer: pooling}; normalize), and the preprocessing overrides
    (image_size = the crop size, crop_pct, interpolation, mean, std; default: the library's).
    pretrained=False and no weights_path: random init (current torch RNG); weights_path: a local state
    dict (strict); pretrained=True: the library's weights from the local cache, or downloaded if the hub is
    reachable, otherwise WeightsError within seconds.
    """
    layers, pooling, model_kwargs, mean, std = (_plain(v) for v in (layers, pooling, model_kwargs, mean, std))
    preset = None
    if name is not None and ":" in str(name):
        family, model, tag, factory = parse_name(str(name))
        name = None
    if name is not None:
        preset = get_spec(str(name))
        _preset_source(preset, family, model, tag, factory)
        family, model, tag, factory = preset.library, preset.model_id, preset.hub_weights, preset.factory
        if family == "custom":
            model = None
    elif family is None:
        raise ValueError("backbone: give a preset name (backbone=alexnet) or a family "
                         f"(backbone.family={'|'.join(FAMILIES)} with backbone.model or backbone.factory)")
    if isinstance(pooling, str):
        check_pooling(pooling)
    else:
        for value in dict(pooling).values():
            check_pooling(str(value))
    defaults = preset.preprocess_defaults if preset else {}
    pick = lambda key, value: value if value is not None else defaults.get(key)  # noqa: E731
    kwargs = {**(preset.model_kwargs if preset else {}), **dict(model_kwargs or {})}
    src = Source(family, model, tag, factory, bool(pretrained), None if weights_path is None else str(weights_path),
                 kwargs, preset.name if preset else "")
    overrides = {key: pick(key, value) for key, value in (("image_size", image_size), ("crop_pct", crop_pct),
                                                           ("interpolation", interpolation), ("mean", mean),
                                                           ("std", std))}
    built = build_family(src, image_size=overrides["image_size"])
    pre = built.preprocess.with_overrides(**{k: v for k, v in overrides.items() if k != "image_size"})
    given = ", ".join(f"{k}={v}" for k, v in overrides.items() if v is not None)
    source = built.preprocess_source + (f", with {given}" if given else "")
    declared = preset.layers if preset else {}
    paths = {n: ls.module for n, ls in declared.items()} if preset else built.catalog
    hints = model_hints(built.model)
    probed = probe_layers(_freeze(built.model), paths, run_embedding(built.embedding), pre.crop_size,
                          declared=declared, optional=preset is None, **hints)
    spec = BackboneSpec(
        name=src.name, library=family, model_id=preset.model_id if preset else (model or factory), hub_weights=tag, layers=probed,
        default_layers=preset.default_layers if preset else (EMBED,), model_kwargs=kwargs,
        n_prefix_tokens=hints["n_prefix"], factory=factory, preprocess=pre,
        preprocess_defaults=dict(defaults), preprocess_source=source)
    return FrozenBackbone(spec, built.model, layers=layers, pooling=pooling, normalize=normalize)


# ----------------------------------------------------------------------------- CLI


def registry_table(registry: Mapping[str, BackboneSpec] = REGISTRY) -> str:
    """A plain-text table of the presets."""
    header = ("name", "family", "model", "default layers", "layers (width)")
    rows = [header]
    for spec in registry.values():
        model = display_name(spec.library, spec.model_id, spec.hub_weights, spec.factory).partition(":")[2]
        layers = ", ".join(f"{n} ({ls.width})" for n, ls in spec.layers.items())
        rows.append((spec.name, spec.library, model, ",".join(spec.default_layers), layers))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("")
    lines.append(f"families: {', '.join(FAMILIES)} (backbone=timm backbone.model=resnet18; "
                 f"python -m encoders.backbones --modules timm:resnet18 lists a model's module paths)")
    return "\n".join(lines)


def modules_listing(name: str, image_size: int | None = None) -> str:
    """Every module path of a backbone (random init) that runs on an image, with its output shape per image."""
    bb = build_backbone(name, pretrained=False, image_size=image_size)
    size = bb.preprocess.crop_size
    rows, not_run = module_table(bb.model, run_embedding(bb._embedding_kind), size)
    named = {ls.module: n for n, ls in bb.spec.layers.items() if ls.module and ls.module != n}
    table = [("module path", "type", "output (one image)")] + [
        (p + (f"  [= {named[p]}]" if p in named else ""), t, s) for p, t, s in rows]
    widths = [max(len(r[i]) for r in table) for i in range(2)]
    lines = [f"{bb.spec.name}: {len(rows)} modules run on a {size}x{size} image "
             f"(preprocessing: {bb.preprocess.to_dict()})"]
    lines += ["  ".join((r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2])) for r in table]
    lines.append(f"named layers: {', '.join(bb.spec.layers)}; 'embed' = the model's own image embedding "
                 f"({bb.spec.layers[EMBED].shape if EMBED in bb.spec.layers else '?'})")
    if not_run:
        lines.append(f"({not_run} modules do not run on the way to the image embedding, e.g. a timm classifier "
                     f"after the pre-logits, or a text tower)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m encoders.backbones``: the presets; ``--modules NAME``: a model's module paths and shapes."""
    parser = argparse.ArgumentParser(prog="python -m encoders.backbones", description=main.__doc__)
    parser.add_argument("--modules", metavar="NAME",
                        help="a preset or family:model (timm:resnet18, open_clip:ViT-B-32, torchvision:alexnet, "
                             "custom:my_models:build): list every module path with its output shape")
    parser.add_argument("--image-size", type=int, default=None, help="input size of the dummy forward")
    args = parser.parse_args(argv)
    if args.modules:
        try:
            print(modules_listing(args.modules, args.image_size))
        except (ValueError, WeightsError) as err:
            raise SystemExit(f"error: {err}") from None
    else:
        print(registry_table())


if __name__ == "__main__":
    main()
