"""Provenance a run records (package versions, git commit) and the JSON writer every run file uses.

The run directory's layout and its readers/writers live in :mod:`encoders.run_dir`.
"""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
from pathlib import Path

import numpy as np

from encoders.storage import write_text

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
