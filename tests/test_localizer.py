"""analyses.methods.localizer: the unit localizer (planted toy network, Welch t vs scipy, false positives at the
nominal rate), split halves and the Spearman–Brown ceiling, RDM comparisons, bootstrap CIs, lesions."""
import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from analyses.methods import localizer as loc
from analyses.methods.categories import CategoryStats

CATEGORIES = np.array(["face", "body", "place", "word", "object"])


class ToyNet(nn.Module):
    """Input (n, 1 + n_noise): column 0 carries the category signal (faces), the others pure noise.
    Units 0..n_face-1 read column 0 (face-selective by construction); every other unit reads its own
    noise column (no selectivity)."""

    def __init__(self, n_face: int, n_noise: int):
        super().__init__()
        self.face = nn.Linear(1, n_face)
        self.other = nn.Linear(n_noise, n_noise, bias=False)
        with torch.no_grad():
            self.face.weight.copy_(torch.linspace(0.5, 2.0, n_face)[:, None])
            self.face.bias.zero_()
            self.other.weight.copy_(torch.eye(n_noise))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.face(x[:, :1]), self.other(x[:, 1:])], dim=1)


def toy_stimuli(n_per_category: int, n_noise: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(CATEGORIES, n_per_category)
    x = rng.normal(size=(labels.size, 1 + n_noise))
    x[:, 0] += 3.0 * (labels == "face")
    return torch.as_tensor(x, dtype=torch.float32), labels


def test_toy_network_face_units_are_found_and_noise_units_are_not():
    net = ToyNet(n_face=6, n_noise=2000)
    x, labels = toy_stimuli(40, 2000)
    with torch.no_grad():
        acts = net(x).numpy()
    mask, t = loc.localize_units(acts, labels, "face", t_threshold=7.0)
    assert mask[:6].all() and not mask[6:].any()
    for other in ("place", "word"):  # the face units are selective for faces only
        assert not loc.localize_units(acts, labels, other)[0][:6].any()
    top, _ = loc.localize_units(acts, labels, "face", top_percent=0.3)  # ceil(0.3% of 2006) = 7 units
    assert top.sum() == 7 and top[:6].all()


def test_false_positive_rate_matches_the_welch_t_tail():
    """Units without selectivity pass t > 2 at the Welch t distribution's tail rate."""
    n_units = 20000
    rng = np.random.default_rng(1)
    labels = np.repeat(CATEGORIES, [30, 40, 50, 40, 40])
    acts = rng.normal(size=(labels.size, n_units)) * rng.uniform(0.5, 2.0, n_units)
    mask, t = loc.localize_units(acts, labels, "face", t_threshold=2.0)
    a, b = acts[labels == "face"], acts[labels != "face"]
    df = scipy.stats.ttest_ind(a, b, equal_var=False).df
    expected = scipy.stats.t.sf(2.0, df).mean()  # ~0.025
    sd = np.sqrt(expected * (1 - expected) / n_units)
    assert abs(mask.mean() - expected) < 4 * sd, (mask.mean(), expected)


@pytest.mark.filterwarnings("ignore:Precision loss")  # scipy, on the constant test columns
def test_welch_t_and_df_match_scipy():
    rng = np.random.default_rng(2)
    labels = np.repeat(CATEGORIES, [8, 12, 9, 15, 6])
    acts = rng.normal(size=(labels.size, 50)) + (labels == "word")[:, None] * rng.normal(size=50)
    acts[:, 7] = 3.0  # constant unit: no t
    acts[:, 8] = np.where(labels == "word", 2.0, 1.0)  # zero variance in both groups, different means
    _, t = loc.localize_units(acts, labels, "word")
    a, b = acts[labels == "word"], acts[labels != "word"]
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = scipy.stats.ttest_ind(a, b, equal_var=False)
    keep = np.arange(50) > 8
    np.testing.assert_allclose(t[keep], ref.statistic[keep], rtol=1e-10)
    assert np.isnan(t[7]) and t[8] > 1e6  # perfect separation: +inf up to the streamed sums' rounding
    codes = np.unique(labels, return_inverse=True)[1]
    stats_ = CategoryStats.from_arrays(acts, codes)
    _, df = loc.contrast_t(stats_, int(np.flatnonzero(np.unique(labels) == "word")[0]))
    np.testing.assert_allclose(df[keep], ref.df[keep], rtol=1e-10)
    with pytest.raises(ValueError, match="not among the labels"):
        loc.localize_units(acts, labels, "food")


def test_select_units_and_jaccard():
    t = np.array([1.0, 9.0, np.nan, 8.0, 7.0, -3.0])
    assert loc.select_units(t, 7.0).tolist() == [False, True, False, True, False, False]
    assert loc.select_units(t, top_percent=50).tolist() == [False, True, False, True, True, False]
    assert loc.jaccard(np.array([1, 1, 0, 0], bool), np.array([0, 1, 1, 0], bool)) == pytest.approx(1 / 3)
    assert np.isnan(loc.jaccard(np.zeros(3, bool), np.zeros(3, bool)))


def test_spearman_brown_recovers_the_reliability_of_the_full_mean():
    """Halves of 2 and 1 trials -> the reliability of the 3-trial mean, i.e. its squared correlation with
    the noise-free signal; equal halves give the textbook 2r / (1 + r)."""
    rng = np.random.default_rng(3)
    signal = rng.normal(size=40000)
    trials = signal[:, None] + rng.normal(scale=1.5, size=(40000, 3))
    r_half = np.corrcoef(trials[:, [0, 2]].mean(1), trials[:, 1])[0, 1]
    truth = np.corrcoef(trials.mean(1), signal)[0, 1] ** 2
    assert loc.spearman_brown(r_half, 2, 1) == pytest.approx(truth, abs=0.01)
    assert loc.spearman_brown(0.6, 2, 2) == pytest.approx(2 * 0.6 / 1.6)
    assert np.isnan(loc.spearman_brown(-0.1, 1, 1))


def test_split_halves_alternate_trials_in_presentation_order():
    ids = np.array([5, 3, 5, 3, 5, 7, 3])
    values = np.arange(7, dtype=float)[:, None] * np.array([[1.0, 10.0]])
    full, a, b, k_a, k_b, kept = loc.split_halves(ids, values, np.array([7, 3, 5]))
    assert kept.tolist() == [3, 5]  # image 7 has one trial
    np.testing.assert_allclose(full[:, 0], [(1 + 3 + 6) / 3, (0 + 2 + 4) / 3])
    np.testing.assert_allclose(a[:, 0], [(1 + 6) / 2, (0 + 4) / 2])
    np.testing.assert_allclose(b[:, 1], [30.0, 20.0])
    assert (k_a, k_b) == (2.0, 1.0)
    np.testing.assert_allclose(loc.image_means(ids, values, np.array([7]))[0], [5.0, 50.0])


def test_rdms_and_their_comparison_match_scipy():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(30, 12))
    Y = X + rng.normal(size=(30, 12))
    A, B = loc.correlation_rdm(X), loc.correlation_rdm(Y)
    np.testing.assert_allclose(A, 1 - np.corrcoef(X), atol=1e-12)
    A = np.round(A, 1)  # ties
    idx = np.stack([np.arange(30), rng.integers(0, 30, 30)])
    got = loc.rdm_similarity(A, B, idx, "spearman")
    pearson = loc.rdm_similarity(A, B, idx, "pearson")
    for row, sample in enumerate(idx):
        iu, ju = np.triu_indices(30, 1)
        p, q = sample[iu], sample[ju]
        keep = p != q  # pairs of an image with itself are left out
        assert got[row] == pytest.approx(scipy.stats.spearmanr(A[p[keep], q[keep]], B[p[keep], q[keep]]).statistic)
        assert pearson[row] == pytest.approx(scipy.stats.pearsonr(A[p[keep], q[keep]], B[p[keep], q[keep]]).statistic)
    assert np.isnan(loc.correlation_rdm(X[:, :2])).all()


def test_consistency_noise_correction_reaches_one_for_identical_tuning():
    """Two 'subjects' whose regions share one noise-free profile: raw r < 1, noise-corrected r ~ 1, and the
    bootstrap CI covers it; a noise-free model equal to the signal also reaches ~1."""
    rng = np.random.default_rng(5)
    n = 600
    signal = rng.normal(size=n)
    views = []
    for _ in range(2):
        trials = signal[:, None] + rng.normal(scale=1.2, size=(n, 3))
        views.append((trials.mean(1), (trials[:, [0, 2]].mean(1), trials[:, 1], 2, 1)))
    (x, xh), (y, yh) = views
    res = loc.consistency(loc.profile_similarity, x, y, xh, yh, n_boot=300, seed=0)
    assert res["score"] < 0.8
    assert res["score_nc"] == pytest.approx(1.0, abs=0.08)
    assert res["score_nc_ci"][0] < 1.0 < res["score_nc_ci"][1] + 0.05
    assert res["score_ci"][0] < res["score"] < res["score_ci"][1]
    model = loc.consistency(loc.profile_similarity, signal, x, None, xh, n_boot=100, seed=0)
    assert model["reliability_x"] == 1.0
    assert model["score_nc"] == pytest.approx(1.0, abs=0.08)
    resamples = loc.resample_indices(n, 5, seed=0)
    assert (resamples[0] == np.arange(n)).all() and resamples.shape == (6, n)


def test_encoding_lesions_need_the_selective_units_when_only_they_drive_the_region():
    rng = np.random.default_rng(6)
    n_train, n_test, n_units = 300, 120, 40
    X = rng.normal(size=(n_train + n_test, n_units))
    selected = np.zeros(n_units, bool)
    selected[:4] = True
    Y = X[:, :4] @ rng.normal(size=(4, 5)) + 0.3 * rng.normal(size=(n_train + n_test, 5))
    rows = {r["condition"]: r for r in loc.encoding_lesions(X[:n_train], Y[:n_train], X[n_train:], Y[n_train:],
                                                            selected, n_random=4, seed=0)}
    assert [rows[c]["n_units"] for c in ("all", "all_but_selective", "selective", "random_k", "all_but_random_k")] \
        == [40, 36, 4, 4, 36]
    assert rows["random_k"]["n_draws"] == 4 and np.isfinite(rows["random_k"]["r_sd"])
    assert rows["selective"]["r_mean"] > 0.9 and rows["all"]["r_mean"] > 0.9
    assert rows["all_but_selective"]["r_mean"] < 0.2
    assert rows["random_k"]["r_mean"] < rows["selective"]["r_mean"] - 0.3
    empty = loc.encoding_lesions(X[:n_train], Y[:n_train], X[n_train:], Y[n_train:], np.zeros(n_units, bool), n_random=2)
    assert np.isnan({r["condition"]: r for r in empty}["selective"]["r_mean"])
