"""Per-voxel scores against scipy / scikit-learn, batch-invariance, and the noise ceiling."""
import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import r2_score as sk_r2

from encoders.metrics import (VoxelScores, nc_normalised_r2, noise_ceiling, noise_ceiling_k, pearson_r,
                              r2_score, summarize)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(200, 30)) * rng.uniform(0.1, 50, 30) + rng.normal(0, 100, 30)
    pred = true * rng.uniform(0, 1, 30) + rng.normal(size=(200, 30)) * 10
    return pred, true


def test_pearson_matches_scipy(data):
    pred, true = data
    expected = [stats.pearsonr(pred[:, j], true[:, j])[0] for j in range(true.shape[1])]
    np.testing.assert_allclose(pearson_r(pred, true), expected, rtol=1e-10, atol=1e-12)


def test_r2_matches_sklearn(data):
    pred, true = data
    np.testing.assert_allclose(r2_score(pred, true), sk_r2(true, pred, multioutput="raw_values"), rtol=1e-9)


def test_batches_give_the_whole_split_score(data):
    pred, true = data
    metric = VoxelScores(true.shape[1])
    for start in range(0, len(true), 17):  # uneven batches, float32 inputs
        metric.update(torch.tensor(pred[start:start + 17], dtype=torch.float32),
                      torch.tensor(true[start:start + 17], dtype=torch.float32))
    out = metric.compute()
    np.testing.assert_allclose(out["r"].numpy(), pearson_r(pred.astype(np.float32), true.astype(np.float32)),
                               atol=1e-6)
    # Averaging per-batch r would differ: the metric must not do that.
    per_batch = np.mean([pearson_r(pred[s:s + 17], true[s:s + 17]) for s in range(0, 187, 17)], axis=0)
    assert np.abs(per_batch - out["r"].numpy()).max() > 1e-3


def test_constant_columns_are_nan_not_a_crash():
    rng = np.random.default_rng(1)
    true = rng.normal(size=(50, 3))
    pred = rng.normal(size=(50, 3))
    true[:, 1] = 7.0
    pred[:, 2] = -3.0
    r, r2 = pearson_r(pred, true), r2_score(pred, true)
    assert np.isnan(r[1]) and np.isnan(r[2]) and np.isfinite(r[0])
    assert np.isnan(r2[1]) and np.isfinite(r2[2])
    block = summarize(r, r2, None)
    assert block["n_nan"] == 2 and block["r_mean"] == pytest.approx(r[0])


def test_noise_ceiling_formula():
    # k = (A/3 + B/2 + C/1) / (A + B + C)
    repeats = np.array([3] * 5 + [2] * 3 + [1] * 2)
    assert noise_ceiling_k(repeats) == pytest.approx((5 / 3 + 3 / 2 + 2) / 10)
    ncsnr = np.array([0.0, 1.0, 2.0])
    nc = noise_ceiling(ncsnr, 1 / 3)
    np.testing.assert_allclose(nc, 100 * ncsnr ** 2 / (ncsnr ** 2 + 1 / 3))
    assert nc[0] == 0 and 0 < nc[1] < nc[2] < 100
    np.testing.assert_allclose(nc_normalised_r2(np.array([0.1, 0.3, 0.4]), nc)[1:], [0.3 / 0.75, 0.4 / (4 / (4 + 1 / 3))])
    assert np.isnan(nc_normalised_r2(np.array([0.1]), np.array([0.0])))[0]


def test_summarize_rois():
    r = np.array([0.1, 0.2, 0.3, 0.4])
    out = summarize(r, r, r, {"A": np.array([True, True, False, False]), "B": np.array([3]),
                              "empty": np.zeros(4, bool)})
    assert out["r_mean"] == pytest.approx(0.25) and out["n_voxels"] == 4
    assert out["rois"]["A"]["r_mean"] == pytest.approx(0.15) and out["rois"]["A"]["n_voxels"] == 2
    assert out["rois"]["B"]["nc_r2_mean"] == pytest.approx(0.4)
    assert "empty" not in out["rois"]


def test_headline_summaries_resist_voxels_with_a_near_zero_noise_ceiling():
    """1000 voxels at NC 30-80 % with R² = 0.5·NC/100 (NC-R² 0.5), plus 20 voxels at NC 0.5 % whose R² of
    -0.02 becomes NC-R² -4: the plain mean falls to ~0.41, the median and the mean over NC > 10 % stay 0.5."""
    import statistics

    rng = np.random.default_rng(0)
    nc = np.concatenate([rng.uniform(30, 80, 1000), np.full(20, 0.5)])
    r2 = np.concatenate([0.5 * nc[:1000] / 100 + rng.normal(0, 0.002, 1000), np.full(20, -0.02)])
    r = np.sign(r2) * np.sqrt(np.abs(r2))
    r[5] = np.nan  # a constant voxel
    nc_r2 = nc_normalised_r2(r2, nc)
    rois = {"A": np.arange(1020) % 2 == 0}
    out = summarize(r, r2, nc_r2, rois, nc=nc, nc_threshold=10.0)
    assert out["nc_threshold"] == 10.0 and out["n_reliable"] == 1000 and out["n_voxels"] == 1020
    assert out["nc_r2_mean"] < 0.42                               # what the headline must not be
    assert out["nc_r2_median"] == pytest.approx(statistics.median(nc_r2.tolist()))
    assert out["nc_r2_mean_reliable"] == pytest.approx(statistics.fmean(nc_r2[:1000].tolist()))
    assert abs(out["nc_r2_median"] - 0.5) < 0.01 and abs(out["nc_r2_mean_reliable"] - 0.5) < 0.01
    finite_r = [x for x in r[:1000].tolist() if np.isfinite(x)]
    assert out["r_mean_reliable"] == pytest.approx(statistics.fmean(finite_r)) and out["n_nan"] == 1
    assert out["r2_median"] == pytest.approx(statistics.median(r2.tolist()))
    roi = out["rois"]["A"]
    assert roi["n_reliable"] == 500 + 0 and roi["n_voxels"] == 510
    assert roi["nc_r2_mean_reliable"] == pytest.approx(statistics.fmean(nc_r2[:1000][::2].tolist()))
    # Without noise ceilings the reliable keys are None; a threshold above every NC leaves an empty (NaN) mean.
    assert summarize(r, r2, None)["nc_r2_mean_reliable"] is None and summarize(r, r2, None)["n_reliable"] is None
    empty = summarize(r, r2, nc_r2, nc=nc, nc_threshold=90.0)
    assert empty["n_reliable"] == 0 and np.isnan(empty["nc_r2_mean_reliable"])
