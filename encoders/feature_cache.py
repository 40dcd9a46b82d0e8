"""On-disk HDF5 cache of frozen-backbone features, keyed by everything that determines them.

Key = hash of (backbone name, a fingerprint of its actual weights, the backbone's description: family,
model, tag, each layer's module path, pooling and width, normalisation and the full preprocessing spec;
the stimulus source and the stimulus ids). One file per key: ``<dir>/<backbone>-<key[:16]>.h5``
(the name made file-safe) with datasets ``features`` (n, n_features) float32 and ``ids`` (n,),
and the full key description in its attributes.

Writing is atomic: extraction streams into ``<file>.partial`` (rows flushed, then ``n_done``
updated, batch by batch) and is renamed into place only when complete. An interrupted extraction
leaves only the .partial file; the next run resumes from its ``n_done`` if it opens and its key
matches, and rebuilds otherwise — and says which. A complete file whose stored key differs is
never used. A lock file serialises concurrent writers (e.g. parallel sweep jobs).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from filelock import FileLock
from torch import nn
from torch.utils.data import DataLoader

from encoders.extract import iter_features

log = logging.getLogger(__name__)


def weights_fingerprint(module: nn.Module) -> str:
    """blake2b over every tensor of the state dict (name, dtype, shape, bytes): identical weights <=> equal."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().reshape(-1).contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def feature_key(backbone, stimuli: dict, ids: np.ndarray) -> dict:
    """The description whose hash is the cache key: backbone + weights + layers + preprocessing + stimuli.

    ``backbone.describe()`` gives each layer's module path, pooling and width and the exact preprocessing
    (Preprocess fields), so two layers or two transforms never share an entry."""
    return {
        "backbone": backbone.spec.name,
        "weights": weights_fingerprint(backbone.model),
        "layers": list(backbone.layers),
        "normalize": bool(backbone.normalize),
        "n_features": int(backbone.n_features),
        "spec": backbone.describe(),
        "stimuli": stimuli,
        "ids_sha": hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=16).hexdigest(),
        "n_ids": int(len(ids)),
    }


def key_hash(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


@dataclass
class CacheResult:
    """features (n_ids, n_features) in ids order; status: "hit" | "built" | "resumed" | "rebuilt"."""

    features: torch.Tensor
    key: str
    path: Path
    status: str


class FeatureCache:
    """Features per stimulus id, computed once per key and read back by later runs."""

    def __init__(self, directory: str | Path, batch_size: int = 64):
        self.directory = Path(directory)
        self.batch_size = batch_size

    def path_for(self, description: dict) -> Path:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(description["backbone"])).strip("_.") or "backbone"
        return self.directory / f"{safe}-{key_hash(description)[:16]}.h5"

    def load_or_build(self, backbone, ids: np.ndarray, stimuli: dict,
                      make_loader: Callable[[np.ndarray], DataLoader], device: str = "cpu") -> CacheResult:
        """Features for ``ids`` (in that order) from the cache, extracting what is missing.

        make_loader(ids) -> a DataLoader of the images of those ids, in order (the encoder's transform).
        """
        ids = np.asarray(ids, dtype=np.int64)
        description = feature_key(backbone, stimuli, ids)
        key = key_hash(description)
        path = self.path_for(description)
        self.directory.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            status = "built"
            if path.exists():
                features = self._read_complete(path, key, ids)
                if features is not None:
                    log.info("feature cache hit: %s", path)
                    return CacheResult(features, key, path, "hit")
                log.warning("feature cache %s does not match this run's key (or is unreadable); rebuilding", path)
                path.unlink()
                status = "rebuilt"
            start = self._resumable(path, key, ids, backbone.n_features)
            if start:
                log.warning("feature cache: resuming an interrupted extraction at %d/%d images (%s)",
                            start, len(ids), path.name)
                status = "resumed"
            self._extract(path, description, key, ids, start, backbone, make_loader, device)
            features = self._read_complete(path, key, ids)
        if features is None:
            raise RuntimeError(f"{path}: the feature cache just written does not read back")
        return CacheResult(features, key, path, status)

    @staticmethod
    def _partial(path: Path) -> Path:
        return path.with_name(path.name + ".partial")

    def _read_complete(self, path: Path, key: str, ids: np.ndarray) -> torch.Tensor | None:
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("key") != key or not f.attrs.get("complete", False):
                    return None
                if not np.array_equal(f["ids"][:], ids):
                    return None
                return torch.from_numpy(f["features"][:])
        except (OSError, KeyError):
            return None

    def _resumable(self, path: Path, key: str, ids: np.ndarray, n_features: int) -> int:
        """Rows already done in a matching .partial file (0 if none, unreadable or for another key)."""
        partial = self._partial(path)
        if not partial.exists():
            return 0
        try:
            with h5py.File(partial, "r") as f:
                ok = (f.attrs.get("key") == key and f["features"].shape == (len(ids), n_features)
                      and np.array_equal(f["ids"][:], ids))
                done = int(f.attrs.get("n_done", 0)) if ok else 0
        except (OSError, KeyError):
            ok, done = False, 0
        if not ok:
            log.warning("feature cache: discarding an interrupted extraction that cannot be resumed (%s)", partial.name)
            partial.unlink()
        return done

    def _extract(self, path: Path, description: dict, key: str, ids: np.ndarray, start: int, backbone,
                 make_loader: Callable[[np.ndarray], DataLoader], device: str) -> None:
        partial = self._partial(path)
        mode = "r+" if start else "w"
        with h5py.File(partial, mode) as f:
            if not start:
                f.attrs["key"] = key
                f.attrs["description"] = json.dumps(description, sort_keys=True)
                f.attrs["n_done"] = 0
                f.attrs["complete"] = False
                f.create_dataset("ids", data=ids)
                f.create_dataset("features", shape=(len(ids), backbone.n_features), dtype=np.float32,
                                 chunks=(min(len(ids), 256), backbone.n_features))
            done = start
            rest = ids[start:]
            if len(rest):
                for batch in iter_features(backbone, make_loader(rest), device,
                                           description=f"features {backbone.spec.name}", total=len(rest)):
                    f["features"][done:done + len(batch)] = batch.numpy()
                    f.flush()
                    done += len(batch)
                    f.attrs["n_done"] = done
                    f.flush()
            if done != len(ids):
                raise RuntimeError(f"{partial}: extraction produced {done} rows for {len(ids)} images")
            f.attrs["complete"] = True
        os.replace(partial, path)
