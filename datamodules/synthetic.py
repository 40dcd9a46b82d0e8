"""Synthetic fMRI dataset in the exact file layout of the Natural Scenes Dataset (NSD).

The generator draws procedural images of six categories (see
:mod:`datamodules.synthetic_images`), plants voxel responses with a known
ground truth (retinotopic low-level voxels in ``prf-visualrois``, category
selective voxels in the ``floc-*`` ROIs, a small food-selective blob, mixed
voxels elsewhere in ``nsdgeneral``, a few dead voxels) and writes single-trial
betas exactly where and how NSD ships them.

Layout under ``DIR`` (``XX`` = subject 01.., ``NN`` = session 01..)::

    nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5            imgBrick (n_stim, H, W, 3) uint8
    nsddata/experiments/nsd/nsd_expdesign.mat               masterordering (1, n_trials), subjectim (n_subj, n_img), sharedix (1, n_shared)
    nsddata/ppdata/subjXX/func1pt8mm/roi/{roi}.nii.gz        int16 (X, Y, Z): -1 outside brain, 0 unlabelled, k label
    nsddata/freesurfer/subjXX/label/{roi}.mgz.ctab           "  k name" lines
    nsddata_betas/ppdata/subjXX/func1pt8mm/betas_fithrf_GLMdenoise_RR/
        betas_sessionNN.hdf5                                betas (T, Z, Y, X) int16 = round(psc * 300)  <- axes reversed
        ncsnr.nii.gz                                        float32 (X, Y, Z)
    ground_truth.h5                                         planted signals (see ``_write_ground_truth``)
    synthetic.json                                          generation parameters (written last)

Trial mapping: session N (1-based) has T = n_trials / n_sessions trials; trial t
(0-based) of session N shows stimulus id (0-based row of imgBrick)
``subjectim[s-1, masterordering[0, (N-1)*T + t] - 1] - 1`` to subject s
(see :func:`trial_stimuli`).

Library use::

    from datamodules.synthetic import generate, ensure_synthetic
    root = ensure_synthetic("data/synthetic_nsd")          # generate only if missing

CLI::

    python -m datamodules.synthetic --out DIR [--n-subjects ...] [--force | --if-missing]
"""

from __future__ import annotations

import argparse
import heapq
import json
import pathlib
import sys
import time
from dataclasses import dataclass
from typing import Callable

import h5py
import nibabel as nib
import numpy as np
import scipy.io
from PIL import Image
from scipy import ndimage

from datamodules.atomic_dir import ensure_generated, write_dir_atomically
from datamodules.synthetic_images import CATEGORIES, render

FORMAT_VERSION = 1
BETA_SCALE = 300  # int16 betas = round(percent signal change * BETA_SCALE), as in NSD
VOXEL_SIZE_MM = 1.8
FEATURE_RES = 64  # grayscale downsample used for the low-level (retinotopic) features
EXTRA_BATCH = 64  # images per extra_signal_fn call
EXTRA_NCSNR = 1e3  # ncsnr reported for noise-free extra voxels
SESSION_OFFSET_SD = 0.5  # per-voxel per-session additive offset (psc)
OUTSIDE_NOISE_SD = 0.5  # psc noise of brain voxels outside nsdgeneral

DEFAULTS: dict = dict(
    n_subjects=2, n_shared=100, n_unique=500, n_repeats=3, n_sessions=6, image_size=425,
    volume_shape=(18, 22, 18), n_dead_voxels=5, snr_range=(0.4, 1.5), seed=0,
)

# ROI files and their labels (1-based, in order), as in NSD.
ROI_LABELS: dict[str, tuple[str, ...]] = {
    "nsdgeneral": ("nsdgeneral",),
    "prf-visualrois": ("V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4"),
    "floc-faces": ("OFA", "FFA-1", "FFA-2", "mTL-faces", "aTL-faces"),
    "floc-bodies": ("EBA", "FBA-1", "FBA-2", "mTL-bodies"),
    "floc-places": ("OPA", "PPA", "RSC"),
    "floc-words": ("OWFA", "VWFA-1", "VWFA-2", "mfs-words", "mTL-words"),
}
FLOC_CATEGORY = {"floc-faces": "face", "floc-bodies": "body", "floc-places": "place", "floc-words": "word"}
REQUIRED_FLOC = ("OFA", "FFA-1", "FFA-2", "EBA", "FBA-1", "OPA", "PPA", "RSC", "OWFA", "VWFA-1")
# Target ROI sizes as fractions of the subject's nsdgeneral voxel count.
PRF_FRACTION, REQUIRED_FRACTION, OPTIONAL_FRACTION, FOOD_FRACTION = 0.045, 0.025, 0.01, 0.03
# Receptive-field sigma ranges (fraction of image width) per visual area.
PRF_SIGMA = {"V1": (0.03, 0.05), "V2": (0.05, 0.08), "V3": (0.08, 0.12), "hV4": (0.12, 0.18)}


# --------------------------------------------------------------------------- paths
def subject_name(s: int) -> str:
    """1-based subject number -> 'subjXX'."""
    return f"subj{s:02d}"


def stimuli_path(root) -> pathlib.Path:
    return pathlib.Path(root) / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"


def expdesign_path(root) -> pathlib.Path:
    return pathlib.Path(root) / "nsddata/experiments/nsd/nsd_expdesign.mat"


def roi_path(root, s: int, roi: str) -> pathlib.Path:
    return pathlib.Path(root) / f"nsddata/ppdata/{subject_name(s)}/func1pt8mm/roi/{roi}.nii.gz"


def ctab_path(root, s: int, roi: str) -> pathlib.Path:
    return pathlib.Path(root) / f"nsddata/freesurfer/{subject_name(s)}/label/{roi}.mgz.ctab"


def betas_dir(root, s: int) -> pathlib.Path:
    return pathlib.Path(root) / f"nsddata_betas/ppdata/{subject_name(s)}/func1pt8mm/betas_fithrf_GLMdenoise_RR"


def betas_path(root, s: int, session: int) -> pathlib.Path:
    return betas_dir(root, s) / f"betas_session{session:02d}.hdf5"


def ground_truth_path(root) -> pathlib.Path:
    return pathlib.Path(root) / "ground_truth.h5"


def meta_path(root) -> pathlib.Path:
    return pathlib.Path(root) / "synthetic.json"


# --------------------------------------------------------------------------- parameters
def _fn_name(fn: Callable | None) -> str | None:
    """Stable, JSON-able name of ``extra_signal_fn`` (None if absent)."""
    if fn is None:
        return None
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def normalise_params(**params) -> dict:
    """Defaults filled in, validated, JSON-able (tuples -> lists, callable -> name)."""
    unknown = set(params) - set(DEFAULTS) - {"extra_signal_fn"}
    if unknown:
        raise TypeError(f"unknown synthetic dataset parameter(s): {sorted(unknown)}")
    p = {**DEFAULTS, **{k: v for k, v in params.items() if k != "extra_signal_fn"}}
    p = {k: (list(v) if isinstance(v, (tuple, list, np.ndarray)) else v) for k, v in p.items()}
    p["volume_shape"] = [int(v) for v in p["volume_shape"]]
    p["snr_range"] = [float(v) for v in p["snr_range"]]
    for k in ("n_subjects", "n_shared", "n_unique", "n_repeats", "n_sessions", "image_size", "n_dead_voxels", "seed"):
        p[k] = int(p[k])
    p["extra_signal_fn"] = _fn_name(params.get("extra_signal_fn"))
    _validate(p)
    return p


def _validate(p: dict) -> None:
    """Raise ValueError for inconsistent parameters."""
    for k in ("n_subjects", "n_shared", "n_unique", "n_repeats", "n_sessions"):
        if p[k] < 1:
            raise ValueError(f"{k} must be >= 1, got {p[k]}")
    n_trials = (p["n_shared"] + p["n_unique"]) * p["n_repeats"]
    if n_trials % p["n_sessions"]:
        raise ValueError(f"n_trials = (n_shared + n_unique) * n_repeats = {n_trials} is not divisible "
                         f"by n_sessions = {p['n_sessions']}")
    if len(p["volume_shape"]) != 3 or min(p["volume_shape"]) < 6:
        raise ValueError(f"volume_shape must be 3 sizes >= 6, got {p['volume_shape']}")
    if p["image_size"] < 16:
        raise ValueError(f"image_size must be >= 16, got {p['image_size']}")
    lo, hi = p["snr_range"]
    if not 0 < lo <= hi:
        raise ValueError(f"snr_range must satisfy 0 < low <= high, got {p['snr_range']}")
    if p["n_dead_voxels"] < 0:
        raise ValueError(f"n_dead_voxels must be >= 0, got {p['n_dead_voxels']}")


# --------------------------------------------------------------------------- design
def assign_categories(rng: np.random.Generator, n_shared: int, n_unique: int, n_subjects: int) -> np.ndarray:
    """Category index per stimulus, (n_stim,) int; balanced within the shared and each unique block."""
    blocks = [n_shared] + [n_unique] * n_subjects
    return np.concatenate([rng.permutation(np.resize(np.arange(len(CATEGORIES)), n)) for n in blocks]).astype(np.int64)


def make_design(rng: np.random.Generator, n_subjects: int, n_shared: int, n_unique: int,
                n_repeats: int, n_sessions: int) -> dict[str, np.ndarray]:
    """NSD-style design: masterordering (1, n_trials), subjectim (n_subjects, n_img), sharedix (1, n_shared); float64, 1-based."""
    n_img = n_shared + n_unique
    n_trials = n_img * n_repeats
    if n_trials % n_sessions:
        raise ValueError(f"n_trials = {n_trials} is not divisible by n_sessions = {n_sessions}")
    order = rng.permutation(np.repeat(np.arange(1, n_img + 1), n_repeats))
    shared = np.arange(1, n_shared + 1)
    rows = [np.concatenate([shared, n_shared + s * n_unique + np.arange(1, n_unique + 1)]) for s in range(n_subjects)]
    return {
        "masterordering": order[None, :].astype(np.float64),
        "subjectim": np.stack(rows).astype(np.float64),
        "sharedix": shared[None, :].astype(np.float64),
    }


def trial_stimuli(masterordering: np.ndarray, subjectim: np.ndarray, subject: int, session: int,
                  n_sessions: int) -> np.ndarray:
    """0-based stimulus ids (rows of imgBrick) of the trials of ``session`` (1-based) for ``subject`` (1-based): (T,) int."""
    mo = np.asarray(masterordering).reshape(-1).astype(np.int64)
    t = mo.size // n_sessions
    idx = mo[(session - 1) * t: session * t] - 1
    return np.asarray(subjectim)[subject - 1].astype(np.int64)[idx] - 1


MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: posix, Created by: brainprobe datamodules.synthetic"


def _write_expdesign(root: pathlib.Path, design: dict) -> None:
    """nsd_expdesign.mat (MATLAB 5 format); the header's creation date is replaced so files are reproducible."""
    path = expdesign_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, design, do_compression=True)
    with open(path, "r+b") as f:  # bytes 0..115 are free descriptive text in a MAT v5 header
        f.write(MAT_HEADER.ljust(116))


# --------------------------------------------------------------------------- stimuli
@dataclass
class StimulusFeatures:
    """Per-image features used to plant responses: edge/lum (n, 64, 64), scale/contrast (n,)."""
    edge: np.ndarray
    lum: np.ndarray
    scale: np.ndarray
    contrast: np.ndarray


def image_features(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Grayscale 64-px downsample of one uint8 (H, W, 3) image -> (edge energy (64, 64), luminance (64, 64), RMS contrast)."""
    g = Image.fromarray(img).convert("L").resize((FEATURE_RES, FEATURE_RES), Image.BOX)
    lum = np.asarray(g, np.float32) / 255.0
    gy, gx = np.gradient(lum)
    return np.hypot(gx, gy), lum, float(lum.std())


def write_stimuli(path: pathlib.Path, categories: np.ndarray, rng: np.random.Generator, size: int) -> StimulusFeatures:
    """Draw every stimulus, stream it into imgBrick (n, size, size, 3) uint8 and return its features."""
    n = len(categories)
    rngs = rng.spawn(n)
    edge = np.empty((n, FEATURE_RES, FEATURE_RES), np.float32)
    lum = np.empty_like(edge)
    scale, contrast = np.empty(n), np.empty(n)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        d = f.create_dataset("imgBrick", shape=(n, size, size, 3), dtype=np.uint8, chunks=(1, size, size, 3),
                             compression="gzip", compression_opts=1, track_times=False)
        for i, c in enumerate(categories):
            img, meta = render(CATEGORIES[c], rngs[i], size)
            d[i] = img
            edge[i], lum[i], contrast[i] = image_features(img)
            scale[i] = meta["scale"]
    return StimulusFeatures(edge, lum, scale, contrast)


def _standardise(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """Zero mean, unit (population) variance along ``axis``; constant columns become 0."""
    x = np.asarray(x, np.float64)
    sd = x.std(axis=axis, keepdims=True)
    return (x - x.mean(axis=axis, keepdims=True)) / np.where(sd > 0, sd, 1.0)


def compute_extra_signals(stim_path: pathlib.Path, fn: Callable) -> np.ndarray:
    """Call ``fn`` on imgBrick in batches of 64 -> standardised (n_stim, k) float64."""
    out = []
    with h5py.File(stim_path, "r") as f:
        d = f["imgBrick"]
        for i in range(0, d.shape[0], EXTRA_BATCH):
            batch = d[i: i + EXTRA_BATCH]
            r = np.asarray(fn(batch), np.float64)
            r = r.reshape(len(batch), -1)
            if out and r.shape[1] != out[0].shape[1]:
                raise ValueError(f"extra_signal_fn returned {r.shape[1]} columns, earlier batches {out[0].shape[1]}")
            out.append(r)
    return _standardise(np.concatenate(out))


# --------------------------------------------------------------------------- anatomy
def _grid(shape) -> np.ndarray:
    """Voxel index coordinates (X, Y, Z, 3) float."""
    return np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), axis=-1)


def make_brain_mask(rng: np.random.Generator, shape) -> np.ndarray:
    """Ellipsoidal brain, bool (X, Y, Z), jittered per subject."""
    shape = np.asarray(shape, float)
    centre = (shape - 1) / 2 + rng.normal(0, 0.02, 3) * shape
    radii = shape * np.array([0.46, 0.47, 0.44]) * rng.uniform(0.97, 1.0, 3)
    return (((_grid(shape.astype(int)) - centre) / radii) ** 2).sum(-1) <= 1.0


def make_nsdgeneral(rng: np.random.Generator, brain: np.ndarray) -> np.ndarray:
    """Posterior cap of the brain holding 32-38 % of its voxels, bool (X, Y, Z)."""
    shape = np.asarray(brain.shape, float)
    pole = np.array([(shape[0] - 1) / 2, 0.1 * shape[1], 0.4 * shape[2]]) + rng.normal(0, 0.03, 3) * shape
    idx = np.argwhere(brain)
    dist = np.linalg.norm(idx - pole, axis=1)
    n = int(round(rng.uniform(0.32, 0.38) * len(idx)))
    keep = idx[np.argsort(dist, kind="stable")[:n]]
    out = np.zeros_like(brain)
    out[tuple(keep.T)] = True
    return out


def grow_blob(rng: np.random.Generator, allowed: np.ndarray, seed: tuple, n: int) -> np.ndarray:
    """Up to ``n`` 6-connected ``allowed`` voxels grown compactly from ``seed`` -> (m, 3) int."""
    seed = tuple(int(v) for v in seed)
    taken = {seed}
    heap = [(0.0, seed)]
    out = []
    while heap and len(out) < n:
        _, v = heapq.heappop(heap)
        out.append(v)
        for ax in range(3):
            for step in (-1, 1):
                w = list(v)
                w[ax] += step
                w = tuple(w)
                if w in taken or not (0 <= w[ax] < allowed.shape[ax]) or not allowed[w]:
                    continue
                taken.add(w)
                d = float(np.linalg.norm(np.subtract(w, seed)))
                heapq.heappush(heap, (d + rng.uniform(0, 0.6), w))
    return np.array(out, dtype=np.int64).reshape(-1, 3)


def _farthest_seed(rng: np.random.Generator, candidates: np.ndarray, labelled: np.ndarray) -> tuple:
    """Candidate voxel (bool mask) farthest from any ``labelled`` voxel (random ties)."""
    idx = np.argwhere(candidates)
    if not labelled.any():
        return tuple(idx[rng.integers(len(idx))])
    dist = ndimage.distance_transform_edt(~labelled)[candidates]
    return tuple(idx[np.argmax(dist + rng.uniform(0, 0.5, len(dist)))])


def _target_size(roi: str, name: str, n_nsd: int) -> int:
    """Planned voxel count of one ROI label."""
    if roi == "prf-visualrois":
        return max(1, round(PRF_FRACTION * n_nsd))
    if name in REQUIRED_FLOC:
        return max(1, round(REQUIRED_FRACTION * n_nsd))
    return round(OPTIONAL_FRACTION * n_nsd)


def place_rois(rng: np.random.Generator, brain: np.ndarray, nsdgeneral: np.ndarray) -> dict[str, np.ndarray]:
    """All ROI volumes, int16 (X, Y, Z) each: -1 outside brain, 0 unlabelled, k label k.

    Labels are contiguous, non-overlapping blobs inside nsdgeneral; prf seeds lie in
    the posterior half of nsdgeneral, floc seeds anywhere (farthest from earlier ROIs)."""
    n_nsd = int(nsdgeneral.sum())
    ys = np.argwhere(nsdgeneral)[:, 1]
    posterior = nsdgeneral & (_grid(brain.shape)[..., 1] <= np.median(ys))
    labelled = np.zeros_like(nsdgeneral)
    vols = {}
    for roi, names in ROI_LABELS.items():
        vol = np.where(brain, 0, -1).astype(np.int16)
        if roi == "nsdgeneral":
            vol[nsdgeneral] = 1
            vols[roi] = vol
            continue
        for k, name in enumerate(names, start=1):
            free = nsdgeneral & ~labelled
            cand = (posterior & free) if roi == "prf-visualrois" and (posterior & free).any() else free
            n = _target_size(roi, name, n_nsd)
            if n == 0 or not cand.any():
                continue
            blob = grow_blob(rng, free, _farthest_seed(rng, cand, labelled), n)
            vol[tuple(blob.T)] = k
            labelled[tuple(blob.T)] = True
        vols[roi] = vol
    return vols


def _write_rois(root: pathlib.Path, s: int, vols: dict[str, np.ndarray]) -> None:
    """ROI NIfTIs (int16, 1.8 mm affine) and FreeSurfer-style .ctab label tables."""
    affine = np.diag([VOXEL_SIZE_MM] * 3 + [1.0])
    for roi, vol in vols.items():
        path = roi_path(root, s, roi)
        path.parent.mkdir(parents=True, exist_ok=True)
        img = nib.Nifti1Image(vol.astype(np.int16), affine)
        img.header.set_data_dtype(np.int16)
        nib.save(img, path)
        ctab = ctab_path(root, s, roi)
        ctab.parent.mkdir(parents=True, exist_ok=True)
        lines = ["  0 Unknown"] + [f"  {k} {name}" for k, name in enumerate(ROI_LABELS[roi], start=1)]
        ctab.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- voxel plan
@dataclass
class VoxelPlan:
    """Per nsdgeneral voxel (n_vox,) arrays, in ``np.argwhere(nsdgeneral)`` order."""
    xyz: np.ndarray  # (n_vox, 3) int
    roi: np.ndarray  # (n_vox,) object: ROI file name or '' (unlabelled)
    label: np.ndarray  # (n_vox,) object: label name or ''
    preferred: np.ndarray  # (n_vox,) int category index, -1 none
    dead: np.ndarray  # (n_vox,) bool
    extra: np.ndarray  # (n_vox,) bool


def plan_voxels(rng: np.random.Generator, vols: dict[str, np.ndarray], n_dead: int, n_extra: int) -> VoxelPlan:
    """Assign each nsdgeneral voxel its role: prf / floc / food / dead / extra / mixed."""
    nsd = vols["nsdgeneral"] == 1
    xyz = np.argwhere(nsd)
    n = len(xyz)
    roi, label = np.full(n, "", object), np.full(n, "", object)
    preferred = np.full(n, -1, np.int64)
    for name, names in ROI_LABELS.items():
        if name == "nsdgeneral":
            continue
        k = vols[name][tuple(xyz.T)]
        roi[k > 0] = name
        label[k > 0] = np.array(names, object)[k[k > 0] - 1]
        if name in FLOC_CATEGORY:
            preferred[k > 0] = CATEGORIES.index(FLOC_CATEGORY[name])
    unlabelled = roi == ""
    food = _food_blob(rng, nsd, xyz, unlabelled)
    preferred[food] = CATEGORIES.index("food")
    free = unlabelled & ~food
    if free.sum() < n_dead + n_extra:
        raise ValueError(f"only {int(free.sum())} unlabelled nsdgeneral voxels for {n_dead} dead + "
                         f"{n_extra} extra voxels; use a larger volume_shape")
    dead = np.zeros(n, bool)
    dead[rng.choice(np.flatnonzero(free), size=n_dead, replace=False)] = True
    extra = np.zeros(n, bool)
    extra[np.flatnonzero(free & ~dead)[:n_extra]] = True
    return VoxelPlan(xyz, roi, label, preferred, dead, extra)


def _food_blob(rng: np.random.Generator, nsd: np.ndarray, xyz: np.ndarray, unlabelled: np.ndarray) -> np.ndarray:
    """Contiguous food-selective blob among unlabelled voxels -> (n_vox,) bool."""
    free = np.zeros_like(nsd)
    free[tuple(xyz[unlabelled].T)] = True
    out = np.zeros(len(xyz), bool)
    if not free.any():
        return out
    blob = grow_blob(rng, free, _farthest_seed(rng, free, nsd & ~free), max(2, round(FOOD_FRACTION * len(xyz))))
    lookup = {tuple(v): i for i, v in enumerate(xyz)}
    out[[lookup[tuple(v)] for v in blob]] = True
    return out


# --------------------------------------------------------------------------- responses
def receptive_fields(rng: np.random.Generator, plan: VoxelPlan) -> tuple[np.ndarray, np.ndarray]:
    """RF centres (n_vox, 2) (x, y as image fractions, y down) and sigmas (n_vox,).

    prf voxels: retinotopic — centre follows the voxel's position inside its ROI,
    ventral areas and hV4 map the upper field, dorsal the lower; sigma grows V1 -> hV4.
    Others: large RFs near the image centre."""
    n = len(plan.xyz)
    centre = np.clip(0.5 + rng.normal(0, 0.12, (n, 2)), 0.15, 0.85)
    sigma = rng.uniform(0.2, 0.35, n)
    for name in ROI_LABELS["prf-visualrois"]:
        m = plan.label == name
        if not m.any():
            continue
        u, v = _roi_axes(plan.xyz[m])
        upper = not name.endswith("d")
        y = 0.5 - (0.06 + 0.38 * v) if upper else 0.5 + (0.06 + 0.38 * v)
        centre[m, 0] = np.clip(0.1 + 0.8 * u + rng.normal(0, 0.03, m.sum()), 0.02, 0.98)
        centre[m, 1] = np.clip(y + rng.normal(0, 0.03, m.sum()), 0.02, 0.98)
        lo, hi = PRF_SIGMA[name.rstrip("vd")]
        sigma[m] = rng.uniform(lo, hi, m.sum())
    return centre, sigma


def _roi_axes(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank-normalised coordinates (u, v) in [0, 1] along an ROI's two principal axes."""
    x = xyz - xyz.mean(0)
    if len(x) < 2:
        return np.full(len(x), 0.5), np.full(len(x), 0.5)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    proj = x @ vt[:2].T if vt.shape[0] > 1 else np.c_[x @ vt[0], np.zeros(len(x))]
    ranks = proj.argsort(0).argsort(0) / (len(x) - 1)
    return ranks[:, 0], ranks[:, 1]


def rf_responses(feat: StimulusFeatures, centre: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RF-weighted edge energy and luminance, each standardised (n_stim, n_vox)."""
    c = (np.arange(FEATURE_RES) + 0.5) / FEATURE_RES
    gy, gx = np.meshgrid(c, c, indexing="ij")
    d2 = (gx.reshape(-1, 1) - centre[:, 0]) ** 2 + (gy.reshape(-1, 1) - centre[:, 1]) ** 2
    w = np.exp(-d2 / (2 * sigma**2)).astype(np.float32)
    w /= w.sum(0, keepdims=True)
    n = len(feat.edge)
    edge = feat.edge.reshape(n, -1) @ w
    lum = feat.lum.reshape(n, -1) @ w
    return _standardise(edge), _standardise(lum)


def within_category_modulation(feat: StimulusFeatures, categories: np.ndarray) -> np.ndarray:
    """Per-image salience (n_stim,): mean of object scale and RMS contrast, z-scored within category."""
    out = np.zeros(len(categories))
    for c in np.unique(categories):
        m = categories == c
        out[m] = 0.5 * (_standardise(feat.scale[m]) + _standardise(feat.contrast[m]))
    return out


def plant_signals(rng: np.random.Generator, plan: VoxelPlan, feat: StimulusFeatures, categories: np.ndarray,
                  extra: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise-free signals (n_stim, n_vox) float32, unit variance per voxel (dead: 0); plus RF centres and sigmas."""
    centre, sigma = receptive_fields(rng, plan)
    edge, lum = rf_responses(feat, centre, sigma)
    n_vox, n_cat = len(plan.xyz), len(CATEGORIES)
    onehot = np.eye(n_cat)[categories]  # (n_stim, n_cat)
    within = within_category_modulation(feat, categories)[:, None]
    prf = plan.roi == "prf-visualrois"
    selective = plan.preferred >= 0
    mixed = ~prf & ~selective

    # category-selective: 2.0 for the preferred category, small values for the others
    cat_w = rng.normal(0, 0.3, (n_vox, n_cat))
    cat_w[np.flatnonzero(selective), plan.preferred[selective]] = 2.0
    within_w = rng.uniform(0.3, 0.6, n_vox)
    sel = onehot @ cat_w.T + within * within_w + 0.3 * edge
    # mixed: random category mixture plus low-level
    mix_w = rng.normal(0, 0.5, (n_vox, n_cat))
    mix = onehot @ mix_w.T + edge + 0.3 * lum
    # retinotopic low-level
    low = edge + 0.3 * lum

    sig = np.where(prf, low, np.where(selective, sel, mix))
    sig = _standardise(sig)
    sig[:, plan.dead] = 0.0
    if extra is not None and plan.extra.any():
        sig[:, plan.extra] = extra[:, : plan.extra.sum()]
    return sig.astype(np.float32), centre, sigma


@dataclass
class NoiseModel:
    """Per-voxel noise: noise_sd, ncsnr (n_vox,), session offsets (n_sessions, n_vox)."""
    noise_sd: np.ndarray
    ncsnr: np.ndarray
    offset: np.ndarray


def make_noise_model(rng: np.random.Generator, plan: VoxelPlan, snr_range, n_sessions: int) -> NoiseModel:
    """snr ~ U(snr_range), noise_sd = 1/snr, ncsnr = snr; dead: 0/0, extra: noise-free (ncsnr 1e3)."""
    n = len(plan.xyz)
    snr = rng.uniform(snr_range[0], snr_range[1], n)
    offset = rng.normal(0, SESSION_OFFSET_SD, (n_sessions, n))
    noise_sd, ncsnr = 1.0 / snr, snr.copy()
    for m, sd, c in ((plan.dead, 0.0, 0.0), (plan.extra, 0.0, EXTRA_NCSNR)):
        noise_sd[m], ncsnr[m], offset[:, m] = sd, c, 0.0
    return NoiseModel(noise_sd, ncsnr, offset)


def to_int16(psc: np.ndarray) -> np.ndarray:
    """Percent signal change -> NSD int16 betas (round(psc * 300), clipped)."""
    return np.clip(np.rint(np.asarray(psc, np.float64) * BETA_SCALE), -32768, 32767).astype(np.int16)


def session_betas(rng: np.random.Generator, signal: np.ndarray, noise: NoiseModel, stim: np.ndarray,
                  session: int, plan: VoxelPlan, brain: np.ndarray) -> np.ndarray:
    """Betas of one session: int16 (T, Z, Y, X) — NSD hdf5 axis order, reversed w.r.t. the NIfTI (X, Y, Z)."""
    t = len(stim)
    psc = (signal[stim].astype(np.float64) + noise.noise_sd * rng.standard_normal((t, signal.shape[1]))
           + noise.offset[session - 1])
    x, y, z = plan.xyz.T
    out = np.zeros((t,) + brain.shape[::-1], np.int16)
    other = brain.copy()
    other[x, y, z] = False
    ox, oy, oz = np.nonzero(other)
    out[:, oz, oy, ox] = to_int16(OUTSIDE_NOISE_SD * rng.standard_normal((t, len(ox))))
    out[:, z, y, x] = to_int16(psc)
    return out


def _write_betas(root: pathlib.Path, s: int, session: int, betas: np.ndarray) -> None:
    path = betas_path(root, s, session)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("betas", data=betas, dtype=np.int16, track_times=False)


def _write_ncsnr(root: pathlib.Path, s: int, shape, plan: VoxelPlan, ncsnr: np.ndarray) -> None:
    vol = np.zeros(shape, np.float32)
    vol[tuple(plan.xyz.T)] = ncsnr
    path = betas_dir(root, s) / "ncsnr.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(vol, np.diag([VOXEL_SIZE_MM] * 3 + [1.0])), path)


# --------------------------------------------------------------------------- ground truth
def _write_ground_truth_root(f: h5py.File, p: dict, categories: np.ndarray, trials_per_session: int) -> None:
    """/categories, /image_category and the parameters as root attributes."""
    f.create_dataset("categories", data=np.array(CATEGORIES, dtype="S"), track_times=False)
    f.create_dataset("image_category", data=categories.astype(np.int64), track_times=False)
    for k, v in p.items():
        f.attrs[k] = "" if v is None else (np.asarray(v) if isinstance(v, list) else v)
    f.attrs["trials_per_session"] = trials_per_session
    f.attrs["beta_scale"] = BETA_SCALE
    f.attrs["n_stim"] = len(categories)


def _write_ground_truth_subject(f: h5py.File, s: int, plan: VoxelPlan, signal: np.ndarray, noise: NoiseModel,
                                centre: np.ndarray, sigma: np.ndarray) -> None:
    """Group subjXX: voxel_xyz, signal, noise_sd, ncsnr, preferred_category, dead, extra, rf_center, rf_sigma."""
    g = f.create_group(subject_name(s))
    data = dict(voxel_xyz=plan.xyz.astype(np.int64), signal=signal, noise_sd=noise.noise_sd.astype(np.float32),
                ncsnr=noise.ncsnr.astype(np.float32), preferred_category=plan.preferred, dead=plan.dead,
                extra=plan.extra, rf_center=centre.astype(np.float32), rf_sigma=sigma.astype(np.float32))
    for k, v in data.items():
        g.create_dataset(k, data=v, track_times=False)


# --------------------------------------------------------------------------- build
def _build_subject(root: pathlib.Path, s: int, rng: np.random.Generator, p: dict, design: dict,
                   feat: StimulusFeatures, categories: np.ndarray, extra: np.ndarray | None, gt: h5py.File) -> None:
    """ROIs, betas, ncsnr and ground truth of subject ``s`` (1-based)."""
    r_geom, r_resp, r_noise = rng.spawn(3)
    brain = make_brain_mask(r_geom, p["volume_shape"])
    vols = place_rois(r_geom, brain, make_nsdgeneral(r_geom, brain))
    _write_rois(root, s, vols)
    plan = plan_voxels(r_geom, vols, p["n_dead_voxels"], 0 if extra is None else extra.shape[1])
    signal, centre, sigma = plant_signals(r_resp, plan, feat, categories, extra)
    noise = make_noise_model(r_resp, plan, p["snr_range"], p["n_sessions"])
    for session in range(1, p["n_sessions"] + 1):
        stim = trial_stimuli(design["masterordering"], design["subjectim"], s, session, p["n_sessions"])
        _write_betas(root, s, session, session_betas(r_noise, signal, noise, stim, session, plan, brain))
    _write_ncsnr(root, s, tuple(p["volume_shape"]), plan, noise.ncsnr)
    _write_ground_truth_subject(gt, s, plan, signal, noise, centre, sigma)


def _build(root: pathlib.Path, p: dict, extra_signal_fn: Callable | None) -> None:
    """Write the whole dataset into ``root`` (synthetic.json last)."""
    r_cat, r_design, r_img, *r_subj = np.random.default_rng(p["seed"]).spawn(3 + p["n_subjects"])
    categories = assign_categories(r_cat, p["n_shared"], p["n_unique"], p["n_subjects"])
    design = make_design(r_design, p["n_subjects"], p["n_shared"], p["n_unique"], p["n_repeats"], p["n_sessions"])
    _write_expdesign(root, design)
    feat = write_stimuli(stimuli_path(root), categories, r_img, p["image_size"])
    extra = None if extra_signal_fn is None else compute_extra_signals(stimuli_path(root), extra_signal_fn)
    tps = design["masterordering"].shape[1] // p["n_sessions"]
    with h5py.File(ground_truth_path(root), "w", track_order=True) as gt:
        _write_ground_truth_root(gt, p, categories, tps)
        for s in range(1, p["n_subjects"] + 1):
            _build_subject(root, s, r_subj[s - 1], p, design, feat, categories, extra, gt)
    meta = {**p, "version": FORMAT_VERSION, "n_stim": len(categories), "trials_per_session": tps,
            "beta_scale": BETA_SCALE, "categories": list(CATEGORIES)}
    meta_path(root).write_text(json.dumps(meta, indent=2) + "\n")


# --------------------------------------------------------------------------- generate
def generate(out_dir, *, n_subjects: int = 2, n_shared: int = 100, n_unique: int = 500, n_repeats: int = 3,
             n_sessions: int = 6, image_size: int = 425, volume_shape=(18, 22, 18), n_dead_voxels: int = 5,
             snr_range=(0.4, 1.5), seed: int = 0, extra_signal_fn: Callable | None = None,
             force: bool = False) -> pathlib.Path:
    """Generate the synthetic NSD dataset at ``out_dir`` and return its path.

    Built in a sibling ``DIR.tmp-<pid>`` and moved into place with ``os.replace``;
    an existing non-empty ``out_dir`` raises FileExistsError unless ``force``.
    ``extra_signal_fn``: images (n, H, W, 3) uint8 -> (n, k) float; its standardised
    columns become the noise-free signals of k extra voxels per subject."""
    out = pathlib.Path(out_dir)
    p = normalise_params(n_subjects=n_subjects, n_shared=n_shared, n_unique=n_unique, n_repeats=n_repeats,
                         n_sessions=n_sessions, image_size=image_size, volume_shape=volume_shape,
                         n_dead_voxels=n_dead_voxels, snr_range=snr_range, seed=seed, extra_signal_fn=extra_signal_fn)
    return write_dir_atomically(out, lambda tmp: _build(tmp, p, extra_signal_fn), force)


def ensure_synthetic(out_dir, **params) -> pathlib.Path:
    """Generate at ``out_dir`` only if ``out_dir/synthetic.json`` is absent.

    If present but made with different parameters, raise ValueError naming the dir and keys."""
    wanted = {**normalise_params(**params), "version": FORMAT_VERSION}
    return ensure_generated(out_dir, meta_path(out_dir).name, wanted, lambda: generate(out_dir, **params),
                            "synthetic dataset")


# --------------------------------------------------------------------------- summary / CLI
def summary(root) -> str:
    """Short human-readable description of a generated dataset."""
    root = pathlib.Path(root)
    meta = json.loads(meta_path(root).read_text())
    lines = [f"{meta['n_stim']} images ({meta['n_shared']} shared + {meta['n_subjects']} x {meta['n_unique']} unique, "
             f"{meta['image_size']} px), {meta['n_subjects']} subjects x {meta['n_sessions']} sessions x "
             f"{meta['trials_per_session']} trials, volume {tuple(meta['volume_shape'])}"]
    for s in range(1, meta["n_subjects"] + 1):
        parts = []
        for roi, names in ROI_LABELS.items():
            vol = np.asarray(nib.load(roi_path(root, s, roi)).dataobj)
            parts.append(" ".join(f"{n}={int((vol == k).sum())}" for k, n in enumerate(names, start=1)))
        lines.append(f"{subject_name(s)} voxels: " + " | ".join(parts))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m datamodules.synthetic",
                                 description="Generate a synthetic dataset in the NSD file layout with planted ground truth.")
    ap.add_argument("--out", required=True, help="output directory")
    for name in ("n_subjects", "n_shared", "n_unique", "n_repeats", "n_sessions", "image_size", "n_dead_voxels", "seed"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=DEFAULTS[name])
    ap.add_argument("--volume", type=int, nargs=3, metavar=("X", "Y", "Z"), default=list(DEFAULTS["volume_shape"]))
    ap.add_argument("--snr-range", type=float, nargs=2, metavar=("LO", "HI"), default=list(DEFAULTS["snr_range"]))
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--force", action="store_true", help="replace an existing DIR")
    mode.add_argument("--if-missing", action="store_true", help="reuse DIR if it already holds this dataset")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    params = dict(n_subjects=args.n_subjects, n_shared=args.n_shared, n_unique=args.n_unique,
                  n_repeats=args.n_repeats, n_sessions=args.n_sessions, image_size=args.image_size,
                  volume_shape=tuple(args.volume), n_dead_voxels=args.n_dead_voxels,
                  snr_range=tuple(args.snr_range), seed=args.seed)
    t0 = time.perf_counter()
    try:
        if args.if_missing and meta_path(args.out).exists():
            ensure_synthetic(args.out, **params)
            print(f"using existing synthetic dataset {args.out}")
            return 0
        if args.if_missing:
            ensure_synthetic(args.out, **params)
        else:
            generate(args.out, force=args.force, **params)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote synthetic NSD dataset to {args.out} in {time.perf_counter() - t0:.1f} s")
    print(summary(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
