"""What turns backbone outputs into the head's input: fitted at training time, saved with the head.

    t = FeatureTransform(n_features=64)
    t.set_frame_stage(reducer)                              # video runs: the datamodule's fitted FeatureReducer
    t.fit(train, blocks=backbone.feature_slices)            # every run: robust standardisation (train.py)
    z = t.from_backbone(raw)      # backbone features (n, F) -> head input (n, n_features): frame stage, standardisation
    z = t.standardise(x)          # per-sample features (n, n_features) -> head input (standardisation only)
    state = t.state(); FeatureTransform.from_state(state)   # what head.pt holds

Stages, in the order training applied them:

1. frame stage (video runs only): every unit z-scored with the training frames' statistics, PCA per layer,
   PCA across layers (``datamodules.video_features.FeatureReducer``, fitted on training frames; its
   z-score robust by the same rule as stage 3). Applies to any image: computed here in float64 with the
   reducer's fitted arrays, so it reproduces the datamodule's per-frame features.
2. temporal stage (video runs only): HRF convolution at the frame rate, averaging per TR, detrending. It
   belongs to a time series, not to an image: ``temporal`` records it, and nothing here applies it. The
   image analyses apply every other stage to single images, as Wen et al. (2018) did when they predicted
   cortical responses to images from the encoding models they fitted on movies.
3. standardisation: (x - mean) / std with the training samples' statistics, robust by default (``fit``):

   * std floor (``std_floor``, default 0.1): each unit's std is at least std_floor × the median std of
     its layer's non-constant units (``blocks``; one block without them). Constant units get the floor.
   * clip (``clip``, default true): standardised values are clipped to each unit's range over the
     training samples, so the training features are unchanged and no held-out sample takes a unit past
     what the head was fitted on (a unit constant in training stays at 0).

   Video runs (a frame stage) clip at the frame z-score instead, not here: that is where a silent unit's
   blow-up enters (before the PCA and the HRF spread it over every feature), and where a single image
   and a movie frame share one distribution. The per-TR features standardised here are HRF-smoothed, so
   their training range is narrower than one frame's: clipping an image's features to it (the image
   analyses) would saturate them. Here they get the std floor only.

   Why: with plain training-statistics z-scoring, a unit nearly silent in training (a random-init ReLU
   unit, a unit constant over a small training set) reaches |z| in the thousands on held-out stimuli,
   and one such unit ruins a voxel's predictions (random-init AlexNet on the video and NOD demos: mean
   test R² −5 to −23 with positive r). ``std_floor=None, clip=False`` is plain z-scoring (std floored at
   1e-6·max), as head.pt files written before the guard keep doing. For video runs these are statistics
   of the per-TR features.

Every stage is fitted on the training samples only and applied alike to the training, validation and
test samples and to every analysis that uses the saved encoder (``encoders.trained``).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn


def floored_std(std: np.ndarray, blocks: Mapping[str, slice], std_floor: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Training std (F,) -> (the std used (F,), bool mask of the units raised to the floor (F,)).

    Without a floor: std >= 1e-6·max (the plain standardisation). With one: within each block, std >=
    std_floor × the median of the block's non-constant stds (constant: <= 1e-6·max); the same rule as
    ``datamodules.video_features.floored_std`` (datamodules and encoders share no code)."""
    std = np.asarray(std, dtype=np.float64)
    tiny = max(float(std.max(initial=0.0)) * 1e-6, 1e-12)
    if std_floor is None:
        return np.maximum(std, tiny), np.zeros(std.shape, bool)
    if not std_floor > 0:
        raise ValueError(f"feature_scaling.std_floor must be positive or null, got {std_floor}")
    constant = std <= tiny
    floor = np.empty_like(std)
    for cols in blocks.values():
        live = std[cols][~constant[cols]]
        floor[cols] = max(std_floor * float(np.median(live)), 1e-12) if live.size else 1.0
    raised = std < floor
    return np.where(raised, floor, std), raised


SCALING_DEFAULTS = {"std_floor": 0.1, "clip": True}


def scaling_options(options: Mapping | None) -> dict:
    """train.yaml's ``feature_scaling`` ({std_floor: float > 0 or null, clip: bool}) with the defaults filled
    in; ValueError (one line, naming the key) for an unknown key or a bad value."""
    out = {**SCALING_DEFAULTS, **dict(options or {})}
    unknown = sorted(set(out) - set(SCALING_DEFAULTS))
    if unknown:
        raise ValueError(f"feature_scaling: unknown key(s) {unknown} (has {sorted(SCALING_DEFAULTS)})")
    floor = out["std_floor"]
    if floor is not None and (isinstance(floor, bool) or not isinstance(floor, (int, float)) or not floor > 0):
        raise ValueError(f"feature_scaling.std_floor must be a positive number or null, got {floor!r}")
    if not isinstance(out["clip"], bool):
        raise ValueError(f"feature_scaling.clip must be true or false, got {out['clip']!r}")
    return out


class FeatureTransform(nn.Module):
    """Backbone features -> head input. n_features: the head's input width (after any frame-stage PCA).

    Buffers: mean, std (n_features,); lower, upper (n_features,) the clip bounds of the standardised
    features (±inf: no clip); a video run's frame stage adds frame_mean, frame_std, frame_lower,
    frame_upper (n_backbone,) and the PCA arrays."""

    def __init__(self, n_features: int):
        super().__init__()
        self.n_features = int(n_features)
        self.register_buffer("mean", torch.zeros(self.n_features))
        self.register_buffer("std", torch.ones(self.n_features))
        self.register_buffer("lower", torch.full((self.n_features,), -torch.inf))
        self.register_buffer("upper", torch.full((self.n_features,), torch.inf))
        self.layers: dict[str, tuple[int, int]] = {}   # frame stage: layer -> (start, stop) of its backbone columns
        self.has_frame_stage = False
        self.temporal: dict | None = None
        self.scaling: dict | None = None    # how ``fit`` made the standardisation robust, and what it touched
        self.frame_scaling: dict | None = None

    # -- fitting ------------------------------------------------------------------------------
    def set_standardisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Plain standardisation: mean, std (n_features,) from the training samples; std floors at 1e-6·max;
        no clip. (``fit`` is the robust default; this is what runs saved before it did.)"""
        std = torch.as_tensor(std).float()
        std = std.clamp(min=max(float(std.max()) * 1e-6, 1e-12))
        self.mean.copy_(torch.as_tensor(mean))
        self.std.copy_(std)
        self.lower.fill_(-torch.inf)
        self.upper.fill_(torch.inf)
        self.scaling = None

    @torch.no_grad()
    def fit(self, train: torch.Tensor, blocks: Mapping[str, slice] | None = None, std_floor: float | None = 0.1,
            clip: bool = True, batch: int = 4096) -> "FeatureTransform":
        """Fit the standardisation on the training samples' features ``train`` (n, n_features) (per-sample
        features: the backbone's, or a video run's per-TR features): mean, std (unbiased, as
        ``torch.std``) with the std floor, and the clip bounds (the training range of each standardised
        unit, computed with ``standardise`` itself, so the training features pass unchanged). With a frame
        stage (set it first) the clip is the frame stage's, not this one's (see the module docstring).
        blocks: {layer: slice of the columns} for the floor's medians (None: one block)."""
        train = torch.as_tensor(train)
        if train.ndim != 2 or train.shape[1] != self.n_features or len(train) < 2:
            raise ValueError(f"FeatureTransform.fit: train must be (n >= 2, {self.n_features}), got {tuple(train.shape)}")
        blocks = dict(blocks) if blocks else {"features": slice(0, self.n_features)}
        chunks = [train[start:start + batch] for start in range(0, len(train), batch)]
        mean = sum(c.double().sum(0) for c in chunks) / len(train)   # float64 sums, one chunk at a time
        raw_std = (sum(((c.double() - mean) ** 2).sum(0) for c in chunks) / (len(train) - 1)).sqrt().numpy()
        self.mean.copy_(mean)
        std, raised = floored_std(raw_std, blocks, std_floor)
        self.std.copy_(torch.from_numpy(std))
        self.lower.fill_(-torch.inf)
        self.upper.fill_(torch.inf)
        clip_here = clip and not self.has_frame_stage
        if clip_here:
            lo = torch.full((self.n_features,), torch.inf)
            hi = torch.full((self.n_features,), -torch.inf)
            for chunk in chunks:
                z = self.standardise(chunk)
                lo, hi = torch.minimum(lo, z.min(0).values), torch.maximum(hi, z.max(0).values)
            self.lower.copy_(lo)
            self.upper.copy_(hi)
        self.scaling = {"std_floor": std_floor,
                        "clip": "training range" if clip_here else ("at the frame stage" if clip else None),
                        "n_units": self.n_features, "n_floored": int(raised.sum()),
                        "n_constant": int((raw_std <= max(float(raw_std.max()) * 1e-6, 1e-12)).sum())}
        return self

    def set_frame_stage(self, reducer, temporal: Mapping | None = None) -> None:
        """Adopt a fitted frame reducer (anything with ``mean_``, ``std_`` (F,), ``variance``, ``layer_slices``
        {layer: slice} or None (one block), ``layer_pcas_`` {layer: PCA with ``mean_``, ``components_``},
        ``joint_pca_``, ``n_components_``, as ``datamodules.video_features.FeatureReducer``), and a
        description of the temporal stage that follows it. Its output width must be n_features."""
        if int(reducer.n_components_) != self.n_features:
            raise ValueError(f"frame stage gives {reducer.n_components_} features, the head takes {self.n_features}")
        f64 = dict(dtype=torch.float64)
        self.register_buffer("frame_mean", torch.as_tensor(np.asarray(reducer.mean_), **f64))
        self.register_buffer("frame_std", torch.as_tensor(np.asarray(reducer.std_), **f64))
        n_in = int(self.frame_mean.numel())
        if getattr(reducer, "lower_", None) is not None:  # a robust reducer's clip bounds
            self.register_buffer("frame_lower", torch.as_tensor(np.asarray(reducer.lower_), **f64))
            self.register_buffer("frame_upper", torch.as_tensor(np.asarray(reducer.upper_), **f64))
        self.frame_scaling = {"std_floor": getattr(reducer, "std_floor", None),
                              "clip": "training range" if hasattr(self, "frame_lower") else None,
                              "n_floored": getattr(reducer, "n_floored_", None),
                              "n_constant": getattr(reducer, "n_constant_", None)}
        self.layers = {}
        if reducer.variance is not None:
            blocks = reducer.layer_slices or {"features": slice(0, n_in)}
            for k, (name, cols) in enumerate(blocks.items()):
                pca = reducer.layer_pcas_[name]
                self.layers[name] = (int(cols.start or 0), int(cols.stop if cols.stop is not None else n_in))
                self.register_buffer(f"layer{k}_mean", torch.as_tensor(pca.mean_, **f64))
                self.register_buffer(f"layer{k}_components", torch.as_tensor(pca.components_, **f64))
            if reducer.joint_pca_ is not None:
                self.register_buffer("joint_mean", torch.as_tensor(reducer.joint_pca_.mean_, **f64))
                self.register_buffer("joint_components", torch.as_tensor(reducer.joint_pca_.components_, **f64))
        self.has_frame_stage = True
        self.temporal = dict(temporal) if temporal else None

    # -- applying -----------------------------------------------------------------------------
    @property
    def n_backbone(self) -> int | None:
        """The backbone width the frame stage takes, or None without a frame stage."""
        return int(self.frame_mean.numel()) if self.has_frame_stage else None

    def frame_stage(self, raw: torch.Tensor) -> torch.Tensor:
        """Backbone features (n, F) -> per-frame features (n, n_features), float64 (identity without a frame stage)."""
        if not self.has_frame_stage:
            return raw
        z = (raw.to(torch.float64) - self.frame_mean) / self.frame_std
        if hasattr(self, "frame_lower"):
            z = torch.clamp(z, self.frame_lower, self.frame_upper)
        if not self.layers:
            return z
        parts = [(z[:, a:b] - getattr(self, f"layer{k}_mean")) @ getattr(self, f"layer{k}_components").T
                 for k, (a, b) in enumerate(self.layers.values())]
        joined = torch.cat(parts, dim=1)
        if hasattr(self, "joint_components"):
            joined = (joined - self.joint_mean) @ self.joint_components.T
        return joined

    @property
    def clips(self) -> bool:
        """Whether the standardised features are clipped (a robust ``fit``; not in runs saved before it)."""
        return bool(torch.isfinite(self.lower).any() or torch.isfinite(self.upper).any())

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample features (n, n_features) -> (x - mean) / std, clipped to [lower, upper], float32."""
        z = (x.float() - self.mean) / self.std
        return torch.clamp(z, self.lower, self.upper) if self.clips else z

    @torch.no_grad()
    def clipped_fraction(self, x: torch.Tensor, batch: int = 4096) -> float:
        """The fraction of the values of per-sample features x (n, n_features) that the clip changes."""
        if not self.clips or len(x) == 0:
            return 0.0
        n = 0
        for start in range(0, len(x), batch):
            z = (torch.as_tensor(x[start:start + batch]).float() - self.mean) / self.std
            n += int(((z < self.lower) | (z > self.upper)).sum())
        return n / (len(x) * self.n_features)

    def from_backbone(self, raw: torch.Tensor) -> torch.Tensor:
        """Backbone features (n, F) -> the head's input (n, n_features) float32: frame stage (if any), then the
        standardisation. The temporal stage of a video run is not applied (see the module docstring)."""
        return self.standardise(self.frame_stage(raw))

    # -- saving -------------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything needed to rebuild it (``from_state``): tensors on the CPU and plain metadata."""
        return {"n_features": self.n_features, "layers": {k: list(v) for k, v in self.layers.items()},
                "has_frame_stage": self.has_frame_stage, "temporal": self.temporal, "scaling": self.scaling,
                "frame_scaling": self.frame_scaling,
                "buffers": {k: v.detach().cpu() for k, v in self.named_buffers()}}

    @classmethod
    def from_state(cls, state: Mapping) -> "FeatureTransform":
        """The transform ``state()`` saved; a state written before the robust standardisation (no lower /
        upper, no frame clip bounds) gives the plain standardisation it was trained with."""
        t = cls(int(state["n_features"]))
        for name, value in state["buffers"].items():
            if name in ("mean", "std", "lower", "upper"):
                getattr(t, name).copy_(value)
            else:
                t.register_buffer(name, torch.as_tensor(value))
        t.layers = {k: (int(v[0]), int(v[1])) for k, v in (state.get("layers") or {}).items()}
        t.has_frame_stage = bool(state.get("has_frame_stage", False))
        t.temporal = state.get("temporal")
        t.scaling, t.frame_scaling = state.get("scaling"), state.get("frame_scaling")
        return t

    def describe(self, held_out: Mapping[str, torch.Tensor | None] | None = None) -> dict:
        """What run.json records about the transform: its stages, what the robust standardisation touched
        (units floored, constant; with ``held_out`` {split: per-sample features}, the fraction of each
        split's values the clip changed)."""
        scaling = dict(self.scaling) if self.scaling else {"std_floor": None, "clip": None}
        if held_out and self.clips:
            scaling["clipped_fraction"] = {s: self.clipped_fraction(x) for s, x in held_out.items() if x is not None}
        out = {"standardisation": {"statistics": "training samples' mean and std", **scaling},
               "frame_stage": None, "temporal_stage": None}
        if self.has_frame_stage:
            out["frame_stage"] = {"zscore": "training frames", **(self.frame_scaling or {}), "n_in": self.n_backbone,
                                  "pca_layers": {k: int(getattr(self, f"layer{i}_components").shape[0])
                                                 for i, k in enumerate(self.layers)},
                                  "joint_pca": int(self.joint_components.shape[0]) if hasattr(self, "joint_components")
                                  else None, "n_out": self.n_features}
            out["temporal_stage"] = self.temporal
        return out
