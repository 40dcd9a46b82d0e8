"""analyses.methods.stats against independent computations (scipy, scikit-learn, explicit loops) and planted cases."""
import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import r2_score as sk_r2

from analyses.methods import stats


def planted(n=120, n_signal=6, n_noise=6, seed=0):
    """true (n, v); pred = true + small noise for the first n_signal voxels, independent noise for the rest."""
    rng = np.random.default_rng(seed)
    true = rng.standard_normal((n, n_signal + n_noise))
    pred = np.concatenate([true[:, :n_signal] + 0.3 * rng.standard_normal((n, n_signal)),
                           rng.standard_normal((n, n_noise))], axis=1)
    return pred, true


def test_pearson_and_r2_match_scipy_and_sklearn_and_count_constant_columns():
    pred, true = planted()
    pred[:, 3] = 2.0  # constant prediction: r undefined, R² defined
    true[:, 5] = 1.0  # constant response: both undefined
    with pytest.warns(stats.ConstantColumnWarning, match="2 of 12 voxels"):
        r = stats.pearson_r(pred, true)
    with pytest.warns(stats.ConstantColumnWarning, match="1 of 12 voxels"):
        r2 = stats.r2_score(pred, true)
    for v in range(12):
        if v in (3, 5):
            assert np.isnan(r[v])
        else:
            assert r[v] == pytest.approx(scipy.stats.pearsonr(pred[:, v], true[:, v])[0], abs=1e-12)
        if v == 5:
            assert np.isnan(r2[v])
        else:
            assert r2[v] == pytest.approx(sk_r2(true[:, v], pred[:, v]), abs=1e-12)
    assert stats.count_nan(r) == 2 and stats.count_nan(r2) == 1


def brute_force_bh(p):
    """p_adj(i) = min over j >= i (in sorted order) of m p_(j) / j, capped at 1 — the definition, O(m²)."""
    m = len(p)
    order = np.argsort(p)
    ps = p[order]
    adj_sorted = np.array([min(1.0, min(m * ps[j] / (j + 1) for j in range(i, m))) for i in range(m)])
    out = np.empty(m)
    out[order] = adj_sorted
    return out


def test_fdr_bh_equals_the_definition_and_scipy_and_keeps_nan():
    p = np.random.default_rng(1).uniform(size=200) ** 3
    adj = stats.fdr_bh(p)
    np.testing.assert_allclose(adj, brute_force_bh(p), rtol=1e-12)
    np.testing.assert_allclose(adj, scipy.stats.false_discovery_control(p, method="bh"), rtol=1e-12)
    # planted: m = 4, p = [0.01, 0.04, 0.03, 0.2] -> [0.04, 0.0533, 0.0533, 0.2]
    np.testing.assert_allclose(stats.fdr_bh(np.array([0.01, 0.04, 0.03, 0.2])), [0.04, 0.16 / 3, 0.16 / 3, 0.2])
    with_nan = np.array([0.01, np.nan, 0.04, 0.03, 0.2])  # NaN stays NaN and does not count in m
    np.testing.assert_allclose(stats.fdr_bh(with_nan), [0.04, np.nan, 0.16 / 3, 0.16 / 3, 0.2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.fdr_bh(np.array([0.5, 1.5]))


def test_bootstrap_pvalues_equal_an_explicit_resampling_loop():
    pred, true = planted(n=60, n_signal=3, n_noise=3)
    pred[:, 4] = true[:, 4] + 3.0 * np.random.default_rng(2).standard_normal(60)  # R² near or below 0
    n_boot = 300
    idx = stats.bootstrap_indices(60, n_boot, seed=7)
    k = np.sum([sk_r2(true[i], pred[i], multioutput="raw_values") <= 0 for i in idx], axis=0)
    expected = (k + 1) / (n_boot + 1)  # as the permutation p-values: never exactly 0
    got = stats.bootstrap_pvalues(pred, true, n_boot=n_boot, seed=7, voxel_batch=4)  # batches of 4 voxels
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert np.all(got[:3] == 1 / 301) and got[3:].min() > 0.5  # planted: signal voxels vs pure noise


def test_bootstrap_constant_response_is_nan():
    pred, true = planted(n=40, n_signal=2, n_noise=1)
    true[:, 1] = 0.5
    p = stats.bootstrap_pvalues(pred, true, n_boot=50)
    assert np.isnan(p[1]) and np.isfinite(p[[0, 2]]).all()


def test_block_permutations_move_whole_blocks():
    orders = stats.block_permutations(23, 50, block=5, seed=0)
    assert orders.shape == (50, 23)
    blocks = [list(range(s, min(s + 5, 23))) for s in range(0, 23, 5)]  # 5, 5, 5, 5, 3
    for order in orders:
        assert sorted(order) == list(range(23))
        pos = np.argsort(order)  # where each original sample went
        for block in blocks:  # a block stays whole and in order
            assert list(np.diff(pos[block])) == [1] * (len(block) - 1)
    assert len({tuple(o) for o in orders}) > 25  # 5! = 120 possible orders, 50 drawn
    assert (orders[:, 0] != 0).any()


def test_permutation_pvalues_equal_an_explicit_loop():
    pred, true = planted(n=50, n_signal=3, n_noise=4, seed=3)
    orders = stats.block_permutations(50, 199, block=5, seed=11)
    r = np.array([scipy.stats.pearsonr(pred[:, v], true[:, v])[0] for v in range(7)])
    perm_r = np.array([[scipy.stats.pearsonr(pred[o, v], true[:, v])[0] for v in range(7)] for o in orders])
    expected = (1 + (perm_r >= r - 1e-6).sum(0)) / 200
    got = stats.permutation_pvalues(pred, true, n_perm=199, block=5, seed=11, voxel_batch=3)
    np.testing.assert_allclose(got, expected)
    assert got[:3].max() == pytest.approx(1 / 200) and got[3:].min() > 0.01


def test_noise_ceiling_normalisation():
    r = np.array([0.5, 0.3, 0.2])
    nc = np.array([25.0, 0.0, 100.0])
    np.testing.assert_allclose(stats.nc_normalised_r(r, nc), [1.0, np.nan, 0.2])
    np.testing.assert_allclose(stats.nc_normalised_r2(r ** 2, nc), [1.0, np.nan, 0.04])


def test_roi_summary_mean_and_standard_error():
    values = np.array([0.1, 0.3, np.nan, 0.5, 0.7, 0.2])
    rois = {"a": np.array([True, True, True, False, False, False]), "b": np.array([3, 4, 5]), "c": np.array([2])}
    out = stats.roi_summary(values, rois)
    assert out["a"]["n"] == 2 and out["a"]["n_nan"] == 1
    assert out["a"]["mean"] == pytest.approx(0.2)
    assert out["b"]["se"] == pytest.approx(scipy.stats.sem([0.5, 0.7, 0.2]))
    assert out["c"]["n"] == 0 and np.isnan(out["c"]["mean"]) and np.isnan(out["c"]["se"])


def test_paired_ttest_per_roi_matches_the_formula():
    rng = np.random.default_rng(4)
    a = rng.normal(0.4, 0.1, 200)
    b = a - 0.05 + rng.normal(0, 0.02, 200)  # planted: a better by 0.05 everywhere
    b[7] = np.nan
    rois = {"first": np.arange(100), "second": np.arange(100, 200)}
    out = stats.paired_ttest(a, b, rois)
    for name, idx in rois.items():
        ok = np.isfinite(b[idx])
        d = a[idx][ok] - b[idx][ok]
        t = d.mean() / (d.std(ddof=1) / np.sqrt(d.size))
        assert out[name]["t"] == pytest.approx(t)
        assert out[name]["p"] == pytest.approx(2 * scipy.stats.t.sf(abs(t), d.size - 1))
        assert out[name]["n"] == d.size and out[name]["mean_diff"] == pytest.approx(0.05, abs=0.01)
        assert out[name]["p"] < 1e-10
    assert out["first"]["n"] == 99
