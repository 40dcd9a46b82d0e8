"""Peak memory of loading one NSD subject's betas, in every space and format, against one session's size.

    python benchmarks/nsd_memory.py                        # 3 sessions x 750 trials, volume 48x56x48, 2 x 40000 vertices
    python benchmarks/nsd_memory.py --volume 81 104 83 --vertices 163842 --sessions 2   # NSD's func1pt8mm / fsaverage sizes

Writes a dataset in NSD's layout and formats into a temporary folder (removed afterwards unless --keep):
func1pt8mm betas as .hdf5 (trials, Z, Y, X) int16 and .nii.gz (X, Y, Z, trials) int16, nativesurface
{lh,rh} .hdf5 (trials, vertices) int16, fsaverage {lh,rh} .mgh (vertices, 1, 1, trials) float32, with an
nsdgeneral mask covering --fraction of the positions. Each load runs in a fresh process
(datamodules.nsd.load_subject, z-scored, repeats averaged) and reports the tracemalloc peak of
Python/numpy allocations during the load, and the growth of the process's peak resident memory (VmHWM
reset just before the load: it also sees HDF5/zlib buffers). The target is a peak of at most about
two sessions' worth plus the selected voxels' result.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import scipy.io

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = [("func1pt8mm", "hdf5"), ("func1pt8mm", "nifti"), ("nativesurface", "hdf5"), ("fsaverage", "mgh")]
MB = 2**20


def write_dataset(root: Path, volume: tuple[int, int, int], vertices: int, n_trials: int, n_sessions: int,
                  fraction: float, seed: int = 0) -> None:
    """One subject in NSD's layout in the four CASES; every image shown 3 times."""
    rng = np.random.default_rng(seed)
    n_images = n_trials * n_sessions // 3
    design = root / "nsddata/experiments/nsd"
    design.mkdir(parents=True)
    master = rng.permutation(np.repeat(np.arange(1, n_images + 1), 3))
    scipy.io.savemat(design / "nsd_expdesign.mat", {
        "masterordering": master[None].astype(float), "subjectim": np.arange(1, n_images + 1, dtype=float)[None],
        "sharedix": np.arange(1, max(2, n_images // 10) + 1, dtype=float)[None]})
    betas = root / "nsddata_betas/ppdata/subj01/{}/betas_fithrf_GLMdenoise_RR"
    # volume: a ball of nsdgeneral voxels
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in volume], indexing="ij"), -1)
    dist = np.linalg.norm(grid - np.array(volume) / 2, axis=-1)
    general = np.where(dist <= np.quantile(dist, fraction), 1, 0).astype(np.int16)
    roi = root / "nsddata/ppdata/subj01/func1pt8mm/roi"
    roi.mkdir(parents=True)
    nib.save(nib.Nifti1Image(general, np.eye(4)), roi / "nsdgeneral.nii.gz")
    vol_dir = Path(str(betas).format("func1pt8mm"))
    vol_dir.mkdir(parents=True)
    nib.save(nib.Nifti1Image(rng.uniform(0.1, 2, volume).astype(np.float32), np.eye(4)), vol_dir / "ncsnr.nii.gz")
    # surfaces: a contiguous band of vertices per hemisphere
    labels = np.zeros(vertices, np.int32)
    start = vertices // 3
    labels[start:start + int(fraction * vertices)] = 1
    for space in ("nativesurface", "fsaverage"):
        label_dir = root / "nsddata/freesurfer" / ("fsaverage" if space == "fsaverage" else "subj01") / "label"
        label_dir.mkdir(parents=True, exist_ok=True)
        surf_dir = Path(str(betas).format(space))
        surf_dir.mkdir(parents=True)
        for hemi in ("lh", "rh"):
            nib.save(nib.MGHImage(labels.reshape(-1, 1, 1), np.eye(4)), label_dir / f"{hemi}.nsdgeneral.mgz")
            nib.save(nib.MGHImage(rng.uniform(0.1, 2, (vertices, 1, 1)).astype(np.float32), np.eye(4)),
                     surf_dir / f"{hemi}.ncsnr.mgh")
    for session in range(1, n_sessions + 1):
        name = f"betas_session{session:02d}"
        data = np.clip(np.rint(rng.normal(0, 1.5, (n_trials,) + volume[::-1]) * 300), -32768, 32767).astype(np.int16)
        with h5py.File(vol_dir / f"{name}.hdf5", "w") as f:
            f["betas"] = data  # (T, Z, Y, X), NSD's axis order through h5py
        nib.save(nib.Nifti1Image(np.asfortranarray(data.T), np.eye(4)), vol_dir / f"{name}.nii.gz")
        del data
        for hemi in ("lh", "rh"):
            surf = np.clip(np.rint(rng.normal(0, 1.5, (n_trials, vertices)) * 300), -32768, 32767).astype(np.int16)
            with h5py.File(Path(str(betas).format("nativesurface")) / f"{hemi}.{name}.hdf5", "w") as f:
                f["betas"] = surf
            psc = (surf.T / 300.0).astype(np.float32).reshape(vertices, 1, 1, n_trials)
            nib.save(nib.MGHImage(psc, np.eye(4)), Path(str(betas).format("fsaverage")) / f"{hemi}.{name}.mgh")
            del surf, psc


def session_bytes(root: Path, space: str, fmt: str) -> int:
    """One session's betas as stored (dtype of the file), in memory."""
    from datamodules.nsd_files import NSDPaths, betas_shape
    paths = NSDPaths(root, 1, space, fmt)
    total = 0
    for path in paths.betas_files(1):
        shape = betas_shape(path)
        itemsize = 4 if fmt == "mgh" else 2
        total += int(np.prod(shape)) * itemsize
    return total


def _vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure(root: Path, space: str, fmt: str) -> dict:
    """Load once in this process; memory figures in bytes."""
    from datamodules.nsd import load_subject
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        rss0, rss_ok = _vm("VmRSS"), True
    except OSError:
        rss0, rss_ok = _vm("VmHWM"), False
    tracemalloc.start()
    t0 = time.perf_counter()
    data = load_subject(root, 1, roi_files=[], space=space, beta_format=fmt)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"tracemalloc_peak": peak, "rss_growth": _vm("VmHWM") - rss0, "rss_reset": rss_ok,
            "result": int(data.responses.nbytes), "n_voxels": int(data.responses.shape[1]),
            "n_images": int(data.responses.shape[0]), "seconds": seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--volume", type=int, nargs=3, default=[48, 56, 48], metavar=("X", "Y", "Z"))
    ap.add_argument("--vertices", type=int, default=40000, help="vertices per hemisphere")
    ap.add_argument("--trials", type=int, default=750, help="trials per session")
    ap.add_argument("--sessions", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.15, help="share of positions in nsdgeneral")
    ap.add_argument("--repeats", type=int, default=1, help="loads per case (medians are printed)")
    ap.add_argument("--out", default=None, help="parent folder for the temporary dataset (default: system tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the dataset")
    ap.add_argument("--measure", nargs=3, metavar=("ROOT", "SPACE", "FORMAT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1], args.measure[2])))
        return 0
    if args.sessions * args.trials % 3:
        ap.error("sessions x trials must be divisible by 3 (every image is shown 3 times)")
    root = Path(tempfile.mkdtemp(prefix="nsd_memory_", dir=args.out))
    try:
        t0 = time.perf_counter()
        write_dataset(root, tuple(args.volume), args.vertices, args.trials, args.sessions, args.fraction)
        print(f"wrote {args.sessions} sessions x {args.trials} trials (volume {tuple(args.volume)}, "
              f"2 x {args.vertices} vertices) to {root} in {time.perf_counter() - t0:.0f} s")
        header = (f"{'space / format':24} {'session':>9} {'result':>8} {'tracemalloc':>12} {'RSS growth':>11} "
                  f"{'peak/session':>13} {'budget':>8} {'load s':>7}")
        print(header + "\n" + "-" * len(header))
        for space, fmt in CASES:
            runs = []
            for _ in range(args.repeats):
                proc = subprocess.run([sys.executable, __file__, "--measure", str(root), space, fmt],
                                      capture_output=True, text=True, cwd=REPO)
                if proc.returncode:
                    print(proc.stderr[-2000:], file=sys.stderr)
                    return 1
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            med = {k: statistics.median(r[k] for r in runs) for k in ("tracemalloc_peak", "rss_growth", "seconds")}
            session = session_bytes(root, space, fmt)
            result = runs[0]["result"]
            peak = max(med["tracemalloc_peak"], med["rss_growth"])
            budget = 2 * session + result
            print(f"{space + ' / ' + fmt:24} {session / MB:8.0f}M {result / MB:7.1f}M {med['tracemalloc_peak'] / MB:11.1f}M "
                  f"{med['rss_growth'] / MB:10.1f}M {peak / session:12.2f}x {'ok' if peak <= budget else 'OVER':>8} "
                  f"{med['seconds']:7.1f}")
        print(f"(session: one session's betas as stored; result: the selected voxels x images, float32; "
              f"budget: peak <= 2 x session + result; {runs[0]['n_voxels']} voxels in the last case)")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
