"""Per-frame backbone features -> features per fMRI volume (Wen et al. 2018).

    reducer = FeatureReducer(backbone.feature_slices, variance=0.99).fit(train_frames)   # (n, F)
    x = reducer.transform(frames)                                                       # (n, d)
    per_tr = volume_features(x, frame_rate=fps / stride, tr=2.0, n_volumes=240, hrf="wen")  # video_timing

``FeatureReducer`` z-scores every unit with statistics of the training frames only, then (optionally)
reduces each layer by PCA keeping a fraction of its variance, and the concatenated layer components
by a second PCA keeping the same fraction. It is fitted on training frames only; validation and test
frames are only transformed.

Robust z-score (``std_floor``, ``clip``; the defaults): a unit nearly silent in the training frames (a
random-init ReLU unit that fires on one training frame, a constant unit) has a tiny standard deviation,
so a held-out frame on which it fires gets |z| in the thousands, and through the PCA and the HRF that
one unit swamps every feature of the volumes around it (test R² of −10 and worse with positive r). So:

* std floor: each unit's std is at least ``std_floor`` × the median std of its layer's non-constant
  units (one block without layer slices); constant units get that floor too.
* clip: z-scored values are clipped to each unit's range over the training frames, so the training
  frames are unchanged and no held-out frame takes a unit past what the model saw (a unit constant in
  training stays at 0).

Wen et al.'s released code z-scores without either (std 0 -> 1): ``std_floor=None, clip=False`` is
that. ``encoders.feature_transform`` applies the same rule to the per-TR features before the head.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from sklearn.decomposition import PCA


def floored_std(std: np.ndarray, blocks: Mapping[str, slice], std_floor: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Training std (F,) -> (the std used (F,), bool mask of the units raised to the floor (F,)).

    Without a floor: constant units (std <= 1e-6·max) get std 1 (a no-op on a column of zeros) and nothing
    else changes. With one: within each block, std >= std_floor × median of the block's non-constant stds.
    ``encoders.feature_transform.floored_std`` is the same rule (datamodules and encoders share no code)."""
    std = np.asarray(std, dtype=np.float64)
    constant = std <= max(float(std.max(initial=0.0)) * 1e-6, 1e-12)
    if std_floor is None:
        return np.where(constant, 1.0, std), np.zeros(std.shape, bool)
    if std_floor <= 0:
        raise ValueError(f"std_floor must be positive or null, got {std_floor}")
    floor = np.empty_like(std)
    for cols in blocks.values():
        live = std[cols][~constant[cols]]
        floor[cols] = max(std_floor * float(np.median(live)), 1e-12) if live.size else 1.0
    raised = std < floor
    return np.where(raised, floor, std), raised


class FeatureReducer:
    """Z-score with training statistics (robustly, see the module docstring), then optional PCA per layer,
    then across layers.

    layer_slices: {layer: slice of the feature columns} (the backbone's ``feature_slices``), or None for
    one block. variance: fraction of variance kept by each PCA, in (0, 1); None = no PCA. std_floor: the
    fraction of the layer's median unit std below which a unit's std is raised (None = off). clip: clip
    z-scores to each unit's training range.
    Fitted attributes: mean_, std_ (n_features,), lower_, upper_ (n_features,) z-score bounds (None without
    clip), n_floored_, n_constant_, layer_pcas_ {layer: PCA}, joint_pca_, n_components_.
    """

    def __init__(self, layer_slices: Mapping[str, slice] | None = None, variance: float | None = None,
                 std_floor: float | None = 0.1, clip: bool = True):
        if variance is not None and not 0 < variance < 1:
            raise ValueError(f"PCA variance fraction must lie in (0, 1) or be null, got {variance}")
        if std_floor is not None and not std_floor > 0:
            raise ValueError(f"std_floor must be positive or null, got {std_floor}")
        self.layer_slices = dict(layer_slices) if layer_slices else None
        self.variance, self.std_floor, self.clip = variance, std_floor, bool(clip)

    def _blocks(self, n_features: int) -> dict[str, slice]:
        return self.layer_slices or {"features": slice(0, n_features)}

    def fit(self, frames: np.ndarray) -> "FeatureReducer":
        """frames (n_frames, n_features) of the training stimuli only."""
        x = np.asarray(frames, dtype=np.float64)
        if len(x) < 2:
            raise ValueError(f"FeatureReducer: {len(x)} training frame(s); need at least 2")
        self.mean_ = x.mean(axis=0)
        std = x.std(axis=0)
        self.std_, raised = floored_std(std, self._blocks(x.shape[1]), self.std_floor)
        self.n_floored_ = int(raised.sum())
        self.n_constant_ = int((std <= max(float(std.max()) * 1e-6, 1e-12)).sum())
        self.lower_ = self.upper_ = None
        z = (x - self.mean_) / self.std_
        if self.clip:
            self.lower_, self.upper_ = z.min(axis=0), z.max(axis=0)
        self.layer_pcas_: dict[str, PCA] = {}
        self.joint_pca_: PCA | None = None
        if self.variance is None:
            self.n_components_ = x.shape[1]
            return self
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

    def zscore(self, frames: np.ndarray) -> np.ndarray:
        """(n_frames, n_features) -> z-scored with the training statistics (clipped to the training range
        when ``clip``), float64."""
        z = (np.asarray(frames, dtype=np.float64) - self.mean_) / self.std_
        return np.clip(z, self.lower_, self.upper_) if self.lower_ is not None else z

    def clipped_fraction(self, frames: np.ndarray) -> float:
        """The fraction of the values of ``frames`` (n_frames, n_features) that the clip changes (0 without clip)."""
        if self.lower_ is None or len(frames) == 0:
            return 0.0
        z = (np.asarray(frames, dtype=np.float64) - self.mean_) / self.std_
        return float(((z < self.lower_) | (z > self.upper_)).mean())

    def transform(self, frames: np.ndarray) -> np.ndarray:
        """(n_frames, n_features) -> (n_frames, n_components_) float64."""
        z = self.zscore(frames)
        if self.variance is None:
            return z
        parts = [self.layer_pcas_[name].transform(z[:, cols]) for name, cols in self._blocks(z.shape[1]).items()]
        joined = np.concatenate(parts, axis=1)
        return self.joint_pca_.transform(joined) if self.joint_pca_ is not None else joined

    def describe(self) -> dict:
        """What a run records: the z-score's robustness (units floored, constant), the PCA variance fraction
        and the components kept per layer and overall."""
        return {"zscore": "training frames", "std_floor": self.std_floor,
                "clip": "training range" if self.clip else None, "n_units": int(len(self.mean_)),
                "n_floored": self.n_floored_, "n_constant": self.n_constant_, "pca_variance": self.variance,
                "pca_components": {k: int(p.n_components_) for k, p in self.layer_pcas_.items()},
                "n_features": int(self.n_components_)}
