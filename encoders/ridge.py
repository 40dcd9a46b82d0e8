"""Closed-form ridge regression with one alpha per voxel, chosen by K-fold cross-validation.

Design (primal, n_features <= n_samples): one pass over the data accumulates per-fold sufficient
statistics (XᵀX, XᵀY, Σx, Σy, Σy²); for each fold the training statistics are the totals minus the
fold's, one eigendecomposition of the centred training XᵀX serves every alpha, and held-out errors
follow from the held-out fold's statistics — no (n_voxels × n_alphas × n_samples) tensor, voxels in
batches. Dual (kernel) form when n_features > n_samples. Torch on CPU or GPU, float64 where the
algebra needs it (statistics, eigendecompositions).

Folds: ``cv`` = an int (K folds, shuffled with ``seed`` or contiguous) or any scikit-learn splitter
(``GroupKFold``, ``PredefinedSplit``, ``TimeSeriesSplit``, …) or a list of (train, test) index pairs.
``fit(X, Y, groups)``: with groups (e.g. stimulus ids of single trials) the int folds never split a
group — every trial of an image is held out together — and a splitter receives them. When every
fold's training set is the complement of its held-out set and the held-out sets do not overlap (K-fold
and its group variants, PredefinedSplit) the training statistics are the totals minus the fold's;
otherwise (ShuffleSplit, TimeSeriesSplit) they are summed over the training indices.

Voxel batches: ``voxel_batch="auto"`` sizes them from the memory free on the fit's device
(``free_bytes``: CUDA's free memory plus what torch's allocator holds unused; on the CPU the kernel's
MemAvailable) and the solver's working memory per voxel (``solve_bytes_per_voxel``), through the pure
``auto_voxel_batch``. Results do not depend on the batch (every voxel's algebra is its own column).

Kernels are plain functions on tensors; ``RidgeCV`` is a thin array-in / array-out estimator.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from encoders.progress import track

DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-8, 10, 19))
CPU_VOXEL_BATCH = 4096        # on the CPU larger batches buy nothing (the matmuls are already large); RAM may lower it
MEMORY_FRACTION = {"cuda": 0.8, "cpu": 0.5}   # of the free memory a voxel batch may use
CUDA_RESERVE = 512 * 2 ** 20  # bytes kept free on a GPU besides: cuBLAS/cuSOLVER workspaces, fragmentation

log = logging.getLogger(__name__)


def kfold_indices(n_samples: int, n_folds: int, shuffle: bool = True, seed: int = 0,
                  groups=None) -> list[np.ndarray]:
    """Fold membership: a list of n_folds sorted index arrays covering range(n_samples).

    shuffle=False gives contiguous blocks (for time series), as scikit-learn's KFold. groups
    (n_samples,) any labels: the folds are K-fold over the distinct groups (in order of first
    appearance; shuffled with ``seed``), each fold holding every sample of its groups, so no group is
    split; with every group distinct this is exactly the ungrouped K-fold.
    """
    if groups is None:
        return _kfold(n_samples, n_folds, shuffle, seed)
    groups = np.asarray(groups)
    if groups.shape != (n_samples,):
        raise ValueError(f"groups must have shape ({n_samples},), got {groups.shape}")
    _, first, label = np.unique(groups, return_index=True, return_inverse=True)
    by_appearance = np.empty(len(first), np.int64)
    by_appearance[np.argsort(first)] = np.arange(len(first))  # group label -> its rank of first appearance
    rank = by_appearance[label.ravel()]
    if n_folds > len(first):
        raise ValueError(f"need n_folds <= the number of groups, got n_folds={n_folds} for {len(first)} groups")
    return [np.flatnonzero(np.isin(rank, fold)) for fold in _kfold(len(first), n_folds, shuffle, seed)]


def _kfold(n: int, n_folds: int, shuffle: bool, seed: int) -> list[np.ndarray]:
    if not 2 <= n_folds <= n:
        raise ValueError(f"need 2 <= n_folds <= n_samples, got n_folds={n_folds}, n_samples={n}")
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    sizes = np.full(n_folds, n // n_folds)
    sizes[: n % n_folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.sort(order[bounds[k]:bounds[k + 1]]) for k in range(n_folds)]


def cv_splits(cv, n_samples: int, groups=None, shuffle: bool = True, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs from ``cv``: an int (``kfold_indices``, train = the rest), a scikit-learn
    splitter (anything with ``split(X, y, groups)``; groups passed on) or an iterable of (train, test) pairs.
    ValueError for indices out of range, an empty side, or a sample on both sides of a split."""
    if isinstance(cv, (int, np.integer)) and not isinstance(cv, bool):
        everything = np.arange(n_samples)
        pairs = [(np.setdiff1d(everything, f), f) for f in kfold_indices(n_samples, int(cv), shuffle, seed, groups)]
    elif hasattr(cv, "split") and not isinstance(cv, (str, bytes)):
        pairs = list(cv.split(np.zeros((n_samples, 1)), None, groups))
    else:
        try:
            pairs = [(train, test) for train, test in cv]
        except (TypeError, ValueError) as err:
            raise ValueError(f"cv must be an int, a scikit-learn splitter or (train, test) index pairs, "
                             f"got {type(cv).__name__}") from err
    out = []
    for k, (train, test) in enumerate(pairs):
        train, test = np.sort(np.asarray(train, np.int64).ravel()), np.sort(np.asarray(test, np.int64).ravel())
        if not len(train) or not len(test):
            raise ValueError(f"cv split {k}: {len(train)} training and {len(test)} held-out samples")
        if min(train[0], test[0]) < 0 or max(train[-1], test[-1]) >= n_samples:
            raise ValueError(f"cv split {k}: indices outside [0, {n_samples})")
        if np.intersect1d(train, test).size:
            raise ValueError(f"cv split {k}: {np.intersect1d(train, test).size} samples are both trained on and held out")
        out.append((train, test))
    if len(out) < 1:
        raise ValueError("cv gave no split")
    return out


CV_CHOICES = ("an int >= 2 (the number of folds), a scikit-learn splitter (e.g. {_target_: "
              "sklearn.model_selection.GroupKFold, n_splits: 5}) or a list of [train indices, test indices] pairs")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_list(value) -> bool:
    return isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes))


def _index_list(side) -> bool:
    """A non-empty list (or integer array) of non-negative indices."""
    if isinstance(side, np.ndarray):
        return side.size > 0 and side.dtype.kind in "iu" and int(side.min()) >= 0
    return _is_list(side) and len(side) > 0 and all(_is_int(i) and i >= 0 for i in side)


def check_cv(cv, prefix: str = "") -> None:
    """ValueError (one line naming ``<prefix>cv``) unless ``cv`` is usable before any data is seen: an int
    >= 2, a splitter (anything with ``split``), or a non-empty list of (train, test) pairs of non-negative
    index lists that do not overlap (any other iterable is taken as it comes). Whether it fits a training
    set: ``check_folds``."""
    if _is_int(cv):
        if cv < 2:
            raise ValueError(f"{prefix}cv must be {CV_CHOICES}; got {cv} (fewer than 2 folds)")
        return
    if hasattr(cv, "split") and not isinstance(cv, (str, bytes)):
        return
    if not _is_list(cv):
        if hasattr(cv, "__iter__") and not isinstance(cv, (str, bytes, dict)) and not hasattr(cv, "keys"):
            return  # an iterator of pairs: checked as it is consumed (cv_splits)
        raise ValueError(f"{prefix}cv must be {CV_CHOICES}; got {cv!r}")
    problem = "" if len(cv) else "no pairs"
    for k, pair in enumerate(cv):
        if not _is_list(pair) or len(pair) != 2:
            problem = f"item {k} is not a [train, test] pair"
        elif not (_index_list(pair[0]) and _index_list(pair[1])):
            problem = f"item {k} is not a pair of non-empty lists of non-negative indices"
        elif np.intersect1d(np.asarray(pair[0]), np.asarray(pair[1])).size:
            problem = f"item {k} has indices on both sides"
        if problem:
            break
    if problem:
        raise ValueError(f"{prefix}cv must be {CV_CHOICES}; got a list of {len(cv)} item(s) ({problem})")


def check_options(alphas=DEFAULT_ALPHAS, cv=5, score: str = "r2", voxel_batch: int | str = "auto",
                  prefix: str = "") -> None:
    """ValueError (one line naming ``<prefix><option>``) for options RidgeCV cannot use: alphas (a non-empty
    list of finite, non-negative numbers; None = DEFAULT_ALPHAS), cv (``check_cv``), score ('r2' | 'corr'),
    voxel_batch (a positive int, or "auto": sized by free memory, ``auto_voxel_batch``). Cheap: run it before any data is read."""
    if alphas is not None:
        values = list(np.ravel(alphas)) if isinstance(alphas, np.ndarray) else list(alphas) if _is_list(alphas) else []
        if not values or not all(isinstance(a, (int, float, np.integer, np.floating)) and not isinstance(a, bool)
                                 and np.isfinite(a) and a >= 0 for a in values):
            shown = list(values) if values else alphas
            raise ValueError(f"{prefix}alphas must be a non-empty list of finite, non-negative numbers (null: the "
                             f"default grid 1e-8 ... 1e10), got {shown!r}")
    check_cv(cv, prefix)
    if score not in ("r2", "corr"):
        raise ValueError(f"{prefix}score must be 'r2' or 'corr', got {score!r}")
    if voxel_batch != "auto" and (not _is_int(voxel_batch) or voxel_batch < 1):
        raise ValueError(f"{prefix}voxel_batch must be a positive integer or 'auto', got {voxel_batch!r}")


def check_folds(cv, n_samples: int, groups=None, shuffle: bool = True, seed: int = 0, prefix: str = "") -> None:
    """ValueError (one line naming ``<prefix>cv``) when ``cv`` cannot split a training set of ``n_samples``
    rows with these ``groups`` (n_samples,) — e.g. more folds than stimuli, indices past its end. Cheap
    (indices only): run it once the split is known, before any features are computed."""
    try:
        cv_splits(cv, n_samples, groups, shuffle, seed)
    except ValueError as err:
        n_groups = len(np.unique(np.asarray(groups))) if groups is not None else n_samples
        shown = cv if _is_int(cv) else type(cv).__name__
        raise ValueError(f"{prefix}cv={shown} cannot split the training set ({n_samples} samples, {n_groups} "
                         f"distinct stimuli): {' '.join(str(err).split())}") from None


def _is_partition(splits: list[tuple[np.ndarray, np.ndarray]], n: int) -> bool:
    """Every training set is the complement of its held-out set, and the held-out sets do not overlap."""
    tested = np.zeros(n, bool)
    for train, test in splits:
        covered = np.zeros(n, bool)
        covered[train] = covered[test] = True
        if len(train) + len(test) != n or not covered.all() or tested[test].any():
            return False
        tested[test] = True
    return True


def score_from_sums(score: str, n: float, s_py: torch.Tensor, s_pp: torch.Tensor, s_p: torch.Tensor,
                    s_y: torch.Tensor, s_yy: torch.Tensor) -> torch.Tensor:
    """Held-out R² or Pearson r per voxel from sums over the held-out samples.

    p = predictions, y = targets (any common offset removed); each argument (..., n_voxels).
    """
    sst = s_yy - s_y ** 2 / n
    if score == "r2":
        sse = s_yy - 2 * s_py + s_pp
        return 1.0 - sse / sst
    if score == "corr":
        cov = s_py - s_p * s_y / n
        var_p = (s_pp - s_p ** 2 / n).clamp(min=0)
        return cov / torch.sqrt(var_p * sst).clamp(min=1e-300)
    raise ValueError(f"score must be 'r2' or 'corr', got {score!r}")


def solve_bytes_per_voxel(solver: str, n_samples: int, n_features: int, n_alphas: int, n_splits: int,
                          max_rows: int, n_blocks: int | None = None, y_itemsize: int = 4) -> int:
    """Upper bound of the bytes one voxel of a batch occupies while ``solver.solve`` runs (tensors it
    allocates, its outputs included; not the solver's own per-split matrices, made before the batches).

    primal: per-block and per-split XᵀY and sums (float64, d + 2 per voxel each: ``n_blocks`` blocks, the
    training sets' and the totals), the rows of one block (``max_rows``: the largest held-out block when the
    splits partition the samples, else n_samples) as gathered input, its float64 copy and squares, and a
    split's (d,)-columns in the solve (B̂, P̂, their products, the float32 Ĉ·W). dual: Y in float64, a
    split's training and held-out columns, the per-alpha predictions and the refit's n-columns, W (d,).
    Measured on the CPU (every storage the solve creates, tests/test_ridge.py): the peak is 0.35-0.65 of this.
    """
    d, n, a = int(n_features), int(n_samples), int(n_alphas)
    if solver == "primal":
        blocks = n_splits if n_blocks is None else n_blocks
        per_stat = 8 * (d + 2) * (blocks + 2 * n_splits + 2)
        rows = (3 * y_itemsize + 24) * int(max_rows)
        return per_stat + rows + 64 * d + 64 * a
    if solver == "dual":
        return y_itemsize * n + 8 * (4 * n + 2 * d + 4 * a)
    raise ValueError(f"solver must be 'primal' or 'dual', got {solver!r}")


def auto_voxel_batch(free: int | None, bytes_per_voxel: int, n_voxels: int, device_type: str = "cpu") -> int:
    """Voxels per batch for ``free`` bytes of free memory (None: unknown) on a device of ``device_type``.

    cuda: MEMORY_FRACTION["cuda"] of (free - CUDA_RESERVE) / bytes_per_voxel, up to every voxel at once;
    cpu: that with MEMORY_FRACTION["cpu"] and no reserve, at most CPU_VOXEL_BATCH; unknown free memory
    (or another device type): CPU_VOXEL_BATCH. At least 1, at most n_voxels (>= 1).
    """
    n_voxels = max(int(n_voxels), 1)
    if free is None or device_type not in MEMORY_FRACTION:
        return min(CPU_VOXEL_BATCH, n_voxels)
    reserve = CUDA_RESERVE if device_type == "cuda" else 0
    budget = MEMORY_FRACTION[device_type] * max(int(free) - reserve, 0)
    batch = int(budget // max(int(bytes_per_voxel), 1))
    if device_type == "cpu":
        batch = min(batch, CPU_VOXEL_BATCH)
    return max(1, min(batch, n_voxels))


def free_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device``: CUDA's free memory plus what torch's caching allocator holds
    unused; the CPU's MemAvailable (Linux /proc/meminfo); None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


@dataclass
class FoldStats:
    """Sufficient statistics of a set of samples: n, Σx (d,), XᵀX (d, d)."""

    n: int
    sx: torch.Tensor
    xtx: torch.Tensor

    @classmethod
    def of(cls, X: torch.Tensor) -> "FoldStats":
        return cls(len(X), X.sum(0), X.T @ X)

    def __sub__(self, other: "FoldStats") -> "FoldStats":
        return FoldStats(self.n - other.n, self.sx - other.sx, self.xtx - other.xtx)


class _PrimalSolver:
    """Per-split eigendecompositions of the centred training XᵀX (d × d), shared by all voxel batches.

    splits: (train, test) index pairs. When they partition the samples (``_is_partition``) the statistics
    are summed once per block (the held-out sets, and the never-held-out rest) and each training set's
    are the totals minus its held-out block's; otherwise each training set's are summed directly.
    """

    def __init__(self, X: torch.Tensor, splits: list[tuple[np.ndarray, np.ndarray]]):
        n = len(X)
        self.splits = splits
        self.partition = _is_partition(splits, n)
        if self.partition:
            tested = np.zeros(n, bool)
            for _, test in splits:
                tested[test] = True
            rest = np.flatnonzero(~tested)
            self.blocks = [test for _, test in splits] + ([rest] if len(rest) else [])
            self.X_blocks = [X[idx].double() for idx in self.blocks]
            block_stats = [FoldStats.of(Xb) for Xb in self.X_blocks]
            self.total = FoldStats(n, sum(b.sx for b in block_stats), sum(b.xtx for b in block_stats))
            self.test_stats = block_stats[:len(splits)]
            self.train_stats = [self.total - t for t in self.test_stats]
        else:
            self.X = X.double()
            self.total = FoldStats.of(self.X)
            self.test_stats = [FoldStats.of(self.X[test]) for _, test in splits]
            self.train_stats = [FoldStats.of(self.X[train]) for train, _ in splits]
        self.fold_eig = [self._eig(k) for k in range(len(splits))]
        self.n_features = X.shape[1]
        self.n_blocks = len(self.blocks) if self.partition else len(splits)
        self.max_rows = max(len(b) for b in self.blocks) if self.partition else n
        mu = self.total.sx / n
        s_full, U_full = torch.linalg.eigh(self.total.xtx - n * torch.outer(mu, mu))
        self.full_eig = (s_full.clamp(min=0), U_full, mu)

    def bytes_per_voxel(self, n_alphas: int, y_itemsize: int = 4) -> int:
        """``solve_bytes_per_voxel`` for this solver's shapes."""
        return solve_bytes_per_voxel("primal", self.total.n, self.n_features, n_alphas, len(self.splits),
                                     self.max_rows, self.n_blocks, y_itemsize)

    def _eig(self, k: int):
        """Eigenbasis U, eigenvalues s of split k's centred training XᵀX, its held-out Ĉ and ŝ."""
        tr, f = self.train_stats[k], self.test_stats[k]
        mu = tr.sx / tr.n
        c_tr = tr.xtx - tr.n * torch.outer(mu, mu)
        s, U = torch.linalg.eigh(c_tr)
        # Held-out scatter around the *training* mean: Σ (x - mu)(x - mu)ᵀ over the fold.
        c_f = f.xtx - torch.outer(mu, f.sx) - torch.outer(f.sx, mu) + f.n * torch.outer(mu, mu)
        return U, s.clamp(min=0), (U.T @ c_f @ U).float(), U.T @ (f.sx - f.n * mu), mu

    def _y_stats(self, Y: torch.Tensor):
        """Per split: training (XᵀY, Σy) and held-out (XᵀY, Σy, Σy²); and the totals (XᵀY, Σy)."""
        if self.partition:
            per_block = []
            for idx, Xb in zip(self.blocks, self.X_blocks):
                Yb = Y[idx].double()
                per_block.append((Xb.T @ Yb, Yb.sum(0), (Yb * Yb).sum(0)))
            total = (sum(p[0] for p in per_block), sum(p[1] for p in per_block))
            test = per_block[:len(self.splits)]
            train = [(total[0] - t[0], total[1] - t[1]) for t in test]
            return train, test, total
        Yd = Y.double()
        train = [(self.X[tr].T @ Yd[tr], Yd[tr].sum(0)) for tr, _ in self.splits]
        test = [(self.X[te].T @ Yd[te], Yd[te].sum(0), (Yd[te] * Yd[te]).sum(0)) for _, te in self.splits]
        return train, test, (self.X.T @ Yd, Yd.sum(0))

    def solve(self, Y: torch.Tensor, alphas: torch.Tensor, score: str):
        """For a voxel batch Y (n, vb): mean held-out scores (n_alphas, vb), then the refit at each
        voxel's best alpha: weights (d, vb), intercepts (vb,), best alpha index (vb,)."""
        train_y, test_y, (xty, sy) = self._y_stats(Y)
        total = torch.zeros(len(alphas), Y.shape[1], dtype=torch.float64, device=Y.device)
        for tr, f, (U, s, C32, sx_hat, mu), (xty_tr, sy_tr), (xty_f, sy_f, syy_f) in zip(
                self.train_stats, self.test_stats, self.fold_eig, train_y, test_y):
            mu_y = sy_tr / tr.n
            B_hat = U.T @ (xty_tr - tr.n * torch.outer(mu, mu_y))
            P_hat = U.T @ (xty_f - torch.outer(mu, sy_f) - torch.outer(f.sx, mu_y) + f.n * torch.outer(mu, mu_y))
            inv = 1.0 / (s[:, None] + alphas[None, :])  # (d, n_alphas)
            # Terms linear in W are cheap for all alphas at once: (vb, d) @ (d, n_alphas).
            s_py = ((P_hat * B_hat).T @ inv).T
            s_p = ((sx_hat[:, None] * B_hat).T @ inv).T
            # The quadratic term needs Ĉ·W per alpha: the cost centre, in float32.
            B32, inv32 = B_hat.float(), inv.float()
            s_pp = torch.stack([torch.linalg.vecdot(W, C32 @ W, dim=0)
                                for W in (B32 * inv32[:, a:a + 1] for a in range(len(alphas)))]).double()
            s_y = sy_f - f.n * mu_y
            s_yy = syy_f - 2 * mu_y * sy_f + f.n * mu_y ** 2
            total += score_from_sums(score, f.n, s_py, s_pp, s_p, s_y, s_yy)
        scores = total / len(self.splits)
        best = torch.nan_to_num(scores, nan=-torch.inf).argmax(0)
        s_full, U_full, mu = self.full_eig
        n = self.total.n
        mu_y = sy / n
        B_hat = U_full.T @ (xty - n * torch.outer(mu, mu_y))
        W = U_full @ (B_hat / (s_full[:, None] + alphas[best][None, :]))
        return scores, W, mu_y - mu @ W, best


class _DualSolver:
    """Kernel form for n_features > n_samples: eigendecompositions of the training kernels per split."""

    def __init__(self, X: torch.Tensor, splits: list[tuple[np.ndarray, np.ndarray]]):
        self.X, self.splits = X.double(), splits
        self.n = len(X)
        self.fold_eig = []
        for tr, idx in splits:
            mu = self.X[tr].mean(0)
            Xtr, Xf = self.X[tr] - mu, self.X[idx] - mu
            lam, V = torch.linalg.eigh(Xtr @ Xtr.T)
            self.fold_eig.append((lam.clamp(min=0), V, (Xf @ Xtr.T) @ V))
        self.mu = self.X.mean(0)
        Xc = self.X - self.mu
        lam, V = torch.linalg.eigh(Xc @ Xc.T)
        self.full_eig = (lam.clamp(min=0), V, Xc)

    def bytes_per_voxel(self, n_alphas: int, y_itemsize: int = 4) -> int:
        """``solve_bytes_per_voxel`` for this solver's shapes."""
        return solve_bytes_per_voxel("dual", self.n, self.X.shape[1], n_alphas, len(self.splits), self.n,
                                     y_itemsize=y_itemsize)

    def cv_scores(self, Y: torch.Tensor, alphas: torch.Tensor, score: str) -> torch.Tensor:
        Yd = Y.double()
        total = torch.zeros(len(alphas), Y.shape[1], dtype=torch.float64, device=Y.device)
        for (tr, idx), (lam, V, M) in zip(self.splits, self.fold_eig):
            mu_y = Yd[tr].mean(0)
            Z = V.T @ (Yd[tr] - mu_y)
            y = Yd[idx] - mu_y
            s_y, s_yy = y.sum(0), (y * y).sum(0)
            for a, alpha in enumerate(alphas):
                pred = M @ (Z / (lam + alpha)[:, None])
                total[a] += score_from_sums(score, len(idx), (pred * y).sum(0), (pred * pred).sum(0),
                                            pred.sum(0), s_y, s_yy)
        return total / len(self.splits)

    def solve(self, Y: torch.Tensor, alphas: torch.Tensor, score: str):
        """As _PrimalSolver.solve, through n × n kernels."""
        scores = self.cv_scores(Y, alphas, score)
        best = torch.nan_to_num(scores, nan=-torch.inf).argmax(0)
        lam, V, Xc = self.full_eig
        Yd = Y.double()
        mu_y = Yd.mean(0)
        dual = V @ ((V.T @ (Yd - mu_y)) / (lam[:, None] + alphas[best][None, :]))
        W = Xc.T @ dual
        return scores, W, mu_y - self.mu @ W, best


class RidgeCV:
    """Ridge regression with a separate alpha per voxel, chosen by cross-validation on the data given to fit.

    fit(X (n_samples, n_features), Y (n_samples, n_voxels), groups=None (n_samples,)); predict(X) ->
    (n_samples, n_voxels); score(X, Y) -> per-voxel R² (n_voxels,). cv: an int (K folds; ``shuffle``,
    ``seed``; never splitting a group), a scikit-learn splitter (``GroupKFold(5)``, ``PredefinedSplit``, …;
    it receives ``groups``) or a list of (train, test) index pairs. Fitted: coef_ (n_voxels, n_features) as
    scikit-learn, intercept_ (n_voxels,), best_alphas_ (n_voxels,), cv_scores_ (n_alphas, n_voxels),
    n_splits_, grouped_ (groups were given), alpha_edge_fraction_ {"lowest", "highest"}: the fraction of
    voxels whose best alpha is the grid's smallest / largest (a one-line warning when either is > 0:
    the grid may be too narrow). Arrays in (numpy or torch), numpy out. ``device`` runs the algebra there.
    progress: report the fit over its voxel batches (a bar on a terminal, a line every ~30 s elsewhere;
    ``encoders.progress``). voxel_batch: voxels solved at once, a positive int or "auto" (``auto_voxel_batch``:
    from the memory free on the device once the solver's per-split matrices are made; on a GPU up to every
    voxel at once, on the CPU at most 4096); the batch used is ``voxel_batch_``.
    """

    def __init__(self, alphas=DEFAULT_ALPHAS, cv=5, score: str = "r2", shuffle: bool = True,
                 seed: int = 0, voxel_batch: int | str = "auto", solver: str = "auto", device: str | None = None,
                 progress: bool = True):
        check_options(alphas, cv, score, voxel_batch)
        if solver not in ("auto", "primal", "dual"):
            raise ValueError(f"solver must be 'auto', 'primal' or 'dual', got {solver!r}")
        self.alphas = np.asarray(DEFAULT_ALPHAS if alphas is None else alphas, dtype=np.float64).ravel()
        self.cv, self.score_name, self.shuffle, self.seed = cv, score, shuffle, seed
        self.voxel_batch, self.solver, self.device = voxel_batch, solver, device
        self.progress = progress

    def _tensor(self, A) -> torch.Tensor:
        t = A if torch.is_tensor(A) else torch.from_numpy(np.ascontiguousarray(A))
        return t.to(self.device or "cpu", dtype=torch.float32 if t.dtype != torch.float64 else torch.float64)

    def fit(self, X, Y, groups=None) -> "RidgeCV":
        X, Y = self._tensor(X), self._tensor(Y)
        if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y):
            raise ValueError(f"RidgeCV.fit: X (n, d) and Y (n, v) must share n, got {tuple(X.shape)} and {tuple(Y.shape)}")
        if groups is not None:
            groups = np.asarray(groups.cpu() if torch.is_tensor(groups) else groups)
            if groups.shape != (len(X),):
                raise ValueError(f"RidgeCV.fit: groups must have shape ({len(X)},), got {groups.shape}")
        splits = cv_splits(self.cv, len(X), groups, self.shuffle, self.seed)
        self.n_splits_, self.grouped_ = len(splits), groups is not None
        solver = self.solver if self.solver != "auto" else ("dual" if X.shape[1] > len(X) else "primal")
        engine = (_DualSolver if solver == "dual" else _PrimalSolver)(X, splits)
        self.solver_ = solver
        alphas = torch.tensor(self.alphas, dtype=torch.float64, device=X.device)
        n_vox = Y.shape[1]
        self.cv_scores_ = np.empty((len(alphas), n_vox), dtype=np.float64)
        self.best_alphas_ = np.empty(n_vox, dtype=np.float64)
        self.coef_ = np.empty((n_vox, X.shape[1]), dtype=np.float32)
        self.intercept_ = np.empty(n_vox, dtype=np.float32)
        batch = self.voxel_batch_ = self._voxel_batch(engine, len(alphas), Y)
        self.device_ = str(Y.device)
        for start in track(range(0, n_vox, batch), f"ridge fit ({len(alphas)} alphas, {self.n_splits_} "
                           f"folds)", total=n_vox, unit="voxels",
                           size=lambda s: min(batch, n_vox - s), enabled=self.progress):
            sl = slice(start, min(start + batch, n_vox))
            scores, W, b, best = engine.solve(Y[:, sl], alphas, self.score_name)
            self.cv_scores_[:, sl] = scores.cpu().numpy()
            self.best_alphas_[sl] = alphas[best].cpu().numpy()
            self.coef_[sl] = W.T.float().cpu().numpy()
            self.intercept_[sl] = b.float().cpu().numpy()
        self.n_features_in_ = X.shape[1]
        self._check_grid_edges()
        return self

    def _voxel_batch(self, engine, n_alphas: int, Y: torch.Tensor) -> int:
        """The voxel batch of this fit: ``voxel_batch`` as given, or sized for the free memory ("auto")."""
        if self.voxel_batch != "auto":
            return int(self.voxel_batch)
        per_voxel = engine.bytes_per_voxel(n_alphas, Y.element_size())
        free = free_bytes(Y.device)
        batch = auto_voxel_batch(free, per_voxel, Y.shape[1], Y.device.type)
        log.debug("ridge: %d voxels a batch (%s free on %s, %.1f kB a voxel)", batch,
                  "?" if free is None else f"{free / 2 ** 30:.1f} GiB", Y.device, per_voxel / 1024)
        return batch

    def cv_record(self) -> dict[str, np.ndarray]:
        """What a run records about the alpha selection besides alphas, best alphas and CV scores:
        alpha_edge_fraction [lowest, highest], grouped (bool), n_splits, voxel_batch (the batch used),
        device (where it was solved)."""
        f = self.alpha_edge_fraction_
        return {"alpha_edge_fraction": np.array([f["lowest"], f["highest"]]), "grouped": np.array(self.grouped_),
                "n_splits": np.array(self.n_splits_), "voxel_batch": np.array(self.voxel_batch_),
                "device": np.array(self.device_)}

    def _check_grid_edges(self) -> None:
        """alpha_edge_fraction_ over the voxels with a finite CV score; one warning line if any sits at an end."""
        scored = np.isfinite(self.cv_scores_).any(axis=0)
        best = self.best_alphas_[scored]
        lo, hi = self.alphas.min(), self.alphas.max()
        frac = {"lowest": float(np.mean(best == lo)) if best.size else 0.0,
                "highest": float(np.mean(best == hi)) if best.size else 0.0}
        self.alpha_edge_fraction_ = frac
        if len(self.alphas) > 1 and (frac["lowest"] > 0 or frac["highest"] > 0):
            log.warning("ridge: best alpha at the grid's lowest value (%.3g) for %.1f%% and at its highest (%.3g) "
                        "for %.1f%% of %d voxels; the grid may be too narrow for them (head.alphas)",
                        lo, 100 * frac["lowest"], hi, 100 * frac["highest"], best.size)

    def predict(self, X) -> np.ndarray:
        X = np.asarray(X.cpu() if torch.is_tensor(X) else X, dtype=np.float32)
        return X @ self.coef_.T + self.intercept_

    def score(self, X, Y) -> np.ndarray:
        """Per-voxel R² of the predictions for X against Y: (n_voxels,)."""
        from encoders.metrics import r2_score
        return r2_score(self.predict(X), np.asarray(Y))
