"""Ridge with a per-voxel alpha against scikit-learn, brute-force CV and himalaya; grouped folds and splitters."""
import logging

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score
from sklearn.model_selection import GroupKFold, PredefinedSplit, ShuffleSplit

from encoders.heads import RidgeHead
from encoders.ridge import RidgeCV, cv_splits, kfold_indices

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
    """scikit-learn's Ridge per alpha and fold; folds: held-out index arrays (train = the rest) or (train, test)."""
    X, Y = X.astype(np.float64), Y.astype(np.float64)
    out = np.zeros((len(ALPHAS), Y.shape[1]))
    for a, alpha in enumerate(ALPHAS):
        for f in folds:
            train, f = f if isinstance(f, tuple) else (np.setdiff1d(np.arange(len(X)), f), f)
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


# ----------------------------------------------------------------------------- folds: groups and splitters


def single_trials(n_images=60, n_repeats=3, d=100, v=30, seed=0):
    """Single trials: every image seen n_repeats times (rows of an image adjacent, as NSD's single-trial rows).
    Responses = an image-specific effect that the features cannot predict for a new image (random per image,
    shared by its trials) + trial noise; d > n_images, so a weakly regularised ridge memorises seen images."""
    rng = np.random.default_rng(seed)
    image_x = rng.normal(size=(n_images, d))
    image_effect = rng.normal(size=(n_images, v))
    ids = np.repeat(rng.choice(10_000, n_images, replace=False), n_repeats)
    rows = np.repeat(np.arange(n_images), n_repeats)
    X = (image_x[rows] + 0.05 * rng.normal(size=(len(rows), d))).astype(np.float32)
    Y = (image_effect[rows] + 0.5 * rng.normal(size=(len(rows), v))).astype(np.float32)
    return X, Y, ids


def test_grouped_folds_never_split_a_group_and_reduce_to_kfold():
    _, _, ids = single_trials()
    for shuffle in (True, False):
        folds = kfold_indices(len(ids), 5, shuffle, seed=3, groups=ids)
        assert sorted(np.concatenate(folds).tolist()) == list(range(len(ids)))
        held_out = [set(ids[f].tolist()) for f in folds]
        assert all(not (held_out[a] & held_out[b]) for a in range(5) for b in range(a + 1, 5))
        assert {len(h) for h in held_out} == {12}  # 60 images, 5 folds: 12 images (36 trials) each
    distinct = np.random.default_rng(0).permutation(1000)[:97]  # every id once: the plain K-fold
    for shuffle in (True, False):
        assert all(np.array_equal(a, b) for a, b in zip(kfold_indices(97, 5, shuffle, 2, groups=distinct),
                                                        kfold_indices(97, 5, shuffle, 2)))
    with pytest.raises(ValueError, match="n_folds <= the number of groups"):
        kfold_indices(6, 5, groups=[1, 1, 2, 2, 3, 3])


@pytest.mark.parametrize("solver", ["primal", "dual"])
def test_splitters_and_split_lists_equal_brute_force_cv(solver):
    X, Y = make_data(n=90, d=12, v=10, seed=7)
    if solver == "dual":
        X = np.concatenate([X] * 9, axis=1)[:, :100] + np.random.default_rng(1).normal(size=(90, 100)).astype(np.float32)
    test_fold = np.random.default_rng(2).integers(-1, 3, size=90)  # 3 held-out folds and rows never held out
    for cv in (PredefinedSplit(test_fold), ShuffleSplit(4, test_size=0.3, random_state=0)):
        pairs = list(cv.split(X))
        ours = RidgeCV(alphas=ALPHAS, cv=cv, solver=solver, voxel_batch=4).fit(X, Y)
        np.testing.assert_allclose(ours.cv_scores_, brute_force_cv(X, Y, pairs, "r2"), atol=1e-6)
        from_list = RidgeCV(alphas=ALPHAS, cv=pairs, solver=solver).fit(X, Y)
        np.testing.assert_array_equal(from_list.best_alphas_, ours.best_alphas_)
        assert ours.n_splits_ == len(pairs) and not ours.grouped_


def test_bad_splits_are_named():
    with pytest.raises(ValueError, match="cv split 0: 2 samples are both trained on and held out"):
        cv_splits([(np.arange(6), np.arange(2))], 10)
    with pytest.raises(ValueError, match="outside"):
        cv_splits([(np.arange(6), np.array([6, 12]))], 10)
    with pytest.raises(ValueError, match="cv must be an int, a scikit-learn splitter"):
        cv_splits("five", 10)
    with pytest.raises(ValueError, match="groups must have shape"):
        RidgeCV(alphas=ALPHAS).fit(np.zeros((10, 2)), np.zeros((10, 3)), groups=np.zeros(9))


def test_matches_himalaya_on_identical_group_splits():
    """himalaya's RidgeCV calls cv.split(Y) without groups, so it gets the same GroupKFold splits as a list."""
    himalaya_ridge = pytest.importorskip("himalaya.ridge")
    from himalaya.scoring import r2_score as himalaya_r2
    X, Y, ids = single_trials(n_images=80, d=40, seed=4)
    Y = Y + X[:, :5] @ np.random.default_rng(5).normal(size=(5, Y.shape[1])).astype(np.float32)  # some signal
    for ours, splits in ((RidgeCV(alphas=ALPHAS, cv=GroupKFold(5)).fit(X, Y, groups=ids),
                          list(GroupKFold(5).split(X, groups=ids))),
                         (RidgeCV(alphas=ALPHAS, cv=5, seed=1).fit(X, Y, groups=ids),
                          cv_splits(5, len(X), ids, shuffle=True, seed=1))):
        assert all(not set(ids[tr]) & set(ids[te]) for tr, te in splits)  # no image on both sides
        ref = himalaya_ridge.RidgeCV(alphas=ALPHAS, cv=splits, fit_intercept=True,
                                     solver_params={"score_func": himalaya_r2}).fit(X.astype(np.float64),
                                                                                    Y.astype(np.float64))
        np.testing.assert_allclose(ours.best_alphas_, np.asarray(ref.best_alphas_), rtol=1e-9)
        np.testing.assert_allclose(ours.predict(X), np.asarray(ref.predict(X.astype(np.float64))), rtol=1e-4,
                                   atol=1e-3)
        assert ours.grouped_


def test_single_trials_without_groups_choose_too_little_regularisation(caplog):
    """The trials of an image in both training and held-out folds reward memorising the image: ungrouped CV
    scores a response the features cannot predict for new images as predictable and picks small alphas;
    grouped CV sees no generalisation (best CV R² <= ~0) and regularises as much as the grid allows, and says
    so in one warning line (here: ungrouped median alpha 10, median best CV R² 0.62; grouped median alpha
    1e5, the grid's top for 2/3 of the voxels, median best CV R² -0.07)."""
    X, Y, ids = single_trials()
    plain = RidgeCV(alphas=ALPHAS).fit(X, Y)
    with caplog.at_level(logging.WARNING, logger="encoders.ridge"):
        grouped = RidgeCV(alphas=ALPHAS).fit(X, Y, groups=ids)
    best_plain, best_grouped = plain.cv_scores_.max(0), grouped.cv_scores_.max(0)
    assert np.median(best_plain) > 0.5 and np.median(best_grouped) < 0.05, (best_plain, best_grouped)
    assert np.all(grouped.best_alphas_ >= plain.best_alphas_) and np.median(grouped.best_alphas_) >= 1e3 * np.median(
        plain.best_alphas_)
    assert grouped.alpha_edge_fraction_["highest"] > 0.5 and plain.alpha_edge_fraction_["highest"] == 0
    lines = [r.getMessage() for r in caplog.records if "grid" in r.getMessage()]
    assert len(lines) == 1 and "at its highest (1e+05) for" in lines[0] and "\n" not in lines[0], lines
    record = grouped.cv_record()
    assert record["grouped"] and record["n_splits"] == 5 and record["alpha_edge_fraction"][1] > 0.5


def test_ridge_head_passes_groups_to_its_estimator():
    X, Y, ids = single_trials(seed=2)
    head = RidgeHead(X.shape[1], Y.shape[1], alphas=ALPHAS).fit(torch.from_numpy(X), Y, groups=ids)
    np.testing.assert_array_equal(head.best_alphas.numpy(), RidgeCV(alphas=ALPHAS).fit(X, Y, groups=ids).best_alphas_)
    assert head.estimator.grouped_


def test_train_groups_single_trials_of_an_image(make_cfg, synthetic_root, tmp_path):
    """train.py hands the split's stimulus ids to the ridge head: with data.average_repeats=false (one row per
    trial) the CV folds keep every image's trials together, and the run records it."""
    from train import train

    cfg = make_cfg([f"data.root={synthetic_root}", "data.synthetic=null", "data.average_repeats=false",
                    "head=ridge", "trainer=cpu", "logger=none", "trainer.enable_progress_bar=false"])
    result = train(cfg, tmp_path / "run")
    ids = result.datamodule.split_ids["train"]
    assert len(np.unique(ids)) < len(ids)  # single trials: ids repeat
    est = result.model.head.estimator
    features = result.model.features(result.datamodule.features["train"])
    refit = RidgeCV(alphas=est.alphas, cv=est.cv, shuffle=est.shuffle, seed=est.seed).fit(
        features, result.datamodule.targets("train"), groups=ids)
    np.testing.assert_array_equal(est.best_alphas_, refit.best_alphas_)
    record = np.load(tmp_path / "run" / "ridge_cv.npz")
    assert bool(record["grouped"]) and record["alpha_edge_fraction"].shape == (2,)


# ----------------------------------------------------------------------------- voxel batches sized by memory

def batch_fits(X, Y, batches, **kwargs):
    return {vb: RidgeCV(alphas=ALPHAS, progress=False, **kwargs, voxel_batch=vb).fit(X, Y) for vb in batches}


@pytest.mark.parametrize("solver,cv", [("primal", 5), ("dual", 5), ("primal", "shuffle"), ("dual", "shuffle")])
def test_results_do_not_depend_on_the_voxel_batch(solver, cv, caplog):
    """Every voxel's algebra is its own column, but BLAS may sum a column differently in a (d, 1) product
    than in a (d, 300) one: the CV scores' quadratic term is float32 (Ĉ·W, relative error ~ d * 6e-8), so
    scores agree to 1e-6 (measured 1e-7), the float64 refit to float32 rounding, and alphas wherever the
    best two CV scores of a voxel are more than 1e-6 apart."""
    X, Y = make_data(n=150, d=20 if solver == "primal" else 200, v=300, seed=6)
    splits = ShuffleSplit(4, test_size=0.25, random_state=0) if cv == "shuffle" else cv
    fits = batch_fits(X, Y, (1, 7, 64, "auto", 300), solver=solver, cv=splits)
    ref = fits[300]
    assert fits["auto"].voxel_batch_ == 300 and fits[7].voxel_batch_ == 7  # auto on a CPU: every voxel (< 4096)
    for vb, fit in fits.items():
        assert_same_fit(fit, ref, f"voxel_batch={vb}")
        assert int(fit.cv_record()["voxel_batch"]) == fit.voxel_batch_


def assert_same_fit(fit, ref, what="", score_atol=1e-6):
    """CV scores within score_atol; alphas and weights equal (to float32 rounding) wherever a voxel's best two
    CV scores are more than score_atol apart (over 90 % of the voxels)."""
    top2 = np.sort(ref.cv_scores_, axis=0)[-2:]
    clear = top2[1] - top2[0] > score_atol
    assert clear.mean() > 0.9
    np.testing.assert_allclose(fit.cv_scores_, ref.cv_scores_, rtol=0, atol=score_atol, err_msg=what)
    np.testing.assert_array_equal(fit.best_alphas_[clear], ref.best_alphas_[clear], err_msg=what)
    np.testing.assert_allclose(fit.coef_[clear], ref.coef_[clear], rtol=0, atol=1e-6 * np.abs(ref.coef_).max(),
                               err_msg=what)


def test_auto_voxel_batch_respects_the_memory_budget():
    from encoders.ridge import CPU_VOXEL_BATCH, CUDA_RESERVE, MEMORY_FRACTION, auto_voxel_batch
    gib = 2 ** 30
    for free, per_voxel in [(80 * gib, 263_000), (3 * gib, 1_000_000), (gib, 50_000), (CUDA_RESERVE + 10 ** 6, 10 ** 5)]:
        batch = auto_voxel_batch(free, per_voxel, 10 ** 7, "cuda")
        assert batch * per_voxel <= MEMORY_FRACTION["cuda"] * (free - CUDA_RESERVE) or batch == 1
        assert (batch + 1) * per_voxel > MEMORY_FRACTION["cuda"] * (free - CUDA_RESERVE)  # the largest that fits
    assert auto_voxel_batch(120 * gib, 263_000, 300_000, "cuda") == 300_000  # a whole brain at once on an H200
    assert auto_voxel_batch(0, 263_000, 300_000, "cuda") == 1  # never 0, even with nothing free
    assert auto_voxel_batch(64 * gib, 263_000, 300_000, "cpu") == CPU_VOXEL_BATCH  # CPU: capped
    assert auto_voxel_batch(gib, 10 ** 6, 300_000, "cpu") == int(MEMORY_FRACTION["cpu"] * gib // 10 ** 6)
    assert auto_voxel_batch(None, 1, 300_000, "cuda") == CPU_VOXEL_BATCH  # unknown free memory
    assert auto_voxel_batch(64 * gib, 1, 100, "mps") == 100
    assert auto_voxel_batch(64 * gib, 1, 10, "cpu") == 10


@pytest.mark.parametrize("solver,cv,n,d,n_alphas,dtype", [
    ("primal", 5, 400, 64, 10, torch.float32), ("primal", 3, 400, 128, 20, torch.float64),
    ("primal", 10, 2000, 32, 30, torch.float32), ("primal", "shuffle", 300, 40, 10, torch.float32),
    ("dual", 5, 100, 300, 10, torch.float32), ("dual", 3, 100, 1000, 20, torch.float64),
    ("dual", "shuffle", 80, 300, 10, torch.float32)])
def test_memory_estimate_bounds_the_tensors_a_batch_allocates(solver, cv, n, d, n_alphas, dtype):
    """solve_bytes_per_voxel x batch >= the peak bytes of every tensor storage the solve of one batch creates
    (counted op by op, tests/tensor_bytes.py), and not wildly above it (>= 0.3 of the estimate: measured
    0.36-0.63), so "auto" neither overflows the budget nor wastes most of it."""
    from encoders.ridge import _DualSolver, _PrimalSolver
    from tests.tensor_bytes import LiveTensorBytes
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, 260, generator=g, dtype=dtype)
    splits = cv_splits(ShuffleSplit(4, test_size=0.25, random_state=0) if cv == "shuffle" else cv, n)
    engine = (_PrimalSolver if solver == "primal" else _DualSolver)(X, splits)
    alphas = torch.logspace(-2, 5, n_alphas, dtype=torch.float64)
    vb = 256
    with LiveTensorBytes() as counted:
        result = engine.solve(Y[:, 2:2 + vb], alphas, "r2")
    estimate = engine.bytes_per_voxel(n_alphas, Y.element_size()) * vb
    assert counted.current > 0 and result[1].shape == (d, vb)
    assert 0.3 * estimate <= counted.peak <= estimate, (counted.peak, estimate)


def test_auto_batches_follow_the_free_memory(monkeypatch):
    """With little memory free the fit takes small batches, the same answer, and records the batch used."""
    import encoders.ridge as ridge
    X, Y = make_data(n=150, d=20, v=200, seed=7)
    big = RidgeCV(alphas=ALPHAS, progress=False).fit(X, Y)
    per_voxel = ridge.solve_bytes_per_voxel("primal", 150, 20, len(ALPHAS), 5, 30, 5, 4)
    monkeypatch.setattr(ridge, "free_bytes", lambda device: int(9.5 * per_voxel / ridge.MEMORY_FRACTION["cpu"]))
    small = RidgeCV(alphas=ALPHAS, progress=False).fit(X, Y)
    assert (big.voxel_batch_, small.voxel_batch_) == (200, 9)
    assert int(small.cv_record()["voxel_batch"]) == 9 and str(small.cv_record()["device"]) == "cpu"
    assert_same_fit(small, big)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "big", True])
def test_bad_voxel_batch_is_named(bad):
    with pytest.raises(ValueError, match="voxel_batch must be a positive integer or 'auto'"):
        RidgeCV(voxel_batch=bad)


def test_train_refuses_a_bad_head_voxel_batch_before_extracting(make_cfg, tmp_path):
    from train import ConfigError, train
    with pytest.raises(ConfigError, match="head.voxel_batch must be a positive integer or 'auto', got 0"):
        train(make_cfg(["head=ridge", "head.voxel_batch=0", "logger=none"]), tmp_path / "run")
    assert not (tmp_path / "feature_cache").exists()
