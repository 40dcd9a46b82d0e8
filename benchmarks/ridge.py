"""Ridge with a per-voxel alpha: our RidgeCV vs himalaya's RidgeCV (and scikit-learn's), side by side.

    python benchmarks/ridge.py                       # n=8000, d=1024, 20k voxels, 10 alphas, 5 folds, 2 repeats
    python benchmarks/ridge.py --voxels 300000 --only ours --repeats 1    # the scale run
    python benchmarks/ridge.py --quick               # small sizes, a minute
    python benchmarks/ridge.py --device cuda         # on a GPU: ours vs himalaya's torch_cuda backend
    python benchmarks/ridge.py --device cpu --himalaya-backend torch --summary   # one line per figure

Every fit runs in a fresh subprocess (peak memory: its VmHWM, reset just before the fit; on CUDA torch's
peak allocation on the GPU), alternating methods so that ratios are measured side by side. Both methods
get the same data, alphas and folds and the R² CV score; held-out R² per voxel on 2000 extra samples is
compared. Prints medians over repeats. --device: where both fit (ours: ``RidgeCV(device=...)`` with
``voxel_batch="auto"``; himalaya: its backend, by default ``torch_cuda`` on cuda and ``numpy`` on the CPU,
``--himalaya-backend`` to choose). On CUDA, the CUDA context and the cuBLAS/cuSOLVER handles are made
before the clock starts, the clock stops after the device is synchronised, and the inputs' transfer to
the GPU is inside the fit for both.
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


def fit_one(method: str, n: int, d: int, v: int, n_alphas: int, folds: int, out: str, device: str = "cpu",
            backend: str = "numpy") -> None:
    """Child process: fit one method, write timings, peak memory and held-out R² to ``out``."""
    import torch

    from encoders.ridge import kfold_indices
    X, Y, Xt, Yt = make_data(n, d, v, n_test=2000)
    alphas = np.logspace(-2, 7, n_alphas)
    fold_idx = kfold_indices(n, folds, shuffle=True, seed=0)
    cuda = device.startswith("cuda")
    if method == "ours":
        import encoders.ridge  # noqa: F401  (import cost outside the timing)
    elif method.startswith("himalaya"):
        import himalaya.ridge  # noqa: F401
        from himalaya.backend import set_backend
        set_backend(backend)
    if cuda:  # the context and the library handles, outside the clock
        a = torch.randn(64, 64, device=device, dtype=torch.float64)
        torch.linalg.eigh(a @ a.T)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_before = torch.cuda.memory_allocated()
    if method == "himalaya64":  # float64 inputs (its float32 path is less exact)
        X, Y, Xt = X.astype(np.float64), Y.astype(np.float64), Xt.astype(np.float64)
    rss_before = rss_gb("VmRSS")
    reset_peak()
    extra = {}
    start = time.perf_counter()
    if method == "ours":
        from encoders.ridge import RidgeCV
        model = RidgeCV(alphas=alphas, cv=folds, seed=0, device=device, progress=False).fit(X, Y)
        best = model.best_alphas_
        extra["voxel_batch"] = int(model.voxel_batch_)
    elif method in ("himalaya", "himalaya64"):
        from himalaya.backend import get_backend
        from himalaya.ridge import RidgeCV as HRidgeCV
        from himalaya.scoring import r2_score as h_r2
        splits = [(np.setdiff1d(np.arange(n), f), f) for f in fold_idx]
        model = HRidgeCV(alphas=alphas, cv=splits, fit_intercept=True, solver_params={"score_func": h_r2}).fit(X, Y)
        best = np.asarray(get_backend().to_numpy(model.best_alphas_))
    elif method == "sklearn":  # efficient leave-one-out (GCV): sklearn has no K-fold alpha_per_target
        from sklearn.linear_model import RidgeCV as SRidgeCV
        model = SRidgeCV(alphas=alphas, alpha_per_target=True).fit(X, Y)
        best = np.asarray(model.alpha_)
    else:
        raise ValueError(method)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    if cuda:
        extra["gpu_peak_gb"] = (torch.cuda.max_memory_allocated() - gpu_before) / 1024 ** 3
    pred = model.predict(Xt)
    if method.startswith("himalaya"):
        from himalaya.backend import get_backend
        pred = get_backend().to_numpy(pred)
    r2 = held_out_r2(np.asarray(pred, dtype=np.float32), Yt)
    peak_gb = rss_gb("VmHWM")
    np.savez(out, r2=r2, best=best)
    Path(out + ".json").write_text(json.dumps({"wall_s": wall, "peak_gb": peak_gb, "fit_gb": peak_gb - rss_before,
                                               **extra}))


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
               "--voxels", str(args.voxels), "--alphas", str(args.alphas), "--folds", str(args.folds), "--out", out,
               "--device", args.device, "--himalaya-backend", args.himalaya_backend]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"method": method, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
        info = json.loads(Path(out + ".json").read_text())
        data = np.load(out)
        return {"method": method, **info, "r2": data["r2"], "best": data["best"]}


def label(method: str, args) -> str:
    return f"{method}[{args.himalaya_backend}]" if method.startswith("himalaya") else method


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8000)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--voxels", type=int, default=20000)
    p.add_argument("--alphas", type=int, default=10)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", nargs="+", default=["ours", "himalaya"], choices=["ours", "himalaya", "himalaya64", "sklearn"])
    p.add_argument("--quick", action="store_true", help="n=2000, d=256, 4000 voxels, with scikit-learn (on the CPU)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N: where both fit (default cpu)")
    p.add_argument("--himalaya-backend", choices=["numpy", "torch", "torch_cuda"],
                   help="himalaya's backend (default: torch_cuda on cuda, numpy on the CPU)")
    p.add_argument("--summary", action="store_true", help="only the figures, one line each")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    if args.himalaya_backend is None:
        args.himalaya_backend = "torch_cuda" if cuda else "numpy"
    if args.child:
        fit_one(args.child, args.n, args.d, args.voxels, args.alphas, args.folds, args.out, args.device,
                args.himalaya_backend)
        return
    if cuda != (args.himalaya_backend == "torch_cuda"):
        p.error(f"--himalaya-backend {args.himalaya_backend} does not run on --device {args.device}")
    if cuda:
        import torch
        if not torch.cuda.is_available():
            print(f"error: --device {args.device}: CUDA is not available (torch {torch.__version__})", file=sys.stderr)
            sys.exit(2)
    if args.quick:
        args.n, args.d, args.voxels = 2000, 256, 4000
        args.only = ["ours", "himalaya", "himalaya64"] + ([] if cuda else ["sklearn"])
    say = (lambda *a, **k: None) if args.summary else print
    say(f"n={args.n} d={args.d} voxels={args.voxels} alphas={args.alphas} folds={args.folds} repeats={args.repeats} "
        f"device={args.device} himalaya backend={args.himalaya_backend} "
        f"threads={os.environ.get('OMP_NUM_THREADS', 'default')}", flush=True)
    results: dict[str, list[dict]] = {m: [] for m in args.only}
    for rep in range(args.repeats):
        for method in args.only:  # alternate: side-by-side under the same machine load
            res = run_child(method, args)
            results[method].append(res)
            if "error" in res:
                print(f"  repeat {rep}: {label(method, args)} FAILED: {res['error']}", flush=True)
            else:
                gpu = f"  peak GPU {res['gpu_peak_gb']:.2f} GB" if "gpu_peak_gb" in res else ""
                say(f"  repeat {rep}: {label(method, args):20s} {res['wall_s']:8.1f} s  peak RSS {res['peak_gb']:.2f} GB "
                    f"(+{res['fit_gb']:.2f} GB during the fit){gpu}", flush=True)
    ok = {m: [r for r in rs if "error" not in r] for m, rs in results.items()}
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k not in ("r2", "best", "method")}
           for m, rs in ok.items() if rs}
    mem = "gpu_peak_gb" if cuda else "fit_gb"
    mem_what = "peak GPU memory of the fit" if cuda else "memory growth during the fit"
    where = f"ridge n={args.n} d={args.d} voxels={args.voxels} alphas={args.alphas} folds={args.folds} on {args.device}"
    if args.summary:
        for method, m in med.items():
            batch = f", voxel_batch {m['voxel_batch']:.0f}" if "voxel_batch" in m else ""
            print(f"{where}: {label(method, args)} {m['wall_s']:.2f} s, {mem_what} {m[mem]:.2f} GB{batch}", flush=True)
    else:
        print(f"\nmethod{'':16s}median wall (s)   median peak RSS (GB)   median growth during fit (GB)"
              + ("   median peak GPU (GB)" if cuda else ""))
        for method, m in med.items():
            print(f"{label(method, args):20s}  {m['wall_s']:14.2f}   {m['peak_gb']:14.2f}   {m['fit_gb']:14.2f}"
                  + (f"   {m['gpu_peak_gb']:14.2f}" if cuda else ""))
    if "ours" in med and len(med) > 1:
        ours = ok["ours"]
        for other, rs in ok.items():
            if other == "ours" or not rs:
                continue
            wall_ratio = med["ours"]["wall_s"] / med[other]["wall_s"]
            mem_ratio = med["ours"][mem] / med[other][mem] if med[other][mem] > 0 else float("nan")
            diff = np.abs(ours[0]["r2"] - rs[0]["r2"])
            flips = int((~np.isclose(ours[0]["best"], rs[0]["best"], rtol=1e-6)).sum())
            if args.summary:
                print(f"{where}: ours / {label(other, args)}: wall time ratio {wall_ratio:.3f} ({1 / wall_ratio:.1f}x "
                      f"faster), {mem_what} ratio {mem_ratio:.3f}; held-out |dR2| max {diff.max():.1e}, "
                      f"{flips} of {len(diff)} voxels with a different alpha", flush=True)
                continue
            print(f"\nours / {label(other, args)}: wall time ratio {wall_ratio:.3f} ({1 / wall_ratio:.1f}x faster), "
                  f"ratio of {mem_what} {mem_ratio:.3f}")
            print(f"  held-out per-voxel |ΔR²|: median {np.median(diff):.2e}, 99th pct {np.percentile(diff, 99):.2e}, "
                  f"max {diff.max():.2e}; voxels with a different alpha: {flips} of {len(diff)}")
    if any("error" in r for rs in results.values() for r in rs):
        sys.exit(1)


if __name__ == "__main__":
    main()
