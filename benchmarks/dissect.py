"""CLIP-MSM's SoftWPMI at scale: our unit-batched soft_wpmi vs CLIP-Dissect's per-unit loop, side by side.

    python benchmarks/dissect.py                    # 20k voxels x 10k images x 1000 concepts, d=1024; reference on 2k
    python benchmarks/dissect.py --voxels 100000 --repeats 1 --ref-voxels 0    # the issue's scale
    python benchmarks/dissect.py --quick            # small sizes, seconds

Every measurement runs in a fresh subprocess (peak memory: its VmHWM, reset after the inputs exist), methods
alternating. "ours" gets Q lazily (LinearActivations: Q = I·Wᵀ one unit batch at a time); "clip-dissect" is
the structure of CLIP-Dissect's similarity.py: Q materialised, topk over all units, then one gather per unit.
Prints medians over repeats, the time ratio, the largest score difference, and how large the tensors are that
neither builds (n_units x n_images x n_concepts) or only the reference builds (Q).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_inputs(n_images: int, n_voxels: int, n_concepts: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    I = rng.standard_normal((n_images, d), dtype=np.float32)
    W = rng.standard_normal((n_voxels, d), dtype=np.float32) / np.float32(np.sqrt(d))
    T = rng.standard_normal((n_concepts, d), dtype=np.float32)
    return I, W, T


def clip_dissect_soft_wpmi(Q, P, top_k=100, a=10.0, lam=1.0, min_prob=1e-7, p_start=0.998, p_end=0.97):
    """CLIP-Dissect's soft_wpmi, its loop structure kept (one gather per unit), on CPU tensors."""
    import torch

    with torch.no_grad():
        clip = torch.softmax(a * P, dim=1)
        inds = torch.topk(Q, dim=0, k=top_k)[1]
        p_in = p_start - (torch.arange(top_k) / top_k * (p_start - p_end)).unsqueeze(1)
        out = []
        for u in range(Q.shape[1]):
            cur = clip.gather(0, inds[:, u:u + 1].expand(-1, clip.shape[1]))
            out.append(torch.sum(torch.log(1 + p_in * (cur - 1) + min_prob), dim=0, keepdim=True))
        log_pde = torch.cat(out, dim=0)
        log_pd = torch.logsumexp(log_pde, dim=0, keepdim=True) - torch.log(torch.tensor(float(Q.shape[1])))
        return (log_pde - lam * log_pd).numpy()


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def _rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def run_one(method: str, n_images: int, n_voxels: int, n_concepts: int, d: int, top_k: int, out: str) -> None:
    """Child process: one method, timings and peak memory to ``out`` (scores to out + .npy)."""
    import torch

    from analyses.methods import dissect

    torch.set_num_threads(max(1, torch.get_num_threads()))
    I, W, T = make_inputs(n_images, n_voxels, n_concepts, d)
    P = dissect.concept_activations(I, T)
    base = _rss_gb()
    _reset_peak()
    start = time.perf_counter()
    if method == "ours":
        scores = dissect.soft_wpmi(dissect.LinearActivations(I, W), P, top_k=top_k)
    else:
        Q = torch.from_numpy(I) @ torch.from_numpy(W).T
        scores = clip_dissect_soft_wpmi(Q, torch.from_numpy(P), top_k=top_k)
    wall = time.perf_counter() - start
    np.save(out + ".npy", scores[: min(2000, n_voxels)])
    Path(out).write_text(json.dumps({"wall_s": wall, "peak_gb": _peak_gb(), "inputs_gb": base}))


def measure(method: str, args, n_voxels: int) -> tuple[dict, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        subprocess.run([sys.executable, __file__, "--child", method, "--images", str(args.images), "--voxels",
                        str(n_voxels), "--concepts", str(args.concepts), "--dim", str(args.dim), "--top-k",
                        str(args.top_k), "--out", out], check=True)
        return json.loads(Path(out).read_text()), np.load(out + ".npy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voxels", type=int, default=20000)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--concepts", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ref-voxels", type=int, default=2000, help="voxels for the side-by-side comparison (0: skip)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        run_one(args.child, args.images, args.voxels, args.concepts, args.dim, args.top_k, args.out)
        return
    if args.quick:
        args.voxels, args.images, args.concepts, args.dim, args.ref_voxels = 3000, 2000, 200, 256, 1000

    full = 4 * args.voxels * args.images * args.concepts / 1e9
    print(f"soft_wpmi: {args.voxels} voxels x {args.images} images x {args.concepts} concepts, d={args.dim}, "
          f"top_k={args.top_k}; an n_voxels x n_images x n_concepts float32 tensor would be {full:,.0f} GB, "
          f"Q (n_images x n_voxels) {4 * args.voxels * args.images / 1e9:.1f} GB")
    runs = [measure("ours", args, args.voxels)[0] for _ in range(args.repeats)]
    print(f"ours, {args.voxels} voxels: {statistics.median(r['wall_s'] for r in runs):.1f} s (median of "
          f"{len(runs)}), peak RSS {statistics.median(r['peak_gb'] for r in runs):.2f} GB "
          f"(inputs {runs[0]['inputs_gb']:.2f} GB)")
    if args.ref_voxels:
        ours, ref, diffs = [], [], []
        for _ in range(args.repeats):
            o, so = measure("ours", args, args.ref_voxels)
            r, sr = measure("clip-dissect", args, args.ref_voxels)
            ours.append(o)
            ref.append(r)
            diffs.append(float(np.abs(so - sr).max()))
        to, tr = statistics.median(x["wall_s"] for x in ours), statistics.median(x["wall_s"] for x in ref)
        print(f"side by side, {args.ref_voxels} voxels: ours {to:.2f} s vs CLIP-Dissect loop {tr:.2f} s "
              f"({tr / to:.1f}x faster); peak RSS {statistics.median(x['peak_gb'] for x in ours):.2f} vs "
              f"{statistics.median(x['peak_gb'] for x in ref):.2f} GB; max |score difference| {max(diffs):.2e}")


if __name__ == "__main__":
    main()
