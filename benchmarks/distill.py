"""Peak memory of BrainSAIL's distillation against the number of images: streamed vs all views at once.

    python benchmarks/distill.py                                  # tiny_vit, 51 views, 100 / 300 / 1000 images
    python benchmarks/distill.py --backbone clip_vitb16 --images 8 16 32 --naive 8 16   # a real ViT-B/16 (random init)

Each measurement runs in a fresh process. ``streamed`` is what analyze.py analysis=brainsail does: images
``--batch-size`` at a time, ``--view-batch`` views per forward (encoders.distill.distill), the relevance maps of
``--columns`` ROI columns kept (a random linear readout) and everything else dropped. ``naive`` runs every view
of every image first (the (n_images x n_views, h, w, d) feature array), then maps them back and averages.
Reported: the growth of the process's peak resident memory (VmHWM, reset after the model is built and one
warm-up batch has run) and the wall time. Streamed memory must stay flat in the number of images; naive grows
with it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MB = 2**20


def _vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _images(n: int, size: int, batch: int, seed: int = 0):
    """Random normalised images, generated batch by batch (the data never all sit in memory)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch):
        yield start, torch.randn(min(batch, n - start), 3, size, size, generator=g)


def measure(mode: str, backbone: str, n_images: int, n_views: int, max_shift: int, batch_size: int,
            view_batch: int, columns: int) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from encoders.backbones import build_backbone
    from encoders.dense import dense_features
    from encoders.distill import apply_view, distill, make_views, source_index

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    dense = dense_features(build_backbone(backbone, layers=["embed"]))
    size, p = dense.image_size, dense.patch_size
    views = make_views(n_views, max_shift, seed=0)
    readout = torch.randn(dense(torch.zeros(1, 3, size, size)).shape[-1], columns)
    distill(dense, torch.randn(min(batch_size, n_images), 3, size, size), views[:view_batch], p, view_batch)  # warm-up
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        rss0, reset = _vm("VmRSS"), True
    except OSError:
        rss0, reset = _vm("VmHWM"), False
    t0 = time.perf_counter()
    if mode == "streamed":
        maps = np.zeros((n_images, dense.grid, dense.grid, columns), np.float32)  # the kept output, allocated once
        for start, x in _images(n_images, size, batch_size):
            maps[start:start + len(x)] = (distill(dense, x, views, p, view_batch) @ readout).numpy()
    else:
        x = torch.cat([x for _, x in _images(n_images, size, batch_size)])
        with torch.no_grad():
            feats = torch.stack([torch.cat([dense(apply_view(x[i:i + batch_size], v, p))
                                            for i in range(0, n_images, batch_size)]) for v in views])  # (V, n, h, w, d)
        h, w = feats.shape[2:4]
        acc = torch.zeros(n_images, h * w, feats.shape[-1])
        count = torch.zeros(h * w)
        for k, v in enumerate(views):
            src = source_index(v, h, w)
            keep = src >= 0
            acc.index_add_(1, src[keep], feats[k].reshape(n_images, h * w, -1)[:, keep])
            count.index_add_(0, src[keep], torch.ones(int(keep.sum())))
        maps = (F.normalize(acc / count[None, :, None], dim=-1) @ readout).numpy()
    seconds = time.perf_counter() - t0
    return {"mode": mode, "n_images": n_images, "rss_growth": _vm("VmHWM") - rss0, "rss_reset": reset,
            "seconds": seconds, "maps_bytes": int(maps.nbytes), "grid": dense.grid, "image_size": size}


def run_child(args: argparse.Namespace, mode: str, n: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(n), "--backbone", args.backbone, "--views", str(args.views),
           "--max-shift", str(args.max_shift), "--batch-size", str(args.batch_size),
           "--view-batch", str(args.view_batch), "--columns", str(args.columns)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="tiny_vit")
    ap.add_argument("--images", type=int, nargs="+", default=[100, 300, 1000])
    ap.add_argument("--naive", type=int, nargs="*", default=[100, 300], help="image counts for the all-at-once run")
    ap.add_argument("--views", type=int, default=51)
    ap.add_argument("--max-shift", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--view-batch", type=int, default=8)
    ap.add_argument("--columns", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child[0], args.backbone, int(args.child[1]), args.views, args.max_shift,
                                 args.batch_size, args.view_batch, args.columns)))
        return 0
    print(f"{args.backbone}, {args.views} views (max shift {args.max_shift} patches), batch {args.batch_size} images "
          f"x {args.view_batch} views per forward, {args.columns} map columns; median of {args.repeats} run(s)")
    print(f"{'mode':>9} {'images':>7} {'peak RSS growth':>16} {'per image':>10} {'wall s':>8} {'img/s':>7}")
    rows = [(mode, n) for n in args.images for mode in ("streamed",)] + [("naive", n) for n in args.naive]
    results = {}
    for mode, n in rows:
        reps = [run_child(args, mode, n) for _ in range(args.repeats)]
        growth = statistics.median(r["rss_growth"] for r in reps) / MB
        secs = statistics.median(r["seconds"] for r in reps)
        results[(mode, n)] = growth
        print(f"{mode:>9} {n:>7} {growth:>13.1f} MB {growth / n:>7.2f} MB {secs:>8.1f} {n / secs:>7.1f}"
              + ("" if reps[0]["rss_reset"] else "  (VmHWM not resettable: growth over the process peak)"))
    streamed = [results[("streamed", n)] for n in args.images]
    if len(args.images) > 1:
        print(f"streamed: {args.images[-1] / args.images[0]:.0f}x the images -> "
              f"{streamed[-1] / max(streamed[0], 1e-9):.2f}x the peak growth")
    for n in args.naive:
        if ("streamed", n) in results:
            print(f"{n} images: naive / streamed peak growth = {results[('naive', n)] / max(results[('streamed', n)], 1e-9):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
