"""analyses.methods.categories against direct formulas, scipy and the Brain Connectivity Toolbox, with planted answers."""
import bct
import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import adjusted_rand_score

from analyses.methods import categories as cat


def responses_with_planted_dprime(n_per=40, seed=0):
    """Voxel v prefers category v (of 4) by a planted shift; voxel 4 prefers none."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), n_per)
    resp = rng.standard_normal((labels.size, 5))
    for v in range(4):
        resp[labels == v, v] += 2.0
    return resp, labels


def direct_dprime(resp, labels):
    cats = np.unique(labels)
    out = np.empty((cats.size, resp.shape[1]))
    for i in cats:
        a, b = resp[labels == i], resp[labels != i]
        out[i] = (a.mean(0) - b.mean(0)) / np.sqrt((a.var(0, ddof=1) + b.var(0, ddof=1)) / 2)
    return out


def test_dprime_equals_the_formula_and_finds_the_planted_preference():
    resp, labels = responses_with_planted_dprime()
    d = cat.dprime(resp, labels)
    np.testing.assert_allclose(d, direct_dprime(resp, labels), rtol=1e-10)
    sel, pref = cat.selectivity(d)
    np.testing.assert_array_equal(pref[:4], [0, 1, 2, 3])
    assert sel[:4].min() > 1.2 and sel[4] < 0.6
    np.testing.assert_array_equal(cat.top_categories(d, k=1)[:4, 0], [0, 1, 2, 3])
    profile = cat.roi_profile(d, {"prefers 2": np.array([2]), "first two": np.array([True, True, False, False, False])})
    assert int(np.argmax(profile["prefers 2"])) == 2
    np.testing.assert_allclose(profile["first two"], d[:, :2].mean(1))


def test_dprime_of_an_exact_planted_case():
    # category 0: values {1, 3} (mean 2, var 2); rest: {0, 0, 2, 2} (mean 1, var 4/3) -> d' = 1/sqrt(5/3)
    resp = np.array([[1.0], [3.0], [0.0], [0.0], [2.0], [2.0]])
    labels = np.array([0, 0, 1, 1, 2, 2])
    assert cat.dprime(resp, labels)[0, 0] == pytest.approx(1 / np.sqrt(5 / 3))
    assert np.isnan(cat.dprime(np.ones((6, 1)), labels)).all()  # constant responses: no d'


def test_category_stats_accumulate_in_batches():
    resp, labels = responses_with_planted_dprime(seed=1)
    order = np.random.default_rng(0).permutation(labels.size)
    stats = cat.CategoryStats(4, 5)
    for chunk in np.array_split(order, 7):
        stats.update(resp[chunk] + 100.0, labels[chunk])  # an offset must not cost precision
    np.testing.assert_allclose(stats.dprime(), cat.dprime(resp, labels), rtol=1e-9)
    np.testing.assert_allclose(stats.means, [resp[labels == i].mean(0) + 100 for i in range(4)], rtol=1e-12)
    np.testing.assert_allclose(stats.variances, [resp[labels == i].var(0, ddof=1) for i in range(4)], rtol=1e-9)
    np.testing.assert_allclose(cat.category_maps(resp, labels), [resp[labels == i].mean(0) for i in range(4)])
    with pytest.raises(ValueError, match="labels must lie"):
        stats.update(resp[:3], np.array([0, 1, 4]))


def test_category_similarity_is_pearson_over_the_chosen_voxels():
    maps = np.random.default_rng(2).standard_normal((5, 30))
    maps[1, 3] = np.nan
    voxels = np.zeros(30, bool)
    voxels[:20] = True
    sim = cat.category_similarity(maps, voxels)
    keep = [v for v in range(20) if v != 3]
    for i in range(5):
        for j in range(5):
            assert sim[i, j] == pytest.approx(scipy.stats.pearsonr(maps[i, keep], maps[j, keep])[0])


def block_network(sizes=(4, 4, 4), within=0.8, between=-0.3, noise=0.0, seed=0):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    W = np.where(labels[:, None] == labels[None, :], within, between)
    if noise:
        e = np.random.default_rng(seed).normal(0, noise, W.shape)
        W = W + (e + e.T) / 2
    return cat.network(W), labels


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # bct on a network without negative weights
def test_signed_modularity_equals_bct_and_is_one_for_perfect_equal_blocks():
    rng = np.random.default_rng(3)
    for _ in range(5):
        W = rng.uniform(-1, 1, (9, 9))
        W = (W + W.T) / 2
        labels = rng.integers(0, 3, 9)
        assert cat.signed_modularity(W, labels) == pytest.approx(bct.modularity_und_sign(W, labels, qtype="smp")[1])
    W, labels = block_network()
    assert cat.signed_modularity(W, labels) == pytest.approx(1.0)  # Q+ = 1 - 3/9, Q- = -3/9
    W_pos = np.abs(W)
    assert cat.signed_modularity(W_pos, labels) == pytest.approx(bct.modularity_und_sign(W_pos, labels, qtype="smp")[1])


def test_cluster_categories_recovers_planted_blocks():
    W, labels = block_network(sizes=(3, 4, 5), noise=0.15, seed=1)
    res = cat.cluster_categories(W, range(2, 8))
    assert res.k == 3
    assert adjusted_rand_score(labels, res.labels) == 1.0
    assert res.q == pytest.approx(cat.signed_modularity(W, res.labels))
    assert res.q == max(res.q_by_k.values())


def test_modularity_pvalue_separates_structure_from_noise():
    W, _ = block_network(noise=0.1)
    res = cat.cluster_categories(W, range(2, 6))
    p, null = cat.modularity_pvalue(W, res, n_perm=60, seed=0)
    assert p == pytest.approx(1 / 61) and null.max() < res.q
    p_fixed, null_fixed = cat.modularity_pvalue(W, res, n_perm=60, seed=0, recluster=False)
    assert p_fixed == pytest.approx(1 / 61) and null_fixed.max() < res.q
    rng = np.random.default_rng(5)
    R = rng.uniform(-1, 1, (12, 12))
    R = cat.network((R + R.T) / 2)
    p_rand, _ = cat.modularity_pvalue(R, cat.cluster_categories(R, range(2, 6)), n_perm=60, seed=0)
    assert p_rand > 0.05


def test_modularity_null_is_clustered_with_the_observed_n_init(monkeypatch):
    """The null networks are clustered exactly as the observed one (same k values, n_init and seed): each null Q
    equals cluster_categories on that shuffled network with the observed settings, and KMeans sees the observed
    n_init (with fewer restarts k-means lands in poorer optima on the null networks and p comes out too small)."""
    import sklearn.cluster

    rng = np.random.default_rng(9)
    R = rng.uniform(-1, 1, (14, 14))
    R = cat.network((R + R.T) / 2)
    res = cat.cluster_categories(R, range(2, 6), seed=3, n_init=7)
    assert (res.n_init, res.seed) == (7, 3)
    seen = []

    class SpyKMeans(sklearn.cluster.KMeans):
        def fit(self, X, y=None, sample_weight=None):
            seen.append((self.n_init, self.random_state))
            return super().fit(X, y, sample_weight)

    monkeypatch.setattr(sklearn.cluster, "KMeans", SpyKMeans)
    p, null = cat.modularity_pvalue(R, res, n_perm=6, seed=3)
    assert set(seen) == {(7, 3)} and len(seen) == 6 * 4  # 6 null networks x k = 2..5
    shuffles = np.random.default_rng(3)
    expected = [cat.cluster_categories(cat.shuffle_similarities(R, shuffles), range(2, 6), seed=3, n_init=7).q
                for _ in range(6)]
    np.testing.assert_allclose(null, expected, rtol=0, atol=0)
    assert p == (1 + np.sum(null >= res.q - 1e-12)) / 7


def test_shuffle_similarities_keeps_values_and_symmetry():
    W, _ = block_network(noise=0.1)
    S = cat.shuffle_similarities(W, np.random.default_rng(0))
    iu = np.triu_indices(12, 1)
    np.testing.assert_allclose(np.sort(S[iu]), np.sort(W[iu]))
    np.testing.assert_allclose(S, S.T)
    np.testing.assert_allclose(np.diag(S), np.diag(W))


def test_similarity_correlation_matches_scipy_and_permutation_null():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((8, 20))
    cortical = np.corrcoef(x)
    semantic = cortical + rng.normal(0, 0.1, (8, 8))
    semantic = (semantic + semantic.T) / 2
    r, p = cat.similarity_correlation(cortical, semantic, n_perm=500, seed=0)
    iu = np.triu_indices(8, 1)
    assert r == pytest.approx(scipy.stats.pearsonr(np.arctanh(cortical[iu]), semantic[iu])[0])
    assert p < 0.01
    # explicit permutation loop with the same draws
    gen = np.random.default_rng(0)
    perms = [gen.permutation(8) for _ in range(500)]
    null = [scipy.stats.pearsonr(np.arctanh(cortical[np.ix_(q, q)][iu]), semantic[iu])[0] for q in perms]
    assert p == pytest.approx((1 + np.sum(np.array(null) >= r - 1e-12)) / 501)
    unrelated = np.corrcoef(rng.standard_normal((8, 20)))
    assert cat.similarity_correlation(cortical, unrelated, n_perm=300)[1] > 0.01
    r_raw, _ = cat.similarity_correlation(cortical, semantic, n_perm=10, fisher=False)
    assert r_raw == pytest.approx(scipy.stats.pearsonr(cortical[iu], semantic[iu])[0])


def test_load_similarity_csv_reorders_and_names_errors(tmp_path):
    path = tmp_path / "sem.csv"
    path.write_text(",b,a,c\nb,1,0.2,0.3\na,0.2,1,0.4\nc,0.3,0.4,1\n")
    from analyses.jobs.wen2018 import load_similarity_csv

    np.testing.assert_allclose(load_similarity_csv(path, ["a", "b", "c"]),
                               [[1, 0.2, 0.4], [0.2, 1, 0.3], [0.4, 0.3, 1]])
    with pytest.raises(ValueError, match=r"sem.csv: categories \['d'\]"):
        load_similarity_csv(path, ["a", "d"])
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_similarity_csv(tmp_path / "nope.csv", ["a"])


def test_clip_text_embeddings_with_a_tiny_clip():
    """The one text-embedding path (encoders.text) with one template: CLIP's own normalised text embedding."""
    import open_clip
    import torch
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from encoders.text import TextEncoder

    torch.manual_seed(0)
    model = CLIP(16, CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32),
                 CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32-quickgelu")
    names = ["face", "body", "place"]
    emb = TextEncoder(model, tokenizer).encode(names, ["a photo of a {}."])
    with torch.no_grad():
        ref = model.encode_text(tokenizer([f"a photo of a {n}." for n in names])).numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(emb, ref, atol=1e-6)
    np.testing.assert_allclose(cat.cosine_similarity(emb), ref @ ref.T, atol=1e-6)


def test_layerwise_organisation_per_layer():
    rng = np.random.default_rng(7)
    labels = np.array([0, 0, 1, 1])
    base = rng.standard_normal((2, 50))
    structured = base[labels] + 0.2 * rng.standard_normal((4, 50))  # clusters visible in this layer only
    layer_maps = {"early": rng.standard_normal((4, 50)), "late": structured}
    out = cat.layerwise_organisation(layer_maps, labels)
    for name, maps in layer_maps.items():
        np.testing.assert_allclose(out[name]["similarity"], np.corrcoef(maps))
        assert out[name]["q"] == pytest.approx(cat.signed_modularity(cat.network(np.corrcoef(maps)), labels))
    assert out["late"]["q"] > out["early"]["q"] + 0.3


def test_cluster_region_is_a_one_sided_bonferroni_t_test():
    rng = np.random.default_rng(8)
    labels = np.repeat(np.arange(4), 30)
    resp = rng.standard_normal((120, 40))
    resp[np.ix_(np.isin(labels, [0, 1]), np.arange(10))] += 1.5
    stats = cat.CategoryStats.from_arrays(resp, labels)
    region = cat.cluster_region(stats, [0, 1], alpha=0.01)
    t = scipy.stats.ttest_ind(resp[np.isin(labels, [0, 1])], resp[~np.isin(labels, [0, 1])], alternative="greater")
    np.testing.assert_array_equal(region, t.pvalue * 40 < 0.01)
    assert region[:10].all() and not region[10:].any()


def test_finer_clusters_find_planted_sub_clusters_in_each_region():
    """Two super-clusters of 4 categories with their own voxels; inside each, two sub-clusters of 2."""
    rng = np.random.default_rng(9)
    n_per, n_vox = 25, 80
    labels = np.repeat(np.arange(8), n_per)
    resp = 0.3 * rng.standard_normal((labels.size, n_vox))
    patterns = rng.standard_normal((4, 20))  # one pattern per sub-cluster, over its super-cluster's 20 voxels
    for c in range(8):
        sup, sub = c // 4, (c % 4) // 2
        rows = labels == c
        resp[np.ix_(rows, np.arange(sup * 40, sup * 40 + 20))] += 2.0 + patterns[2 * sup + sub]
    stats = cat.CategoryStats.from_arrays(resp, labels)
    sim = cat.category_similarity(stats.means)
    res = cat.cluster_categories(cat.network(sim), range(2, 6))
    assert res.k == 2 and adjusted_rand_score(res.labels, np.arange(8) // 4) == 1.0
    finer = cat.finer_clusters(stats, res, alpha=0.01)
    assert len(finer) == 2
    for entry in finer:
        sup = entry["members"][0] // 4
        assert entry["n_voxels"] == 20  # exactly its own voxels
        assert entry["k"] == 2
        truth = (np.array(entry["members"]) % 4) // 2
        assert adjusted_rand_score(truth, entry["labels"]) == 1.0, (sup, entry)


def test_figures(tmp_path):
    from analyses.jobs import wen2018_figures as figures

    W, labels = block_network()
    p1 = figures.plot_similarity(W, [f"c{i}" for i in range(12)], labels, tmp_path / "sim.png")
    p2 = figures.plot_roi_profile({"FFA": np.array([1.0, 0.1]), "PPA": np.array([np.nan, 2.0])}, ["face", "place"],
                              tmp_path / "d.png")
    for p in (p1, p2):
        assert p.read_bytes()[:4] == b"\x89PNG"
