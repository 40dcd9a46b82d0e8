"""Layers of any model by module path: what each one outputs, how it is pooled, and the hooked forward.

    specs = probe_layers(model, {"layer3": "layer3", "embed": ""}, run, size=224)   # one dummy forward
    specs["layer3"].shape, specs["layer3"].kind            # (256, 14, 14), "conv"
    pooled_width(specs["layer3"], "avg2x2")                # 1024
    feats = HookedForward(model, run, targets, pool_fn)(images)   # stops after the last requested layer

A layer's output is recognised by its shape: (n, c, h, w) conv maps (channels-last (n, h, w, c) maps, as
Swin's, are recognised by their square spatial dims), (n, L, d) token sequences (sequence-first (L, n, d),
as older open_clip transformers, by the batch axis of the probe), (n, d) vectors. Tuple outputs are read
at their first element. Hooks keep the output of a module's last call in a forward (a module run several
times, such as torchvision ResNet's shared ``relu``, gives its last output).
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerSpec", "POOLINGS", "EMBED", "probe_layers", "pooled_width", "effective_pool", "pool_features",
           "canonical", "HookedForward", "module_table", "close_matches"]

EMBED = "embed"
KINDS = ("conv", "tokens", "vector", "other")
POOLINGS = ("auto", "avg", "max", "cls", "flatten")  # and avgKxK: spatial average to a k x k grid
_GRID = re.compile(r"^avg(\d+)x(\d+)$")
_PROBE_BATCH = 2


@dataclass(frozen=True)
class LayerSpec:
    """One readable layer.

    module: dotted path of the module to hook in the wrapped model; "" = the model's own image embedding
        (the ``embed`` pseudo-layer: open_clip ``encode_image``, timm pre-logits, or ``model(x)``).
    width: feature width after the layer's own (auto) pooling.
    kind: "conv" (n, c, h, w) | "tokens" (n, L, d) | "vector" (n, d) | "other" (any other rank: flatten only).
    pool: the layer's own pooling for ``pooling=auto`` ("auto" = avg for conv maps, CLS for tokens with a
        prefix token, else the patch-token mean; identity for vectors; flatten for other).
    shape: one image's output shape in canonical layout: conv (c, h, w), tokens (L, d), vector (d,); None
        until probed.
    n_prefix: prefix tokens (CLS, registers) at the start of a token sequence.
    layout: the raw output's layout: "nchw" | "nhwc" for conv maps, "nld" | "lnd" for tokens.
    calls: times the module runs in one forward (the last call's output is read).
    """

    module: str
    width: int
    kind: str
    pool: str = "auto"
    shape: tuple[int, ...] | None = None
    n_prefix: int = 0
    layout: str = ""
    calls: int = 1


# ----------------------------------------------------------------------------- recognising outputs


def _first_tensor(output: Any) -> torch.Tensor | None:
    """A module output's tensor (the first element of a tuple/list), else None."""
    while isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output if isinstance(output, torch.Tensor) else None


def _recognise(x: torch.Tensor, batch: int, nhwc_hint: bool, batch_first_hint: bool) -> tuple[str, str, tuple]:
    """Raw output (from a probe of ``batch`` images) -> (kind, layout, one image's canonical shape)."""
    if x.ndim == 4:
        _, a, b, c = x.shape
        nhwc = (a == b and b != c) or (a == b == c and nhwc_hint)
        return ("conv", "nhwc", (c, a, b)) if nhwc else ("conv", "nchw", (a, b, c))
    if x.ndim == 3:
        n0, n1 = x.shape[0] == batch, x.shape[1] == batch
        seq_first = (n1 and not n0) or (n0 == n1 and not batch_first_hint)
        return ("tokens", "lnd", (x.shape[0], x.shape[2])) if seq_first else ("tokens", "nld", tuple(x.shape[1:]))
    if x.ndim == 2:
        return "vector", "", (x.shape[1],)
    return "other", "", tuple(x.shape[1:])


def canonical(x: torch.Tensor, layer: LayerSpec) -> torch.Tensor:
    """A raw module output -> batch-first, channels-first: conv (n, c, h, w), tokens (n, L, d)."""
    if layer.layout == "nhwc":
        return x.permute(0, 3, 1, 2)
    if layer.layout == "lnd":
        return x.transpose(0, 1)
    return x


def _is_batch_first(model: nn.Module, module_path: str) -> bool:
    """batch_first of the nearest module on the path (itself or an ancestor) that says; default True."""
    parts = module_path.split(".") if module_path else []
    for depth in range(len(parts), -1, -1):
        flag = getattr(model.get_submodule(".".join(parts[:depth])), "batch_first", None)
        if isinstance(flag, bool):
            return flag
    return True


# ----------------------------------------------------------------------------- pooling


def _grid(pool: str) -> int | None:
    m = _GRID.match(pool)
    if m is None:
        return None
    if m.group(1) != m.group(2) or int(m.group(1)) < 1:
        raise ValueError(f"pooling {pool!r}: the grid must be square and >= 1 (e.g. avg2x2)")
    return int(m.group(1))


def check_pooling(pool: str) -> None:
    if pool not in POOLINGS and _grid(pool) is None:
        raise ValueError(f"unknown pooling {pool!r}; valid: {', '.join(POOLINGS)}, or avgKxK (e.g. avg2x2)")


def default_pool(layer: LayerSpec) -> str:
    """The layer's own pooling: LayerSpec.pool, else by kind."""
    if layer.pool != "auto":
        return layer.pool
    return {"conv": "avg", "tokens": "cls" if layer.n_prefix >= 1 else "avg", "vector": "none",
            "other": "flatten"}[layer.kind]


def effective_pool(layer: LayerSpec, pooling: str, name: str = "?") -> str:
    """The pooling used for a layer given the requested one; ValueError where it is not defined."""
    check_pooling(pooling)
    if pooling == "auto" or layer.kind == "vector":
        return default_pool(layer)
    if pooling == "cls" and (layer.kind != "tokens" or layer.n_prefix < 1):
        raise ValueError(f"pooling 'cls' needs a token layer with a CLS token; layer {name!r} is a {layer.kind} "
                         f"layer with {layer.n_prefix} prefix tokens")
    if layer.kind == "other" and pooling != "flatten":
        raise ValueError(f"layer {name!r} outputs shape {layer.shape}: only pooling 'flatten' applies")
    k = _grid(pooling)
    if k is not None and layer.kind == "tokens" and layer.shape is not None:
        n_patches = layer.shape[0] - layer.n_prefix
        if round(n_patches ** 0.5) ** 2 != n_patches:
            raise ValueError(f"pooling {pooling!r} needs a square grid of patch tokens; layer {name!r} has "
                             f"{n_patches}")
    return pooling


def pooled_width(layer: LayerSpec, pool: str) -> int:
    """Width of a probed layer under pooling ``pool`` (an effective one)."""
    shape = layer.shape
    if shape is None:
        raise ValueError(f"layer at {layer.module!r} has not been probed")
    total = 1
    for s in shape:
        total *= int(s)
    if layer.kind in ("vector", "other") or pool == "flatten":
        return total
    k = _grid(pool)
    channels = shape[0] if layer.kind == "conv" else shape[1]
    return channels * k * k if k else channels


def pool_features(x: torch.Tensor, kind: str, pool: str, n_prefix_tokens: int = 0) -> torch.Tensor:
    """Pool one layer's canonical output to (n, width) float32 (always a fresh tensor).

    conv (n, c, h, w): avg / max over h, w -> (n, c); avgKxK -> adaptive average to k x k, (n, c*k*k);
    tokens (n, L, d): cls -> token 0; avg / max over the patch tokens tokens[n_prefix_tokens:] -> (n, d);
    avgKxK -> the patch tokens as their square grid, averaged to k x k, (n, d*k*k);
    flatten -> (n, prod); vector (n, d): unchanged.
    """
    k = _grid(pool)
    if kind == "vector":
        out = x
    elif pool == "flatten" or kind == "other":
        out = x.flatten(1)
    elif kind == "conv" and pool in ("avg", "max"):
        out = x.mean(dim=(2, 3)) if pool == "avg" else x.amax(dim=(2, 3))
    elif kind == "tokens" and pool in ("avg", "max"):
        patches = x[:, n_prefix_tokens:]
        out = patches.mean(dim=1) if pool == "avg" else patches.amax(dim=1)
    elif kind == "tokens" and pool == "cls":
        out = x[:, 0]
    elif k is not None and kind in ("conv", "tokens"):
        if kind == "tokens":
            patches = x[:, n_prefix_tokens:]
            g = round(patches.shape[1] ** 0.5)
            if g * g != patches.shape[1]:
                raise ValueError(f"pooling {pool!r} needs a square grid of patch tokens, got {patches.shape[1]}")
            x = patches.transpose(1, 2).reshape(x.shape[0], -1, g, g)
        out = F.adaptive_avg_pool2d(x.float(), k).flatten(1)
    else:
        raise ValueError(f"pooling {pool!r} is not defined for {kind!r} layers")
    return out.to(dtype=torch.float32, copy=True)


# ----------------------------------------------------------------------------- the hooked forward


class _StopForward(Exception):
    """Raised from the last needed hook: the rest of the forward is not run."""


def _param(model: nn.Module) -> torch.Tensor | None:
    return next(model.parameters(), None)


class HookedForward:
    """One forward of ``run(model, images)`` with hooks on ``targets`` {name: LayerSpec}.

    on_output(name, canonical tensor) -> what to keep (e.g. pooled features). The forward stops right
    after every hooked module has run its ``calls`` times, unless a target is the embedding ("").
    """

    def __init__(self, model: nn.Module, run: Callable[[nn.Module, torch.Tensor], Any],
                 targets: Mapping[str, LayerSpec], on_output: Callable[[str, torch.Tensor], torch.Tensor]):
        self.model, self.run, self.targets, self.on_output = model, run, dict(targets), on_output
        self.stop_early = all(t.module for t in self.targets.values())

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        store: dict[str, torch.Tensor] = {}
        modules: dict[str, list[str]] = {}
        for name, layer in self.targets.items():
            if layer.module:
                modules.setdefault(layer.module, []).append(name)
        counts = dict.fromkeys(modules, 0)
        needed = {path: self.targets[names[0]].calls for path, names in modules.items()}

        def hook(path: str, _module: nn.Module, _inputs: Any, output: Any) -> None:
            x = _first_tensor(output)
            if x is None:
                raise RuntimeError(f"module {path!r} returned {type(output).__name__}, not a tensor")
            counts[path] += 1
            for name in modules[path]:
                store[name] = self.on_output(name, canonical(x, self.targets[name]))
            if self.stop_early and all(counts[p] >= needed[p] for p in counts):
                raise _StopForward

        handles = [self.model.get_submodule(path).register_forward_hook(
            lambda m, i, o, path=path: hook(path, m, i, o)) for path in modules]
        try:
            final = self.run(self.model, images)
        except _StopForward:
            final = None
        finally:
            for handle in handles:
                handle.remove()
        for name, layer in self.targets.items():
            if not layer.module:
                x = _first_tensor(final)
                if x is None:
                    raise RuntimeError(f"the model's embedding is a {type(final).__name__}, not a tensor")
                store[name] = self.on_output(name, canonical(x, layer))
        missing = [n for n in self.targets if n not in store]
        if missing:
            raise RuntimeError(f"layers {missing} did not run in the model's forward")
        return {name: store[name] for name in self.targets}


# ----------------------------------------------------------------------------- probing


def _dummy(model: nn.Module, size: int, batch: int = _PROBE_BATCH) -> torch.Tensor:
    p = _param(model)
    return torch.zeros(batch, 3, size, size, device=p.device if p is not None else "cpu",
                       dtype=p.dtype if p is not None else torch.float32)


def probe_layers(model: nn.Module, paths: Mapping[str, str], run: Callable[[nn.Module, torch.Tensor], Any],
                 size: int, n_prefix: int = 0, num_patches: int | None = None, nhwc_hint: bool = False,
                 declared: Mapping[str, LayerSpec] | None = None, optional: bool = False) -> dict[str, LayerSpec]:
    """{name: module path ("" = the embedding)} -> {name: LayerSpec} from one dummy forward of 2 images.

    n_prefix: the model's prefix tokens; a token layer with exactly ``num_patches`` tokens has none (e.g. a
    ViT's patch embedding). declared: LayerSpecs whose ``pool`` is kept (presets). Widths are those of
    the auto pooling. A layer that gives no tensor (a module that does not run in eval mode, such as
    Inception's auxiliary head) is an error, or left out with ``optional``.
    """
    declared = declared or {}
    calls: dict[str, int] = dict.fromkeys((p for p in paths.values() if p), 0)
    outputs: dict[str, torch.Tensor] = {}

    def hook(path, _m, _i, output):
        calls[path] += 1
        x = _first_tensor(output)
        if x is not None:
            outputs[path] = x.detach()

    handles = [model.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: hook(p, m, i, o)) for p in calls]
    try:
        with torch.no_grad():
            final = run(model, _dummy(model, size))
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, path in paths.items():
        x = outputs.get(path) if path else _first_tensor(final)
        if x is None:
            if optional:
                continue
            raise ValueError(f"layer {name!r} (module {path!r}) gives no tensor in a forward of {size}-px images "
                             f"(it does not run in eval mode, or returns something else)")
        kind, layout, shape = _recognise(x, _PROBE_BATCH, nhwc_hint, _is_batch_first(model, path))
        prefix = 0
        if kind == "tokens":
            prefix = 0 if num_patches is not None and shape[0] == num_patches else min(n_prefix, shape[0] - 1)
        base = declared.get(name)
        layer = LayerSpec(path, 0, kind, base.pool if base else "auto", tuple(int(s) for s in shape), prefix,
                          layout, max(calls.get(path, 1), 1))
        out[name] = replace(layer, width=pooled_width(layer, default_pool(layer)))
    return out


def module_table(model: nn.Module, run: Callable[[nn.Module, torch.Tensor], Any], size: int
                 ) -> tuple[list[tuple[str, str, str]], int]:
    """Every module that runs on a dummy image: [(path, class name, output shape per image)], and the
    number of modules that did not run (e.g. a CLIP's text tower)."""
    seen: dict[str, str] = {}
    handles = []
    for path, module in model.named_modules():
        if not path:
            continue

        def hook(_m, _i, output, path=path):
            x = _first_tensor(output)
            seen[path] = "x".join(str(s) for s in x.shape[1:]) if x is not None else type(output).__name__

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run(model, _dummy(model, size, batch=1))
    finally:
        for handle in handles:
            handle.remove()
    rows = [(p, type(m).__name__, seen[p]) for p, m in model.named_modules() if p in seen]
    return rows, sum(1 for p, _ in model.named_modules() if p and p not in seen)


def close_matches(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Up to n distinct candidates close to ``name`` (difflib ratio >= 0.6), best first, ties alphabetical."""
    scored = []
    for candidate in dict.fromkeys(candidates):
        ratio = difflib.SequenceMatcher(None, name, candidate).ratio()
        if ratio >= 0.6:
            scored.append((-ratio, candidate))
    return [c for _, c in sorted(scored)[:n]]
