"""What turns backbone outputs into the head's input: fitted at training time, saved with the head.

    t = FeatureTransform(n_features=64)
    t.set_standardisation(train.mean(0), train.std(0))      # every run
    t.set_frame_stage(reducer)                              # video runs: the datamodule's fitted FeatureReducer
    z = t.from_backbone(raw)      # backbone features (n, F) -> head input (n, n_features): frame stage, standardisation
    z = t.standardise(x)          # per-sample features (n, n_features) -> head input (standardisation only)
    state = t.state(); FeatureTransform.from_state(state)   # what head.pt holds

Stages, in the order training applied them:

1. frame stage (video runs only): every unit z-scored with the training frames' statistics, PCA per layer,
   PCA across layers (``datamodules.video_features.FeatureReducer``, fitted on training frames). Applies
   to any image: computed here in float64 with the reducer's fitted arrays, so it reproduces the
   datamodule's per-frame features.
2. temporal stage (video runs only): HRF convolution at the frame rate, averaging per TR, detrending. It
   belongs to a time series, not to an image: ``temporal`` records it, and nothing here applies it. The
   image analyses apply every other stage to single images, as Wen et al. (2018) did when they predicted
   cortical responses to images from the encoding models they fitted on movies.
3. standardisation: (x - mean) / std with the training samples' statistics (std floored at 1e-6·max).
   For video runs these are statistics of the per-TR features.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn


class FeatureTransform(nn.Module):
    """Backbone features -> head input. n_features: the head's input width (after any frame-stage PCA)."""

    def __init__(self, n_features: int):
        super().__init__()
        self.n_features = int(n_features)
        self.register_buffer("mean", torch.zeros(self.n_features))
        self.register_buffer("std", torch.ones(self.n_features))
        self.layers: dict[str, tuple[int, int]] = {}   # frame stage: layer -> (start, stop) of its backbone columns
        self.has_frame_stage = False
        self.temporal: dict | None = None

    # -- fitting ------------------------------------------------------------------------------
    def set_standardisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """mean, std: (n_features,) from the training samples; std floors at 1e-6·max."""
        std = torch.as_tensor(std).float()
        std = std.clamp(min=max(float(std.max()) * 1e-6, 1e-12))
        self.mean.copy_(torch.as_tensor(mean))
        self.std.copy_(std)

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
        if not self.layers:
            return z
        parts = [(z[:, a:b] - getattr(self, f"layer{k}_mean")) @ getattr(self, f"layer{k}_components").T
                 for k, (a, b) in enumerate(self.layers.values())]
        joined = torch.cat(parts, dim=1)
        if hasattr(self, "joint_components"):
            joined = (joined - self.joint_mean) @ self.joint_components.T
        return joined

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample features (n, n_features) -> (x - mean) / std, float32."""
        return (x.float() - self.mean) / self.std

    def from_backbone(self, raw: torch.Tensor) -> torch.Tensor:
        """Backbone features (n, F) -> the head's input (n, n_features) float32: frame stage (if any), then the
        standardisation. The temporal stage of a video run is not applied (see the module docstring)."""
        return self.standardise(self.frame_stage(raw))

    # -- saving -------------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything needed to rebuild it (``from_state``): tensors on the CPU and plain metadata."""
        return {"n_features": self.n_features, "layers": {k: list(v) for k, v in self.layers.items()},
                "has_frame_stage": self.has_frame_stage, "temporal": self.temporal,
                "buffers": {k: v.detach().cpu() for k, v in self.named_buffers()}}

    @classmethod
    def from_state(cls, state: Mapping) -> "FeatureTransform":
        t = cls(int(state["n_features"]))
        for name, value in state["buffers"].items():
            if name in ("mean", "std"):
                getattr(t, name).copy_(value)
            else:
                t.register_buffer(name, torch.as_tensor(value))
        t.layers = {k: (int(v[0]), int(v[1])) for k, v in (state.get("layers") or {}).items()}
        t.has_frame_stage = bool(state.get("has_frame_stage", False))
        t.temporal = state.get("temporal")
        return t

    def describe(self) -> dict:
        """What run.json records about the transform."""
        out = {"standardisation": "training samples' mean and std", "frame_stage": None, "temporal_stage": None}
        if self.has_frame_stage:
            out["frame_stage"] = {"zscore": "training frames", "n_in": self.n_backbone,
                                  "pca_layers": {k: int(getattr(self, f"layer{i}_components").shape[0])
                                                 for i, k in enumerate(self.layers)},
                                  "joint_pca": int(self.joint_components.shape[0]) if hasattr(self, "joint_components")
                                  else None, "n_out": self.n_features}
            out["temporal_stage"] = self.temporal
        return out
