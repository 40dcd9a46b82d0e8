"""Closed-form ridge regression with one alpha per voxel, chosen by K-fold cross-validation.

Design (primal, n_features <= n_samples): one pass over the data accumulates per-fold sufficient
statistics (XᵀX, XᵀY, Σx, Σy, Σy²); for each fold the training statistics are the totals minus the
fold's, one eigendecomposition of the centred training XᵀX serves every alpha, and held-out errors
follow from the held-out fold's statistics — no (n_voxels × n_alphas × n_samples) tensor, voxels in
batches. Dual (kernel) form when n_features > n_samples. Torch on CPU or GPU, float64 where the
algebra needs it (statistics, eigendecompositions).

Kernels are plain functions on tensors; ``RidgeCV`` is a thin array-in / array-out estimator.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-8, 10, 19))


def kfold_indices(n_samples: int, n_folds: int, shuffle: bool = True, seed: int = 0) -> list[np.ndarray]:
    """Fold membership: a list of n_folds sorted index arrays covering range(n_samples).

    shuffle=False gives contiguous blocks (for time series), as scikit-learn's KFold.
    """
    if not 2 <= n_folds <= n_samples:
        raise ValueError(f"need 2 <= n_folds <= n_samples, got n_folds={n_folds}, n_samples={n_samples}")
    order = np.random.default_rng(seed).permutation(n_samples) if shuffle else np.arange(n_samples)
    sizes = np.full(n_folds, n_samples // n_folds)
    sizes[: n_samples % n_folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.sort(order[bounds[k]:bounds[k + 1]]) for k in range(n_folds)]


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


@dataclass
class FoldStats:
    """Sufficient statistics of one fold: n, Σx (d,), XᵀX (d, d); per voxel batch Σy, Σy², XᵀY."""

    n: int
    sx: torch.Tensor
    xtx: torch.Tensor


class _PrimalSolver:
    """Per-fold eigendecompositions of the centred training XᵀX (d × d), shared by all voxel batches."""

    def __init__(self, X: torch.Tensor, folds: list[np.ndarray]):
        self.folds = folds
        self.X_folds = [X[idx].double() for idx in folds]
        self.stats = [FoldStats(len(idx), Xf.sum(0), Xf.T @ Xf) for idx, Xf in zip(folds, self.X_folds)]
        self.n = sum(s.n for s in self.stats)
        self.sx = sum(s.sx for s in self.stats)
        self.xtx = sum(s.xtx for s in self.stats)
        self.fold_eig = [self._eig(k) for k in range(len(folds))]
        mu = self.sx / self.n
        s_full, U_full = torch.linalg.eigh(self.xtx - self.n * torch.outer(mu, mu))
        self.full_eig = (s_full.clamp(min=0), U_full, mu)

    def _eig(self, k: int):
        """Eigenbasis U, eigenvalues s of fold k's centred training XᵀX, its held-out Ĉ and ŝ."""
        f = self.stats[k]
        n_tr = self.n - f.n
        mu = (self.sx - f.sx) / n_tr
        c_tr = (self.xtx - f.xtx) - n_tr * torch.outer(mu, mu)
        s, U = torch.linalg.eigh(c_tr)
        # Held-out scatter around the *training* mean: Σ (x - mu)(x - mu)ᵀ over the fold.
        c_f = f.xtx - torch.outer(mu, f.sx) - torch.outer(f.sx, mu) + f.n * torch.outer(mu, mu)
        return U, s.clamp(min=0), (U.T @ c_f @ U).float(), U.T @ (f.sx - f.n * mu), mu

    def solve(self, Y: torch.Tensor, alphas: torch.Tensor, score: str):
        """For a voxel batch Y (n, vb): mean held-out scores (n_alphas, vb), then the refit at each
        voxel's best alpha: weights (d, vb), intercepts (vb,), best alpha index (vb,)."""
        per_fold = []
        for idx, Xf in zip(self.folds, self.X_folds):
            Yf = Y[idx].double()
            per_fold.append((Xf.T @ Yf, Yf.sum(0), (Yf * Yf).sum(0)))
        xty = sum(p[0] for p in per_fold)
        sy = sum(p[1] for p in per_fold)
        total = torch.zeros(len(alphas), Y.shape[1], dtype=torch.float64, device=Y.device)
        for (f, (U, s, C32, sx_hat, mu)), (xty_f, sy_f, syy_f) in zip(zip(self.stats, self.fold_eig), per_fold):
            n_tr = self.n - f.n
            mu_y = (sy - sy_f) / n_tr
            B_hat = U.T @ ((xty - xty_f) - n_tr * torch.outer(mu, mu_y))
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
        scores = total / len(self.folds)
        best = torch.nan_to_num(scores, nan=-torch.inf).argmax(0)
        s_full, U_full, mu = self.full_eig
        mu_y = sy / self.n
        B_hat = U_full.T @ (xty - self.n * torch.outer(mu, mu_y))
        W = U_full @ (B_hat / (s_full[:, None] + alphas[best][None, :]))
        return scores, W, mu_y - mu @ W, best


class _DualSolver:
    """Kernel form for n_features > n_samples: eigendecompositions of n × n training kernels."""

    def __init__(self, X: torch.Tensor, folds: list[np.ndarray]):
        self.X, self.folds = X.double(), folds
        self.n = len(X)
        self.fold_eig = []
        all_idx = np.arange(self.n)
        for idx in folds:
            tr = np.setdiff1d(all_idx, idx)
            mu = self.X[tr].mean(0)
            Xtr, Xf = self.X[tr] - mu, self.X[idx] - mu
            lam, V = torch.linalg.eigh(Xtr @ Xtr.T)
            self.fold_eig.append((tr, lam.clamp(min=0), V, (Xf @ Xtr.T) @ V))
        self.mu = self.X.mean(0)
        Xc = self.X - self.mu
        lam, V = torch.linalg.eigh(Xc @ Xc.T)
        self.full_eig = (lam.clamp(min=0), V, Xc)

    def cv_scores(self, Y: torch.Tensor, alphas: torch.Tensor, score: str) -> torch.Tensor:
        Yd = Y.double()
        total = torch.zeros(len(alphas), Y.shape[1], dtype=torch.float64, device=Y.device)
        for idx, (tr, lam, V, M) in zip(self.folds, self.fold_eig):
            mu_y = Yd[tr].mean(0)
            Z = V.T @ (Yd[tr] - mu_y)
            y = Yd[idx] - mu_y
            s_y, s_yy = y.sum(0), (y * y).sum(0)
            for a, alpha in enumerate(alphas):
                pred = M @ (Z / (lam + alpha)[:, None])
                total[a] += score_from_sums(score, len(idx), (pred * y).sum(0), (pred * pred).sum(0),
                                            pred.sum(0), s_y, s_yy)
        return total / len(self.folds)

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
    """Ridge regression with a separate alpha per voxel, chosen by K-fold CV on the data given to fit.

    fit(X (n_samples, n_features), Y (n_samples, n_voxels)); predict(X) -> (n_samples, n_voxels);
    score(X, Y) -> per-voxel R² (n_voxels,). Fitted: coef_ (n_voxels, n_features) as scikit-learn,
    intercept_ (n_voxels,), best_alphas_ (n_voxels,), cv_scores_ (n_alphas, n_voxels).
    Arrays in (numpy or torch), numpy out. ``device`` runs the algebra there (e.g. "cuda").
    """

    def __init__(self, alphas=DEFAULT_ALPHAS, cv: int = 5, score: str = "r2", shuffle: bool = True,
                 seed: int = 0, voxel_batch: int = 4096, solver: str = "auto", device: str | None = None):
        if score not in ("r2", "corr"):
            raise ValueError(f"score must be 'r2' or 'corr', got {score!r}")
        if solver not in ("auto", "primal", "dual"):
            raise ValueError(f"solver must be 'auto', 'primal' or 'dual', got {solver!r}")
        self.alphas = np.asarray(alphas, dtype=np.float64).ravel()
        if self.alphas.size == 0 or np.any(self.alphas < 0):
            raise ValueError("alphas must be a non-empty list of non-negative values")
        self.cv, self.score_name, self.shuffle, self.seed = cv, score, shuffle, seed
        self.voxel_batch, self.solver, self.device = voxel_batch, solver, device

    def _tensor(self, A) -> torch.Tensor:
        t = A if torch.is_tensor(A) else torch.from_numpy(np.ascontiguousarray(A))
        return t.to(self.device or "cpu", dtype=torch.float32 if t.dtype != torch.float64 else torch.float64)

    def fit(self, X, Y) -> "RidgeCV":
        X, Y = self._tensor(X), self._tensor(Y)
        if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y):
            raise ValueError(f"RidgeCV.fit: X (n, d) and Y (n, v) must share n, got {tuple(X.shape)} and {tuple(Y.shape)}")
        folds = kfold_indices(len(X), self.cv, self.shuffle, self.seed)
        solver = self.solver if self.solver != "auto" else ("dual" if X.shape[1] > len(X) else "primal")
        engine = (_DualSolver if solver == "dual" else _PrimalSolver)(X, folds)
        self.solver_ = solver
        alphas = torch.tensor(self.alphas, dtype=torch.float64, device=X.device)
        n_vox = Y.shape[1]
        self.cv_scores_ = np.empty((len(alphas), n_vox), dtype=np.float64)
        self.best_alphas_ = np.empty(n_vox, dtype=np.float64)
        self.coef_ = np.empty((n_vox, X.shape[1]), dtype=np.float32)
        self.intercept_ = np.empty(n_vox, dtype=np.float32)
        for start in range(0, n_vox, self.voxel_batch):
            sl = slice(start, min(start + self.voxel_batch, n_vox))
            scores, W, b, best = engine.solve(Y[:, sl], alphas, self.score_name)
            self.cv_scores_[:, sl] = scores.cpu().numpy()
            self.best_alphas_[sl] = alphas[best].cpu().numpy()
            self.coef_[sl] = W.T.float().cpu().numpy()
            self.intercept_[sl] = b.float().cpu().numpy()
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X) -> np.ndarray:
        X = np.asarray(X.cpu() if torch.is_tensor(X) else X, dtype=np.float32)
        return X @ self.coef_.T + self.intercept_

    def score(self, X, Y) -> np.ndarray:
        """Per-voxel R² of the predictions for X against Y: (n_voxels,)."""
        from encoders.metrics import r2_score
        return r2_score(self.predict(X), np.asarray(Y))
