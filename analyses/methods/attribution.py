"""Dense attribution (BrainSAIL): relevance maps, image-property correlates, encoder agreement, caption probes.

Arrays in, arrays out (no Hydra, no files); ``analyses/jobs/brainsail.py`` drives it over a run directory.
Caption embeddings come from ``encoders.text.TextEncoder``.

    cols, A = roi_columns({"FFA-1": mask, ...}, voxels=[12])        # A (n_voxels, R): ROI means, single voxels
    readout = Readout(trained_encoder, A)                          # patch features (m, d) -> (m, R)
    maps = relevance_maps(distilled, readout)                      # (n, h, w, d) -> (n, R, h, w)
    r_lum = pixel_correlation(upsample(maps, 224), luminance(display_images))   # (n, R)
    summarize(r_lum)                                               # per column: mean, se, t, p, n
    r_caps = map_correlation(maps, caption_maps(distilled, text))  # (n, R, C)

The relevance of a patch for a column is the trained head's prediction from that patch's feature, as for
an image feature: the patch feature goes through the run's saved feature transform (its standardisation;
for a video run first its frame z-score and PCA), the head is applied, and the voxels averaged over the
ROI (linear heads: the ROI-mean weights; other heads: the predictions).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F

from encoders.heads import LinearHead, RidgeHead

__all__ = ["roi_columns", "Readout", "relevance_maps", "upsample", "luminance", "saturation",
           "pixel_correlation", "map_correlation", "pearson_rows", "summarize", "caption_maps",
           "assign_categories", "check_embedding_run"]


# ----------------------------------------------------------------------------- the head on every patch


def check_embedding_run(encoder) -> None:
    """ValueError (one line) unless the run's head reads exactly the backbone's image embedding.

    Dense patch features live in the embedding space, so the head applies to them (through the run's
    saved feature transform) only when the run was trained on that layer alone (``backbone.layers=[embed]``).
    """
    from encoders.backbones import EMBED

    layers = list(encoder.backbone.layers)
    if layers != [EMBED] or not encoder.predicts_images:
        raise ValueError(f"{encoder.run_dir}: BrainSAIL needs a run trained on the image embedding alone "
                         f"(backbone.layers=[{EMBED}]); this run used layers {layers}"
                         + ("" if encoder.predicts_images else " with transformed features it cannot map images to"))


def roi_columns(rois: Mapping[str, np.ndarray], voxels: Sequence[int] = ()) -> tuple[list[str], np.ndarray]:
    """Columns to map: ROI means and single voxels -> (names, A (n_voxels, R) float32).

    rois: {name: bool mask (n_voxels,)}; empty ROIs are left out. voxels: voxel indices, named ``voxel<i>``.
    """
    masks = {k: np.asarray(v, bool) for k, v in rois.items()}
    sizes = {len(m) for m in masks.values()}
    if len(sizes) > 1:
        raise ValueError(f"ROI masks differ in length: {sorted(sizes)}")
    n_vox = sizes.pop() if sizes else None
    names, cols = [], []
    for name, m in masks.items():
        if m.any():
            names.append(name)
            cols.append(m / m.sum())
    for v in voxels:
        if n_vox is None:
            raise ValueError("single voxels need the voxel count (give at least one ROI mask)")
        if not 0 <= int(v) < n_vox:
            raise ValueError(f"voxel index {v} out of range (the run has {n_vox} voxels)")
        col = np.zeros(n_vox)
        col[int(v)] = 1.0
        names.append(f"voxel{int(v)}")
        cols.append(col)
    if not cols:
        raise ValueError("no ROI with voxels and no voxel to map")
    return names, np.stack(cols, axis=1).astype(np.float32)


def _linear_head(head) -> tuple[torch.Tensor, torch.Tensor] | None:
    if isinstance(head, LinearHead):
        return head.linear.weight, head.linear.bias
    if isinstance(head, RidgeHead):
        return head.weight, head.bias
    return None


class Readout:
    """The run's standardisation + head + column averaging: patch features (m, d) -> (m, R) float32.

    encoder: a TrainedEncoder (encoders.trained). columns: (n_voxels, R) from ``roi_columns``.
    Linear heads (LinearHead, RidgeHead) collapse to the column-averaged weights (R, d); any other head
    predicts every voxel in chunks of at most ``max_elements`` (rows × voxels) and is then averaged.
    """

    def __init__(self, encoder, columns: np.ndarray, max_elements: int = 1 << 23):
        self.encoder = encoder
        self.columns = torch.as_tensor(np.asarray(columns, np.float32))
        if self.columns.shape[0] != encoder.n_voxels:
            raise ValueError(f"columns have {self.columns.shape[0]} rows, the run has {encoder.n_voxels} voxels")
        lin = _linear_head(encoder.model.head)
        if lin is not None:
            w, b = (t.detach().float().cpu() for t in lin)
            self.weight = self.columns.T @ w      # (R, d)
            self.bias = self.columns.T @ b        # (R,)
        else:
            self.weight = self.bias = None
        self.chunk = max(1, int(max_elements) // max(1, encoder.n_voxels))

    def __call__(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """features (m, d) -> (m, R) float32."""
        z = torch.as_tensor(self.encoder.head_inputs(features))
        if self.weight is not None:
            return (z @ self.weight.T + self.bias).numpy()
        out = [torch.as_tensor(self.encoder.predict_standardised(z[i:i + self.chunk])) @ self.columns
               for i in range(0, len(z), self.chunk)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.columns.shape[1]), np.float32)


def relevance_maps(features: np.ndarray | torch.Tensor, readout) -> np.ndarray:
    """Distilled dense features (n, h, w, d) -> relevance maps (n, R, h, w) float32 (readout per patch)."""
    f = torch.as_tensor(features).float().cpu()
    n, h, w, d = f.shape
    out = np.asarray(readout(f.reshape(n * h * w, d)), np.float32)
    return out.reshape(n, h, w, -1).transpose(0, 3, 1, 2).copy()


def upsample(maps: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(n, R, h, w) -> (n, R, H, W) float32, bilinear (pixel centres aligned, align_corners=False)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    t = torch.as_tensor(np.asarray(maps, np.float32))
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False).numpy()


# ----------------------------------------------------------------------------- image properties


def luminance(images: np.ndarray) -> np.ndarray:
    """uint8 RGB (n, H, W, 3) -> relative luminance (n, H, W) in [0, 1]: sRGB linearised, Rec. 709 weights."""
    c = np.asarray(images, np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return lin @ np.array([0.2126, 0.7152, 0.0722])


def saturation(images: np.ndarray) -> np.ndarray:
    """uint8 RGB (n, H, W, 3) -> HSV saturation (n, H, W) in [0, 1] (matplotlib.colors.rgb_to_hsv)."""
    from matplotlib.colors import rgb_to_hsv

    return rgb_to_hsv(np.asarray(images, np.float64) / 255.0)[..., 1]


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r along the last axis of broadcastable a, b (float64); NaN where either is constant."""
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    num = (a * b).sum(-1)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    return np.where(den > 1e-12 * np.maximum(1.0, np.abs(num)), r, np.nan)


def pixel_correlation(maps: np.ndarray, prop: np.ndarray) -> np.ndarray:
    """Per image and column, Pearson r over pixels of maps (n, R, H, W) with a property (n, H, W) -> (n, R)."""
    maps, prop = np.asarray(maps, np.float64), np.asarray(prop, np.float64)
    if maps.shape[0] != prop.shape[0] or maps.shape[2:] != prop.shape[1:]:
        raise ValueError(f"maps {maps.shape} and property {prop.shape} do not match")
    n, R = maps.shape[:2]
    return pearson_rows(maps.reshape(n, R, -1), prop.reshape(n, 1, -1))


def map_correlation(maps: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Pearson r over positions between every column of maps (n, R, h, w) and every map of others
    (n, C, h, w) of the same image -> (n, R, C)."""
    maps, others = np.asarray(maps, np.float64), np.asarray(others, np.float64)
    if maps.shape[0] != others.shape[0] or maps.shape[2:] != others.shape[2:]:
        raise ValueError(f"maps {maps.shape} and {others.shape} do not match")
    n, R = maps.shape[:2]
    C = others.shape[1]
    return pearson_rows(maps.reshape(n, R, 1, -1), others.reshape(n, 1, C, -1))


def summarize(r: np.ndarray) -> list[dict]:
    """Per column of r (n_images, R): mean r, its standard error, one-sample t-test against 0 over images
    (scipy.stats.ttest_1samp, two-sided), and n; NaN images (constant maps) are left out."""
    out = []
    for col in np.asarray(r, np.float64).T:
        v = col[np.isfinite(col)]
        if len(v) >= 2:
            with warnings.catch_warnings():  # identical values (e.g. an encoder compared with itself)
                warnings.simplefilter("ignore", RuntimeWarning)
                t, p = scipy.stats.ttest_1samp(v, 0.0)
            se = float(v.std(ddof=1) / np.sqrt(len(v)))
        else:
            t = p = se = float("nan")
        out.append({"mean": float(v.mean()) if len(v) else float("nan"), "se": se, "t": float(t),
                    "p": float(p), "n": int(len(v))})
    return out


# ----------------------------------------------------------------------------- caption probes


def caption_maps(features: np.ndarray | torch.Tensor, text: np.ndarray) -> np.ndarray:
    """Cosine similarity of every patch feature (n, h, w, e) with every caption embedding (C, e) -> (n, C, h, w)."""
    f = F.normalize(torch.as_tensor(features).float().cpu(), dim=-1)
    t = F.normalize(torch.as_tensor(np.asarray(text, np.float32)), dim=-1)
    return torch.einsum("nhwe,ce->nchw", f, t).numpy()


def assign_categories(r: np.ndarray, caption_category: np.ndarray, n_categories: int) -> tuple[np.ndarray, np.ndarray]:
    """Caption correlations r (n, R, C) -> (category of the best caption (n, R) int64, -1 when all NaN;
    best r per category (n, R, K)). caption_category: (C,) category index of each caption."""
    r = np.asarray(r, np.float64)
    cat = np.asarray(caption_category, np.int64)
    best = np.full(r.shape[:2] + (n_categories,), np.nan)
    for k in range(n_categories):
        sel = r[..., cat == k]
        if sel.shape[-1]:
            with np.errstate(all="ignore"):
                ok = np.isfinite(sel).any(-1)
                best[..., k] = np.where(ok, np.nanmax(np.where(np.isfinite(sel), sel, -np.inf), axis=-1), np.nan)
    finite = np.isfinite(best).any(-1)
    winner = np.where(finite, np.argmax(np.where(np.isfinite(best), best, -np.inf), axis=-1), -1)
    return winner.astype(np.int64), best
