"""Synthetic video-fMRI dataset in the Wen et al. 2018 layout, with a planted ground truth.

Movies are sequences of shots; each shot shows one procedurally drawn image
(:mod:`datamodules.synthetic_images`, six categories) slowly panned across the frame. Every
cortical vertex responds to per-frame features — the shot's category (category-selective
vertices), the luminance of the frame's quadrants and its contrast (low-level vertices), both
(mixed), or, with ``extra_signal_fn``, any function of the frames (noise-free "extra" vertices)
— convolved with the HRF at the frame rate and taken per volume with the released timing of Wen et
al. 2018 (:mod:`datamodules.video_timing`, the datamodule's default): like the real runs, each run
of a training movie and of test1 has n_volumes + 5 volumes, each of test2… n_volumes + 6, and the
volume that the released code keeps as k carries the convolved features at 5 s + k·TR (the 1 or 2
volumes before them and the 4 after them follow the same clock). Each run adds white noise at the
vertex's SNR, a cubic drift and a baseline; a few vertices are dead (constant).

Layout under ``DIR`` (S = subject, K = segment, R = repeat)::

    stimuli/segK.mp4, stimuli/testK.mp4                       H.264, frame_size², fps, n_volumes·tr s
    subjectS/fmri/segK/cifti/segK_R_Atlas.dtseries.nii        R = 1..train_repeats, n_volumes + 5 volumes
    subjectS/fmri/testK/cifti/testK_R_Atlas.dtseries.nii      R = 1..test_repeats, n_volumes + 5 (test1) or + 6
    ground_truth.h5                                           see ``_write_ground_truth``
    synthetic_video.json                                      generation parameters (written last)

The dtseries have the cortex first (``n_cortex`` grayordinates: left then right hemisphere surface
vertices, a subset of each surface as in the HCP 91k space), then ``n_subcortical`` voxels of one
volume structure.

    from datamodules.synthetic_video import ensure_synthetic_video
    root = ensure_synthetic_video("data/synthetic_video", n_volumes=40, fps=10)

    python -m datamodules.synthetic_video --out DIR [--force | --if-missing]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from collections.abc import Callable

import h5py
import numpy as np

from datamodules.atomic_dir import ensure_generated, write_dir_atomically
from datamodules.synthetic_images import CATEGORIES, render
from datamodules.video_files import VideoPaths, write_dtseries, write_mp4
from datamodules.video_timing import TRAILING_VOLUMES, convolved_at, released_times

FORMAT_VERSION = 2      # 2: runs of n_volumes + 5 / + 6 volumes, signal on the released timing
BASELINE = 10000.0      # BOLD intensity scale of the runs
SIGNAL_PSC = 1.0        # signal sd in % of the baseline
DRIFT_SD = 2.0          # cubic drift sd, in signal sds
SURFACE_EXTRA = 12      # surface vertices per hemisphere outside the grayordinates (the medial wall)

DEFAULTS: dict = dict(
    n_subjects=1, n_train_segments=6, n_test_segments=2, train_repeats=2, test_repeats=10, n_volumes=40,
    tr=2.0, fps=10.0, frame_size=64, n_cortex=400, n_subcortical=16, shot_seconds=[2.0, 6.0],
    snr_range=[0.5, 3.0], n_dead=3, hrf="wen", seed=0,
)
KINDS = ("category", "lowlevel", "mixed", "extra", "dead")


def meta_path(root) -> pathlib.Path:
    return pathlib.Path(root) / "synthetic_video.json"


def ground_truth_path(root) -> pathlib.Path:
    return pathlib.Path(root) / "ground_truth.h5"


def stimulus_names(p: dict) -> list[str]:
    return ([f"seg{k}" for k in range(1, p["n_train_segments"] + 1)]
            + [f"test{k}" for k in range(1, p["n_test_segments"] + 1)])


def lead_volumes(stimulus: str) -> int:
    """Volumes before the kept ones, as released: 1 for the training movies and test1, 2 for test2…"""
    return 2 if stimulus.startswith("test") and stimulus != "test1" else 1


def run_volumes(stimulus: str, n_volumes: int) -> int:
    """Volumes in each run of ``stimulus``: the kept n_volumes, its lead volumes and 4 after (245 / 246)."""
    return lead_volumes(stimulus) + n_volumes + TRAILING_VOLUMES


def normalise_params(**params) -> dict:
    """Defaults filled in, validated, JSON-able."""
    unknown = set(params) - set(DEFAULTS) - {"extra_signal_fn"}
    if unknown:
        raise TypeError(f"unknown synthetic video parameter(s): {sorted(unknown)}")
    fn = params.get("extra_signal_fn")
    p = {**DEFAULTS, **{k: v for k, v in params.items() if k != "extra_signal_fn"}}
    for k in ("n_subjects", "n_train_segments", "n_test_segments", "train_repeats", "test_repeats", "n_volumes",
              "frame_size", "n_cortex", "n_subcortical", "n_dead", "seed"):
        p[k] = int(p[k])
    p["tr"], p["fps"] = float(p["tr"]), float(p["fps"])
    p["shot_seconds"] = [float(v) for v in p["shot_seconds"]]
    p["snr_range"] = [float(v) for v in p["snr_range"]]
    p["hrf"] = p["hrf"] if isinstance(p["hrf"], str) else {k: float(v) for k, v in dict(p["hrf"]).items()}
    p["extra_signal_fn"] = None if fn is None else f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"
    if p["frame_size"] < 32 or p["frame_size"] % 2:
        raise ValueError(f"frame_size must be even and >= 32, got {p['frame_size']}")
    if p["train_repeats"] < 1 or p["test_repeats"] < 2 or p["n_train_segments"] < 2 or p["n_test_segments"] < 1:
        raise ValueError("need >= 2 training segments, >= 1 test segment, >= 1 train and >= 2 test repeats")
    if p["n_cortex"] < 20 or p["n_dead"] >= p["n_cortex"] // 2:
        raise ValueError(f"n_cortex must be >= 20 and n_dead < n_cortex / 2, got {p['n_cortex']}, {p['n_dead']}")
    if p["n_volumes"] < 8:
        raise ValueError(f"n_volumes must be >= 8 (a 4th-order detrend needs more), got {p['n_volumes']}")
    if abs(p["n_volumes"] * p["tr"] * p["fps"] - round(p["n_volumes"] * p["tr"] * p["fps"])) > 1e-6:
        raise ValueError("n_volumes x tr x fps must be a whole number of frames")
    if not 0 < p["shot_seconds"][0] <= p["shot_seconds"][1]:
        raise ValueError(f"shot_seconds must be [min, max] > 0, got {p['shot_seconds']}")
    if not 0 < p["snr_range"][0] <= p["snr_range"][1]:
        raise ValueError(f"snr_range must be [lo, hi] > 0, got {p['snr_range']}")
    return p


# --------------------------------------------------------------------------- movies
def movie_frames(rng: np.random.Generator, n_frames: int, fps: float, size: int, shot_seconds) -> tuple[np.ndarray, np.ndarray]:
    """Frames uint8 (n_frames, size, size, 3) and the category index of each frame (n_frames,).

    Each shot draws an image 1.5x the frame size and pans a frame-sized window across it."""
    frames = np.empty((n_frames, size, size, 3), np.uint8)
    category = np.empty(n_frames, np.int64)
    big = int(size * 1.5)
    start = 0
    while start < n_frames:
        length = min(n_frames - start, max(1, int(round(rng.uniform(*shot_seconds) * fps))))
        c = int(rng.integers(len(CATEGORIES)))
        image, _ = render(CATEGORIES[c], rng, big)
        (y0, x0), (y1, x1) = rng.integers(0, big - size + 1, size=(2, 2))
        for j in range(length):
            a = j / max(length - 1, 1)
            y, x = int(round(y0 + a * (y1 - y0))), int(round(x0 + a * (x1 - x0)))
            frames[start + j] = image[y:y + size, x:x + size]
        category[start:start + length] = c
        start += length
    return frames, category


def frame_features(frames: np.ndarray, category: np.ndarray) -> np.ndarray:
    """Ground-truth per-frame features (n_frames, 6 + 5): category one-hot, 4 quadrant luminances, contrast."""
    gray = frames.astype(np.float32).mean(axis=3) / 255.0
    h = gray.shape[1] // 2
    quadrants = [gray[:, :h, :h], gray[:, :h, h:], gray[:, h:, :h], gray[:, h:, h:]]
    low = np.stack([q.mean(axis=(1, 2)) for q in quadrants] + [gray.std(axis=(1, 2))], axis=1)
    return np.concatenate([np.eye(len(CATEGORIES))[category], low], axis=1)


# --------------------------------------------------------------------------- responses
def plan_vertices(rng: np.random.Generator, n_cortex: int, n_dead: int, n_extra: int) -> dict:
    """Kind, preferred category, feature weights (11, n_cortex) and extra-signal column of every vertex."""
    kinds = rng.choice(np.array(["category", "lowlevel", "mixed"]), size=n_cortex, p=[0.4, 0.35, 0.25])
    special = rng.choice(n_cortex, size=n_dead + n_extra, replace=False)
    kinds[special[:n_dead]] = "dead"
    kinds[special[n_dead:]] = "extra"
    extra_column = np.full(n_cortex, -1, np.int64)
    extra_column[special[n_dead:]] = np.arange(n_extra)
    n_cat = len(CATEGORIES)
    weights = np.zeros((n_cat + 5, n_cortex))
    preferred = rng.integers(n_cat, size=n_cortex)
    cat = np.isin(kinds, ["category", "mixed"])
    weights[:n_cat, cat] = rng.normal(0, 0.15, size=(n_cat, cat.sum()))
    weights[preferred[cat], np.flatnonzero(cat)] = 1.0
    low = np.isin(kinds, ["lowlevel", "mixed"])
    weights[n_cat:, low] = rng.normal(0, 1.0, size=(5, low.sum()))
    weights[n_cat:, kinds == "mixed"] *= 0.6
    preferred[~cat] = -1
    return {"kind": kinds, "preferred": preferred, "weights": weights, "extra_column": extra_column}


def planted_signals(per_frame: dict[str, np.ndarray], plan: dict, extra: dict[str, np.ndarray] | None,
                    p: dict, train: list[str]) -> dict[str, np.ndarray]:
    """Noise-free responses per stimulus for every volume of its runs (run_volumes, n_cortex): volume j
    carries the convolved frame signal at 5 s + (j − lead)·TR (the released timing); unit variance over
    the kept volumes of the training segments."""
    signals = {}
    for s, feats in per_frame.items():
        frame_signal = feats @ plan["weights"]
        if extra is not None:
            cols = plan["extra_column"]
            frame_signal[:, cols >= 0] = extra[s][:, cols[cols >= 0]]
        times = released_times(p["n_volumes"] + TRAILING_VOLUMES, p["tr"], first=-lead_volumes(s))
        signals[s] = convolved_at(frame_signal, p["fps"], times, p["hrf"])
    stacked = np.concatenate([kept(signals[s], s, p) for s in train])
    mean, std = stacked.mean(0), stacked.std(0)
    std[std == 0] = 1.0
    dead = plan["kind"] == "dead"
    return {s: np.where(dead, 0.0, (v - mean) / std) for s, v in signals.items()}


def kept(run: np.ndarray, stimulus: str, p: dict) -> np.ndarray:
    """The volumes of a run of ``stimulus`` that the released timing keeps: (n_volumes, …)."""
    return run[lead_volumes(stimulus):lead_volumes(stimulus) + p["n_volumes"]]


def run_data(rng: np.random.Generator, signal: np.ndarray, snr: np.ndarray, dead: np.ndarray,
             n_subcortical: int) -> np.ndarray:
    """One run (n_time, n_cortex + n_subcortical) float32: baseline·(1 + psc/100·(signal + noise + drift)),
    signal (n_time, n_cortex)."""
    n, v = signal.shape
    t = np.linspace(-1, 1, n)
    drift = np.stack([t ** k for k in range(4)], axis=1) @ rng.normal(0, DRIFT_SD / 2, (4, v))
    noise = rng.normal(0, 1, (n, v)) / snr
    baseline = BASELINE * rng.uniform(0.8, 1.2, v)
    cortex = baseline * (1 + SIGNAL_PSC / 100 * (signal + noise + drift))
    cortex[:, dead] = baseline[dead]
    sub = BASELINE * (1 + SIGNAL_PSC / 100 * rng.normal(0, 1, (n, n_subcortical)))
    return np.concatenate([cortex, sub], axis=1).astype(np.float32)


def compute_extra(frames: np.ndarray, fn: Callable, batch: int = 256) -> np.ndarray:
    """fn(uint8 frames (b, H, W, 3)) -> (b, k), over all frames in batches: (n_frames, k) float64."""
    return np.concatenate([np.asarray(fn(frames[i:i + batch]), np.float64) for i in range(0, len(frames), batch)])


# --------------------------------------------------------------------------- build
def _write_ground_truth(path: pathlib.Path, p: dict, categories: dict, subjects: list[dict]) -> None:
    """ground_truth.h5: /categories, /frame_category/<stim> (n_frames,); per subject /subjectS/: kind,
    preferred (-1 = none), weights (11, n_cortex) over [6 categories, 4 quadrant luminances, contrast],
    extra_column, snr (n_cortex,), hemisphere, vertex, signal/<stim> (n_volumes, n_cortex) noise-free, at
    the volumes the released timing keeps (aligned with the datamodule's responses)."""
    with h5py.File(path, "w", track_order=True) as f:
        f.attrs["params"] = json.dumps(p)
        f.create_dataset("categories", data=np.array(CATEGORIES, dtype="S"))
        f.create_dataset("feature_names", data=np.array(list(CATEGORIES) + ["lum_tl", "lum_tr", "lum_bl", "lum_br",
                                                                            "contrast"], dtype="S"))
        for s, c in categories.items():
            f.create_dataset(f"frame_category/{s}", data=c)
        for k, sub in enumerate(subjects, start=1):
            g = f.create_group(f"subject{k}")
            for name, value in sub.items():
                if isinstance(value, dict):
                    for s, v in value.items():
                        g.create_dataset(f"{name}/{s}", data=np.asarray(v, np.float32))
                else:
                    value = np.asarray(value)
                    g.create_dataset(name, data=value.astype("S") if value.dtype.kind == "U" else value)


def _build(root: pathlib.Path, p: dict, extra_signal_fn: Callable | None) -> None:
    names = stimulus_names(p)
    train = names[:p["n_train_segments"]]
    n_frames = int(round(p["n_volumes"] * p["tr"] * p["fps"]))
    r_movies, *r_subjects = np.random.default_rng(p["seed"]).spawn(1 + p["n_subjects"])
    per_frame, categories, extra = {}, {}, ({} if extra_signal_fn is not None else None)
    for s, rng in zip(names, r_movies.spawn(len(names))):
        frames, categories[s] = movie_frames(rng, n_frames, p["fps"], p["frame_size"], p["shot_seconds"])
        write_mp4(root / "stimuli" / f"{s}.mp4", frames, p["fps"])
        per_frame[s] = frame_features(frames, categories[s])
        if extra is not None:
            extra[s] = compute_extra(frames, extra_signal_fn)
    n_extra = 0 if extra is None else next(iter(extra.values())).shape[1]
    n_cortex = p["n_cortex"]
    n_left, n_right = n_cortex // 2, n_cortex - n_cortex // 2
    subjects = []
    for k, rng in enumerate(r_subjects, start=1):
        r_plan, r_noise = rng.spawn(2)
        plan = plan_vertices(r_plan, n_cortex, p["n_dead"], n_extra)
        snr = r_plan.uniform(*p["snr_range"], size=n_cortex)
        snr[plan["kind"] == "extra"] = 1e3
        surfaces = [(name, np.sort(r_plan.choice(n + SURFACE_EXTRA, size=n, replace=False)), n + SURFACE_EXTRA)
                    for name, n in (("CortexLeft", n_left), ("CortexRight", n_right))]
        mask = np.zeros((6, 6, 6), bool)
        mask.flat[np.sort(r_plan.choice(mask.size, size=p["n_subcortical"], replace=False))] = True
        signals = planted_signals(per_frame, plan, extra, p, train)
        paths = VideoPaths(root, k)
        dead = plan["kind"] == "dead"
        for s in names:
            repeats = p["train_repeats"] if s in train else p["test_repeats"]
            for r in range(1, repeats + 1):
                write_dtseries(paths.cifti(s, r), run_data(r_noise, signals[s], snr, dead, p["n_subcortical"]),
                               p["tr"], surfaces, mask)
        subjects.append({**plan, "snr": snr, "hemisphere": np.repeat([0, 1], [n_left, n_right]),
                         "vertex": np.concatenate([v for _, v, _ in surfaces]),
                         "signal": {s: kept(v, s, p) for s, v in signals.items()}})
    _write_ground_truth(ground_truth_path(root), p, categories, subjects)
    meta = {**p, "version": FORMAT_VERSION, "stimuli": names, "categories": list(CATEGORIES),
            "run_volumes": {s: run_volumes(s, p["n_volumes"]) for s in names}, "timing": "released"}
    meta_path(root).write_text(json.dumps(meta, indent=2) + "\n")


def generate_video(out_dir, *, force: bool = False, extra_signal_fn: Callable | None = None, **params) -> pathlib.Path:
    """Generate the dataset at ``out_dir`` (built in ``DIR.tmp-<pid>``, moved into place atomically).

    An existing non-empty ``out_dir`` raises FileExistsError unless ``force``. ``extra_signal_fn``:
    frames uint8 (n, H, W, 3) -> (n, k); its columns, HRF-convolved and TR-averaged, become the
    noise-free signals of k extra vertices per subject."""
    out = pathlib.Path(out_dir)
    p = normalise_params(extra_signal_fn=extra_signal_fn, **params)
    return write_dir_atomically(out, lambda tmp: _build(tmp, p, extra_signal_fn), force)


def ensure_synthetic_video(out_dir, **params) -> pathlib.Path:
    """Generate at ``out_dir`` only if ``synthetic_video.json`` is absent; if present but made with other
    parameters, raise ValueError naming the dir and the keys that differ."""
    wanted = {**normalise_params(**params), "version": FORMAT_VERSION}
    return ensure_generated(out_dir, meta_path(out_dir).name, wanted, lambda: generate_video(out_dir, **params),
                            "synthetic video dataset")


# --------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m datamodules.synthetic_video",
                                 description="Generate a synthetic video-fMRI dataset in the Wen et al. 2018 layout.")
    ap.add_argument("--out", required=True, help="output directory")
    for name in ("n_subjects", "n_train_segments", "n_test_segments", "train_repeats", "test_repeats", "n_volumes",
                 "frame_size", "n_cortex", "n_subcortical", "n_dead", "seed"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=DEFAULTS[name])
    ap.add_argument("--tr", type=float, default=DEFAULTS["tr"])
    ap.add_argument("--fps", type=float, default=DEFAULTS["fps"])
    ap.add_argument("--snr-range", type=float, nargs=2, metavar=("LO", "HI"), default=DEFAULTS["snr_range"])
    ap.add_argument("--hrf", default=DEFAULTS["hrf"], choices=["wen", "spm"])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--force", action="store_true", help="replace an existing DIR")
    mode.add_argument("--if-missing", action="store_true", help="reuse DIR if it already holds this dataset")
    return ap


def main(argv=None) -> int:
    args = vars(_parser().parse_args(argv))
    out, force, if_missing = args.pop("out"), args.pop("force"), args.pop("if_missing")
    t0 = time.perf_counter()
    try:
        root = ensure_synthetic_video(out, **args) if if_missing else generate_video(out, force=force, **args)
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{root}: {len(stimulus_names(normalise_params(**args)))} movies, {args['n_subjects']} subject(s) "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
