"""Shared response preprocessing: per-session z-scoring, repeat averaging, splits."""
from __future__ import annotations

import numpy as np


def invalid_voxels(betas: np.ndarray) -> np.ndarray:
    """Voxels that are NaN/inf anywhere or constant across trials: betas (n_trials, n_voxels) -> bool (n_voxels,)."""
    finite = np.isfinite(betas).all(axis=0)
    with np.errstate(invalid="ignore"):
        constant = np.nanstd(betas, axis=0) == 0
    return ~finite | constant


def zscore_trials(betas: np.ndarray) -> np.ndarray:
    """Z-score each voxel across the trials of one session: (n_trials, n_voxels) float32.

    Invalid (constant / non-finite) voxels come out as 0; drop them with ``invalid_voxels``.
    """
    mean = betas.mean(axis=0, dtype=np.float64)
    std = betas.std(axis=0, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (betas - mean) / std
    z[:, ~np.isfinite(z).all(axis=0)] = 0.0
    return z.astype(np.float32)


class RepeatAverager:
    """Accumulates trials into per-image means without keeping the trials.

    add(stim_ids (n_trials,), values (n_trials, n_voxels)); result() -> (ids (n_images,) sorted,
    means (n_images, n_voxels) float32, counts (n_images,)).
    """

    def __init__(self, n_voxels: int):
        self.n_voxels = n_voxels
        self.row: dict[int, int] = {}
        self.sums = np.zeros((0, n_voxels), dtype=np.float64)
        self.counts = np.zeros(0, dtype=np.int64)

    def add(self, stim_ids: np.ndarray, values: np.ndarray) -> None:
        new = [int(i) for i in np.unique(stim_ids) if int(i) not in self.row]
        for i in new:
            self.row[i] = len(self.row)
        if new:
            self.sums = np.concatenate([self.sums, np.zeros((len(new), self.n_voxels))])
            self.counts = np.concatenate([self.counts, np.zeros(len(new), dtype=np.int64)])
        rows = np.array([self.row[int(i)] for i in stim_ids])
        np.add.at(self.sums, rows, values)
        np.add.at(self.counts, rows, 1)

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = np.array(sorted(self.row), dtype=np.int64)
        rows = np.array([self.row[i] for i in ids], dtype=np.int64)
        means = (self.sums[rows] / self.counts[rows, None]).astype(np.float32)
        return ids, means, self.counts[rows]


def split_train_val(ids: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random, seeded split of ids into (train, val), each sorted; val gets round(fraction·n), at least 1."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(np.asarray(ids))
    n_val = max(1, int(round(val_fraction * len(perm))))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
