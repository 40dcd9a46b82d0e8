"""Streaming passes of a frozen backbone over a stimulus loader, with a progress bar."""
from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader


@torch.no_grad()
def iter_features(backbone: nn.Module, loader: DataLoader, device: str | torch.device = "cpu",
                  description: str = "features", progress: bool = True,
                  total: int | None = None) -> Iterator[torch.Tensor]:
    """Yield float32 CPU features (b, n_features) batch by batch, in loader order.

    loader yields image tensors (b, 3, S, S) or dicts with key "x". A progress bar shows
    images/s and the ETA; memory holds one batch at a time.
    """
    backbone.eval()
    backbone.to(device)
    if total is None:
        total = len(loader.dataset) if hasattr(loader, "dataset") else None
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]:.1f} img/s"), TimeRemainingColumn()]
    start = time.perf_counter()
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task(description, total=total, rate=0.0)
        done = 0
        for batch in loader:
            images = batch["x"] if isinstance(batch, dict) else batch
            yield backbone(images.to(device)).float().cpu()
            done += images.shape[0]
            bar.update(task, advance=images.shape[0], rate=done / max(time.perf_counter() - start, 1e-9))


def extract_features(backbone: nn.Module, loader: DataLoader, device: str | torch.device = "cpu",
                     description: str = "features", progress: bool = True) -> torch.Tensor:
    """All features of a loader in memory: (n_images, n_features) float32 on the CPU."""
    chunks = list(iter_features(backbone, loader, device, description, progress))
    if not chunks:
        raise ValueError(f"extract_features: the {description} loader yielded no images")
    return torch.cat(chunks)
