"""The Wen 2018 job's figures (matplotlib, Agg backend): each function draws one PNG and returns its path."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from analyses.jobs.outputs import pyplot, save_figure


def plot_accuracy(acc: dict, path: Path, title: str) -> Path:
    """Histogram of r (all voxels vs FDR-significant) and per-ROI mean r ± SE with the significant share."""
    plt = pyplot()
    r, sig = acc["r"], acc["significant"]
    rows = [row for row in acc["rows"] if row[0] != "all"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 2]})
    finite = np.isfinite(r)
    bins = np.linspace(min(-0.2, np.nanmin(r) if finite.any() else 0), 1, 40)
    axes[0].hist(r[finite], bins=bins, color="0.7", label="all")
    axes[0].hist(r[finite & sig], bins=bins, color="tab:red", label=f"FDR q<{acc['summary']['q']}")
    axes[0].set_xlabel("test r")
    axes[0].set_ylabel("voxels")
    axes[0].legend(fontsize=8)
    names = [row[0] for row in rows]
    means = np.array([row[6] for row in rows], dtype=float)
    ses = np.array([row[7] for row in rows], dtype=float)
    axes[1].bar(range(len(rows)), means, yerr=np.nan_to_num(ses), color="tab:blue", capsize=2)
    for i, row in enumerate(rows):
        axes[1].text(i, 0, f"{row[3]}/{row[1]}", rotation=90, ha="center", va="bottom", fontsize=6, color="white")
    axes[1].set_xticks(range(len(rows)), names, rotation=90, fontsize=7)
    axes[1].set_ylabel("mean r ± SE (significant/voxels)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def plot_layers_categories(layers_block: dict, names: list[str], labels: np.ndarray, path: Path, title: str) -> Path:
    """One similarity matrix per layer (categories ordered by cluster) and Q per layer."""
    plt = pyplot()
    names_l = list(layers_block)
    order = np.argsort(labels, kind="stable")
    fig, axes = plt.subplots(1, len(names_l) + 1, figsize=(2.6 * (len(names_l) + 1), 3))
    for ax, name in zip(axes, names_l):
        ax.imshow(np.asarray(layers_block[name]["similarity"])[np.ix_(order, order)], cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(f"{name}\nQ={layers_block[name]['q']:.2f}", fontsize=8)
        ax.set_xticks(range(len(names)), [names[i] for i in order], rotation=90, fontsize=6)
        ax.set_yticks(range(len(names)), [names[i] for i in order], fontsize=6)
    axes[-1].plot(range(len(names_l)), [layers_block[n]["q"] for n in names_l], "o-")
    axes[-1].set_xticks(range(len(names_l)), names_l, rotation=45, fontsize=7)
    axes[-1].set_ylabel("signed modularity Q")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_best_layer_per_roi(counts: Mapping[str, np.ndarray], layer_names: Sequence[str], path: str | Path,
                            title: str = "best layer per voxel") -> Path:
    """Heatmap ROI x layer of the fraction of the ROI's voxels whose best layer it is, counts written in
    the cells, and each ROI's mean best-layer index; saved as PNG at ``path``."""
    plt = pyplot()

    names = list(counts)
    mat = np.array([counts[n] for n in names], dtype=np.float64).reshape(len(names), len(layer_names))
    totals = mat.sum(1, keepdims=True)
    frac = np.divide(mat, totals, out=np.zeros_like(mat), where=totals > 0)
    mean_idx = np.divide((mat * np.arange(len(layer_names))).sum(1), totals[:, 0],
                         out=np.full(len(names), np.nan), where=totals[:, 0] > 0)
    fig, ax = plt.subplots(figsize=(max(6.0, 3.5 + 0.7 * len(layer_names)), 1.2 + 0.32 * max(len(names), 1)))
    im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(layer_names)):
            ax.text(j, i, f"{int(mat[i, j])}", ha="center", va="center", fontsize=7,
                    color="white" if frac[i, j] < 0.6 else "black")
    ax.set_xticks(range(len(layer_names)), layer_names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), [f"{n} (n={int(t)}, mean {m:.1f})" for n, t, m in zip(names, totals[:, 0], mean_idx)])
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="fraction of the ROI's voxels")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def plot_similarity(similarity: np.ndarray, names: Sequence[str], labels: np.ndarray | None, path: str | Path,
                    title: str = "category similarity") -> Path:
    """The (C, C) similarity matrix, categories ordered by cluster with the clusters outlined; PNG at path."""
    plt = pyplot()
    sim = np.asarray(similarity)
    order = np.argsort(labels, kind="stable") if labels is not None else np.arange(len(names))
    fig, ax = plt.subplots(figsize=(2.5 + 0.35 * len(names), 2 + 0.3 * len(names)))
    im = ax.imshow(sim[np.ix_(order, order)], cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(names)), [names[i] for i in order], rotation=90)
    ax.set_yticks(range(len(names)), [names[i] for i in order])
    if labels is not None:
        sorted_labels = np.asarray(labels)[order]
        start = 0
        for c in np.unique(sorted_labels):
            size = int((sorted_labels == c).sum())
            ax.add_patch(plt.Rectangle((start - 0.5, start - 0.5), size, size, fill=False, lw=2, ec="black"))
            start += size
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="Pearson r")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def plot_roi_profile(profile: Mapping[str, np.ndarray], names: Sequence[str], path: str | Path,
                     title: str = "mean d' per ROI", label: str = "d'") -> Path:
    """Heatmap ROI x category of a per-ROI profile (e.g. mean d'), the best category boxed; PNG at path."""
    plt = pyplot()
    rois = list(profile)
    mat = np.array([profile[r] for r in rois], dtype=np.float64).reshape(len(rois), len(names))
    lim = np.nanmax(np.abs(mat)) if np.isfinite(mat).any() else 1.0
    fig, ax = plt.subplots(figsize=(2.5 + 0.7 * len(names), 1.0 + 0.3 * max(len(rois), 1)))
    im = ax.imshow(mat, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
    for i in range(len(rois)):
        if np.isfinite(mat[i]).any():
            j = int(np.nanargmax(mat[i]))
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=1.5, ec="black"))
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(rois)), rois)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
