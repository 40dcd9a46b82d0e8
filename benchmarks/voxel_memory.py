"""Memory per 10k voxels of a training step (linear head + AdamW + MSE) and of the whole-split metrics.

    python benchmarks/voxel_memory.py                 # CPU: peak RSS of a fresh process per setting
    python benchmarks/voxel_memory.py --device cuda   # GPU: torch.cuda.max_memory_allocated

For each feature width d it runs the step at two voxel counts and prints the growth per 10k voxels
(the slope, so the data and the libraries cancel out) next to the analytic count: the head's weights,
their gradient and AdamW's two moments are 4 float32 copies of (n_voxels x d), i.e. 16·d bytes per voxel;
the predictions, targets and their gradients add ~4 float32 (batch x n_voxels); the metric keeps 6
float64 sums per voxel and works through the voxels in chunks (VoxelScores.voxel_batch). The measured
peak is ~1.5x the analytic count: AdamW's step makes transient weight-sized copies.
Measured on the 2-core CPU machine (batch 128): d=512 148 MB, d=2048 504 MB per 10k voxels.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one(n_voxels: int, n_features: int, batch: int, steps: int, device: str) -> float:
    """Peak memory (MB) added by `steps` training steps + metric updates at this size."""
    import torch

    sys.path.insert(0, str(REPO))
    from encoders.heads import LinearHead
    from encoders.metrics import VoxelScores

    torch.manual_seed(0)
    x = torch.randn(batch, n_features, device=device)
    y = torch.randn(batch, n_voxels, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    head = LinearHead(n_features, n_voxels).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    scores = VoxelScores(n_voxels, sync_on_compute=False).to(device)
    for _ in range(steps):
        pred = head(x)
        loss = torch.nn.functional.mse_loss(pred, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            scores.update(head(x), y)
    scores.compute()
    if device == "cuda":
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**20


def measure(n_voxels: int, n_features: int, args) -> float:
    out = subprocess.run([sys.executable, __file__, "--one", str(n_voxels), str(n_features), "--batch", str(args.batch),
                          "--steps", str(args.steps), "--device", args.device],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--features", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--voxels", type=int, nargs=2, default=[10_000, 50_000])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps({"mb": one(*args.one, args.batch, args.steps, args.device)}))
        return
    lo, hi = args.voxels
    print(f"device {args.device}, batch {args.batch}, medians of {args.repeats} fresh processes; MB per 10k voxels")
    print(f"{'d':>6} {'measured':>10} {'analytic':>10}   (head+grad+AdamW 16·d B/voxel, batch tensors 16·batch B/voxel, "
          "metric sums 48 B/voxel)")
    for d in args.features:
        slopes = [(measure(hi, d, args) - measure(lo, d, args)) / ((hi - lo) / 10_000) for _ in range(args.repeats)]
        analytic = (16 * d + 16 * args.batch + 48) * 10_000 / 2**20
        print(f"{d:>6} {statistics.median(slopes):>10.1f} {analytic:>10.1f}")


if __name__ == "__main__":
    main()
