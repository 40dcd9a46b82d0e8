"""CLIP-Dissect similarities and CLIP-MSM maps (analyses/dissect.py), the text encoder (encoders/text.py) and the
training-size curve (analyses/training_curve.py): each against a direct transcription or an independent library."""
import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from sklearn.metrics.pairwise import cosine_similarity

from analyses.methods import dissect
from analyses.methods.dissect import LinearActivations
from analyses.methods.training_curve import nested_image_subsets, resolve_sizes, training_size_curve
from encoders.ridge import RidgeCV


def _data(n_images=60, n_units=9, n_concepts=5, d=6, seed=0):
    rng = np.random.default_rng(seed)
    I = rng.normal(size=(n_images, d))
    W = rng.normal(size=(n_units, d))
    P = rng.uniform(-0.3, 0.5, size=(n_images, n_concepts))
    return I, W, I @ W.T, P


def loop_wpmi(Q, P, top_k, a, lam, min_prob, soft, p_start=0.998, p_end=0.97):
    """The formula of METHODS.md, one unit, concept and image at a time."""
    clip = scipy.special.softmax(a * P, axis=1)
    n_units, n_concepts = Q.shape[1], P.shape[1]
    log_pde = np.zeros((n_units, n_concepts))
    for u in range(n_units):
        top = np.argsort(-Q[:, u], kind="stable")[:top_k]
        for c in range(n_concepts):
            total = 0.0
            for j in range(top_k):
                value = clip[top[j], c]
                if soft:
                    p_j = p_start - j / top_k * (p_start - p_end)
                    total += math.log(1 + p_j * (value - 1) + min_prob)
                else:
                    total += math.log(value + min_prob)
            log_pde[u, c] = total
    log_pd = np.array([scipy.special.logsumexp(log_pde[:, c]) - math.log(n_units) for c in range(n_concepts)])
    return log_pde - lam * log_pd[None, :]


@pytest.mark.parametrize("unit_batch", [None, 1, 4, 100])
def test_soft_wpmi_matches_loop_transcription(unit_batch):
    I, W, Q, P = _data()
    for top_k, a, lam in [(10, 10.0, 1.0), (25, 1.0, 0.5), (60, 3.0, 1.0)]:
        expected = loop_wpmi(Q, P, top_k, a, lam, 1e-7, soft=True)
        got = dissect.soft_wpmi(Q, P, top_k=top_k, a=a, lam=lam, unit_batch=unit_batch)
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
        lazy = dissect.soft_wpmi(LinearActivations(I, W), P, top_k=top_k, a=a, lam=lam, unit_batch=unit_batch)
        np.testing.assert_allclose(lazy, expected, atol=1e-6, rtol=0)
    custom = dissect.soft_wpmi(Q, P, top_k=8, a=2.0, lam=0.7, p_start=0.9, p_end=0.5, min_prob=1e-3)
    np.testing.assert_allclose(custom, loop_wpmi(Q, P, 8, 2.0, 0.7, 1e-3, True, 0.9, 0.5), atol=1e-6, rtol=0)
    # float32 inputs are computed in float32, close to the float64 result
    f32 = dissect.soft_wpmi(Q.astype(np.float32), P.astype(np.float32), top_k=10)
    np.testing.assert_allclose(f32, loop_wpmi(Q, P, 10, 10.0, 1.0, 1e-7, True), atol=1e-4)


def test_wpmi_matches_loop_transcription():
    _, _, Q, P = _data(seed=1)
    np.testing.assert_allclose(dissect.wpmi(Q, P), loop_wpmi(Q, P, 28, 2.0, 0.6, 1e-7, soft=False), atol=1e-6)
    np.testing.assert_allclose(dissect.wpmi(Q, P, top_k=5, a=1.0, lam=1.0, unit_batch=2),
                               loop_wpmi(Q, P, 5, 1.0, 1.0, 1e-7, soft=False), atol=1e-6)


def test_similarities_work_in_unit_batches(monkeypatch):
    """Q columns are requested one unit batch at a time; the automatic batch obeys the gather budget."""
    I, W, Q, P = _data(n_images=40, n_units=23)
    requested = []
    original = LinearActivations.columns

    def spy(self, start, stop, *args, **kwargs):
        requested.append((start, stop))
        return original(self, start, stop, *args, **kwargs)

    monkeypatch.setattr(LinearActivations, "columns", spy)
    acts = LinearActivations(I, W)
    reference = dissect.soft_wpmi(Q, P, top_k=10)
    monkeypatch.setattr(dissect, "GATHER_BUDGET", 10 * P.shape[1] * 4)  # 4 units per batch
    np.testing.assert_allclose(dissect.soft_wpmi(acts, P, top_k=10), reference, atol=1e-12)
    assert requested == [(s, min(s + 4, 23)) for s in range(0, 23, 4)]
    for fn in (dissect.wpmi, dissect.cos_similarity, dissect.cos3_similarity):
        requested.clear()
        fn(acts, P, unit_batch=5)
        assert max(stop - start for start, stop in requested) == 5 and requested[-1][1] == 23


def test_cos_similarities_match_direct_formulas():
    I, W, Q, P = _data(seed=2)
    np.testing.assert_allclose(dissect.cos_similarity(Q, P, unit_batch=3), cosine_similarity(Q.T, P.T), atol=1e-10)
    Qc, Pc = (Q - Q.mean(0)) ** 3, (P - P.mean(0)) ** 3
    expected = (Qc / np.linalg.norm(Qc, axis=0)).T @ (Pc / np.maximum(np.linalg.norm(Pc, axis=0), 1e-3))
    np.testing.assert_allclose(dissect.cos3_similarity(LinearActivations(I, W), P), expected, atol=1e-10)


def test_rank_reorder_matches_per_unit_transcription():
    _, _, Q, P = _data(n_images=80, seed=3)
    P = np.abs(P) + 0.05  # CLIP cosines of real images are positive; avg_clip ** 0.5 needs it
    seed, top_fraction, p, scale_p = 4, 0.25, 3.0, 0.5
    got = dissect.rank_reorder(Q, P, p=p, top_fraction=top_fraction, scale_p=scale_p, seed=seed)
    n = int(80 * top_fraction)
    perms = torch.rand(Q.shape[1], 5, n, generator=torch.Generator().manual_seed(seed)).argsort(-1).numpy()
    expected = np.zeros((Q.shape[1], P.shape[1]))
    for u in range(Q.shape[1]):
        top = np.argsort(-Q[:, u])[:n]
        values = Q[top, u]  # descending
        ascending = values[::-1]
        baseline = np.mean([np.abs(ascending - ascending[perm]) ** p for perm in perms[u]])
        for c in range(P.shape[1]):
            rank = scipy.stats.rankdata(P[top, c], method="ordinal").astype(int) - 1  # 0 = lowest P
            error = np.mean(np.abs(values - ascending[rank]) ** p) / baseline
            expected[u, c] = -error / P[top, c].mean() ** scale_p
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    # a unit whose activations follow concept 0 exactly has zero reorder error there: its best score
    Q2 = np.column_stack([P[:, 0], Q[:, 0]])
    assert np.argmax(dissect.rank_reorder(Q2, P, top_fraction=top_fraction)[0]) == 0


def test_maps_labels_histograms_and_correlations():
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(30, 4)) * 3
    S = dissect.multi_semantic_map(scores)
    assert S.shape == (4, 30)
    np.testing.assert_allclose(S, scipy.special.softmax(scores, axis=1).T, atol=1e-12)
    np.testing.assert_allclose(S.sum(axis=0), 1.0, atol=1e-12)
    labels = dissect.hard_labels(scores)
    np.testing.assert_array_equal(labels, scores.argmax(1))
    np.testing.assert_array_equal(labels, S.argmax(0))
    onehot = dissect.hard_label_maps(labels, 4)
    np.testing.assert_array_equal(onehot.sum(0), 1)
    rois = {"a": np.arange(30) < 10, "b": np.arange(30) >= 5}
    hist = dissect.label_histograms(labels, rois, 4)
    np.testing.assert_array_equal(hist["a"], np.bincount(labels[:10], minlength=4))
    assert hist["b"].sum() == 25
    truth = S + rng.normal(scale=0.1, size=S.shape)
    truth[2] = np.nan
    truth[1, :3] = np.nan
    r = dissect.map_correlations(S, truth)
    assert np.isnan(r[2])
    assert r[0] == pytest.approx(scipy.stats.pearsonr(S[0], truth[0])[0])
    assert r[1] == pytest.approx(scipy.stats.pearsonr(S[1, 3:], truth[1, 3:])[0])
    mask = np.arange(30) % 2 == 0
    expected = scipy.stats.pearsonr(S[3, mask], truth[3, mask])[0]
    assert dissect.map_correlations(S, truth, mask)[3] == pytest.approx(expected)


def test_activations_weights_and_top_images():
    I, W, Q, _ = _data(seed=6)
    T = np.random.default_rng(7).normal(size=(3, I.shape[1]))
    np.testing.assert_allclose(dissect.concept_activations(I, T), cosine_similarity(I, T), atol=1e-6)
    # W/σ on raw features = the head on standardised features, up to a per-voxel constant
    mu, sd = I.mean(0), I.std(0) * 3 + 0.1
    head = ((I - mu) / sd) @ W.T
    raw = I @ dissect.raw_space_weights(W, sd).T
    np.testing.assert_allclose(raw - head, np.broadcast_to((raw - head)[0], raw.shape), atol=1e-10)
    units = np.array([1, 4, 5])
    acts = LinearActivations(I, W)
    np.testing.assert_allclose(dissect.mean_activation(acts, units), Q[:, units].mean(1), atol=1e-10)
    np.testing.assert_array_equal(dissect.top_images(acts, units, 3), np.argsort(-Q[:, units].mean(1))[:3])
    with pytest.raises(ValueError, match="top_k=100"):
        dissect.soft_wpmi(Q, np.ones((60, 2)))
    with pytest.raises(ValueError, match="concept_sim"):
        dissect.soft_wpmi(Q, np.ones((59, 2)), top_k=5)
    with pytest.raises(ValueError, match="unknown similarity"):
        dissect.similarity("wmpi", Q, np.ones((60, 2)))


# ----------------------------------------------------------------------------- text encoder


def test_text_encoder_on_tiny_clip():
    from encoders.backbones import REGISTRY, build_backbone
    from encoders.text import TextEncoder, prompts, tokenizer_for

    torch.manual_seed(0)
    bb = build_backbone("tiny_clip")
    text = TextEncoder.from_backbone(bb)
    T = text.encode(["faces", "places"], templates=["a photo of {}.", "{}"])
    assert T.shape == (2, 64) and T.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(T, axis=1), 1, atol=1e-5)
    tok = tokenizer_for(bb.spec, bb.model)
    with torch.no_grad():
        raw = bb.model.encode_text(tok(["a photo of faces.", "faces", "a photo of places.", "places"])).numpy()
    raw = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    mean = raw.reshape(2, 2, -1).mean(1)
    np.testing.assert_allclose(T, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-5)
    assert prompts(["x"], ["{} here", "a {}"]) == [["x here", "a x"]]
    with pytest.raises(ValueError, match="exactly one"):
        text.encode(["faces"], templates=["a photo"])
    assert type(tokenizer_for(REGISTRY["clip_vitb32"], None)).__name__ == "SimpleTokenizer"
    with pytest.raises(ValueError, match="no text tower"):
        TextEncoder.from_backbone(build_backbone("tiny"))


# ----------------------------------------------------------------------------- training-size curve


def test_training_size_curve_nested_and_full_size_equals_ridge():
    rng = np.random.default_rng(8)
    ids = np.repeat(np.arange(60), 2)  # two rows (trials) per image
    X = rng.normal(size=(120, 5)).astype(np.float32) * [1, 2, 3, 4, 5] + 3
    Y = X @ rng.normal(size=(5, 4)) + rng.normal(size=(120, 4))
    Xt = rng.normal(size=(30, 5)).astype(np.float32) * [1, 2, 3, 4, 5] + 3
    Yt = Xt @ rng.normal(size=(5, 4))
    assert resolve_sizes([0.5, 1.0, 10, 10], 60) == [10, 30, 60]
    with pytest.raises(ValueError, match="outside"):
        resolve_sizes([100], 60)
    subsets = nested_image_subsets(ids, [10, 30, 60], seed=1)
    assert set(subsets[0]) <= set(subsets[1]) <= set(subsets[2]) == set(range(60))
    ridge = {"alphas": [0.1, 10.0], "cv": 3}
    plain = {"std_floor": None, "clip": False}
    curve = training_size_curve(X, Y, ids, Xt, Yt, [10, 60], ridge=ridge, seed=1, scaling=plain)
    assert curve["r2"].shape == (2, 4) and list(curve["n_rows"]) == [20, 120]
    z = (X - X.mean(0)) / X.std(0, ddof=1)
    zt = (Xt - X.mean(0)) / X.std(0, ddof=1)
    full = RidgeCV(alphas=[0.1, 10.0], cv=3).fit(z, Y)
    np.testing.assert_allclose(curve["r2"][1], full.score(zt, Yt), atol=1e-5)
    # the default is train.py's robust scaling: here nothing floored, the test rows clipped to the training range
    robust = training_size_curve(X, Y, ids, Xt, Yt, [60], ridge=ridge, seed=1)
    np.testing.assert_allclose(robust["r2"][0], full.score(np.clip(zt, z.min(0), z.max(0)), Yt), atol=1e-5)
