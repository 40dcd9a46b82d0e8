"""Per-voxel accuracy over a whole split: Pearson r, R² and noise-ceiling-normalised R².

Scores are accumulated from sufficient statistics in float64, so a split can be fed in
any number of batches (and, under DDP, summed across ranks by torchmetrics) and still
give exactly the whole-split correlation — never an average of per-batch scores.
"""
from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric


class VoxelScores(Metric):
    """Accumulates per-voxel sums over batches; ``compute()`` gives whole-split scores.

    update(pred, target): pred, target (n_samples, n_voxels).
    compute() -> dict with "r" and "r2", each a float64 tensor (n_voxels,). Voxels with a
    constant prediction or target get NaN r (and NaN R² for a constant target).
    voxel_batch: update() works through the voxels in chunks of this many, so its float64
    temporaries stay at ~5·n_samples·voxel_batch·8 bytes whatever n_voxels is. The state itself
    is 6 float64 sums per voxel (48 bytes; 0.48 MB per 10k voxels).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, n_voxels: int, voxel_batch: int = 16384, **kwargs):
        super().__init__(**kwargs)
        if voxel_batch < 1:
            raise ValueError(f"VoxelScores: voxel_batch must be >= 1, got {voxel_batch}")
        self.n_voxels = n_voxels
        self.voxel_batch = int(voxel_batch)
        for name in ("sum_p", "sum_t", "sum_pp", "sum_tt", "sum_pt", "sum_res"):
            self.add_state(name, default=torch.zeros(n_voxels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape or pred.ndim != 2 or pred.shape[1] != self.n_voxels:
            raise ValueError(f"VoxelScores expects pred and target of shape (n, {self.n_voxels}), "
                             f"got {tuple(pred.shape)} and {tuple(target.shape)}")
        for start in range(0, self.n_voxels, self.voxel_batch):
            sl = slice(start, start + self.voxel_batch)
            p = pred.detach()[:, sl].to(torch.float64)
            t = target.detach()[:, sl].to(torch.float64)
            self.sum_p[sl] += p.sum(0)
            self.sum_t[sl] += t.sum(0)
            self.sum_pp[sl] += (p * p).sum(0)
            self.sum_tt[sl] += (t * t).sum(0)
            self.sum_pt[sl] += (p * t).sum(0)
            self.sum_res[sl] += ((t - p) ** 2).sum(0)
        self.n += pred.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        return scores_from_sums(self.n, self.sum_p, self.sum_t, self.sum_pp, self.sum_tt,
                                self.sum_pt, self.sum_res)


def scores_from_sums(n, sum_p, sum_t, sum_pp, sum_tt, sum_pt, sum_res) -> dict[str, torch.Tensor]:
    """Pearson r and R² per voxel from float64 sums (each (n_voxels,), n a scalar)."""
    cov = sum_pt - sum_p * sum_t / n
    var_p = sum_pp - sum_p ** 2 / n
    var_t = sum_tt - sum_t ** 2 / n
    # Relative tolerance: a column whose variance is rounding noise is constant.
    tiny_p = var_p <= 1e-12 * torch.clamp(sum_pp, min=1e-300)
    tiny_t = var_t <= 1e-12 * torch.clamp(sum_tt, min=1e-300)
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=cov.device)
    r = torch.where(tiny_p | tiny_t, nan, cov / torch.sqrt(var_p.clamp(min=0) * var_t.clamp(min=0)))
    r2 = torch.where(tiny_t, nan, 1.0 - sum_res / var_t)
    return {"r": r, "r2": r2}


def pearson_r(pred: np.ndarray | torch.Tensor, true: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per-column Pearson r: pred, true (n_samples, n_voxels) -> (n_voxels,) float64 (NaN if constant)."""
    return _scores(pred, true)["r"]


def r2_score(pred: np.ndarray | torch.Tensor, true: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per-column coefficient of determination 1 - SS_res/SS_tot: (n_samples, n_voxels) -> (n_voxels,)."""
    return _scores(pred, true)["r2"]


def _scores(pred, true, voxel_batch: int = 8192) -> dict[str, np.ndarray]:
    """r and R² per column, in batches of columns so float64 copies stay small at 100k+ voxels."""
    pred_t = torch.as_tensor(np.asarray(pred) if not torch.is_tensor(pred) else pred)
    true_t = torch.as_tensor(np.asarray(true) if not torch.is_tensor(true) else true)
    if pred_t.ndim == 1:
        pred_t, true_t = pred_t[:, None], true_t[:, None]
    if pred_t.shape != true_t.shape:
        raise ValueError(f"pred {tuple(pred_t.shape)} and true {tuple(true_t.shape)} must have the same shape")
    out: dict[str, list[np.ndarray]] = {"r": [], "r2": []}
    for start in range(0, pred_t.shape[1], voxel_batch):
        sl = slice(start, start + voxel_batch)
        metric = VoxelScores(pred_t[:, sl].shape[1], sync_on_compute=False)  # local arrays: never gathered
        metric.update(pred_t[:, sl], true_t[:, sl])
        for k, v in metric.compute().items():
            out[k].append(v.cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def noise_ceiling_k(n_repeats: np.ndarray) -> float:
    """NSD's k for a test set whose images are averages of n_repeats[i] trials.

    k = (A/3 + B/2 + C/1) / (A + B + C) in general form: mean over images of 1/n_repeats.
    """
    n_repeats = np.asarray(n_repeats, dtype=np.float64)
    if n_repeats.size == 0 or np.any(n_repeats < 1):
        raise ValueError("noise_ceiling_k: every test image needs at least one trial")
    return float(np.mean(1.0 / n_repeats))


def noise_ceiling(ncsnr: np.ndarray, k: float) -> np.ndarray:
    """Noise ceiling in % of explainable variance: NC = 100·ncsnr²/(ncsnr² + k), shape of ncsnr."""
    ncsnr = np.asarray(ncsnr, dtype=np.float64)
    return 100.0 * ncsnr ** 2 / (ncsnr ** 2 + k)


def nc_normalised_r2(r2: np.ndarray, nc_percent: np.ndarray) -> np.ndarray:
    """R² divided by the attainable R² (NC/100); NaN where the ceiling is 0."""
    nc = np.asarray(nc_percent, dtype=np.float64) / 100.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(nc > 0, np.asarray(r2, dtype=np.float64) / nc, np.nan)


# Voxels whose noise ceiling (% of explainable variance) exceeds this form the "reliable" set of the summaries:
# NC-R² = R²/(NC/100) turns test-set noise in R² into noise / (NC/100), so a voxel at NC 0.5 % turns R² ±0.02
# into ±4 and a handful of them can move a mean over thousands. At 10 % a voxel's R² noise is scaled by at
# most 10; for NSD's 3-trial averages (k = 1/3) NC > 10 % is ncsnr > 0.19 (config: metrics.nc_threshold).
NC_THRESHOLD = 10.0


def summarize(r: np.ndarray, r2: np.ndarray, nc_r2: np.ndarray | None,
              rois: dict[str, np.ndarray] | None = None, nc: np.ndarray | None = None,
              nc_threshold: float = NC_THRESHOLD) -> dict:
    """The documented metrics.json block for one split.

    r, r2, nc_r2, nc (noise ceiling, % of variance): (n_voxels,); rois: name -> bool mask or index array
    over the same voxels. Returns, overall and per ROI (``"rois": {name: {...}}``):

    - ``<m>_mean``, ``<m>_median`` for m in r, r2, nc_r2: over the voxels where m is finite;
    - ``<m>_mean_reliable``: the mean over the voxels whose noise ceiling exceeds ``nc_threshold`` (%),
      ``n_reliable`` their count (None for both without ``nc``);
    - ``n_voxels``, ``n_nan`` (voxels whose r is NaN: constant prediction or response);

    and ``nc_threshold`` at the top. The median and the reliable mean are the headline numbers: the plain
    mean of NC-R² can be dominated by a few voxels with a near-zero noise ceiling.
    """
    reliable = None
    if nc is not None:
        with np.errstate(invalid="ignore"):
            reliable = np.asarray(nc, dtype=np.float64) > float(nc_threshold)
    out = _block(r, r2, nc_r2, np.arange(len(r)), reliable)
    out["nc_threshold"] = float(nc_threshold)
    out["rois"] = {}
    for name, sel in (rois or {}).items():
        sel = np.asarray(sel)
        idx = np.flatnonzero(sel) if sel.dtype == bool else sel
        if idx.size:
            out["rois"][name] = _block(r, r2, nc_r2, idx, reliable)
    return out


def _mean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def _median(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else float("nan")


def _block(r, r2, nc_r2, sel: np.ndarray, reliable: np.ndarray | None) -> dict:
    """The summaries over the voxels at index array sel (``reliable``: bool over all voxels, or None)."""
    values = {"r": np.asarray(r, np.float64)[sel], "r2": np.asarray(r2, np.float64)[sel],
              "nc_r2": None if nc_r2 is None else np.asarray(nc_r2, np.float64)[sel]}
    keep = None if reliable is None else reliable[sel]
    block = {}
    for name, x in values.items():
        block[f"{name}_mean"] = None if x is None else _mean(x)
        block[f"{name}_median"] = None if x is None else _median(x)
    for name, x in values.items():
        block[f"{name}_mean_reliable"] = None if x is None or keep is None else _mean(x[keep])
    block["n_reliable"] = None if keep is None else int(keep.sum())
    block["n_voxels"] = int(len(sel))
    block["n_nan"] = int((~np.isfinite(values["r"])).sum())
    return block


def headline(block: dict) -> str:
    """One line for a metrics.json split block: mean r, median R² and NC-R², and the mean NC-R² over the
    voxels whose noise ceiling exceeds the threshold, with their count (train.py's closing line)."""
    def num(key):
        value = block.get(key)
        return "nan" if value is None or value != value else f"{value:.3f}"

    return (f"r {num('r_mean')}  R2 median {num('r2_median')}  NC-R2 median {num('nc_r2_median')}  "
            f"NC-R2 mean {num('nc_r2_mean_reliable')} over the {block.get('n_reliable')} of {block.get('n_voxels')} "
            f"voxels with NC > {block.get('nc_threshold', NC_THRESHOLD):g}%")
