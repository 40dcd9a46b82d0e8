"""CLIP-Dissect for voxels (CLIP-MSM): which concepts each voxel of a CLIP-embedding encoder responds to.

Arrays in, arrays out. ``n_images`` probe images, ``n_units`` units (voxels), ``n_concepts`` concepts:

    Q = LinearActivations(I, W)                  # voxel activations Q = I·Wᵀ (n_images, n_units), lazily
    P = concept_activations(I, T)                # P = norm(I)·norm(T)ᵀ (n_images, n_concepts)
    scores = soft_wpmi(Q, P, a=1)                # (n_units, n_concepts); also wpmi, cos, cos3, rank_reorder
    S = multi_semantic_map(scores)               # (n_concepts, n_units): softmax over concepts per voxel
    labels = hard_labels(scores)                 # (n_units,): CLIP-Dissect's argmax label

I: CLIP image embeddings (n_images, d); W: the encoder's per-voxel weights on that embedding (n_units, d);
T: CLIP text embeddings of the concepts (n_concepts, d). ``activations`` may be an array (n_images, n_units)
or a :class:`LinearActivations`, which computes Q one batch of units at a time.

Every similarity works in batches of units: for a batch of B units it takes each unit's top-k images
(``torch.topk`` over the images) and gathers the (k, B, n_concepts) concept values of those images, so
100k voxels × 10k images × 1000 concepts never needs an n_units × n_images × n_concepts tensor (nor the
whole Q when ``activations`` is a LinearActivations). ``unit_batch=None`` picks B so that the gathered
block holds about 2**24 values. The output (n_units, n_concepts) is the only array of that size.

Formulas (CLIP-Dissect, Oikarinen & Weng 2023, ``similarity.py``; CLIP-MSM used soft_wpmi with a = 1):
    clip = softmax(a·P) over concepts; for unit u with its top-k images top_1..top_k (descending Q),
    p_j = p_start − j/k·(p_start − p_end), j = 0..k−1;
    soft_wpmi: log p(d|e) = Σ_j log(1 + p_j·(clip[top_j] − 1) + min_prob)
    wpmi:      log p(d|e) = Σ_j log(clip[top_j] + min_prob)
    log p(d) = logsumexp over units of log p(d|e) − log(n_units);  score = log p(d|e) − λ·log p(d)
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

__all__ = [
    "LinearActivations", "raw_space_weights", "concept_activations", "soft_wpmi", "wpmi", "cos_similarity",
    "cos3_similarity", "rank_reorder", "SIMILARITIES", "similarity", "multi_semantic_map", "hard_labels",
    "hard_label_maps", "label_histograms", "map_correlations", "mean_activation", "top_images",
]

GATHER_BUDGET = 2 ** 24  # values in one unit batch's gathered (k, B, n_concepts) block


# ----------------------------------------------------------------------------- activations


def _dtype(*items) -> torch.dtype:
    """float64 when any input (an array or a dtype) is float64, else float32."""
    for item in items:
        dtype = getattr(item, "dtype", item)
        if dtype is torch.float64 or (isinstance(dtype, np.dtype) and dtype == np.float64):
            return torch.float64
    return torch.float32


def _tensor(a, device, dtype) -> torch.Tensor:
    t = a if torch.is_tensor(a) else torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device=device, dtype=dtype)


class LinearActivations:
    """Voxel activations Q = I·Wᵀ without the bias (CLIP-MSM), computed per batch of units.

    image_emb: (n_images, d) image embeddings; weights: (n_units, d) per-unit weights on them.
    ``shape`` is (n_images, n_units); ``columns(start, stop)`` returns Q[:, start:stop].
    """

    def __init__(self, image_emb, weights):
        self.image_emb, self.weights = image_emb, weights
        if np.ndim(image_emb) != 2 or np.ndim(weights) != 2 or image_emb.shape[1] != weights.shape[1]:
            raise ValueError(f"image embeddings (n_images, d) and weights (n_units, d) must share d, got "
                             f"{tuple(image_emb.shape)} and {tuple(weights.shape)}")
        self.shape = (int(image_emb.shape[0]), int(weights.shape[0]))
        self.dtype = image_emb.dtype
        self._images: dict = {}  # (device, dtype) -> I as a tensor there, converted once

    def columns(self, start: int, stop: int, device=None, dtype=torch.float32) -> torch.Tensor:
        key = (str(device), dtype)
        if key not in self._images:
            self._images = {key: _tensor(self.image_emb, device, dtype)}
        return self._images[key] @ _tensor(self.weights[start:stop], device, dtype).T

    def mean_column(self, units: np.ndarray) -> np.ndarray:
        """Mean activation over ``units`` (bool mask or indices) per image: (n_images,) = I·mean(W[units])."""
        w = np.asarray(self.weights, dtype=np.float64)[units].mean(axis=0)
        return np.asarray(self.image_emb, dtype=np.float64) @ w


def raw_space_weights(weight: np.ndarray, feature_std: np.ndarray) -> np.ndarray:
    """Head weights on standardised features -> weights on the raw features.

    A head predicts ŷ = ((x − μ)/σ)·Wᵀ + b = x·(W/σ)ᵀ + (b − (μ/σ)·Wᵀ); W/σ (per feature column) maps the
    raw embedding x to the voxel's response up to a per-voxel constant, so Q = I·(W/σ)ᵀ is CLIP-MSM's
    I·Wᵀ for a ridge fit on standardised embeddings. weight (n_units, d), feature_std (d,).
    """
    weight, feature_std = np.asarray(weight, dtype=np.float64), np.asarray(feature_std, dtype=np.float64)
    if weight.ndim != 2 or feature_std.shape != (weight.shape[1],):
        raise ValueError(f"weight (n_units, d) and feature_std (d,) do not match: {weight.shape}, {feature_std.shape}")
    return weight / feature_std[None, :]


def concept_activations(image_emb, text_emb) -> np.ndarray:
    """P = norm(I)·norm(T)ᵀ: cosine of each image with each concept, (n_images, n_concepts) float32.

    image_emb (n_images, d), text_emb (n_concepts, d): CLIP image and text embeddings of the same model.
    """
    I, T = np.asarray(image_emb, dtype=np.float64), np.asarray(text_emb, dtype=np.float64)
    if I.ndim != 2 or T.ndim != 2 or I.shape[1] != T.shape[1]:
        raise ValueError(f"image embeddings (n_images, d) and concept embeddings (n_concepts, d) must share d, "
                         f"got {I.shape} and {T.shape}")
    I = I / np.linalg.norm(I, axis=1, keepdims=True)
    T = T / np.linalg.norm(T, axis=1, keepdims=True)
    return (I @ T.T).astype(np.float32)


def _shape(activations) -> tuple[int, int]:
    if isinstance(activations, LinearActivations):
        return activations.shape
    if np.ndim(activations) != 2:
        raise ValueError(f"activations must be (n_images, n_units), got shape {tuple(np.shape(activations))}")
    return tuple(int(s) for s in activations.shape)


def _columns(activations, start: int, stop: int, device, dtype) -> torch.Tensor:
    if isinstance(activations, LinearActivations):
        return activations.columns(start, stop, device, dtype)
    return _tensor(activations[:, start:stop], device, dtype)


def _check_pair(activations, concept_sim) -> tuple[int, int, int]:
    n_images, n_units = _shape(activations)
    if np.ndim(concept_sim) != 2 or concept_sim.shape[0] != n_images:
        raise ValueError(f"concept_sim must be (n_images={n_images}, n_concepts), got {tuple(np.shape(concept_sim))}")
    if n_units == 0 or concept_sim.shape[1] == 0:
        raise ValueError(f"need at least one unit and one concept, got {n_units} and {concept_sim.shape[1]}")
    return n_images, n_units, int(concept_sim.shape[1])


def _batches(n_units: int, per_unit: int, unit_batch: int | None):
    size = unit_batch or max(1, GATHER_BUDGET // max(per_unit, 1))
    for start in range(0, n_units, size):
        yield start, min(start + size, n_units)


def _check_k(k: int, n_images: int, what: str) -> int:
    k = int(k)
    if not 1 <= k <= n_images:
        raise ValueError(f"{what}={k} must lie in [1, n_images={n_images}] (fewer probe images than top-k?)")
    return k


# ----------------------------------------------------------------------------- similarities


def _log_p_given_e(activations, concept_sim, top_k: int, a: float, prob_fn, unit_batch: int | None,
                   device) -> torch.Tensor:
    """Σ_j log(prob_fn(clip[top_j], k)) per unit and concept: (n_units, n_concepts). prob_fn may work in place
    on the gathered (k, B, n_concepts) block (a fresh tensor), so one such block is the only temporary."""
    n_images, n_units, n_concepts = _check_pair(activations, concept_sim)
    k = _check_k(top_k, n_images, "top_k")
    dtype = _dtype(concept_sim, getattr(activations, "dtype", None))
    clip = torch.softmax(a * _tensor(concept_sim, device, dtype), dim=1)  # (n_images, n_concepts)
    out = torch.empty(n_units, n_concepts, dtype=dtype, device=device)
    for start, stop in _batches(n_units, k * n_concepts, unit_batch):
        idx = torch.topk(_columns(activations, start, stop, device, dtype), k, dim=0).indices  # (k, B)
        gathered = clip[idx]  # (k, B, n_concepts), a copy
        out[start:stop] = prob_fn(gathered, k).log_().sum(dim=0)
    return out


def _pmi(log_pde: torch.Tensor, lam: float) -> np.ndarray:
    log_pd = torch.logsumexp(log_pde, dim=0, keepdim=True) - math.log(log_pde.shape[0])
    return (log_pde - lam * log_pd).cpu().numpy()


def soft_wpmi(activations, concept_sim, top_k: int = 100, a: float = 10.0, lam: float = 1.0,
              p_start: float = 0.998, p_end: float = 0.97, min_prob: float = 1e-7,
              unit_batch: int | None = None, device: str | torch.device | None = None) -> np.ndarray:
    """SoftWPMI scores (n_units, n_concepts) of activations Q (n_images, n_units) against concept
    similarities P (n_images, n_concepts) (the formula in the module docstring; CLIP-MSM: a=1).

    float64 inputs are computed in float64, others in float32.
    """
    def soft(gathered, k):  # 1 + p_j·(clip − 1) + min_prob, in place
        j = torch.arange(k, dtype=gathered.dtype, device=gathered.device)
        p = (p_start - j / k * (p_start - p_end))[:, None, None]
        return gathered.sub_(1).mul_(p).add_(1 + min_prob)

    return _pmi(_log_p_given_e(activations, concept_sim, top_k, a, soft, unit_batch, device), lam)


def wpmi(activations, concept_sim, top_k: int = 28, a: float = 2.0, lam: float = 0.6, min_prob: float = 1e-7,
         unit_batch: int | None = None, device: str | torch.device | None = None) -> np.ndarray:
    """WPMI scores (n_units, n_concepts): log p(d|e) = Σ_j log(clip[top_j] + min_prob) (CLIP-Dissect's
    defaults top_k 28, a 2, λ 0.6)."""
    return _pmi(_log_p_given_e(activations, concept_sim, top_k, a, lambda g, k: g.add_(min_prob), unit_batch,
                               device), lam)


def cos_similarity(activations, concept_sim, unit_batch: int | None = None,
                   device: str | torch.device | None = None) -> np.ndarray:
    """Cosine between each unit's activations and each concept's P column over the images: (n_units, n_concepts)."""
    n_images, n_units, n_concepts = _check_pair(activations, concept_sim)
    dtype = _dtype(concept_sim, getattr(activations, "dtype", None))
    P = _tensor(concept_sim, device, dtype)
    P = P / P.norm(dim=0, keepdim=True)
    out = torch.empty(n_units, n_concepts, dtype=dtype, device=device)
    for start, stop in _batches(n_units, n_images, unit_batch):
        Q = _columns(activations, start, stop, device, dtype)
        out[start:stop] = (Q / Q.norm(dim=0, keepdim=True)).T @ P
    return out.cpu().numpy()


def cos3_similarity(activations, concept_sim, min_norm: float = 1e-3, unit_batch: int | None = None,
                    device: str | torch.device | None = None) -> np.ndarray:
    """CLIP-Dissect's cos³: centre each column over the images, cube, normalise (norm floored at min_norm),
    then the cosine: (n_units, n_concepts)."""
    n_images, n_units, n_concepts = _check_pair(activations, concept_sim)
    dtype = _dtype(concept_sim, getattr(activations, "dtype", None))

    def prep(x):
        x = (x - x.mean(dim=0, keepdim=True)) ** 3
        return x / x.norm(dim=0, keepdim=True).clamp(min=min_norm)

    P = prep(_tensor(concept_sim, device, dtype))
    out = torch.empty(n_units, n_concepts, dtype=dtype, device=device)
    for start, stop in _batches(n_units, n_images, unit_batch):
        out[start:stop] = prep(_columns(activations, start, stop, device, dtype)).T @ P
    return out.cpu().numpy()


def rank_reorder(activations, concept_sim, p: float = 3.0, top_fraction: float = 0.05, scale_p: float = 0.5,
                 seed: int = 0, unit_batch: int | None = None, device: str | torch.device | None = None) -> np.ndarray:
    """CLIP-Dissect's rank reorder: (n_units, n_concepts), higher = better.

    For a unit, take its top n = ⌊top_fraction·n_images⌋ images (activations a_1 ≥ … ≥ a_n); give each image
    the activation of its rank by P (within those images) instead; error = mean |a − reordered|^p divided by
    the same error for 5 random orders; score = −error / mean(P over those images)^scale_p.
    The random orders come from ``seed``.
    """
    n_images, n_units, n_concepts = _check_pair(activations, concept_sim)
    top_n = _check_k(int(n_images * top_fraction), n_images, f"int(n_images*top_fraction={top_fraction})")
    dtype = _dtype(concept_sim, getattr(activations, "dtype", None))
    P = _tensor(concept_sim, device, dtype)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    out = torch.empty(n_units, n_concepts, dtype=dtype, device=device)
    for start, stop in _batches(n_units, 3 * top_n * n_concepts, unit_batch):
        values, idx = torch.topk(_columns(activations, start, stop, device, dtype), top_n, dim=0)  # (n, B)
        clip_top = P[idx]  # (n, B, C)
        avg_clip = clip_top.mean(dim=0)  # (B, C)
        ranks = clip_top.argsort(dim=0).argsort(dim=0)  # rank 0 = lowest P among the unit's top images
        ascending = values.flip(0)  # (n, B)
        B = stop - start
        reorg = torch.gather(ascending[:, :, None].expand(-1, -1, n_concepts), 0, ranks)
        err = (values[:, :, None] - reorg).abs().pow(p).mean(dim=0)  # (B, C)
        perms = torch.rand(B, 5, top_n, generator=gen).argsort(dim=-1).to(device)  # 5 random orders per unit
        shuffled = torch.gather(ascending.T[:, None, :].expand(-1, 5, -1), 2, perms)  # (B, 5, n)
        baseline = (ascending.T[:, None, :] - shuffled).abs().pow(p).mean(dim=(1, 2))  # (B,)
        out[start:stop] = -(err / baseline[:, None]) / avg_clip ** scale_p
    return out.cpu().numpy()


SIMILARITIES = {"soft_wpmi": soft_wpmi, "wpmi": wpmi, "cos": cos_similarity, "cos3": cos3_similarity,
                "rank": rank_reorder}


def similarity(name: str, activations, concept_sim, **kwargs) -> np.ndarray:
    """Scores (n_units, n_concepts) by the similarity ``name`` (a key of SIMILARITIES) with its kwargs."""
    if name not in SIMILARITIES:
        raise ValueError(f"unknown similarity {name!r}; valid: {', '.join(SIMILARITIES)}")
    return SIMILARITIES[name](activations, concept_sim, **kwargs)


# ----------------------------------------------------------------------------- maps and labels


def multi_semantic_map(scores: np.ndarray) -> np.ndarray:
    """S (n_concepts, n_units): softmax over the concepts of each unit's scores (n_units, n_concepts);
    every column sums to 1."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (n_units, n_concepts), got shape {scores.shape}")
    e = scores.astype(np.float32 if scores.dtype == np.float32 else np.float64, copy=True)  # the one copy
    e -= e.max(axis=1, keepdims=True)
    np.exp(e, out=e)
    e /= e.sum(axis=1, keepdims=True)
    return e.T


def hard_labels(scores: np.ndarray) -> np.ndarray:
    """CLIP-Dissect's label: the best-scoring concept of each unit, (n_units,) int64."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (n_units, n_concepts), got shape {scores.shape}")
    return np.argmax(np.nan_to_num(scores, nan=-np.inf), axis=1).astype(np.int64)


def hard_label_maps(labels: np.ndarray, n_concepts: int) -> np.ndarray:
    """One-hot maps (n_concepts, n_units): 1 where the unit's hard label is the concept (CLIP-Dissect's map)."""
    labels = np.asarray(labels, dtype=np.int64)
    return (labels[None, :] == np.arange(n_concepts)[:, None]).astype(np.float64)


def label_histograms(labels: np.ndarray, rois: Mapping[str, np.ndarray], n_concepts: int) -> dict[str, np.ndarray]:
    """{roi: counts (n_concepts,)} of the hard labels of each ROI's units (bool masks (n_units,))."""
    labels = np.asarray(labels, dtype=np.int64)
    return {name: np.bincount(labels[np.asarray(mask, bool)], minlength=n_concepts) for name, mask in rois.items()}


def map_correlations(maps: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Pearson r of each concept's map with its ground-truth map over the units: (n_concepts,).

    maps, truth: (n_concepts, n_units) (a truth row of NaN = no ground truth: r NaN); mask: (n_units,) bool,
    units to use. Per concept only units finite in both rows count; r is NaN with < 3 of them or a constant row.
    """
    maps, truth = np.asarray(maps, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if maps.shape != truth.shape or maps.ndim != 2:
        raise ValueError(f"maps and truth must both be (n_concepts, n_units), got {maps.shape} and {truth.shape}")
    sel = np.ones(maps.shape[1], bool) if mask is None else np.asarray(mask, bool)
    out = np.full(maps.shape[0], np.nan)
    for c in range(maps.shape[0]):
        ok = sel & np.isfinite(maps[c]) & np.isfinite(truth[c])
        x, y = maps[c, ok], truth[c, ok]
        if ok.sum() >= 3 and x.std() > 0 and y.std() > 0:
            out[c] = float(np.corrcoef(x, y)[0, 1])
    return out


def mean_activation(activations, units: np.ndarray) -> np.ndarray:
    """Mean activation per image over the units (bool mask or indices): (n_images,) float64."""
    if isinstance(activations, LinearActivations):
        return activations.mean_column(units)
    return np.asarray(activations, dtype=np.float64)[:, units].mean(axis=1)


def top_images(activations, units: np.ndarray, k: int = 3) -> np.ndarray:
    """Indices (k,) of the probe images with the highest mean activation over ``units``, best first."""
    mean = mean_activation(activations, units)
    k = min(int(k), len(mean))
    return np.argsort(-mean, kind="stable")[:k]

