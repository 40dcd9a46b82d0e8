"""Learning-free distillation of dense patch features over shifted / flipped views (BrainSAIL).

    views = make_views(n_views=51, max_shift=3, seed=0)          # identity first
    feats = distill(dense, images, views, patch_size=16)        # (n, h, w, d), unit norm per patch
    for ids, feats in distill_batches(dense, batches, views, 16):  # streamed over image batches
        ...

Each view moves the image content by (dy, dx) whole patches (down, right; the vacated border is filled,
``fill``: ``edge`` replicates the border pixels, ``zero`` puts 0 = the mean colour after normalisation),
then optionally mirrors it left-right. The view's patch (i, j) therefore shows source patch
(i - dy, j' - dx) with j' = w-1-j when mirrored (else j); view patches that show the fill are dropped.
Every view's patch features are added at their source positions, divided by the number of views that saw
each source patch (count-normalised average = the feature minimising the summed squared error to the
candidates), and unit-normalised per patch (``normalize``).

Memory: one image batch at a time (``distill_batches``), ``view_batch`` views of it per forward; nothing
grows with the number of images (benchmarks/distill.py measures it).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["View", "make_views", "apply_view", "source_index", "distill", "distill_batches", "FILLS"]

FILLS = ("edge", "zero")
DenseFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class View:
    """Shift the content by (dy, dx) patches (down, right), then mirror left-right if ``flip``."""

    dy: int = 0
    dx: int = 0
    flip: bool = False


def make_views(n_views: int, max_shift: int, seed: int = 0, flip: bool = True) -> list[View]:
    """The identity, then ``n_views - 1`` views with integer shifts in [-max_shift, max_shift]².

    Even coverage: the (2·max_shift+1)² - 1 non-zero offsets are taken in a seeded random order, every
    offset once before any repeats (a fresh order for each pass); each view is mirrored with probability
    1/2 (when ``flip``). With max_shift = 0 the extra views are unshifted mirrors (or identities).
    """
    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    rng = np.random.default_rng(seed)
    r = range(-max_shift, max_shift + 1)
    offsets = [(dy, dx) for dy in r for dx in r if (dy, dx) != (0, 0)] or [(0, 0)]
    views = [View()]
    order: list[tuple[int, int]] = []
    while len(views) < n_views:
        if not order:
            order = [offsets[i] for i in rng.permutation(len(offsets))]
        dy, dx = order.pop()
        views.append(View(int(dy), int(dx), bool(flip and rng.random() < 0.5)))
    return views


def apply_view(x: torch.Tensor, view: View, scale: int, fill: str = "edge") -> torch.Tensor:
    """Apply ``view`` to (..., C, H, W) with shifts of ``scale`` pixels per patch step.

    fill: edge (replicate border pixels) | zero | a number (constant; e.g. -1 for index maps).
    """
    dy, dx = view.dy * scale, view.dx * scale
    H, W = x.shape[-2:]
    if abs(dy) >= H or abs(dx) >= W:
        raise ValueError(f"view shift ({view.dy}, {view.dx}) patches leaves nothing of a {H}x{W} image")
    if dy or dx:
        pad = (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0))  # left, right, top, bottom
        if fill == "edge":
            shape = x.shape
            y = F.pad(x.reshape(-1, *shape[-3:]) if x.ndim != 4 else x, pad, mode="replicate")
            y = y.reshape(*shape[:-2], *y.shape[-2:])
        else:
            y = F.pad(x, pad, mode="constant", value=0.0 if fill == "zero" else float(fill))
        top, left = max(-dy, 0), max(-dx, 0)
        x = y[..., top:top + H, left:left + W]
    return x.flip(-1) if view.flip else x


def source_index(view: View, h: int, w: int) -> torch.Tensor:
    """(h*w,) int64: the source patch (row-major index) each patch of the view shows, -1 for the fill."""
    grid = torch.arange(h * w, dtype=torch.float32).reshape(1, h, w)
    return apply_view(grid, view, 1, fill=-1).reshape(-1).round().long()


def distill(dense: DenseFn, images: torch.Tensor, views: list[View], patch_size: int, view_batch: int = 8,
            fill: str = "edge", normalize: bool = True) -> torch.Tensor:
    """Distilled dense features of one image batch.

    dense: images (m, 3, H, W) -> (m, h, w, d) patch features (e.g. encoders.dense.DenseFeatures).
    images: (n, 3, H, W) normalised, H and W multiples of ``patch_size``. views: from ``make_views``.
    view_batch: views per forward (n * view_batch images at once). fill: ``FILLS``.
    normalize: unit-normalise each distilled patch. Returns (n, h, w, d) float32 on ``dense``'s device.
    """
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    if not views:
        raise ValueError("no views to distill over")
    n, _, H, W = images.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {patch_size}")
    h, w = H // patch_size, W // patch_size
    acc: torch.Tensor | None = None
    count = torch.zeros(h * w)
    for start in range(0, len(views), max(1, int(view_batch))):
        chunk = views[start:start + max(1, int(view_batch))]
        x = torch.cat([apply_view(images, v, patch_size, fill) for v in chunk])
        feats = dense(x)
        if feats.shape[:3] != (len(chunk) * n, h, w):
            raise ValueError(f"dense features have shape {tuple(feats.shape)}, expected ({len(chunk) * n}, {h}, {w}, d)")
        feats = feats.float().reshape(len(chunk), n, h * w, -1)
        if acc is None:
            acc = torch.zeros(n, h * w, feats.shape[-1], device=feats.device)
            count = count.to(feats.device)
        for k, view in enumerate(chunk):
            src = source_index(view, h, w).to(feats.device)
            keep = src >= 0
            acc.index_add_(1, src[keep], feats[k][:, keep])
            count.index_add_(0, src[keep], torch.ones(int(keep.sum()), device=feats.device))
        del feats, x
    if (count == 0).any():
        raise ValueError(f"{int((count == 0).sum())} patches are seen by no view (include the identity view)")
    out = (acc / count[None, :, None]).reshape(n, h, w, -1)
    return F.normalize(out, dim=-1) if normalize else out


def distill_batches(dense: DenseFn, batches: Iterable[tuple[object, torch.Tensor]], views: list[View],
                    patch_size: int, view_batch: int = 8, fill: str = "edge", normalize: bool = True
                    ) -> Iterator[tuple[object, torch.Tensor]]:
    """Stream ``distill`` over (key, images (b, 3, H, W)) batches: yields (key, (b, h, w, d)) one batch at a time."""
    for key, images in batches:
        yield key, distill(dense, images, views, patch_size, view_batch, fill, normalize)
