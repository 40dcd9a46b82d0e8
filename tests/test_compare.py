"""Comparisons over test stimuli: the batched bootstrap of per-voxel scores and ROI summaries against a plain
resampling loop, BCa / percentile intervals against scipy.stats.bootstrap, p-values that agree with the intervals,
the test across subjects against scipy.stats.ttest_rel."""
import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import r2_score

from analyses.jobs.report_compare import resampling_units
from analyses.methods import compare
from analyses.methods.stats import (bootstrap_indices, bootstrap_scores, fdr_bh, jackknife_counts,
                                    nc_normalised_r2, resample_counts)


def small_case(seed=0, n_images=24, n_voxels=9, repeats=True):
    """Two encoders' predictions of the same responses; with ``repeats`` some images have 2–3 single-trial rows
    (so a resampled image brings all its rows)."""
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(n_images), rng.integers(1, 4, n_images) if repeats else 1)
    signal = rng.normal(size=(n_images, n_voxels))
    true = signal[ids] + 0.7 * rng.normal(size=(len(ids), n_voxels))
    pred_a = signal[ids] + 0.6 * rng.normal(size=(len(ids), n_voxels))
    pred_b = 0.5 * signal[ids] + 0.9 * rng.normal(size=(len(ids), n_voxels))
    return ids, true, pred_a, pred_b


def loop_scores(pred, true, ids, n_boot, seed):
    """The plain way: draw images with replacement, stack their rows, score each voxel with scipy / sklearn."""
    units = np.unique(ids)
    out = {"r": [], "r2": []}
    for draw in bootstrap_indices(len(units), n_boot, seed):
        rows = np.concatenate([np.flatnonzero(ids == units[k]) for k in draw])
        p, t = pred[rows], true[rows]
        out["r"].append([sps.pearsonr(p[:, v], t[:, v])[0] for v in range(t.shape[1])])
        out["r2"].append(r2_score(t, p, multioutput="raw_values"))
    return {k: np.array(v) for k, v in out.items()}


def test_batched_bootstrap_scores_equal_a_plain_resampling_loop():
    ids, true, pred, _ = small_case()
    counts = resample_counts(ids, 60, seed=3)
    assert counts.shape == (60, len(ids)) and np.all(counts.sum(1) > 0)
    # a row is drawn as often as its image, and the images drawn per resample number the images
    for c in counts[:5]:
        per_image = np.array([c[ids == i][0] for i in np.unique(ids)])
        assert all(np.all(c[ids == i] == per_image[k]) for k, i in enumerate(np.unique(ids)))
        assert per_image.sum() == len(np.unique(ids))
    nc = np.linspace(20, 90, true.shape[1])
    ours = bootstrap_scores(pred, true, counts, nc, voxel_batch=4)  # batches of 4 voxels: the batching is exercised
    ref = loop_scores(pred, true, ids, 60, seed=3)
    np.testing.assert_allclose(ours["r"], ref["r"], rtol=0, atol=2e-6)
    np.testing.assert_allclose(ours["r2"], ref["r2"], rtol=0, atol=2e-6)
    np.testing.assert_allclose(ours["nc_r2"], nc_normalised_r2(ref["r2"], nc[None]), rtol=0, atol=1e-5)
    observed = bootstrap_scores(pred, true, np.ones((1, len(ids))))
    np.testing.assert_allclose(observed["r"][0], [sps.pearsonr(pred[:, v], true[:, v])[0] for v in range(9)],
                               atol=2e-6)


def test_constant_columns_are_nan_as_in_training():
    ids, true, pred, _ = small_case(repeats=False)
    true[:, 2] = 3.0
    pred[:, 4] = 1.0
    out = bootstrap_scores(pred, true, resample_counts(ids, 5))
    assert np.isnan(out["r"][:, [2, 4]]).all() and np.isnan(out["r2"][:, 2]).all() and np.isfinite(out["r2"][:, 4]).all()


def test_roi_summaries_and_paired_differences_equal_a_plain_loop():
    ids, true, pred_a, pred_b = small_case(seed=1, n_voxels=12)
    rois = {"all": np.ones(12, bool), "A": np.arange(12) < 5, "B": np.arange(12) >= 5}
    n_boot, level = 400, 0.9
    counts = resample_counts(ids, n_boot, seed=0)
    draws = {k: compare.roi_draws(bootstrap_scores(p, true, counts)["r"], rois) for k, p in (("a", pred_a), ("b", pred_b))}
    obs = {k: compare.roi_draws(bootstrap_scores(p, true, np.ones((1, len(ids))))["r"][0], rois)
           for k, p in (("a", pred_a), ("b", pred_b))}
    ref = {k: loop_scores(p, true, ids, n_boot, seed=0)["r"] for k, p in (("a", pred_a), ("b", pred_b))}
    for statistic, fn in (("mean", np.mean), ("median", np.median)):
        expected_diff = np.stack([fn(ref["a"][:, m], 1) - fn(ref["b"][:, m], 1) for m in rois.values()], 1)
        np.testing.assert_allclose(draws["a"][statistic] - draws["b"][statistic], expected_diff, atol=5e-6)
        d = compare.paired_difference(obs["a"][statistic], obs["b"][statistic], draws["a"][statistic],
                                      draws["b"][statistic], level=level, method="percentile")
        lo, hi = np.percentile(expected_diff, [5, 95], axis=0)
        np.testing.assert_allclose(d["ci_low"], lo, atol=5e-6)
        np.testing.assert_allclose(d["ci_high"], hi, atol=5e-6)
        f = ((expected_diff < 0).sum(0) + (expected_diff <= 0).sum(0) + 1) / (2 * n_boot + 2)
        np.testing.assert_allclose(d["p"], np.minimum(1, 2 * np.minimum(f, 1 - f)))


def _pearson(x, y):  # along axis -2 (the rows), any leading batch axes
    x, y = x - x.mean(-2, keepdims=True), y - y.mean(-2, keepdims=True)
    return (x * y).sum(-2) / np.sqrt((x * x).sum(-2) * (y * y).sum(-2))


def _r2(p, t):
    tc = t - t.mean(-2, keepdims=True)
    return 1 - ((t - p) ** 2).sum(-2) / (tc * tc).sum(-2)


@pytest.mark.parametrize("quantity", ["r difference", "R² of A"])
def test_intervals_agree_with_scipy_bootstrap(quantity):
    """Over voxels, the mean r difference of two encoders (paired) and the mean R² of one, one row per test image:
    our batched bootstrap (and jackknife, for BCa) against scipy.stats.bootstrap(paired=True) with its own
    resamples; with 4000 resamples each the endpoints agree to a tenth of the interval's width, while BCa and
    percentile intervals of the (biased, skewed) R² differ by more than that."""
    ids, true, pred_a, pred_b = small_case(seed=2, n_images=40, n_voxels=6, repeats=False)

    def statistic(index, axis=-1):  # index (..., n): the resampled rows, as scipy hands them (vectorized)
        i = index.astype(int)
        if quantity == "R² of A":
            return _r2(pred_a[i], true[i]).mean(-1)
        return (_pearson(pred_a[i], true[i]) - _pearson(pred_b[i], true[i])).mean(-1)

    rois = {"all": np.ones(true.shape[1], bool)}
    weights = np.vstack([np.ones((1, len(ids))), resample_counts(ids, 4000, seed=11), jackknife_counts(ids)])
    if quantity == "R² of A":
        values = compare.roi_draws(bootstrap_scores(pred_a, true, weights)["r2"], rois)["mean"][:, 0]
    else:
        per = [compare.roi_draws(bootstrap_scores(p, true, weights)["r"], rois)["mean"][:, 0] for p in (pred_a, pred_b)]
        values = per[0] - per[1]
    assert values[0] == pytest.approx(statistic(np.arange(len(ids))), abs=1e-6)
    ours = {}
    for method in ("BCa", "percentile"):
        res = sps.bootstrap((np.arange(len(ids), dtype=float),), statistic, vectorized=True, paired=True,
                            n_resamples=4000, method=method, random_state=np.random.default_rng(7))
        lo, hi = compare.bootstrap_interval(values[1:4001], values[:1], values[4001:], 0.95, method.lower())
        ours[method] = np.array([lo[0], hi[0]])
        ref = np.array([res.confidence_interval.low, res.confidence_interval.high])
        assert np.abs(ours[method] - ref).max() < 0.1 * (ref[1] - ref[0]), (method, ours[method], ref)
    if quantity == "R² of A":
        assert np.abs(ours["BCa"] - ours["percentile"]).max() > 0.2 * (ours["BCa"][1] - ours["BCa"][0])


def test_bca_reduces_to_percentile_without_bias_or_skew_and_p_matches_the_interval():
    rng = np.random.default_rng(0)
    draws = rng.normal(0.3, 0.2, size=(2000, 5))
    draws[:, 1] -= 0.3  # centred on 0
    draws[:, 2] += 0.4  # far from 0
    draws[:, 3] = rng.gamma(2.0, 0.1, 2000) - 0.15  # skewed
    observed = np.median(draws, 0)
    jackknife = np.tile(rng.normal(size=(30, 1)), (1, 5))  # symmetric leave-one-out values: acceleration ~ 0
    jackknife -= jackknife.mean(0)
    for method in ("bca", "percentile"):
        for level in (0.9, 0.95, 0.99):
            lo, hi = compare.bootstrap_interval(draws, observed, jackknife, level, method)
            p = compare.bootstrap_p(draws, observed, jackknife, method)
            excludes = (lo > 0) | (hi < 0)
            # p < 1 - level exactly when the interval excludes 0 (away from the boundary, where
            # interpolation between draws decides)
            clear = np.abs(p - (1 - level)) > 0.01
            assert np.array_equal((p < 1 - level)[clear], excludes[clear]), (method, level, p, lo, hi)
    sym = np.zeros(30)
    sym[:15], sym[15:] = 1, -1
    lo_b, hi_b = compare.bootstrap_interval(draws[:, 0], np.median(draws[:, :1], 0), sym, 0.95, "bca")
    lo_p, hi_p = compare.bootstrap_interval(draws[:, 0], level=0.95, method="percentile")
    np.testing.assert_allclose([lo_b[0], hi_b[0]], [lo_p[0], hi_p[0]], atol=0.01)  # z0 ~ 0, a = 0
    assert compare.bootstrap_p(np.full((100, 1), 0.5), method="percentile")[0] == pytest.approx(1 / 101)  # the floor
    assert np.isnan(compare.bootstrap_p(np.full((10, 1), np.nan), method="percentile")[0])
    with pytest.raises(ValueError, match="jackknife"):
        compare.bootstrap_interval(draws, method="bca")


def test_across_subjects_is_a_paired_t_test_over_subjects():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.3, 0.1, (5, 4)), rng.normal(0.25, 0.1, (5, 4))
    a[1, 3] = np.nan
    res = compare.across_subjects(a - b, 0.95)
    for j in range(4):
        keep = np.isfinite(a[:, j])
        ref = sps.ttest_rel(a[keep, j], b[keep, j])
        assert res["n"][j] == keep.sum()
        assert res["t"][j] == pytest.approx(ref.statistic) and res["p"][j] == pytest.approx(ref.pvalue)
        ci = ref.confidence_interval(0.95)
        assert (res["ci_low"][j], res["ci_high"][j]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert np.isnan(compare.across_subjects(np.ones((1, 2)))["p"]).all()


def test_time_series_resample_blocks_of_consecutive_samples_and_best_per_column():
    units, unit = resampling_units(np.arange(100, 150), time_series=True, block=20)
    assert unit == "blocks of 20 consecutive TRs" and units.tolist() == [0] * 20 + [1] * 20 + [2] * 10
    counts = resample_counts(units, 50, seed=0)
    assert all(len(set(c[units == u])) == 1 for c in counts for u in range(3))
    assert resampling_units(np.array([3, 3, 7]), time_series=False, block=20)[0].tolist() == [3, 3, 7]
    jk = jackknife_counts(np.array([5, 5, 9, 2]))
    assert jk.tolist() == [[1, 1, 1, 0], [0, 0, 1, 1], [1, 1, 0, 1]]
    assert compare.best_per_column(np.array([[0.1, np.nan, 0.2], [0.3, np.nan, 0.1]])).tolist() == [1, -1, 0]
    assert np.isnan(fdr_bh(np.array([np.nan]))).all()
