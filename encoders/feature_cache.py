"""On-disk HDF5 cache of frozen-backbone features, keyed by everything that determines them.

Key = hash of (backbone name, a fingerprint of its actual weights, the backbone's description: family,
model, tag, each layer's module path, pooling and width, normalisation and the full preprocessing spec;
where it ran, unless on a CPU with the fixed-point uint8 resize (``pixels``: the device type and the resize
arithmetic, ``encoders.extract.pixel_record``: CUDA's float32 resize and convolutions give other last digits
than the CPU's); the stimulus source and the stimulus ids). The per-image transform in the loader and the
batched one (``preprocess_on=cpu|device``) give the same pixels on a CPU and share entries, and those keys are
the ones of the files written before ``pixels`` existed. One file per key: ``<dir>/<backbone>-<key[:16]>.h5``
(the name made file-safe) with datasets ``features`` (n, n_features) float32 and ``ids`` (n,),
and the full key description in its attributes.

Writing is atomic: extraction streams into ``<file>.partial`` (rows flushed, then ``n_done``
updated, batch by batch) and is renamed into place only when complete. An interrupted extraction
leaves only the .partial file; the next run resumes from its ``n_done`` if it opens and its key
matches, and rebuilds otherwise — and says which. A complete file whose stored key differs is
never used. A lock file serialises concurrent writers (e.g. parallel sweep jobs); reading a complete
file takes no lock, so a read-only cache directory serves the files it holds. A directory that cannot
be written, or a disk that fills up during extraction, is a StorageError naming the path (the rows
already flushed stay in the .partial file and are resumed by the next run).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from filelock import FileLock
from torch import nn
from torch.utils.data import DataLoader

from encoders.extract import ExtractionStats, iter_features, pixel_record
from encoders.storage import StorageError, is_storage_failure, reason

log = logging.getLogger(__name__)


def weights_fingerprint(module: nn.Module) -> str:
    """blake2b over every tensor of the state dict (name, dtype, shape, bytes): identical weights <=> equal."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().reshape(-1).contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}".encode())
        if t.numel():
            digest.update(t.view(torch.uint8).numpy())  # the bytes, read in place (no copy)
    return digest.hexdigest()


# Extractions on a CPU whose resize is torch's fixed-point uint8 kernel (or nearest): the arithmetic of every
# cache file written before the key recorded where it ran, so their keys leave "pixels" out and stay valid.
_REFERENCE_PIXELS = ({"device": "cpu", "resize": "uint8"}, {"device": "cpu", "resize": "nearest"})


def feature_key(backbone, stimuli: dict, ids: np.ndarray, pixels: dict | None = None) -> dict:
    """The description whose hash is the cache key: backbone + weights + layers + preprocessing + where it
    ran + stimuli.

    ``backbone.describe()`` gives each layer's module path, pooling and width and the exact preprocessing
    (Preprocess fields), so two layers or two transforms never share an entry. ``pixels``
    (``encoders.extract.pixel_record``: device type, resize arithmetic; default: the per-image transform and
    the forward on this CPU) keeps a CUDA extraction apart from a CPU one; it is recorded only where it
    differs from a CPU with the fixed-point uint8 resize (``_REFERENCE_PIXELS``)."""
    pixels = pixels if pixels is not None else pixel_record(backbone, "cpu", "cpu")
    where = {} if pixels in _REFERENCE_PIXELS else {"pixels": pixels}
    return {
        **where,
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
                      make_loader: Callable[[np.ndarray], DataLoader], device: str = "cpu",
                      stats: ExtractionStats | None = None, preprocess_on: str = "cpu") -> CacheResult:
        """Features for ``ids`` (in that order) from the cache, extracting what is missing.

        make_loader(ids) -> a DataLoader of the images of those ids, in order: through the encoder's
        per-image transform (preprocess_on="cpu"), or only decoded (uint8; preprocess_on="device", see
        ``encoders.extract.loader_transform``), which the key records (``pixel_record``).
        stats: adds the images extracted and the extraction's wall time (``encoders.extract.ExtractionStats``).
        """
        ids = np.asarray(ids, dtype=np.int64)
        description = feature_key(backbone, stimuli, ids, pixel_record(backbone, device, preprocess_on))
        key = key_hash(description)
        path = self.path_for(description)
        # A complete file appears only by an atomic rename and is never changed in place, so reading it
        # needs no lock: a cache directory the user cannot write to still serves the files it holds.
        features = self._read_complete(path, key, ids) if path.exists() else None
        if features is not None:
            log.info("feature cache hit: %s", path)
            return CacheResult(features, key, path, "hit")
        with self._lock(path):
            status = "built"
            if path.exists():
                features = self._read_complete(path, key, ids)
                if features is not None:  # another process built it meanwhile
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
            features = self._extract(path, description, key, ids, start, backbone, make_loader, device, stats,
                                     preprocess_on)
        return CacheResult(features, key, path, status)

    def _lock(self, path: Path) -> FileLock:
        """The held lock of ``path`` (serialises writers); StorageError if the directory cannot be written."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(path) + ".lock")
            lock.acquire()
        except OSError as err:
            raise StorageError(f"{self.directory}: cannot write the feature cache there ({reason(err)}), and it holds "
                               f"no complete cache file for this run ({path.name}); set feature_cache_dir to a "
                               f"writable folder (or features=precompute)") from None
        return lock

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

    def _require_space(self, partial: Path, n_rows: int, n_features: int, n_ids: int) -> None:
        """StorageError before any extraction if the disk cannot hold the rows still to be written."""
        need = (n_rows * n_features * 4 + n_ids * 8) * 1.02 + 2**16  # float32 rows, int64 ids, + HDF5 metadata
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:
            return
        if free < need:
            raise StorageError(f"{self.directory}: {free / 2**20:.1f} MiB free, but the feature cache "
                               f"{partial.name[:-len('.partial')]} needs about {need / 2**20:.1f} MiB ({n_rows} images x "
                               f"{n_features} features, float32); free space or set feature_cache_dir elsewhere")

    def _extract(self, path: Path, description: dict, key: str, ids: np.ndarray, start: int, backbone,
                 make_loader: Callable[[np.ndarray], DataLoader], device: str,
                 stats: ExtractionStats | None = None, preprocess_on: str = "cpu") -> torch.Tensor:
        """Extract rows start.. into the .partial file, check that every row reads back as written, rename it
        into place and return all features (len(ids), n_features).

        A write the disk refuses is a StorageError naming the file, and the .partial file is removed: HDF5
        reports some failed writes only by dropping them (they would read back as zeros), so its rows
        cannot be trusted for a resume. (A killed extraction leaves a .partial file that is resumed.)
        """
        partial = self._partial(path)
        self._require_space(partial, len(ids) - start, backbone.n_features, 0 if start else len(ids))
        written = np.zeros((len(ids), 2))  # per row: sum and sum of |x| (float64) of what was written
        done, f = start, None
        try:
            # No chunk cache: rows reach the file when assigned, so a full disk raises there, and closing
            # the file after a failure has no cached chunks left to flush (see _abandon).
            f = h5py.File(partial, "r+" if start else "w", rdcc_nbytes=0)
            if not start:
                f.attrs["key"] = key
                f.attrs["description"] = json.dumps(description, sort_keys=True)
                f.attrs["n_done"] = 0
                f.attrs["complete"] = False
                f.create_dataset("ids", data=ids)
                f.create_dataset("features", shape=(len(ids), backbone.n_features), dtype=np.float32,
                                 chunks=(min(len(ids), 256), backbone.n_features))
            features = f["features"]  # one dataset object throughout: its write errors are raised, not dropped
            if start:
                written[:start] = _row_sums(features[:start])
            rest = ids[start:]
            if len(rest):
                for batch in iter_features(backbone, make_loader(rest), device,
                                           description=f"features {backbone.spec.name}", total=len(rest),
                                           stats=stats, preprocess_on=preprocess_on):
                    rows = batch.numpy()
                    features[done:done + len(rows)] = rows
                    f.flush()
                    f.attrs["n_done"] = done + len(rows)
                    f.flush()
                    written[done:done + len(rows)] = _row_sums(rows)
                    done += len(rows)
            if done != len(ids):
                raise RuntimeError(f"{partial}: extraction produced {done} rows for {len(ids)} images")
            f.attrs["complete"] = True
            del features
            f.close()
            with h5py.File(partial, "r") as f:
                stored = f["features"][:]
            back = _row_sums(stored)
            lost = np.flatnonzero(~((back == written) | (np.isnan(back) & np.isnan(written))).all(axis=1))
            if len(lost):
                raise StorageError(f"{partial}: {len(lost)} of {len(ids)} feature rows did not reach the disk "
                                   f"(first: row {lost[0]}; the disk is full or failing)")
            os.replace(partial, path)
        except (OSError, RuntimeError) as err:  # h5py reports some failed writes as RuntimeError
            refused = isinstance(err, StorageError) or is_storage_failure(err)
            _abandon(f, partial, remove=refused)
            if not refused:
                raise  # e.g. an image that cannot be read: not the cache's disk
            if isinstance(err, StorageError):
                raise StorageError(f"{err}; removed it, free space (or set feature_cache_dir elsewhere) "
                                   f"and rerun") from None
            raise StorageError(f"{partial}: cannot write the feature cache ({reason(err)}) after {done} of "
                               f"{len(ids)} images; removed it, free space (or set feature_cache_dir elsewhere) "
                               f"and rerun") from None
        except BaseException:  # interrupted (e.g. Ctrl-C): the .partial file is resumed next time
            _abandon(f, partial, remove=False)
            raise
        return torch.from_numpy(stored)


def _abandon(f: h5py.File | None, partial: Path, remove: bool) -> None:
    """Close a failed extraction's file quietly; remove=True also deletes it. Its content is dropped first
    (truncated): on a full disk HDF5 cannot flush its metadata when closing, and a file left open would
    make the HDF5 library crash at interpreter exit."""
    if remove:
        try:
            os.truncate(partial, 0)
        except OSError:
            pass
    if f is not None and f.id.valid:
        try:
            f.close()
        except (OSError, RuntimeError):  # already failing: the first error is the one to report
            pass
    if remove:
        try:
            partial.unlink(missing_ok=True)
        except OSError:
            pass


def _row_sums(rows: np.ndarray) -> np.ndarray:
    """(n, d) -> (n, 2) float64: each row's sum and sum of absolute values (a row lost on the way to the
    disk reads back as zeros, which match only a row of zeros)."""
    rows = np.asarray(rows, dtype=np.float64)
    return np.stack([rows.sum(axis=1), np.abs(rows).sum(axis=1)], axis=1)
