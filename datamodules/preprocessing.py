"""Shared response preprocessing: per-session z-scoring, repeat averaging, splits.

Functions that take (n_trials, n_voxels) arrays work on blocks of voxels, so their temporaries stay
at (n_trials, COLUMN_BLOCK) whatever the number of voxels.
"""
from __future__ import annotations

import numpy as np


COLUMN_BLOCK = 4096


def invalid_voxels(betas: np.ndarray) -> np.ndarray:
    """Voxels that are NaN/inf anywhere or constant across trials: betas (n_trials, n_voxels) -> bool (n_voxels,)."""
    out = np.empty(betas.shape[1], dtype=bool)
    for j in range(0, betas.shape[1], COLUMN_BLOCK):
        block = betas[:, j:j + COLUMN_BLOCK]
        with np.errstate(invalid="ignore"):
            out[j:j + COLUMN_BLOCK] = ~np.isfinite(block).all(axis=0) | (block.max(axis=0) == block.min(axis=0))
    return out


class InvalidVoxels:
    """Voxels found NaN/inf or constant in some block of data (a session or run file), remembering the
    first block that made each one invalid, so that messages can name the file at fault.

    add(invalid bool (n_voxels,), block name); ``mask`` bool (n_voxels,); blocks_of(where) -> the block
    names (in the order added) that made the voxels in ``where`` invalid.
    """

    def __init__(self, n_voxels: int):
        self.first = np.full(n_voxels, -1, dtype=np.int32)
        self.blocks: list[str] = []

    def add(self, invalid: np.ndarray, block: str) -> None:
        new = np.asarray(invalid, dtype=bool) & (self.first < 0)
        if new.any():
            self.blocks.append(block)
            self.first[new] = len(self.blocks) - 1

    @property
    def mask(self) -> np.ndarray:
        return self.first >= 0

    def blocks_of(self, where: np.ndarray | None = None) -> list[str]:
        first = self.first if where is None else self.first[np.asarray(where, dtype=bool)]
        return [self.blocks[k] for k in np.unique(first[first >= 0])]


def describe_blocks(blocks: list[str], limit: int = 3) -> str:
    """'a, b, c (+ 2 more)': a short list of file names for a one-line message."""
    more = f" (+ {len(blocks) - limit} more)" if len(blocks) > limit else ""
    return ", ".join(blocks[:limit]) + more


def zscore_trials(betas: np.ndarray, inplace: bool = False) -> np.ndarray:
    """Z-score each voxel across the trials of one session: (n_trials, n_voxels) float32.

    Statistics in float64. Invalid (constant / non-finite) voxels come out as 0; drop them with
    ``invalid_voxels``. inplace=True overwrites ``betas`` (which must then be float32) and returns it.
    """
    if inplace and betas.dtype != np.float32:
        raise TypeError(f"zscore_trials(inplace=True) needs float32 betas, got {betas.dtype}")
    z = betas if inplace else np.array(betas, dtype=np.float32)
    for j in range(0, z.shape[1], COLUMN_BLOCK):
        block = z[:, j:j + COLUMN_BLOCK]
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            mean = block.mean(axis=0, dtype=np.float64)
            std = block.std(axis=0, dtype=np.float64)
            np.subtract(block, mean, out=block, casting="same_kind")
            np.divide(block, std, out=block, casting="same_kind")
        block[:, ~np.isfinite(block).all(axis=0)] = 0.0
    return z


class RepeatAverager:
    """Accumulates trials into per-image means without keeping the trials.

    add(stim_ids (n_trials,), values (n_trials, n_voxels)); result() -> (ids (n_images,) sorted,
    means (n_images, n_voxels) float32, counts (n_images,)).

    With ``ids`` (every image that will be added) the sums are allocated once, in float32 (an image
    has a handful of repeats, so float32 sums lose nothing that matters), and ``result()`` divides
    them in place and hands that buffer over: no second copy of the responses. Without ``ids`` the
    rows grow as new images arrive (float64 sums).
    """

    def __init__(self, n_voxels: int, ids: np.ndarray | None = None):
        self.n_voxels = n_voxels
        self.fixed = ids is not None
        if self.fixed:
            ids = np.unique(np.asarray(ids, dtype=np.int64))
            self.row = {int(i): k for k, i in enumerate(ids)}
            self.sums = np.zeros((len(ids), n_voxels), dtype=np.float32)
        else:
            self.row = {}
            self.sums = np.zeros((0, n_voxels), dtype=np.float64)
        self.counts = np.zeros(len(self.row), dtype=np.int64)

    def add(self, stim_ids: np.ndarray, values: np.ndarray) -> None:
        new = [int(i) for i in np.unique(stim_ids) if int(i) not in self.row]
        if new and self.fixed:
            raise ValueError(f"stimulus id {new[0]} was not among the ids this RepeatAverager was built for")
        for i in new:
            self.row[i] = len(self.row)
        if new:
            self.sums = np.concatenate([self.sums, np.zeros((len(new), self.n_voxels))])
            self.counts = np.concatenate([self.counts, np.zeros(len(new), dtype=np.int64)])
        rows = np.array([self.row[int(i)] for i in stim_ids], dtype=np.int64)
        np.add.at(self.sums, rows, values)
        np.add.at(self.counts, rows, 1)

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, means, counts); with fixed ids, images never added are left out."""
        ids = np.array(sorted(self.row), dtype=np.int64)
        rows = np.array([self.row[i] for i in ids], dtype=np.int64)
        if not self.fixed:
            means = (self.sums[rows] / self.counts[rows, None]).astype(np.float32)
            return ids, means, self.counts[rows]
        seen = self.counts > 0  # rows are already in id order
        means = self.sums
        np.divide(means, np.maximum(self.counts, 1)[:, None].astype(np.float32), out=means)
        if not seen.all():
            means = means[seen]
        self.sums = np.zeros((0, self.n_voxels), dtype=np.float32)  # handed over
        return ids[seen], means, self.counts[seen]


def drop_columns(a: np.ndarray, keep: np.ndarray, block_bytes: int = 64 * 2**20) -> np.ndarray:
    """``a[:, keep]`` without a second full-size array: (n, m) -> (n, keep.sum()).

    When ``a`` owns its C-contiguous buffer the kept columns are packed to its front block of rows by
    block and the buffer is shrunk in place; ``a`` must then not be used (or viewed) afterwards.
    Otherwise a plain copy.
    """
    keep = np.asarray(keep, dtype=bool)
    if keep.all():
        return a
    n, m = a.shape
    cols = np.flatnonzero(keep)
    k = len(cols)
    if not (a.flags.owndata and a.flags.c_contiguous) or k == 0:
        return np.ascontiguousarray(a[:, keep])
    flat = a.reshape(-1)
    rows = max(1, block_bytes // max(1, k * a.itemsize))
    for i in range(0, n, rows):
        packed = a[i:i + rows][:, cols]  # a copy, taken before its destination is written
        flat[i * k:i * k + packed.size] = packed.reshape(-1)  # ends before row i + rows starts: unread rows intact
    del flat
    a.resize((n, k), refcheck=False)
    return a


def check_fraction(value, key: str, what: str) -> None:
    """ValueError naming the config ``key`` unless ``value`` is a number strictly between 0 and 1 (``what``:
    what the fraction is of, for the message). Datamodules call it in ``__init__``, before any data is read."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not 0 < value < 1:
        raise ValueError(f"{key} must be a number strictly between 0 and 1 ({what}), got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_subject_and_sessions(subject, sessions) -> None:
    """ValueError naming ``data.subject`` / ``data.sessions`` unless the subject is a positive int and the
    sessions None (every session on disk) or a non-empty list of positive ints."""
    if not _is_int(subject) or subject < 1:
        raise ValueError(f"data.subject must be a positive int (1 = subj01), got {subject!r}")
    if sessions is not None and (isinstance(sessions, (str, bytes)) or not hasattr(sessions, "__len__")
                                 or not len(sessions) or not all(_is_int(s) and s >= 1 for s in sessions)):
        raise ValueError(f"data.sessions must be null (every session) or a non-empty list of session numbers "
                         f"(1-based, e.g. [1,2,3]), got {sessions!r}")


def split_train_val(ids: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random, seeded split of ids into (train, val), each sorted; val gets round(fraction·n), at least 1."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(np.asarray(ids))
    n_val = max(1, int(round(val_fraction * len(perm))))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
