"""Per-frame backbone features -> features per fMRI volume (Wen et al. 2018).

    reducer = FeatureReducer(backbone.feature_slices, variance=0.99).fit(train_frames)   # (n, F)
    x = reducer.transform(frames)                                                       # (n, d)
    per_tr = volume_features(x, frame_rate=fps / stride, tr=2.0, n_volumes=240, hrf="wen")  # video_timing

``FeatureReducer`` z-scores every unit with statistics of the training frames only, then (optionally)
reduces each layer by PCA keeping a fraction of its variance, and the concatenated layer components
by a second PCA keeping the same fraction. It is fitted on training frames only; validation and test
frames are only transformed.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from sklearn.decomposition import PCA


class FeatureReducer:
    """Z-score with training statistics, then optional PCA per layer, then across layers.

    layer_slices: {layer: slice of the feature columns} (the backbone's ``feature_slices``), or None for
    one block. variance: fraction of variance kept by each PCA, in (0, 1); None = no PCA.
    Fitted attributes: mean_, std_ (n_features,), layer_pcas_ {layer: PCA}, joint_pca_, n_components_.
    """

    def __init__(self, layer_slices: Mapping[str, slice] | None = None, variance: float | None = None):
        if variance is not None and not 0 < variance < 1:
            raise ValueError(f"PCA variance fraction must lie in (0, 1) or be null, got {variance}")
        self.layer_slices = dict(layer_slices) if layer_slices else None
        self.variance = variance

    def _blocks(self, n_features: int) -> dict[str, slice]:
        return self.layer_slices or {"features": slice(0, n_features)}

    def fit(self, frames: np.ndarray) -> "FeatureReducer":
        """frames (n_frames, n_features) of the training stimuli only."""
        x = np.asarray(frames, dtype=np.float64)
        if len(x) < 2:
            raise ValueError(f"FeatureReducer: {len(x)} training frame(s); need at least 2")
        self.mean_ = x.mean(axis=0)
        std = x.std(axis=0)
        self.std_ = np.where(std > max(float(std.max()) * 1e-6, 1e-12), std, 1.0)
        self.layer_pcas_: dict[str, PCA] = {}
        self.joint_pca_: PCA | None = None
        if self.variance is None:
            self.n_components_ = x.shape[1]
            return self
        z = (x - self.mean_) / self.std_
        parts = []
        for name, cols in self._blocks(x.shape[1]).items():
            pca = PCA(n_components=self.variance, svd_solver="full").fit(z[:, cols])
            self.layer_pcas_[name] = pca
            parts.append(pca.transform(z[:, cols]))
        joined = np.concatenate(parts, axis=1)
        if len(parts) > 1:
            self.joint_pca_ = PCA(n_components=self.variance, svd_solver="full").fit(joined)
            self.n_components_ = int(self.joint_pca_.n_components_)
        else:
            self.n_components_ = joined.shape[1]
        return self

    def transform(self, frames: np.ndarray) -> np.ndarray:
        """(n_frames, n_features) -> (n_frames, n_components_) float64."""
        z = (np.asarray(frames, dtype=np.float64) - self.mean_) / self.std_
        if self.variance is None:
            return z
        parts = [self.layer_pcas_[name].transform(z[:, cols]) for name, cols in self._blocks(z.shape[1]).items()]
        joined = np.concatenate(parts, axis=1)
        return self.joint_pca_.transform(joined) if self.joint_pca_ is not None else joined

    def describe(self) -> dict:
        """What a run records: the PCA variance fraction and the components kept per layer and overall."""
        return {"zscore": "training frames", "pca_variance": self.variance,
                "pca_components": {k: int(p.n_components_) for k, p in self.layer_pcas_.items()},
                "n_features": int(self.n_components_)}
