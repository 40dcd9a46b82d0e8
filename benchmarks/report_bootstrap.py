"""The report's per-run bootstrap over test stimuli (analyses.jobs.report_compare.bootstrap_run): time and memory at
scale, and a side-by-side comparison with the plain resampling loop.

    python benchmarks/report_bootstrap.py            # n=1000 test images, 20k voxels, 1000 resamples + 1000 jackknife
    python benchmarks/report_bootstrap.py --quick    # n=300, 5k voxels, 300 resamples

Each measurement runs in a fresh subprocess on a run directory written through RunDir (predictions.npz,
voxel_metrics.npz with 10 ROIs); the peak is the process's VmHWM, reset after the data are loaded, so "growth" is
what the bootstrap adds. The reference gathers each resample's rows explicitly (true[idx], pred[idx]), scores
every voxel (r, R², float64, torch, in the same voxel batches) and takes the ROI means and medians: the obvious
implementation, on the same resamples, so the ROI draws must agree to float32 precision.
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

N_ROIS = 10


def write_run(path: Path, n: int, v: int, seed: int = 0) -> None:
    """A run directory with predictions of n test images at v voxels (R² from 0.96 down to -1.25) and 10 ROIs."""
    import yaml

    from encoders.run_dir import RunDir

    rng = np.random.default_rng(seed)
    true = rng.standard_normal((n, v), dtype=np.float32)
    pred = true + np.linspace(0.2, 1.5, v, dtype=np.float32) * rng.standard_normal((n, v), dtype=np.float32)
    run = RunDir(path)
    run.write_config(yaml.safe_dump({"data": {"_target_": "datamodules.nsd.NSDDataModule"}}))
    zeros = np.zeros(v)
    run.write_voxel_metrics({"test": {"r": zeros, "r2": zeros, "nc": np.full(v, 60.0), "nc_r2": zeros}},
                            np.stack([np.arange(v), np.zeros(v, int), np.zeros(v, int)], 1),
                            {f"roi{k}": (np.arange(v) % N_ROIS) == k for k in range(N_ROIS)})
    ids = np.arange(n)
    run.write_predictions({"test": pred}, {"test": true}, {"test": ids})
    run.write_info({"time_series": False})
    run.write_metrics({"test": {}})


def rss_gb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024 ** 2
    return float("nan")


def reference(run, n_boot: int, seed: int, voxel_batch: int = 1024) -> np.ndarray:
    """The plain loop: ROI means of per-voxel r for every resample, (n_boot, 1 + N_ROIS)."""
    import torch

    from analyses.jobs.report_compare import ALL_VOXELS
    from analyses.methods.stats import bootstrap_indices

    pr = run.predictions("test")
    masks = {ALL_VOXELS: np.ones(pr.true.shape[1], bool), **run.rois()}
    out = np.empty((n_boot, len(masks)))
    true = torch.as_tensor(pr.true, dtype=torch.float64)
    pred = torch.as_tensor(pr.pred, dtype=torch.float64)
    for b, rows in enumerate(torch.from_numpy(bootstrap_indices(len(pr.ids), n_boot, seed))):
        r = np.empty(true.shape[1])
        for start in range(0, true.shape[1], voxel_batch):
            t, p = true[rows, start:start + voxel_batch], pred[rows, start:start + voxel_batch]
            t, p = t - t.mean(0), p - p.mean(0)
            r[start:start + voxel_batch] = ((t * p).sum(0) / torch.sqrt((t * t).sum(0) * (p * p).sum(0))).numpy()
        out[b] = [r[m].mean() for m in masks.values()]
    return out


def child(args) -> None:
    import torch  # noqa: F401  (import cost outside the timing)

    from analyses.jobs.report_compare import bootstrap_run
    from encoders.run_dir import RunDir

    run = RunDir(args.run)
    run.predictions("test"), run.voxels()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak covers the computation only
    except OSError:
        pass
    base = rss_gb("VmRSS")
    start = time.perf_counter()
    if args.child == "ours":
        boot = bootstrap_run(run, "test", ["r", "r2", "nc_r2"], [f"roi{k}" for k in range(N_ROIS)], args.n_boot, 0, 20,
                             interval=args.interval)
        draws = boot.draws["r", "mean"]
    else:
        draws = reference(run, args.n_boot, 0)
    seconds = time.perf_counter() - start
    np.save(args.out, draws)
    Path(args.out + ".json").write_text(json.dumps({"seconds": seconds, "growth_gb": rss_gb("VmHWM") - base}))


def run_child(method: str, run_dir: Path, n_boot: int, interval: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "d.npy")
        proc = subprocess.run([sys.executable, __file__, "--child", method, "--run", str(run_dir), "--n-boot",
                               str(n_boot), "--interval", interval, "--out", out], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        return {**json.loads(Path(out + ".json").read_text()), "draws": np.load(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="test images")
    ap.add_argument("--voxels", type=int, default=20_000)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--ref-voxels", type=int, default=500)
    ap.add_argument("--ref-boot", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--interval", default="bca")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if args.quick:
        args.n, args.voxels, args.n_boot = 300, 5_000, 300
    with tempfile.TemporaryDirectory() as tmp:
        big, small = Path(tmp) / "big", Path(tmp) / "small"
        write_run(big, args.n, args.voxels)
        write_run(small, args.n, args.ref_voxels)
        res = run_child("ours", big, args.n_boot, args.interval)
        data_gb = 2 * args.n * args.voxels * 4 / 1024 ** 3
        extra = f" + {args.n} jackknife" if args.interval == "bca" else ""
        print(f"scale: n={args.n} images, {args.voxels:,} voxels, {args.n_boot} resamples{extra}, r/R²/NC-R², "
              f"{N_ROIS + 1} ROIs (mean, median): {res['seconds']:.1f} s; memory growth {res['growth_gb']:.2f} GB "
              f"over {data_gb:.2f} GB of predictions")
        times = {"ours": [], "reference": []}
        diffs = []
        for _ in range(args.repeats):
            pair = {m: run_child(m, small, args.ref_boot, "percentile") for m in ("ours", "reference")}
            for m, r in pair.items():
                times[m].append(r["seconds"])
            diffs.append(float(np.abs(pair["ours"]["draws"] - pair["reference"]["draws"]).max()))
        t_ours, t_ref = statistics.median(times["ours"]), statistics.median(times["reference"])
        print(f"side by side, {args.ref_voxels} voxels x {args.ref_boot} resamples, median of {args.repeats}: ours "
              f"{t_ours:.2f} s (r, R² and NC-R², mean and median) vs the resampling loop {t_ref:.2f} s (r, mean only) "
              f"-> {t_ref / t_ours:.1f}x; max |ROI mean r ours - loop| = {max(diffs):.1e}")


if __name__ == "__main__":
    main()
