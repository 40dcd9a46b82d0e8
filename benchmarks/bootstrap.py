"""Bootstrap p-values of per-voxel R² (analyses.methods.stats.bootstrap_pvalues): memory and time at scale, and a
side-by-side comparison with the plain resampling loop.

    python benchmarks/bootstrap.py                  # 100k voxels x 2000 resamples (n=1000) + reference on 256 voxels
    python benchmarks/bootstrap.py --quick          # 10k voxels, 500 resamples, n=500
    python benchmarks/bootstrap.py --device cuda    # the same products on a GPU

Every measurement runs in a fresh subprocess; the peak is its VmHWM, reset after the data are made, so
"growth" is what the computation itself adds on top of pred and true. The reference resamples the rows
explicitly (true[idx], pred[idx] -> R² per voxel, for every resample, in voxel batches of the same size):
the obvious implementation. Both use the same resamples (stats.bootstrap_indices), so their p-values must
agree exactly. Prints medians over --repeats, alternating the two methods.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_data(n: int, v: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """true (n, v) float32; pred = true + s·noise with s from 0.2 to 1.5 across voxels (R² = 1 - s², 0.96 .. -1.25)."""
    rng = np.random.default_rng(seed)
    true = rng.standard_normal((n, v), dtype=np.float32)
    pred = np.empty_like(true)
    for start in range(0, v, 10000):
        stop = min(start + 10000, v)
        s = np.linspace(0.2, 1.5, stop - start, dtype=np.float32)
        pred[:, start:stop] = true[:, start:stop] + s * rng.standard_normal((n, stop - start), dtype=np.float32)
    return pred, true


def reference_pvalues(pred: np.ndarray, true: np.ndarray, n_boot: int, seed: int, voxel_batch: int,
                      device: str) -> np.ndarray:
    """The plain loop: for every resample, gather its rows and compute R² per voxel (float64)."""
    import torch

    from analyses.methods.stats import bootstrap_indices

    idx = torch.from_numpy(bootstrap_indices(true.shape[0], n_boot, seed)).to(device)
    out = np.empty(true.shape[1])
    for start in range(0, true.shape[1], voxel_batch):
        t = torch.as_tensor(true[:, start:start + voxel_batch], dtype=torch.float64, device=device)
        p = torch.as_tensor(pred[:, start:start + voxel_batch], dtype=torch.float64, device=device)
        fail = torch.zeros(t.shape[1], dtype=torch.float64, device=device)
        for rows in idx:
            tb, pb = t[rows], p[rows]
            ss_res = ((tb - pb) ** 2).sum(0)
            ss_tot = ((tb - tb.mean(0)) ** 2).sum(0)
            fail += (ss_res >= ss_tot).to(torch.float64)
        out[start:start + voxel_batch] = ((fail + 1) / (n_boot + 1)).cpu().numpy()
    return out


def rss_gb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024 ** 2
    return float("nan")


def child(args) -> None:
    import torch  # noqa: F401  (import cost outside the timing)

    from analyses.methods.stats import bootstrap_pvalues

    pred, true = make_data(args.n, args.voxels)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak covers the computation only
    except OSError:
        pass
    base = rss_gb("VmRSS")
    start = time.perf_counter()
    if args.child == "ours":
        p = bootstrap_pvalues(pred, true, n_boot=args.n_boot, seed=0, voxel_batch=args.voxel_batch, device=args.device)
    else:
        p = reference_pvalues(pred, true, args.n_boot, 0, args.voxel_batch, args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = rss_gb("VmHWM")
    np.save(args.out, p)
    Path(args.out + ".json").write_text(json.dumps({"seconds": seconds, "base_gb": base, "peak_gb": peak,
                                                    "data_gb": (pred.nbytes + true.nbytes) / 1024 ** 3}))


def run(method: str, voxels: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "p.npy")
        cmd = [sys.executable, __file__, "--child", method, "--n", str(args.n), "--voxels", str(voxels),
               "--n-boot", str(args.n_boot), "--voxel-batch", str(args.voxel_batch), "--device", args.device,
               "--out", out]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        return {**json.loads(Path(out + ".json").read_text()), "p": np.load(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="test samples (rows)")
    ap.add_argument("--voxels", type=int, default=100_000)
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--ref-voxels", type=int, default=256, help="voxels for the side-by-side comparison")
    ap.add_argument("--voxel-batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the side-by-side comparison")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if args.quick:
        args.n, args.voxels, args.n_boot, args.ref_voxels = 500, 10_000, 500, 256
    print(f"n={args.n} rows, {args.n_boot} resamples, voxel_batch={args.voxel_batch}, device={args.device}")

    big = run("ours", args.voxels, args)
    naive_gb = args.n_boot * args.n * args.voxels * 8 / 1024 ** 3
    print(f"scale: {args.voxels:,} voxels in {big['seconds']:.1f} s; peak RSS {big['peak_gb']:.2f} GB, of which data "
          f"{big['data_gb']:.2f} GB: growth {big['peak_gb'] - big['base_gb']:.2f} GB "
          f"(all resamples at once would be {naive_gb:,.0f} GB)")
    p = big["p"]
    print(f"        p == 0 for {int((p == 0).sum()):,} voxels, p > 0.5 for {int((p > 0.5).sum()):,}")

    times = {"ours": [], "reference": []}
    growth = {"ours": [], "reference": []}
    diffs = []
    for _ in range(args.repeats):
        res = {m: run(m, args.ref_voxels, args) for m in ("ours", "reference")}
        for m, r in res.items():
            times[m].append(r["seconds"])
            growth[m].append(r["peak_gb"] - r["base_gb"])
        diffs.append(float(np.max(np.abs(res["ours"]["p"] - res["reference"]["p"]))))
    t_ours, t_ref = statistics.median(times["ours"]), statistics.median(times["reference"])
    print(f"side by side, {args.ref_voxels:,} voxels, median of {args.repeats}: ours {t_ours:.2f} s vs resampling "
          f"loop {t_ref:.2f} s -> {t_ref / t_ours:.1f}x faster; memory growth {statistics.median(growth['ours']):.2f} vs "
          f"{statistics.median(growth['reference']):.2f} GB; max |p_ours - p_loop| = {max(diffs):.1e}")
    print(f"        the loop at {args.voxels:,} voxels would take ~{t_ref * args.voxels / args.ref_voxels / 60:.0f} min")


if __name__ == "__main__":
    main()
