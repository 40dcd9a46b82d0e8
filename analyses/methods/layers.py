"""Which backbone layer explains each voxel best (Wen et al. 2018, "layer index per voxel").

Two forms:

* One model trained on the features of several layers (concatenated, standardised). For each
  layer, predict with every other layer's standardised features set to 0 (Wen's single-layer
  contribution), score each voxel (R² by default: the explained variance), take the argmax::

      slices = layer_slices(backbone.feature_dims)             # {layer: slice into the features}
      scores = layer_scores(head_fn, z_test, y_test, slices)    # (n_layers, n_voxels)
      best = best_layer(scores)                                  # (n_voxels,) layer index, -1 if none

* A sweep with one model per layer: stack each run's held-out per-voxel accuracy,
  ``best_layer(np.stack([r_layer0, r_layer1, ...]))``.

``best_layer_counts`` gives the voxel counts per best layer in each ROI (drawn by the Wen 2018 job,
``analyses.jobs.wen2018_figures.plot_best_layer_per_roi``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np

from encoders import metrics as _metrics

Predict = Callable[[np.ndarray], np.ndarray]


def layer_slices(feature_dims: Mapping[str, int]) -> dict[str, slice]:
    """{layer: width} in feature order -> {layer: slice of its columns} (as FrozenBackbone.feature_slices)."""
    out, start = {}, 0
    for name, width in feature_dims.items():
        if int(width) < 1:
            raise ValueError(f"layer {name!r} has width {width}")
        out[name] = slice(start, start + int(width))
        start += int(width)
    return out


def keep_one_layer(features: np.ndarray, slices: Mapping[str, slice], layer: str) -> np.ndarray:
    """features (n, n_features), standardised -> a copy with every column outside ``slices[layer]`` set to 0."""
    features = np.asarray(features)
    end = max(s.stop for s in slices.values())
    if features.ndim != 2 or features.shape[1] != end:
        raise ValueError(f"features {features.shape} do not match the layer slices ({end} columns)")
    out = np.zeros_like(features)
    out[:, slices[layer]] = features[:, slices[layer]]
    return out


def single_layer_predictions(predict: Predict, features: np.ndarray,
                             slices: Mapping[str, slice]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (layer, predict(features with only that layer kept)) for every layer, in slice order.

    predict: standardised features (n, n_features) -> predictions (n, n_voxels), e.g. a trained head.
    One layer's predictions are in memory at a time.
    """
    for name in slices:
        yield name, np.asarray(predict(keep_one_layer(features, slices, name)))


def layer_scores(predict: Predict, features: np.ndarray, true: np.ndarray, slices: Mapping[str, slice],
                 score: str = "r2") -> np.ndarray:
    """Per-layer, per-voxel accuracy of the single-layer predictions: (n_layers, n_voxels) float64.

    features (n, n_features) standardised; true (n, n_voxels). score: "r2" (explained variance,
    Wen 2018) or "r" (Pearson r). Rows follow the order of ``slices``.
    """
    fn = {"r2": _metrics.r2_score, "r": _metrics.pearson_r}
    if score not in fn:
        raise ValueError(f"score must be one of {sorted(fn)}, got {score!r}")
    return np.stack([fn[score](pred, true) for _, pred in single_layer_predictions(predict, features, slices)])


def best_layer(scores: np.ndarray) -> np.ndarray:
    """scores (n_layers, n_voxels) -> index of the best layer per voxel (n_voxels,) int64.

    NaN scores never win; a voxel whose scores are all NaN gets -1.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (n_layers, n_voxels), got {scores.shape}")
    finite = np.isfinite(scores)
    best = np.argmax(np.where(finite, scores, -np.inf), axis=0)
    return np.where(finite.any(0), best, -1).astype(np.int64)


def best_layer_counts(best: np.ndarray, rois: Mapping[str, np.ndarray], n_layers: int) -> dict[str, np.ndarray]:
    """Voxels per best layer in each ROI: {roi: (n_layers,) int64}; voxels with best = -1 are left out.

    best (n_voxels,) from :func:`best_layer`; rois: name -> bool mask (n_voxels,) or indices.
    """
    best = np.asarray(best)
    out = {}
    for name, sel in rois.items():
        sel = np.asarray(sel)
        b = best[np.flatnonzero(sel) if sel.dtype == bool else sel]
        out[name] = np.bincount(b[b >= 0], minlength=n_layers)[:n_layers].astype(np.int64)
    return out


