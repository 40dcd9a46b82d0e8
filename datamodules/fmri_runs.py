"""Preprocessing of fMRI runs (time series): polynomial detrending, z-scoring, repeat averaging, ncsnr.

    clean = zscore_time(detrend_polynomial(run, order=4))     # run (n_volumes, n_voxels)
    moments = RepeatMoments(); moments.add(clean); …          # the repeats of one stimulus
    mean, n = moments.mean(), moments.count                   # repeat average
    ncsnr = ncsnr_from_noise_variance(moments.noise_variance())

The noise ceiling SNR follows NSD (Allen et al. 2022) on z-scored data: σ²_noise = the across-repeat
variance (ddof 1) averaged over samples, ncsnr = sqrt(max(0, 1 − σ²_noise)) / σ_noise.
"""
from __future__ import annotations

import warnings

import numpy as np
from numpy.polynomial import legendre


def polynomial_basis(n_samples: int, order: int) -> np.ndarray:
    """Legendre polynomials 0..order over the run, t in [-1, 1]: (n_samples, order + 1) float64."""
    t = np.linspace(-1.0, 1.0, n_samples) if n_samples > 1 else np.zeros(1)
    return legendre.legvander(t, order)


def detrend_polynomial(x: np.ndarray, order: int = 4) -> np.ndarray:
    """Remove each column's least-squares polynomial trend of degree ``order``: (n, v) -> (n, v) float64.

    The constant is part of the trend, so the result has zero mean over time.
    """
    x = np.asarray(x, dtype=np.float64)
    if order < 0:
        return x.copy()
    if x.shape[0] <= order + 1:
        raise ValueError(f"detrend_polynomial: {x.shape[0]} samples cannot be detrended with order {order}")
    basis = polynomial_basis(x.shape[0], order)
    coef, *_ = np.linalg.lstsq(basis, x, rcond=None)
    return x - basis @ coef


def zscore_time(x: np.ndarray) -> np.ndarray:
    """Z-score each column over time (ddof 0): (n, v) -> (n, v) float32; constant columns give 0."""
    x = np.asarray(x, dtype=np.float64)
    std = x.std(axis=0)
    safe = np.where(std > 0, std, 1.0)
    return ((x - x.mean(axis=0)) / safe * (std > 0)).astype(np.float32)


def invalid_columns(x: np.ndarray) -> np.ndarray:
    """Columns that are non-finite anywhere or constant over time: (n, v) -> bool (v,)."""
    finite = np.isfinite(x).all(axis=0)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: counted by the caller, not warned about
        constant = np.nanmax(x, axis=0) == np.nanmin(x, axis=0) if len(x) else np.ones(x.shape[1], bool)
    return ~finite | constant


class RepeatMoments:
    """Running sum and sum of squares of the repeats of one stimulus, each (n_samples, n_voxels)."""

    def __init__(self):
        self.count = 0
        self.sum: np.ndarray | None = None
        self.sumsq: np.ndarray | None = None

    def add(self, run: np.ndarray) -> None:
        run = np.asarray(run, dtype=np.float64)
        if self.sum is None:
            self.sum, self.sumsq = np.zeros_like(run), np.zeros_like(run)
        elif run.shape != self.sum.shape:
            raise ValueError(f"RepeatMoments: run of shape {run.shape}, earlier runs {self.sum.shape}")
        self.sum += run
        self.sumsq += run * run
        self.count += 1

    def mean(self) -> np.ndarray:
        """Repeat average (n_samples, n_voxels) float32."""
        return (self.sum / self.count).astype(np.float32)

    def variance(self) -> np.ndarray:
        """Across-repeat variance, ddof 1: (n_samples, n_voxels) float64 (needs >= 2 repeats)."""
        if self.count < 2:
            raise ValueError("RepeatMoments: the noise variance needs at least 2 repeats")
        return np.maximum(self.sumsq - self.sum ** 2 / self.count, 0.0) / (self.count - 1)

    def noise_variance(self) -> np.ndarray:
        """σ²_noise per voxel: across-repeat variance averaged over samples, (n_voxels,) float64."""
        return self.variance().mean(axis=0)


def ncsnr_from_noise_variance(noise_var: np.ndarray) -> np.ndarray:
    """NSD's ncsnr on z-scored data: sqrt(max(0, 1 − σ²)) / σ, (n_voxels,) float64 (0 where σ² = 0 too)."""
    noise_var = np.asarray(noise_var, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.sqrt(np.maximum(0.0, 1.0 - noise_var)) / np.sqrt(noise_var)
    return np.where(noise_var > 0, out, 0.0)


def ncsnr_from_repeats(runs: np.ndarray) -> np.ndarray:
    """ncsnr from z-scored repeats (n_repeats, n_samples, n_voxels), or a list of such arrays (one per
    stimulus, their noise variances averaged weighted by samples) -> (n_voxels,) float64."""
    arrays = [runs] if isinstance(runs, np.ndarray) else list(runs)
    total, n = 0.0, 0
    for a in arrays:
        a = np.asarray(a, dtype=np.float64)
        if a.shape[0] < 2:
            raise ValueError(f"ncsnr_from_repeats: {a.shape[0]} repeat(s); need at least 2")
        total = total + a.var(axis=0, ddof=1).sum(axis=0)
        n += a.shape[1]
    return ncsnr_from_noise_variance(total / n)


def ncsnr_from_trial_sums(sum_x: np.ndarray, sum_xx: np.ndarray, n_trials: int, image_means: np.ndarray,
                          image_counts: np.ndarray, row_block: int = 4096) -> np.ndarray:
    """NSD's ncsnr from every trial of a set of sessions, given as sums (no trial kept in memory).

    sum_x, sum_xx (n_voxels,): Σx and Σx² over all ``n_trials`` trials (z-scored per session);
    image_means (n_images, n_voxels): each image's mean over its trials, image_counts (n_images,) their number.
    σ²_noise = the pooled within-image variance, Σ_i Σ_j (x_ij − x̄_i)² / Σ_i (n_i − 1) (images seen once add
    nothing; with 3 trials for every image this is NSD's mean of the per-image variances, ddof 1); σ²_total =
    the variance of all trials (ddof 0; 1 for data z-scored per session); ncsnr = sqrt(max(0, σ²_total −
    σ²_noise)) / σ_noise, i.e. ``ncsnr_from_noise_variance(σ²_noise / σ²_total)``. ValueError when no
    image has two trials. Returns (n_voxels,) float64.
    """
    counts = np.asarray(image_counts, dtype=np.float64)
    dof = float(n_trials) - len(counts)
    if dof < 1:
        raise ValueError("ncsnr_from_trial_sums: no image has two trials")
    between = np.zeros(len(sum_x), dtype=np.float64)  # Σ_i n_i x̄_i²
    for start in range(0, len(counts), row_block):
        m = np.asarray(image_means[start:start + row_block], dtype=np.float64)
        between += counts[start:start + row_block] @ (m * m)
    sum_xx = np.asarray(sum_xx, dtype=np.float64)
    noise_var = np.maximum(sum_xx - between, 0.0) / dof
    total_var = sum_xx / n_trials - (np.asarray(sum_x, dtype=np.float64) / n_trials) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(total_var > 0, noise_var / total_var, 0.0)
    return ncsnr_from_noise_variance(relative)
