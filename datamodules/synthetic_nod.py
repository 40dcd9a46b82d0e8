"""Synthetic fMRI dataset in the file layout of the Natural Object Dataset (NOD), with a planted ground truth.

Images are drawn procedurally (six categories, :mod:`datamodules.synthetic_images`) and written as
JPEG files; responses follow the ground-truth recipe of :mod:`datamodules.synthetic` on a small
two-hemisphere "surface": retinotopic low-level vertices at the occipital end of each hemisphere,
category-selective fLoc ROIs (faces, bodies, places, words), a food-selective blob, mixed vertices
elsewhere, a few dead (NaN) vertices; single-trial betas = signal + noise at a known SNR, with a
per-run offset and gain per vertex (which z-scoring per run removes). Files are real CIFTI-2
(nibabel), BIDS events TSVs and JPEGs, exactly where :mod:`datamodules.nod_files` reads NOD::

    stimuli/imagenet/<synset>/<synset>_<k>.JPEG             one synset per category
    stimuli/coco/<12-digit id>.jpg, stimuli/coco_images.csv  (num,img)
    sub-XX/ses-imagenetSS/func/sub-XX_ses-imagenetSS_task-imagenet_run-RR_events.tsv
    sub-XX/ses-coco/func/sub-XX_ses-coco_task-coco_run-RR_events.tsv    columns onset, duration, trial_type, stim_file
    derivatives/ciftify/sub-XX/results/<run>/<run>_beta.dscalar.nii   maps = trials (ImageNet: events order;
                                                                      COCO: coco_images.csv order), columns =
                                                                      CORTEX_LEFT + CORTEX_RIGHT (n_cortex) + a few
                                                                      subcortical voxels, like fsLR's 91282
    derivatives/ciftify/sub-XX/results/ses-floc_task-floc/floc-{faces,bodies,places,words}.dlabel.nii
    ground_truth.h5     per subject, in the loader's stimulus-id order: stimulus_names, signal (n_stim, n_cortex),
                        noise_sd, ncsnr (= SNR), preferred_category, dead, roi, rf_center, rf_sigma
    synthetic_nod.json  generation parameters (written last)

Each subject sees its own ImageNet images (sessions × runs × trials, once each) and the shared COCO
images in every COCO run. ``n_cortex`` is the loader's ``data.n_cortex``.

    python -m datamodules.synthetic_nod --out DIR [--n-cortex 800 ...] [--force | --if-missing]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import pathlib
import sys
import time

import h5py
import nibabel as nib
import numpy as np
from nibabel import cifti2
from PIL import Image

from datamodules.atomic_dir import ensure_generated, write_dir_atomically
from datamodules.synthetic import (StimulusFeatures, _standardise, image_features,
                                   rf_responses, within_category_modulation)
from datamodules.synthetic_images import CATEGORIES, render

FORMAT_VERSION = 1
META = "synthetic_nod.json"
DEFAULTS: dict = dict(n_subjects=1, n_imagenet_sessions=2, runs_per_session=5, trials_per_run=40, n_coco=60,
                      n_coco_runs=5, n_cortex=800, n_subcortical=24, image_size=128, n_dead=4,
                      snr_range=(0.4, 1.5), seed=0)
FLOC_LABELS: dict[str, tuple[str, ...]] = {
    "floc-faces": ("OFA", "FFA"), "floc-bodies": ("EBA", "FBA"),
    "floc-places": ("OPA", "PPA", "RSC"), "floc-words": ("VWFA",),
}
FLOC_CATEGORY = {"floc-faces": "face", "floc-bodies": "body", "floc-places": "place", "floc-words": "word"}
SYNSETS = {c: f"n{9000001 + i:08d}" for i, c in enumerate(CATEGORIES)}
HEMISPHERES = ("CIFTI_STRUCTURE_CORTEX_LEFT", "CIFTI_STRUCTURE_CORTEX_RIGHT")
EARLY_FRACTION = 0.3  # occipital share of each hemisphere: retinotopic vertices
ROI_FRACTION = 0.04  # vertices per fLoc label, as a fraction of a hemisphere
RUN_OFFSET_SD, RUN_GAIN = 0.5, (0.7, 1.3)


# --------------------------------------------------------------------------- parameters
def normalise_params(**params) -> dict:
    """Defaults filled in, validated, JSON-able."""
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown synthetic NOD parameter(s): {sorted(unknown)}")
    p = {**DEFAULTS, **params}
    p["snr_range"] = [float(v) for v in p["snr_range"]]
    for k, v in p.items():
        if k != "snr_range":
            p[k] = int(v)
    for k in ("n_subjects", "n_imagenet_sessions", "runs_per_session", "trials_per_run", "n_coco"):
        if p[k] < 1:
            raise ValueError(f"{k} must be >= 1, got {p[k]}")
    if p["n_cortex"] < 100 or p["n_cortex"] % 2:
        raise ValueError(f"n_cortex must be an even number >= 100, got {p['n_cortex']}")
    if p["image_size"] < 16:
        raise ValueError(f"image_size must be >= 16, got {p['image_size']}")
    lo, hi = p["snr_range"]
    if not 0 < lo <= hi:
        raise ValueError(f"snr_range must satisfy 0 < low <= high, got {p['snr_range']}")
    if p["n_coco_runs"] < 0 or p["n_subcortical"] < 0 or p["n_dead"] < 0:
        raise ValueError("n_coco_runs, n_subcortical and n_dead must be >= 0")
    return p


# --------------------------------------------------------------------------- surface
class Surface:
    """Two hemispheres of n_cortex/2 model vertices each on a grid, with a medial wall left out.

    Per cortical grayordinate (n_cortex,): hemi (0 left, 1 right), vertex (surface index),
    uv (n_cortex, 2) grid position in [0, 1] (v = 0 at the occipital pole).
    """

    def __init__(self, n_cortex: int):
        n_h = n_cortex // 2
        n_vert = n_h + max(1, n_h // 10)
        cols = int(np.ceil(np.sqrt(n_vert)))
        rows = int(np.ceil(n_vert / cols))
        grid = np.stack([np.arange(n_vert) % cols / max(cols - 1, 1), np.arange(n_vert) // cols / max(rows - 1, 1)], 1)
        medial = np.argsort(np.linalg.norm(grid - [0.5, 0.6], axis=1), kind="stable")[:n_vert - n_h]
        vertices = np.setdiff1d(np.arange(n_vert), medial)
        self.n_vertices = n_vert
        self.hemi = np.repeat([0, 1], n_h)
        self.vertex = np.tile(vertices, 2)
        self.uv = np.tile(grid[vertices], (2, 1))

    def axis(self, n_subcortical: int) -> cifti2.BrainModelAxis:
        """The grayordinates: CORTEX_LEFT, CORTEX_RIGHT, then n_subcortical thalamus voxels."""
        bm = None
        for h, name in enumerate(HEMISPHERES):
            part = cifti2.BrainModelAxis.from_surface(self.vertex[self.hemi == h], self.n_vertices, name)
            bm = part if bm is None else bm + part
        if n_subcortical:
            mask = np.zeros((n_subcortical, 1, 1), bool)
            mask[:] = True
            bm = bm + cifti2.BrainModelAxis.from_mask(mask, name="CIFTI_STRUCTURE_THALAMUS_LEFT",
                                                       affine=np.diag([2.0, 2.0, 2.0, 1.0]))
        return bm


def place_rois(rng: np.random.Generator, surface: Surface) -> tuple[np.ndarray, np.ndarray]:
    """(roi file (n_cortex,) object, label (n_cortex,) object; '' = none): compact fLoc blobs in the
    ventral (non-occipital) part of each hemisphere, no overlaps."""
    n = len(surface.hemi)
    roi, label = np.full(n, "", object), np.full(n, "", object)
    size = max(3, round(ROI_FRACTION * n / 2))
    for h in (0, 1):
        in_h = surface.hemi == h
        for file, names in FLOC_LABELS.items():
            for name in names:
                free = np.flatnonzero(in_h & (surface.uv[:, 1] > EARLY_FRACTION + 0.05) & (label == ""))
                taken = np.flatnonzero(in_h & (label != ""))
                if taken.size:
                    dist = np.linalg.norm(surface.uv[free, None] - surface.uv[None, taken], axis=2).min(1)
                    seed = free[np.argmax(dist + rng.uniform(0, 0.02, len(free)))]
                else:
                    seed = free[rng.integers(len(free))]
                near = free[np.argsort(np.linalg.norm(surface.uv[free] - surface.uv[seed], axis=1))[:size]]
                roi[near], label[near] = file, name
    return roi, label


def receptive_fields(rng: np.random.Generator, surface: Surface, early: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RF centres (n, 2) (x, y image fractions) and sigmas (n,): retinotopic in the early vertices (left
    hemisphere maps the right visual field; sigma grows away from the pole), large and central elsewhere."""
    n = len(surface.hemi)
    centre = np.clip(0.5 + rng.normal(0, 0.12, (n, 2)), 0.15, 0.85)
    sigma = rng.uniform(0.2, 0.35, n)
    u, v = surface.uv[early, 0], surface.uv[early, 1] / EARLY_FRACTION
    side = np.where(surface.hemi[early] == 0, 1.0, -1.0)
    centre[early, 0] = np.clip(0.5 + side * (0.05 + 0.4 * v) + rng.normal(0, 0.02, early.sum()), 0.02, 0.98)
    centre[early, 1] = np.clip(0.05 + 0.9 * u + rng.normal(0, 0.02, early.sum()), 0.02, 0.98)
    sigma[early] = 0.03 + 0.12 * v
    return centre, sigma


def plant_signals(rng: np.random.Generator, surface: Surface, roi: np.ndarray, feat: StimulusFeatures,
                  categories: np.ndarray) -> dict[str, np.ndarray]:
    """Noise-free signals (n_stim, n_cortex) float32, unit variance per vertex, and each vertex's role."""
    n = len(surface.hemi)
    early = surface.uv[:, 1] <= EARLY_FRACTION
    preferred = np.full(n, -1, np.int64)
    for file, category in FLOC_CATEGORY.items():
        preferred[roi == file] = CATEGORIES.index(category)
    free = np.flatnonzero(~early & (roi == ""))
    food_seed = free[rng.integers(len(free))]
    food = free[np.argsort(np.linalg.norm(surface.uv[free] - surface.uv[food_seed], axis=1))[:max(2, n // 40)]]
    preferred[food] = CATEGORIES.index("food")
    centre, sigma = receptive_fields(rng, surface, early)
    edge, lum = rf_responses(feat, centre, sigma)
    onehot = np.eye(len(CATEGORIES))[categories]
    within = within_category_modulation(feat, categories)[:, None]
    selective = preferred >= 0
    cat_w = rng.normal(0, 0.3, (n, len(CATEGORIES)))
    cat_w[np.flatnonzero(selective), preferred[selective]] = 2.0
    sel = onehot @ cat_w.T + within * rng.uniform(0.3, 0.6, n) + 0.3 * edge
    mix = onehot @ rng.normal(0, 0.5, (n, len(CATEGORIES))).T + edge + 0.3 * lum
    signal = _standardise(np.where(early, edge + 0.3 * lum, np.where(selective, sel, mix)))
    return {"signal": signal.astype(np.float32), "preferred_category": preferred, "early": early,
            "rf_center": centre.astype(np.float32), "rf_sigma": sigma.astype(np.float32)}


# --------------------------------------------------------------------------- stimuli
def write_images(root: pathlib.Path, names: list[str], categories: np.ndarray, rng: np.random.Generator,
                 size: int) -> StimulusFeatures:
    """Draw and save every image under stimuli/ (JPEG); features come from the decoded files."""
    n = len(names)
    edge = np.empty((n, 64, 64), np.float32)
    lum, scale, contrast = np.empty_like(edge), np.empty(n), np.empty(n)
    for i, (name, rng_i) in enumerate(zip(names, rng.spawn(n))):
        img, meta = render(CATEGORIES[categories[i]], rng_i, size)
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="JPEG", quality=92)
        path = root / "stimuli" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        edge[i], lum[i], contrast[i] = image_features(decoded)
        scale[i] = meta["scale"]
    return StimulusFeatures(edge, lum, scale, contrast)


def write_events(path: pathlib.Path, names: list[str], trial_type: list[int], duration: float) -> None:
    """BIDS events TSV: onset, duration, trial_type, stim_file (relative to stimuli/)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["onset", "duration", "trial_type", "stim_file"])
        for t, (name, tt) in enumerate(zip(names, trial_type)):
            w.writerow([f"{4.0 * t:.1f}", duration, tt, name])


def write_cifti(path: pathlib.Path, data: np.ndarray, row_axis, bm: cifti2.BrainModelAxis) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(cifti2.Cifti2Image(data.astype(np.float32), header=(row_axis, bm)), path)


def write_rois(results: pathlib.Path, bm: cifti2.BrainModelAxis, roi: np.ndarray, label: np.ndarray) -> None:
    """floc-*.dlabel.nii: one map per file, key 0 '???' unlabelled, keys 1.. the file's labels."""
    n_cortex = len(roi)
    for file, names in FLOC_LABELS.items():
        values = np.zeros((1, len(bm)), np.float32)
        table = {0: ("???", (1.0, 1.0, 1.0, 0.0))}
        for k, name in enumerate(names, start=1):
            values[0, :n_cortex][label == name] = k
            table[k] = (name, (k / len(names), 0.3, 1 - k / len(names), 1.0))
        write_cifti(results / "ses-floc_task-floc" / f"{file}.dlabel.nii", values,
                    cifti2.LabelAxis([file], table), bm)


# --------------------------------------------------------------------------- build
def _build_subject(root: pathlib.Path, s: int, p: dict, rng: np.random.Generator, surface: Surface,
                   stim: dict, gt: h5py.File) -> None:
    """Events, betas, fLoc ROIs and ground truth of subject s (1-based)."""
    sub = f"sub-{s:02d}"
    r_geom, r_design, r_noise = rng.spawn(3)
    roi, label = place_rois(r_geom, surface)
    own = [i for i, n in enumerate(stim["names"]) if stim["owner"][i] in (0, s)]  # shared COCO + its ImageNet
    own_names = [stim["names"][i] for i in own]
    order = np.argsort(own_names, kind="stable")  # the loader's id order: sorted relative names
    own = [own[i] for i in order]
    feat = StimulusFeatures(*(getattr(stim["features"], k)[own] for k in ("edge", "lum", "scale", "contrast")))
    planted = plant_signals(r_geom, surface, roi, feat, stim["categories"][own])
    signal = planted["signal"]
    n = len(surface.hemi)
    dead = np.zeros(n, bool)
    candidates = np.flatnonzero((roi == "") & ~planted["early"] & (planted["preferred_category"] < 0))
    dead[r_geom.choice(candidates, size=min(p["n_dead"], len(candidates)), replace=False)] = True
    snr = r_geom.uniform(*p["snr_range"], n)
    row_of = {stim["names"][g]: k for k, g in enumerate(own)}
    bm = surface.axis(p["n_subcortical"])
    results = root / "derivatives/ciftify" / sub / "results"

    def write_run(session: str, task: str, run: int, names: list[str], map_names: list[str], trial_type):
        rows = np.array([row_of[m] for m in map_names])
        offset = r_noise.normal(0, RUN_OFFSET_SD, n)
        gain = r_noise.uniform(*RUN_GAIN, n)
        betas = gain * (signal[rows] + r_noise.standard_normal((len(rows), n)) / snr + offset)
        betas[:, dead] = np.nan
        full = np.concatenate([betas, r_noise.normal(0, 1, (len(rows), p["n_subcortical"]))], axis=1)
        run_name = f"ses-{session}_task-{task}_run-{run}"
        write_cifti(results / run_name / f"{run_name}_beta.dscalar.nii", full,
                    cifti2.ScalarAxis([pathlib.PurePath(m).name for m in map_names]), bm)
        events = root / sub / f"ses-{session}" / "func" / f"{sub}_ses-{session}_task-{task}_run-{run:02d}_events.tsv"
        write_events(events, names, trial_type(names), 1.0 if task == "imagenet" else 0.5)

    imagenet = r_design.permutation([m for m in own_names if m.startswith("imagenet/")]).tolist()
    t = p["trials_per_run"]
    for ses in range(p["n_imagenet_sessions"]):
        for run in range(p["runs_per_session"]):
            names = imagenet[(ses * p["runs_per_session"] + run) * t:][:t]
            write_run(f"imagenet{ses + 1:02d}", "imagenet", run + 1, names, names,
                      lambda ns: [CATEGORIES.index(stim["category_of"][m]) + 1 for m in ns])
    coco = stim["coco"]
    for run in range(p["n_coco_runs"]):
        shown = r_design.permutation(coco).tolist()  # presentation order; betas in coco_images.csv order
        write_run("coco", "coco", run + 1, shown, coco, lambda ns: [coco.index(m) for m in ns])
    write_rois(results, bm, roi, label)

    g = gt.create_group(sub)
    data = dict(stimulus_names=np.array([stim["names"][i] for i in own], dtype="S"), signal=signal,
                noise_sd=(1.0 / snr).astype(np.float32), ncsnr=snr.astype(np.float32),
                preferred_category=planted["preferred_category"], dead=dead, early=planted["early"],
                roi=np.array(label.astype(str), dtype="S"), rf_center=planted["rf_center"],
                rf_sigma=planted["rf_sigma"], hemisphere=surface.hemi, vertex=surface.vertex)
    for k, v in data.items():
        g.create_dataset(k, data=v, track_times=False)


def _stimuli(root: pathlib.Path, p: dict, rng: np.random.Generator) -> dict:
    """Draw all images: the shared COCO ones (owner 0) and each subject's ImageNet ones (owner s)."""
    r_cat, r_ids, r_img = rng.spawn(3)
    n_imagenet = p["n_imagenet_sessions"] * p["runs_per_session"] * p["trials_per_run"]
    blocks = [p["n_coco"]] + [n_imagenet] * p["n_subjects"]
    categories = np.concatenate([r_cat.permutation(np.resize(np.arange(len(CATEGORIES)), b)) for b in blocks])
    coco = [f"{i:012d}.jpg" for i in np.sort(r_ids.choice(580000, p["n_coco"], replace=False))]
    names, owner = [f"coco/{c}" for c in coco], [0] * p["n_coco"]
    for s in range(1, p["n_subjects"] + 1):
        for k in range(n_imagenet):
            syn = SYNSETS[CATEGORIES[categories[len(names)]]]
            names.append(f"imagenet/{syn}/{syn}_{s * 100000 + k}.JPEG")
            owner.append(s)
    features = write_images(root, names, categories, r_img, p["image_size"])
    with open(root / "stimuli/coco_images.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["num", "img"])
        w.writerows(enumerate(coco))
    return {"names": names, "owner": np.array(owner), "categories": categories, "features": features,
            "coco": [f"coco/{c}" for c in coco], "category_of": {n: CATEGORIES[c] for n, c in zip(names, categories)}}


def _build(root: pathlib.Path, p: dict) -> None:
    r_stim, *r_subj = np.random.default_rng(p["seed"]).spawn(1 + p["n_subjects"])
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "synthetic NOD (brainprobe)", "BIDSVersion": "1.8.0", "DatasetType": "raw"}, indent=2) + "\n")
    stim = _stimuli(root, p, r_stim)
    surface = Surface(p["n_cortex"])
    with h5py.File(root / "ground_truth.h5", "w", track_order=True) as gt:
        gt.create_dataset("categories", data=np.array(CATEGORIES, dtype="S"), track_times=False)
        for k, v in p.items():
            gt.attrs[k] = np.asarray(v) if isinstance(v, list) else v
        for s in range(1, p["n_subjects"] + 1):
            _build_subject(root, s, p, r_subj[s - 1], surface, stim, gt)
    meta = {**p, "version": FORMAT_VERSION, "categories": list(CATEGORIES)}
    (root / META).write_text(json.dumps(meta, indent=2) + "\n")


def generate_nod(out_dir, *, force: bool = False, **params) -> pathlib.Path:
    """Write the synthetic NOD dataset at ``out_dir`` (built in a sibling temp dir, moved into place
    atomically; an existing non-empty ``out_dir`` raises FileExistsError unless ``force``)."""
    out = pathlib.Path(out_dir)
    p = normalise_params(**params)
    return write_dir_atomically(out, lambda tmp: _build(tmp, p), force)


def ensure_synthetic_nod(out_dir, **params) -> pathlib.Path:
    """Generate at ``out_dir`` only if ``out_dir/synthetic_nod.json`` is absent; ValueError naming the
    differing keys if it holds a dataset made with other parameters."""
    wanted = {**normalise_params(**params), "version": FORMAT_VERSION}
    return ensure_generated(out_dir, META, wanted, lambda: generate_nod(out_dir, **params), "synthetic NOD dataset")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m datamodules.synthetic_nod",
                                 description="Write a synthetic NOD-layout dataset with a planted ground truth.")
    ap.add_argument("--out", required=True)
    for k, v in DEFAULTS.items():
        if k != "snr_range":
            ap.add_argument("--" + k.replace("_", "-"), type=int, default=v)
    ap.add_argument("--snr-range", type=float, nargs=2, default=list(DEFAULTS["snr_range"]))
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--force", action="store_true", help="replace an existing DIR")
    mode.add_argument("--if-missing", action="store_true", help="reuse DIR if it already holds this dataset")
    args = vars(ap.parse_args(argv))
    out, force, if_missing = args.pop("out"), args.pop("force"), args.pop("if_missing")
    t0 = time.perf_counter()
    try:
        if if_missing:
            ensure_synthetic_nod(out, **args)
        else:
            generate_nod(out, force=force, **args)
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"synthetic NOD dataset at {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
