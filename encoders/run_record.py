"""What every run writes next to its checkpoints: metrics, per-voxel scores, split, provenance.

metrics.json layout (users and scripts rely on it):
  {"<split>": {"r_mean", "r_median", "r2_mean", "nc_r2_mean", "n_voxels", "n_nan",
               "rois": {"<ROI name>": {same keys}}}, ...}
voxel_metrics.npz: per split "<split>_r", "<split>_r2", "<split>_nc" (noise ceiling, % of variance),
  "<split>_nc_r2", plus "voxel_xyz" (n_voxels, 3) and one bool mask "roi_<name>" per ROI.
"""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
from pathlib import Path

import numpy as np

from encoders.storage import atomic_write, write_text

PACKAGES = ("torch", "torchvision", "lightning", "timm", "open_clip_torch", "hydra-core", "numpy",
            "scipy", "scikit-learn", "h5py", "nibabel", "wandb")


def write_json(path: Path, obj: dict) -> None:
    """Write JSON atomically (temp file + rename), NaN as null; StorageError naming it if it cannot be written."""
    write_text(path, json.dumps(_clean(obj), indent=2))


def _clean(obj):
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    return obj


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(cwd: str | Path = ".") -> str:
    """HEAD commit of the repository at cwd (+ "-dirty" with uncommitted changes), or "unknown"."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def write_voxel_metrics(path: Path, per_split: dict[str, dict[str, np.ndarray]], voxel_xyz: np.ndarray,
                        rois: dict[str, np.ndarray]) -> None:
    """per_split: {split: {"r", "r2", "nc", "nc_r2"} each (n_voxels,)} -> one .npz."""
    arrays = {f"{split}_{k}": np.asarray(v, dtype=np.float32) for split, d in per_split.items() for k, v in d.items()}
    arrays["voxel_xyz"] = np.asarray(voxel_xyz)
    arrays.update({f"roi_{name}": np.asarray(mask, dtype=bool) for name, mask in rois.items()})
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
