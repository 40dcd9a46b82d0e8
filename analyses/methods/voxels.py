"""Matching the voxels of two runs by their coordinates (arrays in, arrays out)."""
from __future__ import annotations

import numpy as np


def common_voxels(xyz_a: np.ndarray, xyz_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices (ia, ib) of the voxels two runs share, matched by coordinates: xyz (n, k) each
    (voxel_metrics.npz's ``voxel_xyz``); xyz_a[ia] == xyz_b[ib], ordered by coordinate."""
    xyz_a, xyz_b = np.asarray(xyz_a), np.asarray(xyz_b)
    if xyz_a.shape == xyz_b.shape and np.array_equal(xyz_a, xyz_b):
        return np.arange(len(xyz_a)), np.arange(len(xyz_b))
    dtype = np.result_type(xyz_a, xyz_b)

    def rows(x):
        x = np.ascontiguousarray(x, dtype=dtype)
        return x.view([("", dtype)] * x.shape[1]).ravel()

    _, ia, ib = np.intersect1d(rows(xyz_a), rows(xyz_b), assume_unique=True, return_indices=True)
    return ia, ib
