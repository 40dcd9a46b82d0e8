"""The BrainSAIL job's figures (matplotlib, Agg backend): each function draws one PNG and returns its path."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from analyses.jobs.outputs import pyplot, save_figure
from analyses.methods import attribution as attr


def _scaled(m: np.ndarray, size: int) -> np.ndarray:
    up = attr.upsample(m[None, None], size)[0, 0]
    lo, hi = up.min(), up.max()
    return (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)


def plot_overlays(images: np.ndarray, maps: np.ndarray, ids: Sequence, predicted: np.ndarray, path: Path,
                  title: str) -> Path:
    """Top row the images (n, S, S, 3), bottom row each with its map (n, h, w) overlaid (jet, min-max)."""
    plt = pyplot()
    n, size = len(images), images.shape[1]
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
    for k in range(n):
        axes[0, k].imshow(images[k])
        axes[0, k].set_title(f"id {ids[k]}\npred {predicted[k]:.2f}", fontsize=7)
        axes[1, k].imshow(images[k])
        axes[1, k].imshow(_scaled(maps[k], size), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        for ax in axes[:, k]:
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def plot_comparison(images: np.ndarray, maps: dict[str, np.ndarray | None], ids: Sequence, path: Path,
                    title: str) -> Path:
    """The images (top row) and each encoder's maps overlaid (one row per encoder)."""
    plt = pyplot()
    n, size = len(images), images.shape[1]
    fig, axes = plt.subplots(1 + len(maps), n, figsize=(2.2 * n, 2.2 * (1 + len(maps))), squeeze=False)
    for k in range(n):
        axes[0, k].imshow(images[k])
        axes[0, k].set_title(f"id {ids[k]}", fontsize=7)
        for row, (label, m) in enumerate(maps.items(), start=1):
            axes[row, k].imshow(images[k])
            if m is not None:
                axes[row, k].imshow(_scaled(m[k], size), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if k == 0:
                axes[row, k].set_title(label, fontsize=6, loc="left")
        for ax in axes[:, k]:
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
