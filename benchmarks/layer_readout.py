"""Reading an early layer: our hooked forward (which stops after the last requested layer) vs the library's
whole forward, on the same random-init model and batch; and what building a backbone costs (the dummy
forward that finds every layer's shape) next to building the bare model.

    python benchmarks/layer_readout.py [--models timm:resnet50 timm:vit_base_patch16_224] [--batch 16] [--repeats 5]

Prints medians over repeats and the ratio ours / library (< 1: the early stop saves the rest of the net).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from encoders.backbones import build_backbone  # noqa: E402
from encoders.families import Source, build_family, run_embedding  # noqa: E402

EARLY = {"timm:resnet50": "layer2", "timm:vit_base_patch16_224": "blocks.3", "torchvision:alexnet": "features.4"}


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(EARLY))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(f"batch {args.batch}, {torch.get_num_threads()} threads, {args.repeats} repeats (medians)")
    for name in args.models:
        family, _, model = name.partition(":")
        layer = EARLY.get(name)
        build_bare = median_seconds(lambda: build_family(Source(family, model)), 1)
        build_ours = median_seconds(lambda: build_backbone(name, layers=[layer] if layer else None), 1)
        bb = build_backbone(name, layers=[layer] if layer else None)
        x = torch.randn(args.batch, 3, bb.preprocess.crop_size, bb.preprocess.crop_size)
        full = run_embedding(bb._embedding_kind)
        with torch.no_grad():
            ours = median_seconds(lambda: bb(x), args.repeats)
            library = median_seconds(lambda: full(bb.model, x), args.repeats)
        print(f"{name:32s} read {layer}: ours {ours:.3f} s vs whole forward {library:.3f} s "
              f"(x{ours / library:.2f}); build {build_ours:.2f} s vs bare model {build_bare:.2f} s "
              f"(+{build_ours - build_bare:.2f} s: the dummy forward over every named layer)")


if __name__ == "__main__":
    main()
