"""Feature-extraction throughput: our pipeline vs the bare backbone forward, side by side.

    python benchmarks/extract.py [--backbones alexnet resnet50] [--images 192] [--batch 32] [--repeats 3]

Pipeline = read images from nsd_stimuli.hdf5 by id + the encoder's transform + backbone with layer
hooks and pooling + the HDF5 feature-cache write (FeatureCache.load_or_build into a fresh
directory). Bare = the library model's own forward on the same, already transformed tensors, same
batch size. Runs alternate within each repeat; medians over repeats; overhead = pipeline/bare − 1.
Uses the embedded synthetic dataset (generated under data/ if absent; 425-px images as in NSD).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datamodules.nsd import NSDDataModule  # noqa: E402
from datamodules.synthetic import ensure_synthetic  # noqa: E402
from encoders.backbones import build_backbone  # noqa: E402
from encoders.feature_cache import FeatureCache  # noqa: E402


def pipeline_seconds(backbone, dm: NSDDataModule, ids: np.ndarray) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        FeatureCache(tmp).load_or_build(backbone, ids, dm.stimulus_source(), dm.images_loader)
        return time.perf_counter() - start


@torch.no_grad()
def bare_seconds(model: torch.nn.Module, batches: list[torch.Tensor], forward) -> float:
    start = time.perf_counter()
    for x in batches:
        forward(model, x)
    return time.perf_counter() - start


def bare_forward(name: str):
    """The library's own image forward, without our hooks or pooling."""
    if name.startswith("clip") or name.startswith("siglip"):
        return lambda m, x: m.encode_image(x)
    return lambda m, x: m(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["alexnet", "resnet50"])
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for the pipeline (data.num_workers)")
    p.add_argument("--data", default=str(REPO / "data" / "synthetic_nsd"))
    args = p.parse_args()
    root = ensure_synthetic(args.data)
    dm = NSDDataModule(str(root), subject=1, batch_size=args.batch, roi_files=[], num_workers=args.workers)
    dm.setup()
    ids = np.sort(np.concatenate(list(dm.split_ids.values())))[: args.images]
    print(f"{args.images} images (425 px, from HDF5), batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{args.workers} loader workers, {args.repeats} repeats")
    for name in args.backbones:
        backbone = build_backbone(name)
        dm.set_transform(backbone.transform)
        batches = [torch.stack([backbone.transform(dm.images.image(i)) for i in ids[s:s + args.batch]])
                   for s in range(0, len(ids), args.batch)]
        forward = bare_forward(name)
        bare_seconds(backbone.model, batches[:1], forward)  # warm-up
        ours, bare = [], []
        for _ in range(args.repeats):
            ours.append(pipeline_seconds(backbone, dm, ids))
            bare.append(bare_seconds(backbone.model, batches, forward))
        o, b = statistics.median(ours), statistics.median(bare)
        print(f"{name:10s} pipeline {len(ids) / o:6.1f} img/s   bare forward {len(ids) / b:6.1f} img/s   "
              f"overhead {100 * (o / b - 1):+.1f}%")


if __name__ == "__main__":
    main()
