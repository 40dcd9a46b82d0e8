"""Ridge with a per-voxel alpha: our RidgeCV vs himalaya's RidgeCV (and scikit-learn's), side by side.

    python benchmarks/ridge.py                       # n=8000, d=1024, 20k voxels, 10 alphas, 5 folds, 2 repeats
    python benchmarks/ridge.py --voxels 300000 --only ours --repeats 1    # the scale run
    python benchmarks/ridge.py --quick               # small sizes, a minute

Every fit runs in a fresh subprocess (peak memory: its VmHWM, reset just before the fit), alternating methods so
that ratios are measured side by side. Both methods get the same data, alphas and folds and the R²
CV score; held-out R² per voxel on 2000 extra samples is compared. Prints medians over repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_data(n: int, d: int, v: int, n_test: int, seed: int = 0):
    """X (n + n_test, d) float32 with correlated features; Y (n + n_test, v) float32 with per-voxel SNR."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d), dtype=np.float32) / np.sqrt(d)
    X = rng.standard_normal((n + n_test, d), dtype=np.float32) @ (np.eye(d, dtype=np.float32) + mix)
    rank = 64
    basis = rng.standard_normal((d, rank), dtype=np.float32) / np.sqrt(d)
    Y = np.empty((n + n_test, v), dtype=np.float32)
    for start in range(0, v, 20000):  # bounded memory for the 300k-voxel run
        stop = min(start + 20000, v)
        W = basis @ rng.standard_normal((rank, stop - start), dtype=np.float32)
        snr = rng.uniform(0.05, 2.0, stop - start).astype(np.float32)
        signal = X @ W
        signal /= signal.std(0)
        Y[:, start:stop] = signal * snr + rng.standard_normal((n + n_test, stop - start), dtype=np.float32)
    return X[:n], Y[:n], X[n:], Y[n:]


def held_out_r2(pred: np.ndarray, Y: np.ndarray) -> np.ndarray:
    from encoders.metrics import r2_score
    return r2_score(pred, Y)


def fit_one(method: str, n: int, d: int, v: int, n_alphas: int, folds: int, out: str) -> None:
    """Child process: fit one method, write timings, peak RSS and held-out R² to ``out``."""
    from encoders.ridge import kfold_indices
    X, Y, Xt, Yt = make_data(n, d, v, n_test=2000)
    alphas = np.logspace(-2, 7, n_alphas)
    fold_idx = kfold_indices(n, folds, shuffle=True, seed=0)
    if method == "ours":
        import encoders.ridge  # noqa: F401  (import cost outside the timing)
    elif method.startswith("himalaya"):
        import himalaya.ridge  # noqa: F401
    rss_before = rss_gb("VmRSS")
    reset_peak()
    start = time.perf_counter()
    if method == "ours":
        from encoders.ridge import RidgeCV
        model = RidgeCV(alphas=alphas, cv=folds, seed=0).fit(X, Y)
        best = model.best_alphas_
    elif method in ("himalaya", "himalaya64"):  # himalaya64: float64 inputs (its float32 path is less exact)
        from himalaya.ridge import RidgeCV as HRidgeCV
        from himalaya.scoring import r2_score as h_r2
        if method == "himalaya64":
            X, Y, Xt = X.astype(np.float64), Y.astype(np.float64), Xt.astype(np.float64)
            reset_peak()
            start = time.perf_counter()
        splits = [(np.setdiff1d(np.arange(n), f), f) for f in fold_idx]
        model = HRidgeCV(alphas=alphas, cv=splits, fit_intercept=True, solver_params={"score_func": h_r2}).fit(X, Y)
        best = np.asarray(model.best_alphas_)
    elif method == "sklearn":  # efficient leave-one-out (GCV): sklearn has no K-fold alpha_per_target
        from sklearn.linear_model import RidgeCV as SRidgeCV
        model = SRidgeCV(alphas=alphas, alpha_per_target=True).fit(X, Y)
        best = np.asarray(model.alpha_)
    else:
        raise ValueError(method)
    wall = time.perf_counter() - start
    r2 = held_out_r2(np.asarray(model.predict(Xt), dtype=np.float32), Yt)
    peak_gb = rss_gb("VmHWM")
    np.savez(out, r2=r2, best=best)
    Path(out + ".json").write_text(json.dumps({"wall_s": wall, "peak_gb": peak_gb, "fit_gb": peak_gb - rss_before}))


def rss_gb(field: str) -> float:
    """VmRSS (current) or VmHWM (peak since the last reset) of this process, in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024 ** 2
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def reset_peak() -> None:
    """Reset VmHWM so the peak covers the fit only (Linux; a no-op elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def run_child(method: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.npz")
        cmd = [sys.executable, __file__, "--child", method, "--n", str(args.n), "--d", str(args.d),
               "--voxels", str(args.voxels), "--alphas", str(args.alphas), "--folds", str(args.folds), "--out", out]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"method": method, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
        info = json.loads(Path(out + ".json").read_text())
        data = np.load(out)
        return {"method": method, **info, "r2": data["r2"], "best": data["best"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8000)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--voxels", type=int, default=20000)
    p.add_argument("--alphas", type=int, default=10)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", nargs="+", default=["ours", "himalaya"], choices=["ours", "himalaya", "himalaya64", "sklearn"])
    p.add_argument("--quick", action="store_true", help="n=2000, d=256, 4000 voxels, with scikit-learn")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        fit_one(args.child, args.n, args.d, args.voxels, args.alphas, args.folds, args.out)
        return
    if args.quick:
        args.n, args.d, args.voxels, args.only = 2000, 256, 4000, ["ours", "himalaya", "himalaya64", "sklearn"]
    print(f"n={args.n} d={args.d} voxels={args.voxels} alphas={args.alphas} folds={args.folds} "
          f"repeats={args.repeats} threads={os.environ.get('OMP_NUM_THREADS', 'default')}", flush=True)
    results: dict[str, list[dict]] = {m: [] for m in args.only}
    for rep in range(args.repeats):
        for method in args.only:  # alternate: side-by-side under the same machine load
            res = run_child(method, args)
            results[method].append(res)
            if "error" in res:
                print(f"  repeat {rep}: {method:9s} FAILED: {res['error']}", flush=True)
            else:
                print(f"  repeat {rep}: {method:10s} {res['wall_s']:8.1f} s  peak RSS {res['peak_gb']:.2f} GB "
                      f"(+{res['fit_gb']:.2f} GB during the fit)", flush=True)
    ok = {m: [r for r in rs if "error" not in r] for m, rs in results.items()}
    print("\nmethod      median wall (s)   median peak RSS (GB)   median growth during fit (GB)")
    for method, rs in ok.items():
        if rs:
            print(f"{method:10s}  {statistics.median(r['wall_s'] for r in rs):14.1f}   "
                  f"{statistics.median(r['peak_gb'] for r in rs):14.2f}   {statistics.median(r['fit_gb'] for r in rs):14.2f}")
    if ok.get("ours") and len(ok) > 1:
        ours = ok["ours"]
        for other, rs in ok.items():
            if other == "ours" or not rs:
                continue
            wall_ratio = statistics.median(r["wall_s"] for r in ours) / statistics.median(r["wall_s"] for r in rs)
            mem_ratio = statistics.median(r["fit_gb"] for r in ours) / statistics.median(r["fit_gb"] for r in rs)
            diff = np.abs(ours[0]["r2"] - rs[0]["r2"])
            flips = int((~np.isclose(ours[0]["best"], rs[0]["best"], rtol=1e-6)).sum())
            print(f"\nours / {other}: wall time ratio {wall_ratio:.3f} ({1 / wall_ratio:.1f}x faster), "
                  f"ratio of memory growth during the fit {mem_ratio:.3f}")
            print(f"  held-out per-voxel |ΔR²|: median {np.median(diff):.2e}, 99th pct {np.percentile(diff, 99):.2e}, "
                  f"max {diff.max():.2e}; voxels with a different alpha: {flips} of {len(diff)}")


if __name__ == "__main__":
    main()
