"""The encoder's feature transform: its frame stage reproduces the datamodule's fitted reducer (scikit-learn
PCA) exactly, it round-trips through head.pt's state, and its standardisation is train.py's."""
import numpy as np
import pytest
import torch

from datamodules.video_features import FeatureReducer
from encoders.feature_transform import FeatureTransform


def frames(n=300, seed=0):
    """Frame features with correlated columns (so the PCAs keep fewer components than columns)."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 6))
    mixing = rng.normal(size=(6, 20))
    return (latent @ mixing * rng.uniform(0.5, 3, 20) + rng.normal(0, 0.05, (n, 20)) + 4).astype(np.float32)


@pytest.mark.parametrize("variance, slices", [(None, None), (0.95, None),
                                              (0.9, {"a": slice(0, 8), "b": slice(8, 20)})])
def test_frame_stage_reproduces_the_reducer(variance, slices):
    train, other = frames(), frames(50, seed=1)
    reducer = FeatureReducer(slices, variance).fit(train)
    t = FeatureTransform(reducer.n_components_)
    t.set_frame_stage(reducer, {"hrf": "wen"})
    for x in (train, other):
        np.testing.assert_allclose(t.frame_stage(torch.from_numpy(x)).numpy(), reducer.transform(x),
                                   rtol=1e-10, atol=1e-10)
    if variance is not None:
        assert reducer.n_components_ < 20  # the PCA did reduce
    per_tr = reducer.transform(train)[::3]  # stands for the datamodule's per-TR features
    t.set_standardisation(torch.from_numpy(per_tr.mean(0)).float(), torch.from_numpy(per_tr.std(0, ddof=1)).float())
    z = t.from_backbone(torch.from_numpy(other)).numpy()
    expected = (reducer.transform(other) - per_tr.mean(0)) / per_tr.std(0, ddof=1)
    np.testing.assert_allclose(z, expected, rtol=1e-4, atol=1e-4)  # float32 standardisation
    # head.pt's state rebuilds the same transform
    back = FeatureTransform.from_state(t.state())
    assert back.has_frame_stage and back.temporal == {"hrf": "wen"} and back.n_backbone == 20
    np.testing.assert_array_equal(back.from_backbone(torch.from_numpy(other)).numpy(), z)
    assert t.describe()["frame_stage"]["n_out"] == reducer.n_components_


def test_without_a_frame_stage_it_is_train_pys_standardisation():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(3, 2, (40, 5)).astype(np.float32))
    x[:, 4] = 1.0  # a constant column: std floored at 1e-6 of the largest
    t = FeatureTransform(5)
    t.set_standardisation(x.mean(0), x.std(0))
    std = x.std(0).clamp(min=float(x.std(0).max()) * 1e-6)
    torch.testing.assert_close(t.from_backbone(x), (x - x.mean(0)) / std)
    torch.testing.assert_close(t.standardise(x), t.from_backbone(x))
    assert not FeatureTransform.from_state(t.state()).has_frame_stage and t.describe()["frame_stage"] is None
    with pytest.raises(ValueError, match="frame stage gives 20 features, the head takes 5"):
        t.set_frame_stage(FeatureReducer(None, None).fit(frames()))


# --------------------------------------------------------------------------- robust standardisation (issue 14)
def sparse_problem(seed=0, n_train=240, n_test=120, n_dense=24, n_sparse=8, n_planted=60, n_noise=60):
    """Features whose sparse units are nearly silent in training (one tiny value each) but fire on held-out
    samples, as random-init ReLU units do; targets = a planted linear map of the dense units + noise, and
    pure-noise targets. Returns train/test features (n, F) float32 and targets (n, n_planted + n_noise)."""
    rng = np.random.default_rng(seed)
    dense = rng.normal(size=(n_train + n_test, n_dense))
    sparse = np.zeros((n_train + n_test, n_sparse))
    sparse[rng.integers(n_train, size=n_sparse), np.arange(n_sparse)] = 1e-4          # silent in training
    sparse[n_train:] = rng.exponential(1.0, (n_test, n_sparse)) * (rng.random((n_test, n_sparse)) < 0.3)
    x = np.concatenate([dense, sparse], 1).astype(np.float32)
    planted = dense @ rng.normal(size=(n_dense, n_planted)) / np.sqrt(n_dense) + rng.normal(size=(len(x), n_planted))
    y = np.concatenate([planted, rng.normal(size=(len(x), n_noise))], 1).astype(np.float32)
    return x[:n_train], x[n_train:], y[:n_train], y[n_train:], n_planted


def ridge_scores(transform, x_train, x_test, y_train, y_test):
    from encoders.metrics import pearson_r, r2_score
    from encoders.ridge import RidgeCV

    z_train, z_test = transform.standardise(torch.from_numpy(x_train)), transform.standardise(torch.from_numpy(x_test))
    pred = RidgeCV(cv=5, seed=0).fit(z_train, y_train).predict(z_test)
    return np.asarray(pearson_r(pred, y_test)), np.asarray(r2_score(pred, y_test))


def test_robust_standardisation_keeps_noise_targets_near_zero_where_plain_z_scoring_blows_up():
    x_train, x_test, y_train, y_test, n_planted = sparse_problem()
    plain = FeatureTransform(x_train.shape[1]).fit(torch.from_numpy(x_train), std_floor=None, clip=False)
    robust = FeatureTransform(x_train.shape[1]).fit(torch.from_numpy(x_train))
    r_plain, r2_plain = ridge_scores(plain, x_train, x_test, y_train, y_test)
    r_robust, r2_robust = ridge_scores(robust, x_train, x_test, y_train, y_test)
    # plain z-scoring: the silent units reach |z| ~ 1e4 on the test samples and ruin the predictions
    assert float(np.abs(plain.standardise(torch.from_numpy(x_test))).max()) > 1e3
    assert r2_plain[n_planted:].mean() < -1.0 and r2_plain[:n_planted].mean() < 0
    # the robust default: noise targets stay near 0, planted targets keep (at least) their r and R² > 0
    assert r2_robust[n_planted:].mean() >= -0.05
    assert r_robust[:n_planted].mean() >= r_plain[:n_planted].mean() - 0.02 and r_robust[:n_planted].mean() > 0.4
    assert r2_robust[:n_planted].mean() > 0.1
    assert robust.scaling["n_floored"] == 8 and robust.scaling["n_units"] == 32  # the 8 silent units, nothing else


def test_robust_fit_against_an_independent_computation():
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, (100, 12)) * np.r_[np.full(6, 2.0), np.full(6, 50.0)]   # two layers of different scale
    x[:, 2] *= 1e-3                       # a near-silent unit of layer a
    x[:, 9] = 7.0                         # a constant unit of layer b
    x = torch.from_numpy(x.astype(np.float32))
    blocks = {"a": slice(0, 6), "b": slice(6, 12)}
    t = FeatureTransform(12).fit(x, blocks=blocks, std_floor=0.1)
    std = x.double().std(0).numpy()
    expected = std.copy()
    for cols in blocks.values():
        live = std[cols][std[cols] > 1e-6 * std.max()]
        expected[cols] = np.maximum(std[cols], 0.1 * np.median(live))   # per layer: the layer's median
    np.testing.assert_allclose(t.std.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(t.mean.numpy(), x.double().mean(0).numpy(), rtol=1e-6, atol=1e-6)
    assert t.scaling == {"std_floor": 0.1, "clip": "training range", "n_units": 12, "n_floored": 2, "n_constant": 1}
    # training features pass the clip unchanged; held-out ones stay within each unit's training range
    plain = (x - t.mean) / t.std
    torch.testing.assert_close(t.standardise(x), plain, rtol=0, atol=0)
    held_out = x[:10] * 3 + 100
    z = t.standardise(held_out)
    assert torch.all(z >= plain.min(0).values) and torch.all(z <= plain.max(0).values)
    assert torch.all(z[:, 9] == 0)                             # constant in training: 0 everywhere
    assert 0 < t.clipped_fraction(held_out) <= 1 and t.clipped_fraction(x) == 0
    described = t.describe({"val": x, "test": held_out})["standardisation"]
    assert described["n_floored"] == 2 and described["clipped_fraction"]["val"] == 0
    assert described["clipped_fraction"]["test"] == t.clipped_fraction(held_out)
    # what head.pt keeps rebuilds the same transform
    back = FeatureTransform.from_state(t.state())
    torch.testing.assert_close(back.standardise(held_out), z, rtol=0, atol=0)
    assert back.describe()["standardisation"]["n_floored"] == 2


def test_a_state_saved_before_the_robust_standardisation_loads_as_plain():
    """head.pt files written before: buffers mean and std only, no scaling record -> no floor, no clip."""
    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.normal(3, 2, (50, 4)).astype(np.float32))
    old = {"n_features": 4, "layers": {}, "has_frame_stage": False, "temporal": None,
           "buffers": {"mean": x.mean(0), "std": x.std(0)}}
    t = FeatureTransform.from_state(old)
    assert not t.clips and t.describe()["standardisation"]["clip"] is None
    far = x * 100
    torch.testing.assert_close(t.standardise(far), (far - x.mean(0)) / x.std(0))


def test_frame_stage_robust_z_score_is_the_same_rule():
    """The reducer's floor and clip (datamodules) and the transform's (encoders) agree; the saved frame stage
    reproduces the reducer's clipped output on held-out frames."""
    from datamodules.video_features import floored_std as frame_floored_std
    from encoders.feature_transform import floored_std

    train = frames()
    train[:, 3] *= 1e-4                              # a near-silent unit
    train[:, 5] = 2.0                                # a constant one
    slices = {"a": slice(0, 8), "b": slice(8, 20)}
    std = train.astype(np.float64).std(0)
    for floor in (0.1, 0.5):
        a, raised_a = frame_floored_std(std, slices, floor)
        b, raised_b = floored_std(std, slices, floor)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(raised_a, raised_b)
    reducer = FeatureReducer(slices, 0.95).fit(train)
    assert reducer.n_floored_ == 2 and reducer.n_constant_ == 1
    held_out = frames(40, seed=7) * 5
    assert reducer.clipped_fraction(held_out) > 0 and reducer.clipped_fraction(train) == 0
    z = reducer.zscore(held_out)
    z_train = (train - reducer.mean_) / reducer.std_
    assert np.all(z <= z_train.max(0)) and np.all(z >= z_train.min(0)) and np.all(z[:, 5] == 0)
    t = FeatureTransform(reducer.n_components_)
    t.set_frame_stage(reducer)
    np.testing.assert_allclose(t.frame_stage(torch.from_numpy(held_out)).numpy(), reducer.transform(held_out),
                               rtol=1e-10, atol=1e-10)
    # with a frame stage the standardisation floors but does not clip (the frame stage did)
    t.fit(torch.from_numpy(reducer.transform(train)).float())
    assert not t.clips and t.scaling["clip"] == "at the frame stage"
    assert t.describe()["frame_stage"]["n_floored"] == 2
    plain = FeatureReducer(slices, 0.95, std_floor=None, clip=False).fit(train)
    assert plain.lower_ is None and plain.n_floored_ == 0 and plain.std_[5] == 1.0
