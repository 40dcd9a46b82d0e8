"""Comparing encoders honestly: ROI summaries of per-voxel scores under a bootstrap over test stimuli, paired
differences between two encoders with bootstrap CIs (BCa or percentile) and p-values, and a test across subjects.

Arrays in, arrays out. The unit of resampling is the test stimulus (an image, or a block of consecutive TRs of
a time series), never the voxel: voxels of one ROI are not independent samples, stimuli are. Both encoders of a
pair are scored on the *same* resamples (``stats.resample_counts`` over the same units and seed), so the
difference's distribution is paired.

    counts = stats.resample_counts(test_ids, n_boot=1000, seed=0)            # (n_boot, n_test)
    boot = stats.bootstrap_scores(pred, true, counts, nc)                     # {"r", "r2", "nc_r2"}: (n_boot, n_voxels)
    draws = roi_draws(boot["nc_r2"], rois)                                    # {"mean", "median"}: (n_boot, n_rois)
    jack = roi_draws(stats.bootstrap_scores(pred, true, stats.jackknife_counts(test_ids), nc)["nc_r2"], rois)
    row = paired_difference(obs_a, obs_b, draws_a["mean"], draws_b["mean"], jack_a["mean"], jack_b["mean"])
    across_subjects(d)                                                        # d (n_subjects, n_rois): t-test over subjects
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.special
import scipy.stats

STATISTICS = ("mean", "median")


def roi_draws(scores: np.ndarray, rois: Mapping[str, np.ndarray], statistics: Sequence[str] = STATISTICS
              ) -> dict[str, np.ndarray]:
    """The mean / median over each ROI's voxels of every resample: scores (n_boot, n_voxels) (or (n_voxels,)),
    rois {name: bool (n_voxels,)} -> {statistic: (n_boot, n_rois)} (n_rois in ``rois`` order; (n_rois,) for 1-D
    scores). Non-finite voxel scores are left out (NaN where an ROI has none)."""
    scores = np.asarray(scores, dtype=np.float64)
    flat = scores.ndim == 1
    scores = scores[None, :] if flat else scores
    out = {s: np.full((scores.shape[0], len(rois)), np.nan) for s in statistics}
    with warnings.catch_warnings():  # an all-NaN ROI gives NaN, as documented
        warnings.simplefilter("ignore", RuntimeWarning)
        for j, mask in enumerate(rois.values()):
            x = scores[:, np.asarray(mask, bool)]
            if not x.shape[1]:
                continue
            finite = np.isfinite(x).all()
            for s in statistics:
                if s == "mean":
                    out[s][:, j] = x.mean(1) if finite else np.nanmean(x, 1)
                elif s == "median":
                    out[s][:, j] = np.median(x, 1) if finite else np.nanmedian(x, 1)
                else:
                    raise ValueError(f"statistic must be one of {STATISTICS}, got {s!r}")
    return {s: v[0] for s, v in out.items()} if flat else out


INTERVALS = ("bca", "percentile")


def _columns(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x[:, None] if x.ndim == 1 else x


def _acceleration(jackknife: np.ndarray) -> float:
    """BCa's acceleration from leave-one-unit-out values (n_units,): Σd³ / (6 (Σd²)^1.5), d = mean − value."""
    jk = jackknife[np.isfinite(jackknife)]
    d = jk.mean() - jk if jk.size else jk
    den = 6.0 * (d * d).sum() ** 1.5
    return float((d ** 3).sum() / den) if den > 0 else 0.0


def _bias(draws: np.ndarray, observed: float) -> float:
    """BCa's bias correction z0 = Φ⁻¹(share of draws below the observed value, ties counted half)."""
    return float(scipy.special.ndtri(((draws < observed).sum() + (draws <= observed).sum()) / (2.0 * draws.size)))


def bootstrap_interval(draws: np.ndarray, observed: np.ndarray | None = None, jackknife: np.ndarray | None = None,
                       level: float = 0.95, method: str = "bca") -> tuple[np.ndarray, np.ndarray]:
    """A bootstrap confidence interval per column: draws (n_boot, k) (or (n_boot,)) -> (low (k,), high (k,)).

    ``method="bca"`` (default; as ``scipy.stats.bootstrap``'s BCa, Efron & Tibshirani 14.3): the percentiles
    α₁,₂ = Φ(z0 + (z0 + z)/(1 − a(z0 + z))) of the draws, z = Φ⁻¹(α/2), Φ⁻¹(1 − α/2), the bias z0 from the
    share of draws below ``observed`` (k,) and the acceleration a from ``jackknife`` (n_units, k), the statistic
    with each unit left out; ``"percentile"``: the α/2 and 1 − α/2 percentiles. NaN draws are left out; NaN when
    a column has none."""
    if method not in INTERVALS:
        raise ValueError(f"interval must be one of {INTERVALS}, got {method!r}")
    draws = _columns(draws)
    k = draws.shape[1]
    lo, hi = np.full(k, np.nan), np.full(k, np.nan)
    alpha = (1 - level) / 2
    for j in range(k):
        d = draws[np.isfinite(draws[:, j]), j]
        if not d.size:
            continue
        levels = np.array([alpha, 1 - alpha])
        if method == "bca":
            if observed is None or jackknife is None:
                raise ValueError("a BCa interval needs the observed values and the jackknife values")
            obs = float(np.asarray(observed, np.float64).reshape(-1)[j])
            if not np.isfinite(obs):
                continue
            z0, a = _bias(d, obs), _acceleration(_columns(jackknife)[:, j])
            z = z0 + scipy.special.ndtri(levels)
            with np.errstate(invalid="ignore", divide="ignore"):
                levels = scipy.special.ndtr(z0 + z / (1 - a * z))
            if not np.isfinite(levels).all():
                continue
        lo[j], hi[j] = np.percentile(d, 100 * levels)
    return lo, hi


def percentile_ci(draws: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval over axis 0: draws (n_boot, k) -> (low, high) (``bootstrap_interval``)."""
    return bootstrap_interval(draws, level=level, method="percentile")


def bootstrap_p(diff_draws: np.ndarray, observed: np.ndarray | None = None, jackknife: np.ndarray | None = None,
                method: str = "bca") -> np.ndarray:
    """Two-sided bootstrap p of a difference ≠ 0 per column: diff_draws (n_boot, k) -> (k,), the smallest
    1 − level at which ``bootstrap_interval`` (same method) excludes 0, so that p < 0.05 exactly when the 95 %
    interval excludes 0.

    With F = (#{d < 0} + #{d ≤ 0} + 1) / (2B + 2) (the share of the B finite draws below 0, never 0 or 1):
    percentile, p = 2·min(F, 1 − F); BCa, the interval's map inverted, u = Φ⁻¹(F) − z0, α = Φ(u/(1 + a·u) − z0),
    p = 2·min(α, 1 − α) (the percentile p where 1 + a·u ≤ 0). The smallest attainable p is about 1/(B + 1).
    NaN without draws."""
    if method not in INTERVALS:
        raise ValueError(f"interval must be one of {INTERVALS}, got {method!r}")
    draws = _columns(diff_draws)
    k = draws.shape[1]
    out = np.full(k, np.nan)
    for j in range(k):
        d = draws[np.isfinite(draws[:, j]), j]
        if not d.size:
            continue
        f = ((d < 0).sum() + (d <= 0).sum() + 1.0) / (2.0 * d.size + 2.0)
        alpha = f
        if method == "bca":
            if observed is None or jackknife is None:
                raise ValueError("a BCa p-value needs the observed values and the jackknife values")
            obs = float(np.asarray(observed, np.float64).reshape(-1)[j])
            if not np.isfinite(obs):
                continue
            z0, a = _bias(d, obs), _acceleration(_columns(jackknife)[:, j])
            u = scipy.special.ndtri(f) - z0
            if np.isfinite(z0) and 1 + a * u > 0:
                alpha = float(scipy.special.ndtr(u / (1 + a * u) - z0))
        out[j] = min(1.0, 2.0 * min(alpha, 1.0 - alpha))
    return out


def paired_difference(observed_a: np.ndarray, observed_b: np.ndarray, draws_a: np.ndarray, draws_b: np.ndarray,
                      jackknife_a: np.ndarray | None = None, jackknife_b: np.ndarray | None = None,
                      level: float = 0.95, method: str = "bca") -> dict[str, np.ndarray]:
    """A − B of a statistic (e.g. an ROI's mean NC-R²) with its paired bootstrap: observed (k,), draws (n_boot, k)
    from the same resamples, jackknife (n_units, k) with the same unit left out (BCa) -> {"a", "b", "diff",
    "ci_low", "ci_high", "p"}, each (k,)."""
    a, b = np.asarray(observed_a, np.float64), np.asarray(observed_b, np.float64)
    draws = _columns(draws_a) - _columns(draws_b)
    jack = None if jackknife_a is None or jackknife_b is None else _columns(jackknife_a) - _columns(jackknife_b)
    lo, hi = bootstrap_interval(draws, a - b, jack, level, method)
    return {"a": a, "b": b, "diff": a - b, "ci_low": lo, "ci_high": hi, "p": bootstrap_p(draws, a - b, jack, method)}


def across_subjects(differences: np.ndarray, level: float = 0.95) -> dict[str, np.ndarray]:
    """A − B over subjects: differences (n_subjects, k), one row per subject (NaN rows of a column left out)
    -> {"n", "diff" (mean), "ci_low", "ci_high" (t interval), "t", "p"} each (k,): a one-sample t-test of the
    per-subject differences (= ``scipy.stats.ttest_rel`` of A and B over subjects); NaN with fewer than 2."""
    d = np.asarray(differences, np.float64)
    k = d.shape[1]
    out = {key: np.full(k, np.nan) for key in ("diff", "ci_low", "ci_high", "t", "p")}
    out["n"] = np.isfinite(d).sum(0)
    for j in range(k):
        x = d[np.isfinite(d[:, j]), j]
        if x.size:
            out["diff"][j] = x.mean()
        if x.size < 2:
            continue
        res = scipy.stats.ttest_1samp(x, 0.0)
        out["t"][j], out["p"][j] = float(res.statistic), float(res.pvalue)
        ci = res.confidence_interval(level)
        out["ci_low"][j], out["ci_high"][j] = float(ci.low), float(ci.high)
    return out


def best_per_column(values: np.ndarray) -> np.ndarray:
    """Row index of the largest finite value in each column: values (n_models, k) -> (k,) int, -1 where a
    column has no finite value."""
    v = np.asarray(values, np.float64)
    filled = np.where(np.isfinite(v), v, -np.inf)
    best = filled.argmax(0) if v.size else np.zeros(v.shape[1], np.int64)
    return np.where(np.isfinite(v).any(0), best, -1)
