"""The report's figures (matplotlib, Agg backend), each written as one PNG file."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from analyses.jobs.outputs import save_figure  # noqa: E402

DPI = 100


def roi_bar_chart(labels: Sequence[str], rois: Sequence[str],
                  stats: Sequence[Mapping[str, tuple[float, float, float]]], ylabel: str, title: str,
                  path: Path) -> Path:
    """Grouped bars: one group per ROI, one bar per run, height = mean, error bar = its CI [low, high].

    labels: one per run; stats: one per run, ROI -> (mean, CI low, CI high) (a missing ROI draws no bar, a NaN
    CI no error bar).
    """
    n_runs, n_rois = len(labels), len(rois)
    width = 0.8 / max(n_runs, 1)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.22 * n_rois * max(n_runs, 2) + 2), 4.2))
    x = np.arange(n_rois)
    colors = plt.get_cmap("tab10")
    for k, (label, run_stats) in enumerate(zip(labels, stats)):
        mean, lo, hi = (np.array([run_stats.get(r, (np.nan,) * 3)[i] for r in rois], dtype=np.float64)
                        for i in range(3))
        errors = np.nan_to_num(np.vstack([mean - lo, hi - mean]).clip(min=0))
        ax.bar(x + (k - (n_runs - 1) / 2) * width, mean, width, yerr=errors, capsize=2,
               label=label, color=colors(k % 10), error_kw={"elinewidth": 0.8})
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x, rois, rotation=60, ha="right", fontsize=8)
    ax.set_xlim(-0.6, n_rois - 0.4)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.spines[["top", "right"]].set_visible(False)
    return save_figure(fig, path, dpi=DPI, bbox_inches="tight")


def voxel_scatter(a: np.ndarray, b: np.ndarray, colour: np.ndarray | None, xlabel: str, ylabel: str,
                  metric_label: str, title: str, path: Path) -> Path:
    """One point per voxel, a (n,) against b (n,), coloured by ``colour`` (n,) (the noise ceiling, %)
    when given, with the identity line; the title counts the voxels above and below it."""
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    if colour is not None:
        points = ax.scatter(a, b, c=np.asarray(colour)[keep], s=9, cmap="viridis", alpha=0.85, linewidths=0)
        fig.colorbar(points, ax=ax, label="noise ceiling (% variance)")
    else:
        ax.scatter(a, b, s=9, color="tab:blue", alpha=0.7, linewidths=0)
    if a.size:
        lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "--", color="grey", linewidth=0.8)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_aspect("equal")
    ax.set_xlabel(f"{xlabel}\n{metric_label}", fontsize=9)
    ax.set_ylabel(f"{ylabel}\n{metric_label}", fontsize=9)
    ax.set_title(f"{title}\n{int((b > a).sum())} voxels above the line, {int((b < a).sum())} below", fontsize=9)
    return save_figure(fig, path, dpi=DPI, bbox_inches="tight")


def learning_curves(curves: Mapping[str, Mapping[str, np.ndarray]], path: Path) -> Path:
    """Validation mean r (left) and train/validation loss (right) per epoch, one colour per run.

    curves: run name -> {"epoch", "train/loss", "val/loss", "val/r_mean"}, arrays of equal length.
    """
    fig, (ax_r, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.get_cmap("tab10")
    for k, (name, c) in enumerate(curves.items()):
        color = colors(k % 10)
        ax_r.plot(c["epoch"], c["val/r_mean"], "o-", color=color, markersize=3, label=name)
        ax_loss.plot(c["epoch"], c["train/loss"], "-", color=color, label=f"{name} train")
        ax_loss.plot(c["epoch"], c["val/loss"], "--", color=color, label=f"{name} val")
    ax_r.set_xlabel("epoch")
    ax_r.set_ylabel("validation mean r")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("MSE loss (solid train, dashed val)")
    for ax in (ax_r, ax_loss):
        ax.spines[["top", "right"]].set_visible(False)
    ax_r.legend(fontsize=8, frameon=False)
    return save_figure(fig, path, dpi=DPI, bbox_inches="tight")
