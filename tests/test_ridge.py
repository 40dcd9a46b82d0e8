"""Ridge with a per-voxel alpha against scikit-learn, brute-force CV and himalaya."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score

from encoders.heads import RidgeHead
from encoders.ridge import RidgeCV, kfold_indices

ALPHAS = np.logspace(-3, 5, 9)


def make_data(n=150, d=20, v=40, seed=0):
    rng = np.random.default_rng(seed)
    X = (rng.normal(size=(n, d)) * rng.uniform(0.5, 3, d) + 2).astype(np.float32)
    W = rng.normal(size=(d, v))
    noise = rng.normal(size=(n, v)) * rng.uniform(0.1, 40, v)  # very different SNRs -> different alphas
    return X, (X @ W + noise + 5).astype(np.float32)


@pytest.mark.parametrize("solver", ["primal", "dual"])
def test_fixed_alpha_matches_sklearn(solver):
    X, Y = make_data()
    ours = RidgeCV(alphas=[3.0], solver=solver).fit(X, Y)
    ref = Ridge(alpha=3.0).fit(X.astype(np.float64), Y.astype(np.float64))
    scale = np.abs(ref.coef_).max()
    np.testing.assert_allclose(ours.coef_, ref.coef_, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(ours.intercept_, ref.intercept_, rtol=1e-5, atol=1e-5 * np.abs(ref.intercept_).max())
    np.testing.assert_allclose(ours.predict(X), ref.predict(X), rtol=1e-5, atol=1e-4)


def brute_force_cv(X, Y, folds, score):
    X, Y = X.astype(np.float64), Y.astype(np.float64)
    out = np.zeros((len(ALPHAS), Y.shape[1]))
    for a, alpha in enumerate(ALPHAS):
        for f in folds:
            train = np.setdiff1d(np.arange(len(X)), f)
            pred = Ridge(alpha=alpha).fit(X[train], Y[train]).predict(X[f])
            if score == "r2":
                out[a] += r2_score(Y[f], pred, multioutput="raw_values")
            else:
                out[a] += [np.corrcoef(pred[:, j], Y[f][:, j])[0, 1] for j in range(Y.shape[1])]
    return out / len(folds)


@pytest.mark.parametrize("solver", ["primal", "dual"])
@pytest.mark.parametrize("score", ["r2", "corr"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_alpha_per_voxel_equals_brute_force_cv(solver, score, shuffle):
    X, Y = make_data()
    ours = RidgeCV(alphas=ALPHAS, cv=5, score=score, solver=solver, shuffle=shuffle, seed=4, voxel_batch=16).fit(X, Y)
    expected = brute_force_cv(X, Y, kfold_indices(len(X), 5, shuffle, 4), score)
    np.testing.assert_allclose(ours.cv_scores_, expected, atol=1e-6)
    np.testing.assert_array_equal(ours.best_alphas_, ALPHAS[expected.argmax(0)])
    assert len(np.unique(ours.best_alphas_)) > 2  # the test data really needs different alphas
    # Final weights: each voxel's ridge at its own alpha, on all samples.
    for j in (0, 17, 39):
        ref = Ridge(alpha=ours.best_alphas_[j]).fit(X.astype(np.float64), Y[:, j].astype(np.float64))
        np.testing.assert_allclose(ours.coef_[j], ref.coef_, rtol=1e-4, atol=1e-5 * np.abs(ref.coef_).max())


def test_contiguous_folds_are_blocks():
    folds = kfold_indices(10, 3, shuffle=False)
    assert [f.tolist() for f in folds] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    shuffled = kfold_indices(10, 3, shuffle=True, seed=0)
    assert sorted(np.concatenate(shuffled).tolist()) == list(range(10))


def test_score_is_per_voxel_r2_and_voxel_batches_do_not_matter():
    X, Y = make_data(seed=1)
    a = RidgeCV(alphas=ALPHAS, voxel_batch=7).fit(X, Y)
    b = RidgeCV(alphas=ALPHAS, voxel_batch=1000).fit(X, Y)
    np.testing.assert_array_equal(a.best_alphas_, b.best_alphas_)
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-6, atol=1e-7)
    Xt, Yt = make_data(seed=2)
    np.testing.assert_allclose(a.score(Xt, Yt), r2_score(Yt.astype(np.float64), a.predict(Xt).astype(np.float64),
                                                         multioutput="raw_values"), rtol=1e-6)


def test_matches_himalaya_on_the_same_folds():
    himalaya_ridge = pytest.importorskip("himalaya.ridge")
    X, Y = make_data(n=200, d=30, v=60, seed=3)
    folds = kfold_indices(len(X), 5, True, 0)
    splits = [(np.setdiff1d(np.arange(len(X)), f), f) for f in folds]
    from himalaya.scoring import r2_score as himalaya_r2  # himalaya's default CV score is -MSE
    ref = himalaya_ridge.RidgeCV(alphas=ALPHAS, cv=splits, fit_intercept=True,
                                 solver_params={"score_func": himalaya_r2}).fit(X.astype(np.float64), Y.astype(np.float64))
    ours = RidgeCV(alphas=ALPHAS, cv=5, seed=0).fit(X, Y)
    np.testing.assert_allclose(ours.best_alphas_, np.asarray(ref.best_alphas_), rtol=1e-9)
    np.testing.assert_allclose(ours.predict(X), np.asarray(ref.predict(X.astype(np.float64))), rtol=1e-4, atol=1e-3)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="share n"):
        RidgeCV().fit(np.zeros((10, 3)), np.zeros((9, 2)))
    with pytest.raises(ValueError, match="score"):
        RidgeCV(score="mse")


def test_ridge_head_predicts_like_its_estimator():
    X, Y = make_data(seed=5)
    head = RidgeHead(X.shape[1], Y.shape[1], alphas=ALPHAS).fit(torch.from_numpy(X), Y)
    est = RidgeCV(alphas=ALPHAS).fit(X, Y)
    np.testing.assert_allclose(head(torch.from_numpy(X)).numpy(), est.predict(X), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(head.best_alphas.numpy(), est.best_alphas_)
    assert not list(head.parameters())  # nothing for an optimiser to train
