"""Category organisation of cortex from predicted responses (Wen et al. 2018, "virtual fMRI").

Feed an encoder many images grouped by category, then:

    stats = CategoryStats(n_categories, n_voxels); stats.update(pred_batch, label_batch) ...
    maps = stats.means                         # (n_categories, n_voxels): category maps
    d = dprime(responses, labels)              # (n_categories, n_voxels) selectivity index
    S = category_similarity(maps, voxels)      # (n_categories, n_categories) Pearson r between maps
    res = cluster_categories(S, range(2, 6))   # k-means labels for the k with the highest signed Q
    p, null = modularity_pvalue(S, res, n_perm=1000)
    r, p = similarity_correlation(S, semantic, n_perm=10000)

Labels are integer category codes 0..n_categories-1 (row i of every output is category i).
Similarity matrices are used as given by :func:`signed_modularity`; :func:`cluster_categories` and
:func:`modularity_pvalue` take W as the network (zero its diagonal for a network without
self-loops: :func:`network` does that). Arrays in, arrays out: the figures are the Wen 2018 job's
(``analyses.jobs.wen2018_figures``), the text embeddings for a semantic similarity come from
``encoders.text``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.stats


__all__ = [
    "CategoryStats", "category_maps", "dprime", "selectivity", "top_categories", "roi_profile",
    "category_similarity", "network", "signed_modularity", "ClusterResult", "cluster_categories",
    "shuffle_similarities", "modularity_pvalue", "fisher_z", "similarity_correlation", "cosine_similarity",
    "layerwise_organisation", "cluster_region", "finer_clusters",
]


# ----------------------------------------------------------------------------- per-category statistics


class CategoryStats:
    """Per-category sums of predicted responses, accumulated batch by batch (float64).

    update(responses (n, n_voxels), labels (n,) ints in [0, n_categories)). Afterwards:
    counts (n_categories,), means (n_categories, n_voxels) — the category maps —, variances
    (sample variance, ddof=1), and :meth:`dprime`. Memory O(n_categories · n_voxels), whatever
    the number of images.
    """

    def __init__(self, n_categories: int, n_voxels: int):
        self.n_categories, self.n_voxels = int(n_categories), int(n_voxels)
        self.count = np.zeros(self.n_categories)
        self.sum = np.zeros((self.n_categories, self.n_voxels))
        self.sumsq = np.zeros((self.n_categories, self.n_voxels))
        self.shift: np.ndarray | None = None  # the first batch's mean, subtracted for conditioning

    @classmethod
    def from_arrays(cls, responses: np.ndarray, labels: np.ndarray, n_categories: int | None = None) -> "CategoryStats":
        responses, labels = _check(responses, labels)
        n_cat = int(labels.max()) + 1 if n_categories is None else int(n_categories)
        stats = cls(n_cat, responses.shape[1])
        stats.update(responses, labels)
        return stats

    def update(self, responses: np.ndarray, labels: np.ndarray) -> "CategoryStats":
        responses, labels = _check(responses, labels)
        if responses.shape[1] != self.n_voxels:
            raise ValueError(f"responses have {responses.shape[1]} voxels, expected {self.n_voxels}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.n_categories):
            raise ValueError(f"labels must lie in [0, {self.n_categories}), got {labels.min()}..{labels.max()}")
        x = responses.astype(np.float64)
        if self.shift is None:
            self.shift = x.mean(0)
        x = x - self.shift
        onehot = np.eye(self.n_categories)[labels]  # (n, C)
        self.count += onehot.sum(0)
        self.sum += onehot.T @ x
        self.sumsq += onehot.T @ (x * x)
        return self

    @property
    def counts(self) -> np.ndarray:
        return self.count.copy()

    @property
    def means(self) -> np.ndarray:
        """Category maps (n_categories, n_voxels): mean predicted response per category (NaN if empty)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sum / self.count[:, None] + self._shift()

    @property
    def variances(self) -> np.ndarray:
        """Sample variance (ddof=1) per category and voxel (n_categories, n_voxels)."""
        return _variance(self.count[:, None], self.sum, self.sumsq)

    def _shift(self) -> np.ndarray:
        return self.shift if self.shift is not None else np.zeros(self.n_voxels)

    def rest(self, members: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pooled statistics of the images of the ``members`` categories and of all the other images:
        ((n_in, mean_in (n_voxels,), var_in (n_voxels,)), (n_out, mean_out, var_out)), var with ddof=1."""
        inside = np.zeros(self.n_categories, bool)
        inside[list(members)] = True
        out = []
        for sel in (inside, ~inside):
            n = self.count[sel].sum()
            s, ss = self.sum[sel].sum(0), self.sumsq[sel].sum(0)
            with np.errstate(invalid="ignore", divide="ignore"):
                out.append((n, s / n + self._shift(), _variance(n, s, ss)))
        return tuple(out)

    def dprime(self) -> np.ndarray:
        """d'_i = (mean_i - mean_rest) / sqrt((var_i + var_rest)/2) per category and voxel, (C, V).

        rest = every image not of category i; sample variances (ddof=1). NaN where both variances are 0.
        """
        out = np.empty((self.n_categories, self.n_voxels))
        for i in range(self.n_categories):
            (_, m_in, v_in), (_, m_out, v_out) = self.rest([i])
            with np.errstate(invalid="ignore", divide="ignore"):
                denom = np.sqrt((v_in + v_out) / 2)
                out[i] = np.where(denom > 0, (m_in - m_out) / np.where(denom > 0, denom, 1), np.nan)
        return out


def _variance(n, s, ss) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        var = (ss - s * s / n) / (n - 1)
    return np.where(np.asarray(n) > 1, np.clip(var, 0, None), np.nan)


def _check(responses, labels) -> tuple[np.ndarray, np.ndarray]:
    responses, labels = np.asarray(responses), np.asarray(labels)
    if responses.ndim != 2 or labels.shape != (responses.shape[0],):
        raise ValueError(f"responses must be (n_images, n_voxels) and labels (n_images,), got "
                         f"{responses.shape} and {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer category codes, got dtype {labels.dtype}")
    return responses, labels.astype(np.int64)


def category_maps(responses: np.ndarray, labels: np.ndarray, n_categories: int | None = None) -> np.ndarray:
    """Mean response per category: responses (n_images, n_voxels), labels (n_images,) -> (n_categories, n_voxels)."""
    return CategoryStats.from_arrays(responses, labels, n_categories).means


def dprime(responses: np.ndarray, labels: np.ndarray, n_categories: int | None = None) -> np.ndarray:
    """Category selectivity d' (Wen 2018 eq. 5): (n_images, n_voxels), (n_images,) -> (n_categories, n_voxels).

    d'_i = (mean_i - mean_rest) / sqrt((var_i + var_rest) / 2), rest = the images of every other
    category, sample variances (ddof=1); NaN where both variances are 0.
    """
    return CategoryStats.from_arrays(responses, labels, n_categories).dprime()


def selectivity(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d (n_categories, n_voxels) -> (max over categories (n_voxels,), the category attaining it (n_voxels,),
    -1 where every d' is NaN)."""
    d = np.asarray(d, dtype=np.float64)
    finite = np.isfinite(d)
    best = np.argmax(np.where(finite, d, -np.inf), axis=0)
    value = np.where(finite.any(0), np.take_along_axis(np.where(finite, d, -np.inf), best[None], 0)[0], np.nan)
    return value, np.where(finite.any(0), best, -1)


def top_categories(values: np.ndarray, k: int = 3) -> np.ndarray:
    """values (n_categories, n_voxels) (d' or maps) -> (n_voxels, k) category indices, best first (NaN last)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(-np.where(np.isfinite(values), values, -np.inf), axis=0, kind="stable")
    return order[:k].T


def roi_profile(values: np.ndarray, rois: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mean of values (n_categories, n_voxels) over each ROI's voxels (NaN-ignoring): {roi: (n_categories,)}."""
    values = np.asarray(values, dtype=np.float64)
    out = {}
    for name, sel in rois.items():
        sel = np.asarray(sel)
        v = values[:, np.flatnonzero(sel) if sel.dtype == bool else sel]
        with np.errstate(invalid="ignore"):
            out[name] = np.array([row[np.isfinite(row)].mean() if np.isfinite(row).any() else np.nan for row in v])
    return out


# ----------------------------------------------------------------------------- similarity and modularity


def category_similarity(maps: np.ndarray, voxels: np.ndarray | None = None) -> np.ndarray:
    """Pearson r between category maps over the chosen voxels: (n_categories, n_voxels) -> (C, C).

    voxels: bool mask or indices (None = all). Voxels with a non-finite value in any map are left out.
    """
    maps = np.asarray(maps, dtype=np.float64)
    if voxels is not None:
        voxels = np.asarray(voxels)
        maps = maps[:, np.flatnonzero(voxels) if voxels.dtype == bool else voxels]
    maps = maps[:, np.isfinite(maps).all(0)]
    if maps.shape[1] < 2:
        raise ValueError(f"category_similarity needs at least 2 voxels with finite maps, got {maps.shape[1]}")
    return np.corrcoef(maps)


def network(similarity: np.ndarray) -> np.ndarray:
    """A similarity matrix as a network without self-loops: a copy with the diagonal set to 0."""
    w = np.array(similarity, dtype=np.float64)
    np.fill_diagonal(w, 0.0)
    return w


def signed_modularity(W: np.ndarray, labels: np.ndarray) -> float:
    """Signed modularity Q = Q+ - Q- of partition ``labels`` of the undirected network W (n, n).

    W+ = max(W, 0), W- = max(-W, 0); Q± = Σ_ij (W±_ij - k±_i k±_j / s±) δ(c_i, c_j) / s±, with
    s± = Σ_ij W±_ij and k±_i = Σ_j W±_ij; a sign without weights contributes 0. Equal to the Brain
    Connectivity Toolbox ``modularity_und_sign(W, labels, qtype="smp")``. W is used as given
    (diagonal included).
    """
    W = np.asarray(W, dtype=np.float64)
    labels = np.asarray(labels)
    if W.ndim != 2 or W.shape[0] != W.shape[1] or labels.shape != (W.shape[0],):
        raise ValueError(f"W must be (n, n) and labels (n,), got {W.shape} and {labels.shape}")
    same = labels[:, None] == labels[None, :]
    q = 0.0
    for sign, part in ((1.0, np.clip(W, 0, None)), (-1.0, np.clip(-W, 0, None))):
        s = part.sum()
        if s > 0:
            k = part.sum(1)
            q += sign * float(((part - np.outer(k, k) / s) * same).sum() / s)
    return q


@dataclass
class ClusterResult:
    """labels (n,) 0-based cluster per node; q: signed modularity; k: number of clusters;
    q_by_k {k: Q of that k's k-means partition}; n_init, seed: the k-means restarts and seed used (the
    modularity null clusters its shuffled networks the same way)."""

    labels: np.ndarray
    q: float
    k: int
    q_by_k: dict[int, float] = field(default_factory=dict)
    n_init: int = 10
    seed: int = 0


def cluster_categories(W: np.ndarray, k_range: Sequence[int] | None = None, seed: int = 0,
                       n_init: int = 10) -> ClusterResult:
    """k-means on the rows of W (each node's similarity profile) for each k in ``k_range``; keeps the
    partition with the highest signed modularity (ties: the smaller k).

    W (n, n) symmetric; k_range defaults to 2..min(n - 1, 10). scikit-learn KMeans(random_state=seed).
    """
    from threadpoolctl import threadpool_limits

    # One thread: on a few shared cores, OpenMP workers spinning beside torch's make KMeans ~20x slower
    # on these tiny matrices.
    with threadpool_limits(1):
        return _cluster(W, k_range, seed, n_init)


def _cluster(W: np.ndarray, k_range: Sequence[int] | None, seed: int, n_init: int) -> ClusterResult:
    from sklearn.cluster import KMeans

    W = np.asarray(W, dtype=np.float64)
    n = W.shape[0]
    ks = list(k_range) if k_range is not None else list(range(2, min(n - 1, 10) + 1))
    ks = [k for k in ks if 2 <= k < n]
    if not ks:
        raise ValueError(f"cluster_categories: no k in {list(k_range or [])} with 2 <= k < n = {n}")
    best: ClusterResult | None = None
    q_by_k = {}
    for k in ks:
        labels = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(W).labels_.astype(np.int64)
        q = signed_modularity(W, labels)
        q_by_k[k] = q
        if best is None or q > best.q + 1e-12:
            best = ClusterResult(_relabel(labels), q, k)
    best.q_by_k, best.n_init, best.seed = q_by_k, int(n_init), int(seed)
    return best


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Clusters numbered in order of first appearance (0 holds node 0): a canonical form."""
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    mapping = np.empty(order.size, np.int64)
    mapping[order] = np.arange(order.size)
    return mapping[np.unique(labels, return_inverse=True)[1]]


def shuffle_similarities(W: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """W with its off-diagonal pairwise values randomly reassigned to pairs (kept symmetric, diagonal kept)."""
    W = np.asarray(W, dtype=np.float64)
    iu = np.triu_indices(W.shape[0], 1)
    out = W.copy()
    vals = rng.permutation(W[iu])
    out[iu] = vals
    out[(iu[1], iu[0])] = vals
    return out


def modularity_pvalue(W: np.ndarray, result: ClusterResult, n_perm: int = 1000, seed: int = 0,
                      recluster: bool = True, k_range: Sequence[int] | None = None,
                      n_init: int | None = None) -> tuple[float, np.ndarray]:
    """Permutation p-value of the clustering's Q against networks with shuffled pairwise similarities.

    W: the (n, n) network the clustering was found on. recluster=True (default): each shuffled
    network is clustered again over the same k (``k_range``, default the k values the observed
    clustering searched, ``result.q_by_k``) and its best Q enters the null, so the null includes the
    choice of partition that made the observed Q large; it is clustered as the observed network was
    (``n_init`` k-means restarts, default ``result.n_init``, with ``seed``): fewer restarts would find
    lower Q on the null networks and make p too small. recluster=False: Q of the fixed partition
    ``result.labels`` on each shuffled network (faster, but anti-conservative for a partition chosen
    on W). Returns (p = (1 + #{Q_null >= Q}) / (1 + n_perm), Q_null (n_perm,)).
    """
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(seed)
    ks = list(k_range) if k_range is not None else (sorted(result.q_by_k) or [result.k])
    n_init = result.n_init if n_init is None else int(n_init)
    null = np.empty(n_perm)
    with threadpool_limits(1):
        for i in range(n_perm):
            shuffled = shuffle_similarities(W, rng)
            if recluster:
                null[i] = _cluster(shuffled, ks, seed, n_init).q
            else:
                null[i] = signed_modularity(shuffled, result.labels)
    return float((1 + np.sum(null >= result.q - 1e-12)) / (1 + n_perm)), null


# ----------------------------------------------------------------------------- semantic similarity


def fisher_z(r: np.ndarray) -> np.ndarray:
    """arctanh(r), with r clipped to ±(1 - 1e-7) so that a diagonal of 1 stays finite."""
    return np.arctanh(np.clip(np.asarray(r, dtype=np.float64), -1 + 1e-7, 1 - 1e-7))


def similarity_correlation(cortical: np.ndarray, semantic: np.ndarray, n_perm: int = 10000, seed: int = 0,
                           fisher: bool = True) -> tuple[float, float]:
    """Pearson r between the upper triangles (diagonal excluded) of two (C, C) similarity matrices, and its
    one-sided permutation p-value.

    The cortical matrix is Fisher z-transformed first (``fisher``). Null: the category labels of the
    cortical matrix are permuted (its rows and columns reordered together) ``n_perm`` times;
    p = (1 + #{r_perm >= r}) / (1 + n_perm).
    """
    a, b = np.asarray(cortical, dtype=np.float64), np.asarray(semantic, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 3:
        raise ValueError(f"two square similarity matrices of the same size >= 3 needed, got {a.shape} and {b.shape}")
    if fisher:
        a = fisher_z(a)
    iu = np.triu_indices(a.shape[0], 1)
    y = b[iu] - b[iu].mean()
    y /= np.linalg.norm(y)

    def corr(x: np.ndarray) -> np.ndarray:  # rows of x against y
        x = x - x.mean(-1, keepdims=True)
        return (x @ y) / np.linalg.norm(x, axis=-1)

    r = float(corr(a[iu][None])[0])
    rng = np.random.default_rng(seed)
    exceed = 0
    for start in range(0, n_perm, 1000):
        perms = np.stack([rng.permutation(a.shape[0]) for _ in range(min(1000, n_perm - start))])
        shuffled = a[perms[:, :, None], perms[:, None, :]]  # (b, C, C)
        exceed += int(np.sum(corr(shuffled[:, iu[0], iu[1]]) >= r - 1e-12))
    return r, float((1 + exceed) / (1 + n_perm))


def cosine_similarity(embeddings: np.ndarray) -> np.ndarray:
    """(n, d) embeddings -> (n, n) cosine similarity."""
    e = np.asarray(embeddings, dtype=np.float64)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    return e @ e.T


# ----------------------------------------------------------------------------- layers and finer scales


def layerwise_organisation(layer_maps: Mapping[str, np.ndarray], labels: np.ndarray,
                           voxels: np.ndarray | None = None) -> dict[str, dict]:
    """Category similarity and the Q of a fixed partition, recomputed from single-layer category maps (Wen Fig. 6).

    layer_maps: {layer: (n_categories, n_voxels) maps predicted with only that layer's features};
    labels (n_categories,): the partition found on the full model. Returns
    {layer: {"similarity": (C, C), "q": signed_modularity(network(similarity), labels)}}.
    """
    out = {}
    for name, maps in layer_maps.items():
        sim = category_similarity(maps, voxels)
        out[name] = {"similarity": sim, "q": signed_modularity(network(sim), labels)}
    return out


def cluster_region(stats: CategoryStats, members: Sequence[int], alpha: float = 0.01,
                   voxels: np.ndarray | None = None) -> np.ndarray:
    """Voxels responding more to the cluster's categories than to all the other images (Wen Fig. 7a).

    One-sided two-sample t-test (equal variances) of the pooled images of ``members`` against the rest,
    Bonferroni-corrected over the tested voxels (``voxels`` mask, default all): p·n_tested < alpha.
    Returns a bool mask (n_voxels,).
    """
    (n1, m1, v1), (n2, m2, v2) = stats.rest(members)
    tested = np.ones(stats.n_voxels, bool) if voxels is None else np.asarray(voxels, bool).copy()
    if n1 < 2 or n2 < 2:
        return np.zeros(stats.n_voxels, bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        t, _ = scipy.stats.ttest_ind_from_stats(m1, np.sqrt(v1), n1, m2, np.sqrt(v2), n2, equal_var=True)
    p = scipy.stats.t.sf(t, n1 + n2 - 2)
    tested &= np.isfinite(p)
    return tested & (p * max(int(tested.sum()), 1) < alpha)


def finer_clusters(stats: CategoryStats, result: ClusterResult, voxels: np.ndarray | None = None,
                   alpha: float = 0.01, seed: int = 0, min_voxels: int = 3) -> list[dict]:
    """Sub-clusters inside each cluster, from the similarity over that cluster's own region (Wen Fig. 7).

    For each cluster of ``result``: region = :func:`cluster_region` (within ``voxels``); similarity of
    the member categories' maps over the region; :func:`cluster_categories` on it. Returns one dict per
    cluster: {"cluster", "members" (category indices), "n_voxels", and, when it has >= 3 members and
    >= min_voxels voxels, "similarity", "labels" (sub-cluster per member), "q", "k"; else "skipped"}.
    """
    maps = stats.means
    out = []
    for c in range(int(result.labels.max()) + 1):
        members = np.flatnonzero(result.labels == c)
        region = cluster_region(stats, members, alpha, voxels)
        entry = {"cluster": c, "members": members.tolist(), "n_voxels": int(region.sum())}
        if members.size < 3:
            entry["skipped"] = f"{members.size} categories: sub-clusters need at least 3"
        elif region.sum() < min_voxels:
            entry["skipped"] = f"{int(region.sum())} voxels in the cluster's region (< {min_voxels})"
        else:
            sim = category_similarity(maps[members], region)
            sub = cluster_categories(network(sim), range(2, members.size), seed=seed)
            entry.update(similarity=sim, labels=sub.labels.tolist(), q=sub.q, k=sub.k)
        out.append(entry)
    return out
