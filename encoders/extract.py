"""Streaming passes of a frozen backbone over a stimulus loader, with progress (``encoders.progress``)."""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from encoders.progress import Progress


@dataclass
class ExtractionStats:
    """What extraction passes did, summed over the passes given the same object: images, seconds."""

    images: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.seconds if self.images and self.seconds > 0 else None


@torch.no_grad()
def iter_features(backbone: nn.Module, loader: DataLoader, device: str | torch.device = "cpu",
                  description: str = "features", progress: bool = True,
                  total: int | None = None, stats: ExtractionStats | None = None) -> Iterator[torch.Tensor]:
    """Yield float32 CPU features (b, n_features) batch by batch, in loader order.

    loader yields image tensors (b, 3, S, S) or dicts with key "x". Progress: a bar with images/s and
    the time left on a terminal, a line every ~30 s elsewhere (``encoders.progress``); memory holds one
    batch at a time. ``stats`` (if given) adds the images and the wall time of this pass.
    """
    backbone.eval()
    backbone.to(device)
    if total is None:
        total = len(loader.dataset) if hasattr(loader, "dataset") else None
    with Progress(progress) as bar:
        task = bar.add_task(description, total=total, unit="images")
        last = time.perf_counter()
        for batch in loader:
            images = batch["x"] if isinstance(batch, dict) else batch
            out = backbone(images.to(device)).float().cpu()
            if stats is not None:  # the pass's wall time: reading, decoding, the forward, and storing the rows
                now = time.perf_counter()
                stats.images += int(images.shape[0])
                stats.seconds += now - last
                last = now
            yield out
            bar.advance(task, images.shape[0])


def extract_features(backbone: nn.Module, loader: DataLoader, device: str | torch.device = "cpu",
                     description: str = "features", progress: bool = True,
                     stats: ExtractionStats | None = None) -> torch.Tensor:
    """All features of a loader in memory: (n_images, n_features) float32 on the CPU."""
    chunks = list(iter_features(backbone, loader, device, description, progress, stats=stats))
    if not chunks:
        raise ValueError(f"extract_features: the {description} loader yielded no images")
    return torch.cat(chunks)
