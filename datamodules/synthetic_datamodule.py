"""The embedded synthetic dataset as a datamodule: NSD's reader on the generator's files, plus what only a
synthetic dataset has: its planted ground truth and fresh images of its categories.

``conf/data/synthetic.yaml`` instantiates ``SyntheticDataModule`` (train.py generates the files first with
``datamodules.synthetic.ensure_synthetic``). Analyses of a finished run reach the ground truth through the
run (``RunDir.ground_truth()``, ``RunDir.category_images(...)``), which asks this class, so no analysis
reads the generator's files itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from datamodules.errors import DataError
from datamodules.nsd import NSDDataModule
from datamodules.synthetic import ground_truth_path, meta_path, subject_name
from datamodules.synthetic_images import CATEGORIES, write_category_folder


def _rows_of(xyz: np.ndarray, other_xyz: np.ndarray) -> np.ndarray:
    """Row of each voxel of xyz in other_xyz, or -1."""
    lookup = {tuple(v): i for i, v in enumerate(np.asarray(other_xyz).tolist())}
    return np.array([lookup.get(tuple(v), -1) for v in np.asarray(xyz).tolist()], dtype=np.int64)


class SyntheticDataModule(NSDDataModule):
    """NSDDataModule on the synthetic dataset (same arguments); adds ``ground_truth`` and ``category_images``."""

    @staticmethod
    def _root(config: dict, description: dict) -> Path:
        root = config.get("root", description.get("root"))
        if root is None:
            raise DataError("the run's data config has no root")
        return Path(root)

    @classmethod
    def ground_truth(cls, config: dict, description: dict, voxel_xyz: np.ndarray) -> dict | None:
        """The planted truth at the run's voxels: {"categories": [names], "contrast": (n_categories, n_voxels)
        mean noise-free signal for the category's images minus that for the other images, "preferred":
        (n_voxels,) planted category index or -1}; voxels the generator did not plant are NaN / -1. None
        when the dataset's ground_truth.h5 is gone or lacks the subject.

        config: config.yaml's ``data`` section; description: run.json's ``data``; voxel_xyz (n_voxels, 3).
        """
        path = ground_truth_path(cls._root(config, description))
        subject = config.get("subject", description.get("subject"))
        if subject is None or not path.is_file():
            return None
        xyz = np.asarray(voxel_xyz)
        with h5py.File(path, "r") as f:
            group = subject_name(int(subject))
            if group not in f:
                return None
            categories = [c.decode() if isinstance(c, bytes) else str(c) for c in f["categories"][:]]
            image_category = f["image_category"][:]
            g = f[group]
            rows = _rows_of(xyz, g["voxel_xyz"][:])
            signal = g["signal"][:].astype(np.float64)
            preferred_all = g["preferred_category"][:]
        contrast = np.full((len(categories), len(xyz)), np.nan)
        preferred = np.full(len(xyz), -1, np.int64)
        ok = rows >= 0
        for c in range(len(categories)):
            inside = image_category == c
            if inside.any() and (~inside).any():
                diff = signal[inside].mean(0) - signal[~inside].mean(0)
                contrast[c, ok] = diff[rows[ok]]
        preferred[ok] = preferred_all[rows[ok]]
        return {"categories": categories, "contrast": contrast, "preferred": preferred}

    @classmethod
    def category_images(cls, config: dict, description: dict, parent: str | Path, n_per_category: int,
                        seed: int = 0) -> Path | None:
        """Fresh images of the dataset's categories at its image size, drawn once into
        ``parent/synthetic_n<N>_px<size>_seed<seed>/<category>/NNNN.png`` (``image_folder.category_folder``
        layout) and reused; None when the dataset's synthetic.json is gone."""
        meta = meta_path(cls._root(config, description))
        if not meta.is_file():
            return None
        params = json.loads(meta.read_text())
        names = [c for c in params.get("categories", CATEGORIES) if c in CATEGORIES]
        size = int(params.get("image_size", 425))
        folder = Path(parent) / f"synthetic_n{int(n_per_category)}_px{size}_seed{int(seed)}"
        return write_category_folder(folder, names, n_per_category, size, seed)
