"""The CLIP-MSM job's figures (matplotlib, Agg backend): each function draws one PNG and returns its path."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from analyses.jobs.outputs import pyplot, save_figure


def plot_label_histograms(rows: list[list], concepts: list[str], path: Path, title: str) -> Path:
    """Voxels per hard label for each ROI (CLIP-MSM Fig. 4A), one small bar chart per ROI."""
    plt = pyplot()
    n = max(len(rows), 1)
    cols = min(n, 6)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(2.2 * cols, 2.0 * nrows), squeeze=False)
    colors = plt.get_cmap("tab10")(np.arange(len(concepts)) % 10)
    for ax, row in zip(axes.flat, rows):
        counts = np.array(row[6:], dtype=float)
        ax.bar(range(len(concepts)), counts, color=colors)
        ax.set_title(f"{row[0]} ({row[1]})" + (f"\nexpected {row[4]}" if row[4] else ""), fontsize=7)
        ax.set_xticks(range(len(concepts)), concepts if len(concepts) <= 12 else [""] * len(concepts),
                      rotation=90, fontsize=6)
        ax.tick_params(axis="y", labelsize=6)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle(f"voxels per CLIP-Dissect label — {title}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_top_images(top: dict, probe, path: Path, title: str, max_rois: int = 24) -> Path | None:
    """Top images per ROI for its top concept (CLIP-MSM Fig. 4B); None when the probe images cannot be read."""
    if probe.reader is None or not top["per_roi"]:
        return None
    plt = pyplot()
    items = list(top["per_roi"].items())[:max_rois]
    k = max(len(idx) for _, (_, idx) in items)
    fig, axes = plt.subplots(len(items), k, figsize=(1.6 * k, 1.6 * len(items)), squeeze=False)
    for r, (roi, (concept, idx)) in enumerate(items):
        for j in range(k):
            ax = axes[r, j]
            ax.axis("off")
            if j < len(idx):
                ax.imshow(probe.image(int(idx[j])))
            if j == 0:
                ax.set_title(f"{roi}: {concept}", fontsize=7, loc="left")
    fig.suptitle(f"top images per ROI for its top concept — {title}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / len(items)))
    return save_figure(fig, path, dpi=100)


def _projection(values: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Maximum projection along the last axis of per-voxel values placed at voxel_xyz (volume runs), or a
    single row (other spaces)."""
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        return values[None, :]
    grid = np.full(tuple(xyz.max(0) + 1), np.nan)
    grid[xyz[:, 0], xyz[:, 1], xyz[:, 2]] = values
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmax(grid, axis=2).T


def plot_semantic_maps(S: np.ndarray, labels: np.ndarray, xyz: np.ndarray, concepts: list[str], path: Path,
                       title: str, max_concepts: int = 12) -> Path:
    """Each concept's S map (top row) and CLIP-Dissect's hard-label map (bottom row)."""
    plt = pyplot()
    shown = list(range(min(len(concepts), max_concepts)))
    fig, axes = plt.subplots(2, len(shown), figsize=(2.3 * len(shown), 4.6), squeeze=False)
    for j, c in enumerate(shown):
        for i, values in enumerate((S[c], (labels == c).astype(float))):
            ax = axes[i, j]
            im = ax.imshow(_projection(values, xyz), origin="lower", cmap="magma", vmin=0, vmax=1,
                           aspect="auto", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{concepts[c]} ({'MSM' if i == 0 else 'CLIP-Dissect'})", fontsize=7)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6)
    fig.suptitle(f"semantic maps (max projection) — {title}", fontsize=9)
    return save_figure(fig, path, dpi=110)


def plot_localizer(rows: list[list], path: Path, title: str) -> Path:
    plt = pyplot()
    rows = [r for r in rows if r[1]]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 3.5))
    ax.bar(x - 0.2, [r[3] for r in rows], 0.4, label="CLIP-MSM (S map)")
    ax.bar(x + 0.2, [r[4] for r in rows], 0.4, label="CLIP-Dissect (hard label)")
    ax.set_xticks(x, [r[0] for r in rows])
    ax.set_ylabel("Pearson r with the localizer")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_paired(rows: list[list], path: Path, title: str) -> Path:
    plt = pyplot()
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 3.5))
    ax.bar(x - 0.2, [r[2] for r in rows], 0.4, label="CLIP-MSM")
    ax.bar(x + 0.2, [r[3] for r in rows], 0.4, label="CLIP-Dissect")
    for i, r in enumerate(rows):
        if np.isfinite(r[5]):
            star = "**" if r[5] < 0.001 else "*" if r[5] < 0.05 else "n.s."
            ax.text(i, max(np.nan_to_num(r[2]), np.nan_to_num(r[3])) + 0.02, star, ha="center", fontsize=8)
    ax.set_xticks(x, [r[0] for r in rows])
    ax.set_ylabel("mean r over subjects")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_training_curve(curve: dict, path: Path, title: str) -> Path:
    """Mean test R² against the number of training images, per ROI (at most 12), "all" thicker (Fig. 2B)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for roi, mask in list(curve["rois"].items())[:12]:
        ax.plot(curve["sizes"], np.nanmean(curve["r2"][:, mask], axis=1), marker="o", label=roi,
                lw=2.5 if roi == "all" else 1)
    ax.set_xlabel("training images")
    ax.set_ylabel("mean test R²")
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(f"accuracy vs training-set size — {title}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_training_curves(curves: list[tuple[str, dict]], path: Path) -> Path:
    """Every run's curve of mean test R² (all voxels) against the number of training images."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves:
        ax.plot(curve["sizes"], np.nanmean(curve["r2"], axis=1), marker="o", label=label)
    ax.set_xlabel("training images")
    ax.set_ylabel("mean test R² (all voxels)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
