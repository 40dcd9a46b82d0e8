"""Category-selective units in networks vs category-selective regions in the brain (Dipani & Murty 2026).

Arrays in, arrays out (no Hydra, no files; ``analyses/localizer_job.py`` reads runs and writes tables):

    mask, t = localize_units(acts, labels, "face", t_threshold=7.0)   # acts (n_images, n_units): Welch t, face vs rest
    mask = select_units(t, top_percent=1.0)                          # or the top 1% of units by t
    t, df = contrast_t(CategoryStats, category_index)               # the same from streamed per-category sums
    jaccard(mask_a, mask_b)                                          # overlap of two localizers' selections

    prof = unit_profile(acts_test[:, mask])                          # (n_images,) units' mean response profile
    full, half_a, half_b, k_a, k_b, kept = split_halves(trial_ids, values, ids)   # brain trials -> split halves
    res = consistency(profile_similarity, prof, full.mean(1), y_halves=(half_a.mean(1), half_b.mean(1), k_a, k_b))
    res["score"], res["score_ci"], res["score_nc"], res["reliability_y"]   # r, bootstrap CI, noise-corrected r
    rdm_similarity(correlation_rdm(X), correlation_rdm(Y), idx, "spearman")   # representational geometry

    rows = encoding_lesions(X_train, Y_train, X_test, Y_test, selected, n_random=10)   # ridge on unit subsets

Conventions: images are rows; a "profile" is (n_images,), a "pattern" matrix (n_images, n_units or
n_voxels), an RDM (n_images, n_images) of 1 - Pearson r between image patterns. Bootstrap resamples
are rows of image indices (``analyses.methods.stats.bootstrap_indices``); row 0 of every index batch built
here is the identity (the point estimate), the same resamples serve every measure (paired CIs).

Noise correction: a brain profile's split-half reliability (two means of k_a and k_b trials per image)
is corrected to the reliability of the mean of all k_a + k_b trials by the Spearman–Brown formula
(generalised to unequal halves, :func:`spearman_brown`); a consistency r between x and y is divided
by sqrt(R_x · R_y) (R = 1 for a model, which has no measurement noise). For RDM correlations the same
correction is the usual approximation (an RDM is not a linear function of the trials).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import scipy.stats

from analyses.methods import stats
from analyses.methods.categories import CategoryStats

__all__ = [
    "welch_t", "contrast_t", "select_units", "localize_units", "jaccard", "unit_profile", "rowwise_pearson",
    "profile_similarity", "correlation_rdm", "rdm_similarity", "spearman_brown", "split_halves",
    "resample_indices", "percentile_ci", "consistency", "lesion_subsets", "encoding_lesions",
]


# ----------------------------------------------------------------------------- localizing units


def welch_t(n1, m1, v1, n0, m0, v0) -> tuple[np.ndarray, np.ndarray]:
    """Welch's t of group 1 vs group 0 and its Welch–Satterthwaite degrees of freedom.

    n: sizes, m: means, v: sample variances (ddof=1), per unit (broadcast). t = (m1 - m0) / se with
    se = sqrt(v1/n1 + v0/n0); where se = 0, t = ±inf if the means differ and NaN if not (as
    ``scipy.stats.ttest_ind(equal_var=False)``). Returns float64 arrays (t, df).
    """
    m1, v1, m0, v0 = (np.asarray(a, dtype=np.float64) for a in (m1, v1, m0, v0))
    a, b = v1 / n1, v0 / n0
    se2 = a + b
    diff = m1 - m0
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(se2 > 0, diff / np.sqrt(np.where(se2 > 0, se2, 1.0)),
                     np.where(diff == 0, np.nan, np.sign(diff) * np.inf))
        df = se2 ** 2 / (a ** 2 / (n1 - 1) + b ** 2 / (n0 - 1))
    return t, df


def contrast_t(category_stats: CategoryStats, category: int) -> tuple[np.ndarray, np.ndarray]:
    """Welch t (and df) of one category against all the other images, per unit, from streamed sums.

    category_stats: :class:`analyses.methods.categories.CategoryStats` over (n_images, n_units) activations
    (``update`` batch by batch: memory O(n_categories · n_units) whatever the number of images).
    Returns (t (n_units,), df (n_units,)).
    """
    (n1, m1, v1), (n0, m0, v0) = category_stats.rest([int(category)])
    if n1 < 2 or n0 < 2:
        raise ValueError(f"a t-contrast needs >= 2 images in the category and in the rest, got {int(n1)} and {int(n0)}")
    return welch_t(n1, m1, v1, n0, m0, v0)


def select_units(t: np.ndarray, t_threshold: float = 7.0, top_percent: float | None = None) -> np.ndarray:
    """Selected units from their t-values (n_units,) -> bool (n_units,).

    top_percent None: t > t_threshold. Otherwise the ceil(top_percent/100 · n_units) units of highest t
    (NaN never selected; ties broken by unit order), whatever their t.
    """
    t = np.asarray(t, dtype=np.float64)
    finite = ~np.isnan(t)
    if top_percent is None:
        return finite & (np.nan_to_num(t, nan=-np.inf) > t_threshold)
    if not 0 < top_percent <= 100:
        raise ValueError(f"top_percent must lie in (0, 100], got {top_percent}")
    k = min(int(np.ceil(top_percent / 100.0 * t.size)), int(finite.sum()))
    mask = np.zeros(t.shape, bool)
    mask[np.argsort(-np.where(finite, t, -np.inf), kind="stable")[:k]] = True
    return mask


def localize_units(activations: np.ndarray, labels: Sequence, category, t_threshold: float = 7.0,
                   top_percent: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """fMRI-style localizer on network units: Welch t-contrast of ``category`` vs every other image.

    activations (n_images, n_units); labels (n_images,) category names or codes; category: one of the
    labels. Returns (mask (n_units,) bool, t (n_units,) float64); mask = t > t_threshold, or the top
    ``top_percent`` % of units by t (:func:`select_units`).
    """
    acts = np.asarray(activations)
    labels = np.asarray(labels)
    if acts.ndim != 2 or labels.shape != (acts.shape[0],):
        raise ValueError(f"activations must be (n_images, n_units) and labels (n_images,), got {acts.shape} "
                         f"and {labels.shape}")
    names, codes = np.unique(labels, return_inverse=True)
    if category not in names:
        raise ValueError(f"category {category!r} is not among the labels {names.tolist()}")
    stats_ = CategoryStats.from_arrays(acts, codes.astype(np.int64), len(names))
    t, _ = contrast_t(stats_, int(np.flatnonzero(names == category)[0]))
    return select_units(t, t_threshold, top_percent), t


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∩ b| / |a ∪ b| of two bool masks of the same shape; NaN when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"jaccard: masks of different shapes {a.shape} and {b.shape}")
    union = int((a | b).sum())
    return float((a & b).sum() / union) if union else float("nan")


# ----------------------------------------------------------------------------- profiles and RDMs


def unit_profile(activations: np.ndarray, standardise: bool = True) -> np.ndarray:
    """Mean response profile of a set of units: (n_images, n_units) -> (n_images,) float64.

    standardise: each unit z-scored over these images first (so every unit weighs the same, like
    z-scored voxels); constant units then contribute 0. NaN profile when there are no units.
    """
    x = np.asarray(activations, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"activations must be (n_images, n_units), got {x.shape}")
    if x.shape[1] == 0:
        return np.full(x.shape[0], np.nan)
    if standardise:
        x = _zscore_columns(x)
    return x.mean(1)


def _zscore_columns(x: np.ndarray) -> np.ndarray:
    sd = x.std(0)
    return (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)


def rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each row of a with the same row of b: (B, n) x 2 -> (B,); NaN for a constant row."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def profile_similarity(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Pearson r of two profiles (n_images,) on each resample of images: idx (B, m) -> (B,)."""
    return rowwise_pearson(np.asarray(x)[idx], np.asarray(y)[idx])


def correlation_rdm(patterns: np.ndarray, standardise: bool = False) -> np.ndarray:
    """RDM = 1 - Pearson r between the images' patterns: (n_images, n_features) -> (n_images, n_images).

    standardise: z-score each feature over the images first. NaN rows/columns for an image whose pattern
    is constant; an all-NaN RDM with fewer than 3 features (a correlation over 2 values is ±1).
    """
    x = np.asarray(patterns, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"patterns must be (n_images, n_features), got {x.shape}")
    if x.shape[1] < 3:
        return np.full((x.shape[0], x.shape[0]), np.nan)
    if standardise:
        x = _zscore_columns(x)
    x = x - x.mean(1, keepdims=True)
    norm = np.linalg.norm(x, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        x = x / np.where(norm > 0, norm, np.nan)[:, None]
    return 1.0 - x @ x.T


def rdm_similarity(a: np.ndarray, b: np.ndarray, idx: np.ndarray, method: str = "spearman") -> np.ndarray:
    """Correlation of the upper triangles of two RDMs (n, n) on each resample of images: idx (B, m) -> (B,).

    For a resample, the pairs are those of distinct positions p < q whose images differ (a resample
    drawing an image twice adds no zero-distance pair). method: "pearson" | "spearman" (the resample's
    pairs ranked afresh, ties averaged, as ``scipy.stats.spearmanr``). NaN when a triangle has non-finite
    values or fewer than 3 pairs.
    """
    if method not in ("pearson", "spearman"):
        raise ValueError(f"rdm similarity must be 'pearson' or 'spearman', got {method!r}")
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    idx = np.atleast_2d(np.asarray(idx))
    out = np.full(idx.shape[0], np.nan)
    n = a.shape[0]
    tri = np.triu_indices(n, 1)
    if not (np.isfinite(a[tri]).all() and np.isfinite(b[tri]).all()):
        return out
    if method == "spearman":  # dense ranks over the whole triangle once; a resample re-ranks by counting
        a, b = (_dense_rank_matrix(m, tri) for m in (a, b))
    iu, ju = np.triu_indices(idx.shape[1], 1)
    for row, sample in enumerate(idx):
        p, q = sample[iu], sample[ju]
        keep = p != q
        if keep.sum() < 3:
            continue
        x, y = a[p[keep], q[keep]], b[p[keep], q[keep]]
        if method == "spearman":
            x, y = _average_ranks(x.astype(np.int64)), _average_ranks(y.astype(np.int64))
        out[row] = rowwise_pearson(x, y)
    return out


def _dense_rank_matrix(m: np.ndarray, tri: tuple) -> np.ndarray:
    """Symmetric matrix of 0-based dense ranks of the upper-triangle values (equal values share a rank)."""
    ranks = np.zeros(m.shape)
    dense = scipy.stats.rankdata(m[tri], method="dense") - 1
    ranks[tri] = dense
    ranks[(tri[1], tri[0])] = dense
    return ranks


def _average_ranks(dense: np.ndarray) -> np.ndarray:
    """Average ranks (1-based, ties averaged: scipy.stats.rankdata's default) of values given as dense
    integer ranks, by counting: O(n + max rank), no sort."""
    counts = np.bincount(dense)
    upto = np.cumsum(counts)
    return (upto - (counts - 1) / 2.0)[dense]


# ----------------------------------------------------------------------------- split halves and ceilings


def spearman_brown(r, k_a: float = 1.0, k_b: float = 1.0) -> np.ndarray:
    """Reliability of the mean of all k_a + k_b trials from the correlation r of a k_a-trial mean with a
    k_b-trial mean (independent trials, equal per-trial noise).

    With per-trial reliability ρ, a k-trial mean has reliability R(k) = kρ / (1 + (k-1)ρ) and the two
    half means correlate as sqrt(R(k_a) R(k_b)); solving that for ρ (the positive root of a quadratic)
    gives R(k_a + k_b). k_a = k_b is the usual Spearman–Brown 2r / (1 + r). NaN where r <= 0 or r is NaN.
    """
    r = np.asarray(r, dtype=np.float64)
    k_a, k_b = float(k_a), float(k_b)
    r2 = r * r
    a = r2 * (k_a - 1) * (k_b - 1) - k_a * k_b
    b = r2 * (k_a + k_b - 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (-b - np.sqrt(b * b - 4 * a * r2)) / (2 * a)
        k = k_a + k_b
        out = k * rho / (1 + (k - 1) * rho)
    return np.where(r > 0, np.minimum(out, 1.0), np.nan)


def split_halves(trial_ids: np.ndarray, values: np.ndarray, ids: np.ndarray, min_trials: int = 2):
    """Per-image means of all trials and of two halves of them.

    trial_ids (n_trials,) the image of each trial, in presentation order; values (n_trials, n_voxels);
    ids: the images wanted. The trials of an image alternate between the halves in presentation order
    (1st, 3rd, ... -> a; 2nd, 4th, ... -> b). Images with fewer than ``min_trials`` (>= 2) trials are left
    out. Returns (full, half_a, half_b) each (n_kept, n_voxels) float64, k_a, k_b (mean trials per
    half), kept ids (n_kept,) in the order of ``ids``.
    """
    if min_trials < 2:
        raise ValueError(f"split halves need min_trials >= 2, got {min_trials}")
    trial_ids = np.asarray(trial_ids)
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] != trial_ids.shape[0]:
        raise ValueError(f"values must be (n_trials, n_voxels) with n_trials = {trial_ids.shape[0]}, got {values.shape}")
    order = np.argsort(trial_ids, kind="stable")  # trials of an image stay in presentation order
    sorted_ids = trial_ids[order]
    starts = np.searchsorted(sorted_ids, ids, side="left")
    stops = np.searchsorted(sorted_ids, ids, side="right")
    kept = np.flatnonzero(stops - starts >= min_trials)
    n_vox = values.shape[1]
    full, half_a, half_b = (np.empty((kept.size, n_vox)) for _ in range(3))
    counts = np.empty((kept.size, 2))
    for row, i in enumerate(kept):
        rows = order[starts[i]:stops[i]]
        full[row] = values[rows].mean(0)
        half_a[row] = values[rows[0::2]].mean(0)
        half_b[row] = values[rows[1::2]].mean(0)
        counts[row] = (len(rows[0::2]), len(rows[1::2]))
    k_a, k_b = (counts.mean(0) if kept.size else (np.nan, np.nan))
    return full, half_a, half_b, float(k_a), float(k_b), np.asarray(ids)[kept]


def image_means(trial_ids: np.ndarray, values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Mean of every trial of each image: trial_ids (n_trials,), values (n_trials, n_voxels), ids (n,) ->
    (n, n_voxels) float64. ValueError naming the first image without trials."""
    trial_ids = np.asarray(trial_ids)
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(trial_ids, kind="stable")
    sorted_ids = trial_ids[order]
    ids = np.asarray(ids)
    starts, stops = np.searchsorted(sorted_ids, ids, "left"), np.searchsorted(sorted_ids, ids, "right")
    if np.any(stops == starts):
        raise ValueError(f"image_means: image {ids[np.argmax(stops == starts)]} has no trials")
    out = np.empty((ids.size, values.shape[1]))
    for row, (a, b) in enumerate(zip(starts, stops)):
        out[row] = values[order[a:b]].mean(0)
    return out


def resample_indices(n_images: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """(1 + n_boot, n_images): the identity (the point estimate), then ``stats.bootstrap_indices`` resamples."""
    return np.concatenate([np.arange(n_images)[None], stats.bootstrap_indices(n_images, n_boot, seed)])


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap samples (NaN samples ignored; NaN when none is finite)."""
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if not s.size:
        return float("nan"), float("nan")
    lo, hi = np.percentile(s, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


Halves = tuple  # (half_a, half_b, k_a, k_b): two split-half versions of a brain measure, and their trial counts


def consistency(similarity: Callable[[object, object, np.ndarray], np.ndarray], x, y,
                x_halves: Halves | None = None, y_halves: Halves | None = None, n_boot: int = 1000,
                seed: int = 0, level: float = 0.95, n_images: int | None = None) -> dict:
    """Consistency of x and y over images, its split-half noise correction, with bootstrap CIs over images.

    similarity(a, b, idx (B, m)) -> (B,): e.g. :func:`profile_similarity` (x, y profiles (n,)) or
    ``lambda a, b, i: rdm_similarity(a, b, i, "spearman")`` (x, y RDMs (n, n)). x_halves / y_halves:
    (half_a, half_b, k_a, k_b) for a noisy (brain) side, None for a noise-free (model) side. Every
    quantity is recomputed on the same ``n_boot`` resamples of the images (seeded).

    Returns {"score", "score_ci", "score_nc" = score / sqrt(R_x R_y), "score_nc_ci", "reliability_x",
    "reliability_x_ci", "reliability_y", "reliability_y_ci" (Spearman–Brown-corrected split-half
    reliabilities; 1 for a noise-free side), "n_images", "n_boot"}.
    """
    n = int(n_images if n_images is not None else np.asarray(x).shape[0])
    idx = resample_indices(n, n_boot, seed)
    score = similarity(x, y, idx)
    rel = {}
    for name, halves in (("x", x_halves), ("y", y_halves)):
        if halves is None:
            rel[name] = np.ones(idx.shape[0])
        else:
            a, b, k_a, k_b = halves
            rel[name] = spearman_brown(similarity(a, b, idx), k_a, k_b)
    with np.errstate(invalid="ignore"):
        nc = score / np.sqrt(rel["x"] * rel["y"])
    out = {"score": float(score[0]), "score_ci": percentile_ci(score[1:], level),
           "score_nc": float(nc[0]), "score_nc_ci": percentile_ci(nc[1:], level), "n_images": n, "n_boot": int(n_boot)}
    for name in ("x", "y"):
        out[f"reliability_{name}"] = float(rel[name][0])
        out[f"reliability_{name}_ci"] = percentile_ci(rel[name][1:], level)
    return out


# ----------------------------------------------------------------------------- encoding lesions


def lesion_subsets(selected: np.ndarray, n_random: int = 10, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """The unit subsets of an encoding-lesion experiment: {condition: [index arrays]}.

    selected (n_units,) bool, k = its count. "all": every unit; "all_but_selective"; "selective";
    "random_k": ``n_random`` random k-unit subsets of all units (matched to "selective");
    "all_but_random_k": all units minus k random ones (matched to "all_but_selective"). Random draws:
    numpy default_rng(seed), without replacement. Empty conditions are empty lists of indices.
    """
    selected = np.asarray(selected, bool)
    n, k = selected.size, int(selected.sum())
    rng = np.random.default_rng(seed)
    units = np.arange(n)
    draws = [np.sort(rng.choice(n, size=k, replace=False)) for _ in range(n_random)] if 0 < k < n else []
    return {"all": [units], "all_but_selective": [units[~selected]], "selective": [units[selected]],
            "random_k": draws, "all_but_random_k": [np.setdiff1d(units, d) for d in draws]}


def _standardiser(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = X.mean(0)
    sd = X.std(0)
    return mean, np.where(sd > 0, sd, 1.0)


def encoding_lesions(X_train: np.ndarray, Y_train: np.ndarray, X_test: np.ndarray, Y_test: np.ndarray,
                     selected: np.ndarray, n_random: int = 10, seed: int = 0, alphas: Sequence[float] | None = None,
                     cv: int = 5, device: str | None = None) -> list[dict]:
    """Ridge encoding models of a region's voxels from subsets of units, scored on held-out images.

    X_* (n_images, n_units) unit activations of the train / test images, Y_* (n_images, n_voxels) the
    region's responses; selected (n_units,) bool. For each subset of :func:`lesion_subsets` the features
    are standardised with training statistics and an ``encoders.ridge.RidgeCV`` (one alpha per voxel,
    ``cv``-fold CV inside the training images only) is fitted on the training images, then scored on
    the test images: per-voxel Pearson r and R², averaged over the region's voxels (a voxel given a
    constant prediction, e.g. when CV picks the largest alpha, counts as r = 0; constant voxels are left out).
    Random conditions: mean over their draws, with the standard deviation across draws.

    Returns one dict per condition: {"condition", "n_units", "n_draws", "r_mean", "r_sd", "r2_mean", "r2_sd"}
    (NaN scores for an empty subset).
    """
    from encoders.ridge import DEFAULT_ALPHAS, RidgeCV

    X_train, X_test = np.asarray(X_train, dtype=np.float32), np.asarray(X_test, dtype=np.float32)
    if np.asarray(selected).shape != (X_train.shape[1],):
        raise ValueError(f"encoding_lesions: selected {np.asarray(selected).shape} must be ({X_train.shape[1]},), one per unit")
    Y_train, Y_test = np.asarray(Y_train, dtype=np.float32), np.asarray(Y_test, dtype=np.float32)
    if X_train.shape[1] != X_test.shape[1] or len(X_train) != len(Y_train) or len(X_test) != len(Y_test) \
            or Y_train.shape[1] != Y_test.shape[1]:
        raise ValueError(f"encoding_lesions: X_train {X_train.shape}, Y_train {Y_train.shape}, X_test {X_test.shape}, "
                         f"Y_test {Y_test.shape} do not fit together")
    mean, sd = _standardiser(X_train)
    Z_train, Z_test = (X_train - mean) / sd, (X_test - mean) / sd
    n, k = X_train.shape[1], int(np.asarray(selected, bool).sum())
    sizes = {"all": n, "all_but_selective": n - k, "selective": k, "random_k": k, "all_but_random_k": n - k}
    rows = []
    for condition, subsets in lesion_subsets(selected, n_random, seed).items():
        scores = []
        for cols in subsets:
            if cols.size == 0:
                continue
            model = RidgeCV(alphas=DEFAULT_ALPHAS if alphas is None else alphas, cv=cv, seed=seed, device=device)
            model.fit(Z_train[:, cols], Y_train)
            pred = model.predict(Z_test[:, cols])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", stats.ConstantColumnWarning)
                r = stats.pearson_r(pred, Y_test)
                r2 = stats.r2_score(pred, Y_test)
            r[np.isnan(r) & (np.ptp(pred, axis=0) == 0) & (np.ptp(Y_test, axis=0) > 0)] = 0.0  # a constant prediction
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                scores.append((np.nanmean(r), np.nanmean(r2)))
        s = np.array(scores, dtype=np.float64).reshape(-1, 2)
        rows.append({"condition": condition, "n_units": sizes[condition], "n_draws": int(len(s)),
                     "r_mean": float(s[:, 0].mean()) if len(s) else float("nan"),
                     "r_sd": float(s[:, 0].std(ddof=1)) if len(s) > 1 else float("nan"),
                     "r2_mean": float(s[:, 1].mean()) if len(s) else float("nan"),
                     "r2_sd": float(s[:, 1].std(ddof=1)) if len(s) > 1 else float("nan")})
    return rows
