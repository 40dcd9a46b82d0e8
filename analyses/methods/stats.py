"""Accuracy maps and their significance: per-voxel r/R², FDR, bootstrap and permutation p-values,
noise-ceiling normalisation, ROI summaries and paired comparisons between two encoders.

Arrays in, arrays out; ``(n_samples, n_voxels)`` means rows are test samples (images or time
points) and columns voxels. The scores themselves come from :mod:`encoders.metrics` (the ones
training reports); this module adds what an analysis needs on top of them:

    r = pearson_r(pred, true)                          # (n_voxels,), NaN (counted) for constant columns
    labels, r_g = pearson_r_by_group(pred, true, movie)  # (n_groups, n_voxels): r within each test movie
    p = bootstrap_pvalues(pred, true, n_boot=2000)     # CLIP-MSM: resampled test rows, H0: R² <= 0
    p = permutation_pvalues(pred, true, n_perm=1000, block=20)   # Wen 2018: block permutation of r
    significant = fdr_bh(p) < 0.01
    roi_summary(r, rois)                               # {roi: {"mean", "se", "n", "n_nan"}}
    paired_ttest(r_resnet, r_alexnet, rois)            # {roi: {"t", "p", "mean_diff", "n"}}

Resampling runs in batches of voxels (``voxel_batch``), so 100k voxels x 2000 resamples needs
memory for (n_boot, voxel_batch) arrays only (see ``benchmarks/bootstrap.py``).
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.stats
import torch

from encoders import metrics as _metrics
from encoders.metrics import nc_normalised_r2, noise_ceiling, noise_ceiling_k  # noqa: F401  (re-exported)
from encoders.progress import track

__all__ = [
    "ConstantColumnWarning", "pearson_r", "pearson_r_by_group", "r2_score", "count_nan", "fdr_bh", "bootstrap_indices",
    "bootstrap_pvalues", "resample_counts", "jackknife_counts", "bootstrap_scores", "block_permutations", "permutation_pvalues", "noise_ceiling", "noise_ceiling_k",
    "nc_normalised_r2", "nc_normalised_r", "roi_summary", "paired_ttest",
]


class ConstantColumnWarning(RuntimeWarning):
    """Some columns were constant, so their score is NaN; the message gives the count."""


def count_nan(scores: np.ndarray) -> int:
    """Number of non-finite entries of a score array (the voxels a score could not be computed for)."""
    return int((~np.isfinite(np.asarray(scores, dtype=np.float64))).sum())


def _warn_nan(name: str, scores: np.ndarray) -> np.ndarray:
    n = count_nan(scores)
    if n:
        warnings.warn(f"{name}: {n} of {scores.size} voxels have a constant prediction or response -> NaN",
                      ConstantColumnWarning, stacklevel=3)
    return scores


def pearson_r(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-voxel Pearson r: pred, true (n_samples, n_voxels) -> (n_voxels,) float64.

    Computed over the whole input (never averaged over batches), from float64 sums. A voxel whose
    prediction or response is constant gets NaN, and a ConstantColumnWarning gives the count.
    """
    return _warn_nan("pearson_r", _metrics.pearson_r(pred, true))


def pearson_r_by_group(pred: np.ndarray, true: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel Pearson r within each group of samples (e.g. each test movie of a video run).

    pred, true (n_samples, n_voxels); groups (n_samples,) any labels. Returns (labels (n_groups,) sorted,
    r (n_groups, n_voxels) float64): row g is ``pearson_r`` over the samples of labels[g] only. Wen et al.
    (2018) scored each test movie so and averaged the rows (``r.mean(0)``); the pooled r over all samples
    also counts differences between the movies' mean responses and predictions.
    """
    groups = np.asarray(groups)
    if groups.shape != (np.shape(pred)[0],):
        raise ValueError(f"groups must have one label per sample ({np.shape(pred)[0]},), got {groups.shape}")
    labels = np.unique(groups)
    return labels, np.stack([pearson_r(np.asarray(pred)[groups == g], np.asarray(true)[groups == g]) for g in labels])


def r2_score(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-voxel R² = 1 - SS_res/SS_tot: (n_samples, n_voxels) -> (n_voxels,) float64.

    NaN (counted in a ConstantColumnWarning) where the response is constant.
    """
    return _warn_nan("r2_score", _metrics.r2_score(pred, true))


def nc_normalised_r(r: np.ndarray, nc_percent: np.ndarray) -> np.ndarray:
    """r divided by the highest attainable r, sqrt(NC/100); NaN where the ceiling is 0. Shapes of r."""
    nc = np.asarray(nc_percent, dtype=np.float64) / 100.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(nc > 0, np.asarray(r, dtype=np.float64) / np.sqrt(np.clip(nc, 0, None)), np.nan)


# ----------------------------------------------------------------------------- multiple comparisons


def fdr_bh(pvals: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values, any shape -> same shape (float64).

    p_adj(i) = min_{j >= i} m·p_(j)/j over the sorted p-values, capped at 1; equal to
    ``scipy.stats.false_discovery_control(p, method="bh")``. NaN entries (untestable voxels) stay
    NaN and do not count in m. ``fdr_bh(p) < q`` is the set of discoveries at FDR q.
    """
    p = np.asarray(pvals, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    finite = np.isfinite(p)
    if np.any((p[finite] < 0) | (p[finite] > 1)):
        raise ValueError("fdr_bh: p-values must lie in [0, 1]")
    if finite.any():
        out[finite] = scipy.stats.false_discovery_control(p[finite], method="bh")
    return out


# ----------------------------------------------------------------------------- bootstrap


def bootstrap_indices(n_samples: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """The resampled rows: (n_boot, n_samples) int64, rows drawn with replacement (numpy default_rng(seed))."""
    return np.random.default_rng(seed).integers(0, n_samples, size=(n_boot, n_samples))


def _counts(indices: np.ndarray, n_samples: int) -> np.ndarray:
    """(n_boot, n_samples) indices -> how often each row was drawn, (n_boot, n_samples) float64."""
    n_boot = indices.shape[0]
    flat = indices + (np.arange(n_boot)[:, None] * n_samples)
    return np.bincount(flat.ravel(), minlength=n_boot * n_samples).reshape(n_boot, n_samples).astype(np.float64)


def _as_pair(pred, true) -> tuple[np.ndarray, np.ndarray]:
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.ndim == 1:
        pred, true = pred[:, None], true[:, None]
    if pred.shape != true.shape or pred.ndim != 2:
        raise ValueError(f"pred {pred.shape} and true {true.shape} must both be (n_samples, n_voxels)")
    return pred, true


@torch.no_grad()
def bootstrap_pvalues(pred: np.ndarray, true: np.ndarray, n_boot: int = 2000, seed: int = 0,
                      voxel_batch: int = 4096, device: str = "cpu", progress: bool = True) -> np.ndarray:
    """One-sided bootstrap p-value of R² > 0 per voxel (CLIP-MSM): (n_samples, n_voxels) x 2 -> (n_voxels,).

    The test rows are resampled with replacement ``n_boot`` times (the same resamples for every
    voxel, :func:`bootstrap_indices`); R² is recomputed on each resample and p = (k + 1) / (n_boot + 1)
    with k the number of resamples with R² <= 0 (as the permutation p-values: never exactly 0, the
    smallest attainable p is 1 / (n_boot + 1)). Each resample is a vector of row counts c, so
    SS_res = c·(t - p)², SS_tot = c·t² - (c·t)²/n are three (n_boot, n) @ (n, voxel_batch)
    float64 products: memory O(n_boot · voxel_batch), never (n_boot, n, n_voxels).
    NaN where the response is constant. ``device`` may be "cuda". ``progress``: over the voxel batches
    (``encoders.progress``: a bar on a terminal, a line every ~30 s elsewhere).
    """
    pred, true = _as_pair(pred, true)
    n, n_vox = true.shape
    counts = torch.from_numpy(_counts(bootstrap_indices(n, n_boot, seed), n)).to(device)
    out = np.empty(n_vox)
    for start in track(range(0, n_vox, voxel_batch), f"bootstrap p-values ({n_boot} resamples)", total=n_vox,
                       unit="voxels", size=lambda s: min(voxel_batch, n_vox - s), enabled=progress):
        t = torch.as_tensor(true[:, start:start + voxel_batch], dtype=torch.float64, device=device)
        p = torch.as_tensor(pred[:, start:start + voxel_batch], dtype=torch.float64, device=device)
        residual2 = (t - p) ** 2
        raw_tt = (t * t).sum(0)
        t = t - t.mean(0)  # centring first keeps c·t² - (c·t)²/n well conditioned
        tt = t * t
        constant = tt.sum(0) <= 1e-12 * torch.clamp(raw_tt, min=1e-300)  # as encoders.metrics
        ss_res = counts @ residual2
        ss_tot_c = counts @ tt
        ss_tot = ss_tot_c - (counts @ t) ** 2 / n
        # a degenerate resample (all drawn responses equal) has no R²: it counts against the voxel
        degenerate = ss_tot <= 1e-12 * torch.clamp(ss_tot_c, min=1e-300)
        pvals = (((ss_res >= ss_tot) | degenerate).to(torch.float64).sum(0) + 1) / (n_boot + 1)
        pvals[constant] = float("nan")
        out[start:start + voxel_batch] = pvals.cpu().numpy()
    return out


def resample_counts(units: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """A bootstrap over units of rows: units (n_rows,) a label per row (a test image's id, a block of TRs; the
    rows of one unit are drawn together) -> (n_boot, n_rows) float64, how often each row is in each resample.

    Each resample draws the n_units units with replacement (:func:`bootstrap_indices` over the sorted unique
    labels, so two runs with the same labels get the same resamples); a row counts as often as its unit.
    """
    _, inverse = np.unique(np.asarray(units), return_inverse=True)
    n_units = int(inverse.max()) + 1 if inverse.size else 0
    return _counts(bootstrap_indices(n_units, n_boot, seed), n_units)[:, inverse.ravel()]


def jackknife_counts(units: np.ndarray) -> np.ndarray:
    """Leave-one-unit-out weights: units (n_rows,) -> (n_units, n_rows) float64, row i = 1 everywhere except 0 on
    the rows of the i-th unit (sorted labels), for BCa's acceleration (``analyses.methods.compare``)."""
    labels, inverse = np.unique(np.asarray(units), return_inverse=True)
    return (inverse.ravel()[None, :] != np.arange(len(labels))[:, None]).astype(np.float64)


@torch.no_grad()
def bootstrap_scores(pred: np.ndarray, true: np.ndarray, counts: np.ndarray, nc_percent: np.ndarray | None = None,
                     voxel_batch: int = 1024, device: str = "cpu") -> dict[str, np.ndarray]:
    """Per-voxel r, R² and R²/NC on every resample: pred, true (n_samples, n_voxels), counts (n_boot, n_samples)
    (:func:`resample_counts`; a row of ones is the observed data) -> {"r", "r2", "nc_r2"}, each (n_boot, n_voxels)
    float32 ("nc_r2" only with ``nc_percent`` (n_voxels,), the noise ceiling in % of variance, held fixed).

    Each resample is a vector of row counts c, so the weighted sums Σc·p, Σc·t, Σc·p², Σc·t², Σc·p·t and
    Σc·(t − p)² are six (n_boot, n) @ (n, voxel_batch) float64 products (columns centred first), and r and R²
    follow from them as in training (``encoders.metrics.scores_from_sums``, with n = Σc): memory
    O(n_boot · voxel_batch) besides the output, never (n_boot, n_samples, n_voxels). NaN where a resample's
    response (or prediction, for r) is constant.
    """
    pred, true = _as_pair(pred, true)
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[1] != true.shape[0]:
        raise ValueError(f"counts {counts.shape} must be (n_boot, n_samples={true.shape[0]})")
    n_vox = true.shape[1]
    c = torch.from_numpy(counts).to(device)
    n = c.sum(1, keepdim=True)
    out = {k: np.empty((len(counts), n_vox), np.float32) for k in ("r", "r2")}
    for start in range(0, n_vox, voxel_batch):
        sl = slice(start, start + voxel_batch)
        t = torch.as_tensor(true[:, sl], dtype=torch.float64, device=device)
        p = torch.as_tensor(pred[:, sl], dtype=torch.float64, device=device)
        res = (t - p) ** 2
        constant = [(x - x.mean(0)).pow(2).sum(0) <= 1e-12 * torch.clamp((x * x).sum(0), min=1e-300) for x in (p, t)]
        t, p = t - t.mean(0), p - p.mean(0)  # r and the variances are shift-invariant; sums stay well conditioned
        scores = _metrics.scores_from_sums(n, c @ p, c @ t, c @ (p * p), c @ (t * t), c @ (p * t), c @ res)
        scores["r"][:, constant[0] | constant[1]] = float("nan")  # as encoders.metrics: judged on the raw columns
        scores["r2"][:, constant[1]] = float("nan")
        for k in out:
            out[k][:, sl] = scores[k].cpu().numpy()
    if nc_percent is not None:
        out["nc_r2"] = nc_normalised_r2(out["r2"], np.asarray(nc_percent, np.float64)[None, :]).astype(np.float32)
    return out


# ----------------------------------------------------------------------------- permutation


def block_permutations(n_samples: int, n_perm: int, block: int = 1, seed: int = 0) -> np.ndarray:
    """Row orders that shuffle contiguous blocks: (n_perm, n_samples) int64.

    The series is cut into blocks of ``block`` samples (the last one may be shorter); each
    permutation concatenates the blocks in a random order, keeping the order inside a block, so
    the autocorrelation of a time series within a block survives (Wen 2018's block permutation).
    block=1 is an ordinary permutation of the rows.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    starts = np.arange(0, n_samples, block)
    blocks = [np.arange(s, min(s + block, n_samples)) for s in starts]
    rng = np.random.default_rng(seed)
    return np.stack([np.concatenate([blocks[b] for b in rng.permutation(len(blocks))])
                     for _ in range(n_perm)]) if n_perm else np.empty((0, n_samples), np.int64)


@torch.no_grad()
def permutation_pvalues(pred: np.ndarray, true: np.ndarray, n_perm: int = 1000, block: int = 1, seed: int = 0,
                        voxel_batch: int = 8192, device: str = "cpu", progress: bool = True) -> np.ndarray:
    """One-sided permutation p-value of r > 0 per voxel: (n_samples, n_voxels) x 2 -> (n_voxels,).

    The predicted series is reordered by ``n_perm`` block permutations (:func:`block_permutations`;
    ``block`` in samples, e.g. ~ the HRF length in TRs for fMRI time series; the same permutations
    for every voxel) and r recomputed; p = (1 + #{r_perm >= r}) / (1 + n_perm), never 0
    (permuted r within 1e-6 of r count as ties, i.e. as exceeding). The z-scored columns are float32
    in the permutation loop (one gather per permutation); memory O(n_samples · voxel_batch).
    NaN where the prediction or response is constant. ``progress``: as bootstrap_pvalues.
    """
    pred, true = _as_pair(pred, true)
    n, n_vox = true.shape
    orders = torch.from_numpy(block_permutations(n, n_perm, block, seed)).to(device)
    out = np.empty(n_vox)
    for start in track(range(0, n_vox, voxel_batch), f"permutation p-values ({n_perm} permutations)",
                       total=n_vox, unit="voxels", size=lambda s: min(voxel_batch, n_vox - s), enabled=progress):
        zs = []
        for x in (pred[:, start:start + voxel_batch], true[:, start:start + voxel_batch]):
            x = torch.as_tensor(x, dtype=torch.float64, device=device)
            raw = (x * x).sum(0)
            x = x - x.mean(0)
            ss = (x * x).sum(0)
            constant = ss <= 1e-12 * torch.clamp(raw, min=1e-300)
            zs.append((x / torch.sqrt(torch.where(constant, 1.0, ss)), constant))
        (zp, const_p), (zt, const_t) = zs
        zp, zt = zp.float(), zt.float()  # unit-norm columns: float32 products are exact to ~1e-7
        r = (zp * zt).sum(0)
        exceed = torch.zeros(r.shape, dtype=torch.float64, device=device)
        for order in orders:
            exceed += ((zp[order] * zt).sum(0) >= r - 1e-6).to(torch.float64)
        pvals = (1.0 + exceed) / (1.0 + n_perm)
        pvals[const_p | const_t] = float("nan")
        out[start:start + voxel_batch] = pvals.cpu().numpy()
    return out


# ----------------------------------------------------------------------------- summaries


def _indices(sel: np.ndarray) -> np.ndarray:
    sel = np.asarray(sel)
    return np.flatnonzero(sel) if sel.dtype == bool else sel.astype(np.int64)


def roi_summary(values: np.ndarray, rois: dict[str, np.ndarray]) -> dict[str, dict]:
    """Mean ± standard error of a per-voxel map within each ROI.

    values (n_voxels,); rois: name -> bool mask (n_voxels,) or index array. Returns
    {name: {"mean", "se", "n", "n_nan"}}: n = finite voxels used, se = std(ddof=1)/sqrt(n)
    (NaN with fewer than 2), n_nan = voxels of the ROI left out for being NaN.
    """
    values = np.asarray(values, dtype=np.float64)
    out = {}
    for name, sel in rois.items():
        v = values[_indices(sel)]
        finite = v[np.isfinite(v)]
        n = int(finite.size)
        out[name] = {"mean": float(finite.mean()) if n else float("nan"),
                     "se": float(finite.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
                     "n": n, "n_nan": int(v.size - n)}
    return out


def paired_ttest(a: np.ndarray, b: np.ndarray, rois: dict[str, np.ndarray] | None = None) -> dict[str, dict]:
    """Paired t-test of two per-voxel maps (e.g. test r of two backbones on the same voxels) per ROI.

    a, b (n_voxels,); rois: name -> mask or indices (None = all voxels, key "all"). Voxels where
    either is NaN are dropped. Returns {name: {"t", "p" (two-sided), "mean_diff" (a - b), "n"}},
    from ``scipy.stats.ttest_rel``; t and p are NaN with fewer than 2 pairs.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_ttest: a {a.shape} and b {b.shape} must be the same (n_voxels,) shape")
    rois = rois if rois is not None else {"all": np.ones(a.shape, bool)}
    out = {}
    for name, sel in rois.items():
        idx = _indices(sel)
        x, y = a[idx], b[idx]
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = x[ok], y[ok]
        if x.size >= 2:
            res = scipy.stats.ttest_rel(x, y)
            t, p = float(res.statistic), float(res.pvalue)
        else:
            t = p = float("nan")
        out[name] = {"t": t, "p": p, "mean_diff": float((x - y).mean()) if x.size else float("nan"), "n": int(x.size)}
    return out


PAIRED_TESTS = ("ttest_rel", "wilcoxon")


def paired_test(a: np.ndarray, b: np.ndarray, test: str = "ttest_rel") -> dict:
    """Paired test of a vs b over voxels (both (n,)); voxels non-finite in either are dropped.

    Returns {"n", "mean_a", "mean_b", "diff", "stat", "p"}: diff = mean(a − b); stat is t
    (``scipy.stats.ttest_rel``) or the signed-rank W (``scipy.stats.wilcoxon``); two-sided p; stat and p
    are NaN with fewer than 2 pairs or when a and b are identical.
    """
    if test not in PAIRED_TESTS:
        raise ValueError(f"the paired test (analysis.test) must be one of {PAIRED_TESTS}, got {test!r}")
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    out = {"n": int(a.size), "mean_a": float(a.mean()) if a.size else float("nan"),
           "mean_b": float(b.mean()) if b.size else float("nan"),
           "diff": float((a - b).mean()) if a.size else float("nan"), "stat": float("nan"), "p": float("nan")}
    if a.size < 2 or not np.any(a != b):
        return out
    result = scipy.stats.ttest_rel(a, b) if test == "ttest_rel" else scipy.stats.wilcoxon(a, b)
    out.update(stat=float(result.statistic), p=float(result.pvalue))
    return out
