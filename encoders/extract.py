"""One streaming pass of a frozen backbone over a stimulus loader."""
from __future__ import annotations

import time

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: DataLoader, device: str | torch.device = "cpu",
                     description: str = "features", progress: bool = True) -> torch.Tensor:
    """Run ``backbone`` over every batch of images in ``loader`` (in order).

    loader yields image tensors (b, 3, S, S) or dicts with key "x". Returns float32
    features (n_images, n_features) on the CPU. Memory holds one batch of images at a time.
    """
    backbone.eval()
    backbone.to(device)
    chunks: list[torch.Tensor] = []
    n_total = len(loader.dataset) if hasattr(loader, "dataset") else None
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]:.1f} img/s"), TimeRemainingColumn()]
    start = time.perf_counter()
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task(description, total=n_total, rate=0.0)
        done = 0
        for batch in loader:
            images = batch["x"] if isinstance(batch, dict) else batch
            chunks.append(backbone(images.to(device)).float().cpu())
            done += images.shape[0]
            bar.update(task, advance=images.shape[0], rate=done / max(time.perf_counter() - start, 1e-9))
    if not chunks:
        raise ValueError(f"extract_features: the {description} loader yielded no images")
    return torch.cat(chunks)
