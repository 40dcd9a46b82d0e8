"""CLIP-MSM (analyze.py analysis=clip_msm): dissect the voxels of CLIP-embedding encoders with free-text concepts.

    python analyze.py analysis=clip_msm run_dir=outputs/runs/<clip_rn50 ridge run>
    python analyze.py analysis=clip_msm sweep_dir=outputs/multirun/<one run per subject>   # + paired test
    python analyze.py analysis=clip_msm concepts@analysis.concepts=from_file analysis.concepts.file=broden.txt
    python analyze.py analysis=clip_msm analysis.concept_embeddings=T.npy run_dir=...   # your own T

A run qualifies when its head is linear in the CLIP image embedding: ``backbone.layers=[embed]`` of an
open_clip backbone (clip_rn50, clip_vitb32, clip_vitb16, siglip_vitb16; tiny_clip for tests) with
head=ridge or head=linear. Per run, written to ``<run_dir>/clip_msm/``:

- ``scores.npz``: concepts, scores (n_voxels, n_concepts) of the similarity, S (n_concepts, n_voxels) the
  multi-semantic map (softmax over concepts per voxel), labels (hard CLIP-Dissect labels), voxel_xyz,
  probe image ids / files, the top images per ROI;
- ``roi_labels.csv`` + ``label_histograms.png``: per ROI the number of voxels per hard label (Fig. 4A), the
  top concept and its share, and the concept the ROI is expected to prefer (from the concept set);
- ``top_images.csv`` + ``top_images.png``: per ROI, the probe images with the highest mean activation
  Q over the ROI's voxels labelled with its top concept (Fig. 4B);
- ``semantic_maps.png``: each concept's S map and hard-label map (maximum projection of the volume);
- ``localizer.csv`` + ``localizer.png``: Pearson r between each concept's S map and its ground-truth
  localizer map, for MSM and for hard-label CLIP-Dissect (one-hot maps) (Fig. 6);
- ``similarities.csv``: the same agreement figures for the similarities in ``analysis.compare``;
- ``training_curve.csv`` + ``.png``: test accuracy of ridge refits on nested subsets of the training
  images (Fig. 2B), see :mod:`analyses.methods.training_curve`;
- ``summary.json``.

With a sweep_dir holding runs of >= 2 subjects (same backbone, head, dataset), ``clip_msm_localizer_paired_*``
files in the sweep directory hold the paired t-test (scipy.stats.ttest_rel over subjects) of r(MSM) vs
r(CLIP-Dissect) per concept, and ``clip_msm_training_curve.png`` overlays every run's curve.

Q = I·Wᵀ: I are the run's own image features (the embedding as its backbone computed it) and W the head's
weights mapped back from the standardised features to those raw features, W_raw = W/σ (see
:func:`analyses.methods.dissect.raw_space_weights`); the bias and the standardisation offset are constant per
voxel and do not enter Q. P = norm(I)·norm(T)ᵀ with T from the same open_clip model's text tower
(:mod:`encoders.text`), or from ``analysis.concept_embeddings``.

Ground truth for the localizer correlation (``analysis.localizers``): ``auto`` uses the synthetic dataset's
planted truth (``RunDir.ground_truth()``, from ``SyntheticDataModule``: the planted category contrast, mean
noise-free signal for the category's images minus that for the other images, per voxel) for concepts with
a ``synthetic_category``; or a mapping
``{concept: file}`` with a NIfTI volume read at the run's voxel coordinates (e.g. NSD's fLoc t-maps
``nsddata/ppdata/subjXX/func1pt8mm/floc_facestval.nii.gz``) or a ``.npy`` vector in the run's voxel order.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console

from analyses.jobs import clip_msm_figures as figures
from analyses.jobs.base import Job, JobOptions
from analyses.jobs.console import fmt, print_notes, table
from analyses.jobs.maps import clip_msm_maps, write_job_maps
from analyses.jobs.outputs import write_csv
from analyses.methods import dissect
from datamodules.errors import DataError
from datamodules.image_folder import ImageFolder, image_files
from encoders.run_dir import RunDir
from encoders.run_record import write_json

PLANTED_PREFIX = "planted:"


# ----------------------------------------------------------------------------- options


@dataclass
class ClipMSMOptions(JobOptions):
    """conf/analysis/clip_msm.yaml (its ``concepts`` group is a concept set, see ``load_concepts``)."""

    JOB = "clip_msm"
    GROUPS = ("training_curve",)
    ALIASES = {("training_curve", "sizes"): "curve_sizes", ("training_curve", "seed"): "curve_seed"}

    concepts: list[str] = field(default_factory=list)
    expected_rois: dict[str, list[str]] = field(default_factory=dict)  # concept -> ROI names that prefer it
    synthetic_category: dict[str, str] = field(default_factory=dict)   # concept -> synthetic category name
    templates: list[str] = field(default_factory=lambda: ["{}"])
    concept_embeddings: str | None = None
    similarity: str = "soft_wpmi"
    similarity_args: dict[str, dict] = field(default_factory=dict)
    compare: list[str] = field(default_factory=list)
    probe: str = "dataset"
    n_top_images: int = 3
    rois: list[str] | None = None
    localizers: str | dict = "auto"
    localizer_rois: list[str] | None = None
    curve_sizes: list = field(default_factory=list)
    curve_seed: int = 0
    device: str = "cpu"
    batch_size: int = 64
    out_subdir: str = "clip_msm"

    @classmethod
    def from_config(cls, analysis: dict, data_dir: str | None = None) -> "ClipMSMOptions":
        """The options from the analysis config; its ``concepts`` group (a concept set) becomes the concept
        names, their expected ROIs and synthetic categories."""
        a = dict(analysis)
        names, expected, synthetic = load_concepts(a.pop("concepts", None) or {})
        a.update(concepts=names, expected_rois=expected, synthetic_category=synthetic)
        for key in ("templates", "similarity_args", "compare", "localizers"):
            if a.get(key) is None:
                a.pop(key, None)  # null in the YAML: the default
        return super().from_config(a, data_dir)

    def check(self) -> None:
        if not self.concepts:
            raise ValueError("analysis.concepts: no concepts (give names: [...] or file: <path>)")
        for name in [self.similarity, *self.compare]:
            if name not in dissect.SIMILARITIES:
                raise ValueError(f"analysis.similarity/compare: unknown similarity {name!r}; valid: "
                                 f"{', '.join(dissect.SIMILARITIES)}")

    def similarity_kwargs(self, name: str) -> dict:
        return {k: v for k, v in (self.similarity_args.get(name) or {}).items() if v is not None}


def load_concepts(cfg: dict) -> tuple[list[str], dict[str, list[str]], dict[str, str]]:
    """A concept set (conf/concepts/*.yaml) -> (names, {concept: expected ROIs}, {concept: synthetic category}).

    ``file`` (a .txt with one concept a line, or a .yaml list / {names: [...]}) replaces ``names``.
    """
    names = cfg.get("names")
    if cfg.get("file") == "???":
        raise ValueError("analysis.concepts.file: give the concept list, analysis.concepts.file=<labels.txt|.yaml>")
    if cfg.get("file"):
        path = Path(cfg["file"])
        if not path.is_file():
            raise FileNotFoundError(f"{path}: concept file not found (analysis.concepts.file)")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            loaded = yaml.safe_load(path.read_text())
            names = loaded.get("names") if isinstance(loaded, dict) else loaded
        else:
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not isinstance(names, list):
            raise ValueError(f"{path}: expected a list of concepts (or names: [...])")
    names = [str(n) for n in (names or [])]
    if not names:
        raise ValueError("analysis.concepts: no concepts (give names: [...] or file: <path>)")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"analysis.concepts: duplicate concepts {dup[:10]}")
    expected = {str(k): [str(r) for r in (v or [])] for k, v in (cfg.get("rois") or {}).items() if k in names}
    synthetic = {str(k): str(v) for k, v in (cfg.get("synthetic_category") or {}).items() if k in names and v}
    return names, expected, synthetic


# ----------------------------------------------------------------------------- the run's encoder


@dataclass
class RunEncoder:
    """What CLIP-MSM needs from a run: its TrainedEncoder, W_raw (n_voxels, d), voxels and ROIs."""

    run: RunDir
    enc: object
    weights: np.ndarray
    voxel_xyz: np.ndarray
    rois: dict[str, np.ndarray]
    split: dict
    info: dict


def load_run_encoder(run_dir: RunDir | Path, device: str = "cpu") -> RunEncoder:
    """The run's encoder and its head weights on the raw CLIP image embedding; ValueError when the run is
    not a linear head on the ``embed`` layer alone."""
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    if run.is_time_series:
        raise ValueError(f"{run.path}: CLIP-MSM needs a head on the raw CLIP image embedding; this run's head reads "
                         f"z-scored, PCA-reduced, HRF-convolved features per TR (a time series)")
    enc = run.encoder(device=device)
    if not enc.takes_backbone_features or enc.layers != ["embed"]:
        raise ValueError(f"{run.path}: CLIP-MSM needs a head on the CLIP image embedding alone "
                         f"(backbone.layers=[embed]); this run reads {enc.layers}")
    weight = getattr(enc.model.head, "weight", None)
    if weight is None or tuple(weight.shape) != (enc.n_voxels, enc.n_features):
        raise ValueError(f"{run.path}: CLIP-MSM needs a linear head (head=ridge or head=linear) with weights "
                         f"(n_voxels, n_features); {type(enc.model.head).__name__} has none")
    w_raw = dissect.raw_space_weights(weight.detach().cpu().numpy(), enc.model.feature_std.cpu().numpy())
    return RunEncoder(run, enc, w_raw, run.voxel_xyz, run.rois(), run.split, run.info)


def concept_embeddings(run: RunEncoder, opts: ClipMSMOptions) -> tuple[np.ndarray, str]:
    """T (n_concepts, d): from ``analysis.concept_embeddings`` or the backbone's own text tower."""
    d = run.weights.shape[1]
    if opts.concept_embeddings:
        T = read_embeddings(Path(opts.concept_embeddings), opts.concepts)
        if T.shape != (len(opts.concepts), d):
            raise ValueError(f"{opts.concept_embeddings}: concept embeddings have shape {T.shape}, expected "
                             f"({len(opts.concepts)} concepts, {d}) for this run's embedding")
        return T, f"file {opts.concept_embeddings}"
    from encoders.text import TextEncoder

    try:
        text = TextEncoder.from_backbone(run.enc.backbone)
    except ValueError as err:
        raise ValueError(f"{run.enc.run_dir}: {err} (analysis.concept_embeddings=<file.npy>)") from None
    T = text.encode(opts.concepts, opts.templates)
    if T.shape[1] != d:
        raise ValueError(f"{run.enc.run_dir}: text embeddings are {T.shape[1]}-d but the run's image features "
                         f"are {d}-d (is the run on the backbone's embed layer?)")
    return T, f"{run.enc.backbone.spec.name} text tower, templates {opts.templates}"


def read_embeddings(path: Path, concepts: list[str]) -> np.ndarray:
    """(n_concepts, d) from .npy, .npz or .pt (an array, or {"embeddings": ..., "concepts": [...]}).
    When the file names its concepts they must be the analysis's, in order."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: concept embeddings file not found (analysis.concept_embeddings)")
    names = None
    if path.suffix == ".npy":
        arr = np.load(path)
    elif path.suffix == ".npz":
        with np.load(path) as f:
            if "embeddings" not in f.files:
                raise ValueError(f"{path}: no 'embeddings' array (has {f.files})")
            arr = f["embeddings"]
            names = [str(n) for n in f["concepts"]] if "concepts" in f.files else None
    elif path.suffix in (".pt", ".pth"):
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            if "embeddings" not in obj:
                raise ValueError(f"{path}: no 'embeddings' key (has {sorted(obj)})")
            names = [str(n) for n in obj["concepts"]] if "concepts" in obj else None
            obj = obj["embeddings"]
        arr = obj.float().numpy() if hasattr(obj, "numpy") else np.asarray(obj)
    else:
        raise ValueError(f"{path}: concept embeddings must be .npy, .npz or .pt")
    if names is not None and names != list(concepts):
        raise ValueError(f"{path}: its concepts {names[:5]}... differ from the analysis's {list(concepts)[:5]}...")
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim != 2 or not np.isfinite(arr).all():
        raise ValueError(f"{path}: concept embeddings must be a finite (n_concepts, d) array, got shape {arr.shape}")
    return arr


# ----------------------------------------------------------------------------- probe images


@dataclass
class Probe:
    """Probe images: raw features (n, d), their ids (dataset) or files (folder), and a reader of the pixels."""

    features: np.ndarray
    ids: np.ndarray | None
    files: list[str] | None
    description: str
    reader: object = None  # callable i -> uint8 (H, W, 3), or None when images cannot be shown

    def image(self, i: int) -> np.ndarray | None:
        return None if self.reader is None else self.reader(i)

    def name(self, i: int) -> str:
        return str(self.files[i]) if self.files is not None else str(int(self.ids[i]))


def probe_images(run: RunEncoder, opts: ClipMSMOptions) -> Probe:
    """``dataset``: every image of the run's splits; ``test``: its test images; else a folder of images."""
    enc = run.enc
    if opts.probe in ("dataset", "test"):
        keys = ("test",) if opts.probe == "test" else ("train", "val", "test")
        ids = np.unique(np.concatenate([np.asarray(run.split.get(k, []), dtype=np.int64) for k in keys]))
        if ids.size == 0:
            raise ValueError(f"{enc.run_dir / 'split.json'}: no image ids for the probe set '{opts.probe}'")
        try:
            source = run.run.stimuli()
        except (DataError, ValueError, KeyError):
            source = None
        feats = enc.cached_features(ids)
        if feats is None:
            if source is None:
                raise ValueError(f"{enc.run_dir}: the run's feature cache is gone and its images cannot be read; "
                                 f"give analysis.probe=<folder of images>")
            feats = np.concatenate([enc.image_features([source.image(i) for i in ids[s:s + opts.batch_size]])
                                    for s in range(0, len(ids), opts.batch_size)])
        reader = (lambda i: source.image(int(ids[i]))) if source is not None else None
        return Probe(feats, ids, None, f"{opts.probe} images of the run ({len(ids)})", reader)
    folder = Path(opts.probe)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: probe image folder not found (analysis.probe: dataset | test | <folder>)")
    source = ImageFolder(image_files(folder, recursive=True))
    files = source.files
    feats = np.concatenate([enc.image_features([source.image(i) for i in range(s, min(s + opts.batch_size, len(files)))])
                            for s in range(0, len(files), opts.batch_size)])
    return Probe(feats, None, [str(f) for f in files], f"{len(files)} images under {folder}", source.image)


# ----------------------------------------------------------------------------- ground truth


def localizer_truth(run: RunEncoder, opts: ClipMSMOptions, synthetic: dict | None) -> tuple[dict[int, np.ndarray],
                                                                                      dict[str, str]]:
    """Ground-truth maps {concept index: (n_voxels,)} for the concepts that have one, and their sources."""
    truth: dict[int, np.ndarray] = {}
    sources: dict[str, str] = {}
    if isinstance(opts.localizers, dict):
        unknown = [c for c in opts.localizers if c not in opts.concepts]
        if unknown:
            raise ValueError(f"analysis.localizers: {unknown} are not concepts of the analysis ({opts.concepts})")
        for concept, path in opts.localizers.items():
            truth[opts.concepts.index(concept)] = read_localizer(Path(path), run.voxel_xyz)
            sources[concept] = str(path)
    elif opts.localizers == "auto":
        if synthetic is not None:
            for concept, category in opts.synthetic_category.items():
                if category in synthetic["categories"]:
                    truth[opts.concepts.index(concept)] = synthetic["contrast"][synthetic["categories"].index(category)]
                    sources[concept] = f"ground_truth.h5 planted contrast '{category}'"
    elif opts.localizers not in ("none", "null"):
        raise ValueError(f"analysis.localizers must be auto, none or {{concept: file}}, got {opts.localizers!r}")
    return truth, sources


def read_localizer(path: Path, xyz: np.ndarray) -> np.ndarray:
    """A per-voxel localizer map in the run's voxel order: .npy (n_voxels,) or a NIfTI volume at voxel_xyz."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: localizer map not found (analysis.localizers)")
    if path.suffix == ".npy":
        vec = np.load(path).astype(np.float64).ravel()
        if vec.shape != (len(xyz),):
            raise ValueError(f"{path}: {vec.size} values, the run has {len(xyz)} voxels")
        return vec
    import nibabel as nib

    try:
        vol = np.asarray(nib.load(str(path)).get_fdata(), dtype=np.float64)
    except Exception as err:  # nibabel raises several types for unreadable files
        raise ValueError(f"{path}: cannot read as NIfTI ({err})") from None
    vol = vol.reshape(vol.shape[:3]) if vol.ndim > 3 and all(s == 1 for s in vol.shape[3:]) else vol
    if vol.ndim != 3 or xyz.shape[1] != 3 or (xyz.max(0) >= np.array(vol.shape)).any():
        raise ValueError(f"{path}: volume {vol.shape} does not hold the run's voxels (max index "
                         f"{xyz.max(0).tolist()}); give a .npy in the run's voxel order instead")
    return vol[xyz[:, 0], xyz[:, 1], xyz[:, 2]]


# ----------------------------------------------------------------------------- one run


def roi_masks(run: RunEncoder, opts: ClipMSMOptions, synthetic: dict | None) -> dict[str, np.ndarray]:
    """The run's ROIs (or analysis.rois) plus, on synthetic data, the planted category groups."""
    rois = dict(run.rois)
    if synthetic is not None:
        for c, name in enumerate(synthetic["categories"]):
            mask = synthetic["preferred"] == c
            if mask.any():
                rois[PLANTED_PREFIX + name] = mask
    if opts.rois:
        unknown = [r for r in opts.rois if r not in rois]
        if unknown:
            raise ValueError(f"analysis.rois: no ROI {unknown} in this run (has {sorted(rois)})")
        rois = {r: rois[r] for r in opts.rois}
    return {k: v for k, v in rois.items() if v.any()}


def expected_concept(roi: str, opts: ClipMSMOptions) -> str | None:
    """The concept a ROI is expected to prefer: from the concept set's ``rois`` and ``synthetic_category``."""
    for concept, names in opts.expected_rois.items():
        if roi in names:
            return concept
    if roi.startswith(PLANTED_PREFIX):
        for concept, category in opts.synthetic_category.items():
            if roi == PLANTED_PREFIX + category:
                return concept
    return None


def localizer_correlations(S: np.ndarray, labels: np.ndarray, truth: dict[int, np.ndarray],
                           mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r with the ground truth of each concept's S map and of its CLIP-Dissect one-hot map:
    (n_concepts,) each, NaN for concepts without ground truth."""
    msm, hard = np.full(S.shape[0], np.nan), np.full(S.shape[0], np.nan)
    if truth:
        idx = np.array(sorted(truth))
        maps = np.stack([truth[i] for i in idx])
        msm[idx] = dissect.map_correlations(S[idx], maps, mask)
        hard[idx] = dissect.map_correlations((labels[None, :] == idx[:, None]).astype(np.float64), maps, mask)
    return msm, hard


def dissect_run(acts, P: np.ndarray, name: str, opts: ClipMSMOptions) -> dict:
    """Scores, S, hard labels for one similarity."""
    scores = dissect.similarity(name, acts, P, device=opts.device, **opts.similarity_kwargs(name))
    return {"scores": scores, "S": dissect.multi_semantic_map(scores), "labels": dissect.hard_labels(scores)}


def roi_label_rows(labels: np.ndarray, rois: dict[str, np.ndarray], opts: ClipMSMOptions) -> list[list]:
    hist = dissect.label_histograms(labels, rois, len(opts.concepts))
    rows = []
    for roi, counts in hist.items():
        total = int(counts.sum())
        top = int(np.argmax(counts))
        expected = expected_concept(roi, opts)
        share = float(counts[opts.concepts.index(expected)] / total) if expected and total else float("nan")
        rows.append([roi, total, opts.concepts[top], float(counts[top] / total) if total else float("nan"),
                     expected or "", share, *[int(c) for c in counts]])
    return rows


def compute_run(run_dir: RunDir | Path, opts: ClipMSMOptions) -> dict:
    """Everything CLIP-MSM finds in one run (nothing written): the dissection, the per-ROI labels, the
    localizer correlations, the top images, the training curve and the summary."""
    run = load_run_encoder(run_dir, opts.device)
    run_dir = run.run.path
    T, t_source = concept_embeddings(run, opts)
    probe = probe_images(run, opts)
    acts = dissect.LinearActivations(probe.features.astype(np.float32), run.weights.astype(np.float32))
    P = dissect.concept_activations(probe.features, T)
    synthetic = run.run.ground_truth()
    rois = roi_masks(run, opts, synthetic)
    truth, truth_sources = localizer_truth(run, opts, synthetic)
    loc_mask = None
    if opts.localizer_rois:
        unknown = [r for r in opts.localizer_rois if r not in rois]
        if unknown:
            raise ValueError(f"analysis.localizer_rois: no ROI {unknown} in this run (has {sorted(rois)})")
        loc_mask = np.any([rois[r] for r in opts.localizer_rois], axis=0)

    main = dissect_run(acts, P, opts.similarity, opts)
    results = {opts.similarity: main}
    for name in opts.compare:
        if name not in results:
            results[name] = dissect_run(acts, P, name, opts)

    loc = {}
    for name, res in results.items():
        loc[name] = dict(zip(("msm", "hard"), localizer_correlations(res["S"], res["labels"], truth, loc_mask)))
    label_rows = roi_label_rows(main["labels"], rois, opts)
    top = top_images_per_roi(acts, main["labels"], rois, label_rows, opts, probe)
    curve = training_curve(run, opts) if opts.curve_sizes else None

    loc_rows = [[c, truth_sources.get(c, ""), int(np.isfinite(truth[i]).sum()) if i in truth else 0,
                 loc[opts.similarity]["msm"][i], loc[opts.similarity]["hard"][i]] for i, c in enumerate(opts.concepts)]
    sim_rows = []
    for name, res in results.items():
        acc = {row[0]: row[5] for row in roi_label_rows(res["labels"], rois, opts)}
        for i, c in enumerate(opts.concepts):
            rois_c = [r for r in rois if expected_concept(r, opts) == c]
            sim_rows.append([name, c, loc[name]["msm"][i], loc[name]["hard"][i],
                             float(np.nanmean([acc[r] for r in rois_c])) if rois_c else float("nan")])
    data = run.info.get("data", {})
    title = f"{run.info.get('backbone', '?')}/{run.info.get('head', '?')} subject {data.get('subject', '?')}"
    summary = {"run_dir": str(run_dir), "backbone": run.info.get("backbone"), "head": run.info.get("head"),
               "dataset": run.info.get("data", {}).get("dataset"), "subject": run.info.get("data", {}).get("subject"),
               "concepts": opts.concepts, "concept_embeddings": t_source, "probe": probe.description,
               "n_probe_images": int(len(probe.features)), "n_voxels": int(len(run.voxel_xyz)),
               "similarity": opts.similarity, "similarity_args": opts.similarity_kwargs(opts.similarity),
               "weights": "W_raw = W / feature_std (head weights on the raw embedding)",
               "localizer": {c: {"r_msm": _num(r[3]), "r_hard": _num(r[4]), "source": r[1]}
                             for c, r in zip(opts.concepts, loc_rows)},
               "rois": {row[0]: {"top_concept": row[2], "top_share": _num(row[3]), "expected": row[4] or None}
                        for row in label_rows}}
    return {"run_dir": run_dir, "title": title, "main": main, "T": T, "probe": probe, "voxel_xyz": run.voxel_xyz,
            "label_rows": label_rows, "top": top, "loc_rows": loc_rows, "truth_sources": truth_sources,
            "sim_rows": sim_rows, "curve": curve, "summary": summary, "localizer": loc_rows, "info": run.info}


def write_run(res: dict, out: Path, opts: ClipMSMOptions) -> list[Path]:
    """scores.npz, roi_labels.csv, label_histograms.png, top_images.csv/.png, semantic_maps.png,
    localizer.csv/.png, similarities.csv, training_curve.csv/.png and summary.json into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    main, probe, title = res["main"], res["probe"], res["title"]
    files = []
    np.savez_compressed(out / "scores.npz", concepts=np.array(opts.concepts), scores=main["scores"].astype(np.float32),
                        S=main["S"].astype(np.float32), labels=main["labels"], voxel_xyz=res["voxel_xyz"],
                        concept_embeddings=res["T"], probe_ids=probe.ids if probe.ids is not None else np.zeros(0, np.int64),
                        probe_files=np.array(probe.files or []), similarity=opts.similarity)
    files.append(out / "scores.npz")
    header = ["roi", "n_voxels", "top_concept", "top_share", "expected_concept", "expected_share",
              *[f"n_{c}" for c in opts.concepts]]
    files.append(write_csv(out / "roi_labels.csv", header, res["label_rows"]))
    files.append(figures.plot_label_histograms(res["label_rows"], opts.concepts, out / "label_histograms.png", title))
    files.append(write_csv(out / "top_images.csv", ["roi", "top_concept", "n_voxels_labelled", "rank", "image",
                                                     "mean_activation"], res["top"]["rows"]))
    png = figures.plot_top_images(res["top"], probe, out / "top_images.png", title)
    if png is not None:
        files.append(png)
    files.append(figures.plot_semantic_maps(main["S"], main["labels"], res["voxel_xyz"], opts.concepts,
                                            out / "semantic_maps.png", title))
    files.append(write_csv(out / "localizer.csv", ["concept", "ground_truth", "n_voxels", "r_msm", "r_hard"],
                           res["loc_rows"]))
    if res["truth_sources"]:
        files.append(figures.plot_localizer(res["loc_rows"], out / "localizer.png", title))
    files.append(write_csv(out / "similarities.csv", ["similarity", "concept", "r_msm", "r_hard",
                                                      "expected_share_mean"], res["sim_rows"]))
    if res["curve"] is not None:
        files += write_training_curve(res["curve"], out, title)
    write_json(out / "summary.json", res["summary"])
    files.append(out / "summary.json")
    return files


class ClipMSMJob(Job):
    """CLIP-MSM of every CLIP-embedding run, then the paired test over subjects (see the module docstring)."""

    name = "clip_msm"
    Options = ClipMSMOptions

    def compute(self, run: RunDir) -> dict:
        return compute_run(run, self.options)

    def write(self, run: RunDir, result: dict) -> list[Path]:
        out = self.out_dir(run)
        result["out_dir"] = out
        map_files, result["map_notes"] = write_job_maps(  # <run>/maps/: top concept and its share in the data's space
            run, *clip_msm_maps(result["main"]["S"], result["main"]["labels"], self.options.concepts))
        return write_run(result, out, self.options) + map_files

    def show(self, run: RunDir, result: dict) -> None:
        _print_run(self.console, result["label_rows"], result["loc_rows"], self.options)
        print_notes(self.console, result.get("map_notes", []))

    def combine(self, results: list[tuple[RunDir, dict]]) -> dict:
        notes: list[str] = []
        res = [r for _, r in results]
        return {"paired": paired_localizer_tests(res, notes), "notes": notes,
                "curves": [(f"{r['summary']['backbone']}/{r['summary']['head']} s{r['summary']['subject']}", r["curve"])
                           for r in res if r["curve"] is not None]}

    def write_combined(self, combined: dict, target: Path) -> list[Path]:
        return write_sweep(combined, target, self.console)


def analyse_run(run_dir: RunDir | Path, opts: ClipMSMOptions, console: Console | None = None) -> dict:
    """Everything for one run (library use): computed, then written to ``<run_dir>/<out_subdir>/``; returns
    {"run_dir", "out_dir", "files", "summary", "curve", "localizer", "info", ...}."""
    job = ClipMSMJob(opts, console or Console(quiet=True))
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    result, files = job.process(run)
    return {**result, "files": files}


def top_images_per_roi(acts, labels: np.ndarray, rois: dict[str, np.ndarray], label_rows: list[list],
                       opts: ClipMSMOptions, probe: Probe) -> dict:
    """Per ROI: its top concept, and the probe images with the highest mean Q over its voxels so labelled
    (rows: roi, concept, voxels, rank, image id or file, mean activation)."""
    rows, per_roi = [], {}
    for row in label_rows:
        roi, concept = row[0], row[2]
        units = rois[roi] & (labels == opts.concepts.index(concept))
        if not units.any():
            continue
        idx = dissect.top_images(acts, units, opts.n_top_images)
        mean = dissect.mean_activation(acts, units)
        per_roi[roi] = (concept, idx)
        rows += [[roi, concept, int(units.sum()), k + 1, probe.name(int(i)), float(mean[i])]
                 for k, i in enumerate(idx)]
    return {"rows": rows, "per_roi": per_roi}


# ----------------------------------------------------------------------------- training-size curve


def training_curve(run: RunEncoder, opts: ClipMSMOptions) -> dict:
    """Ridge refits on nested subsets of the run's training images, scored on its test images."""
    from analyses.methods.training_curve import resolve_sizes, training_size_curve

    enc, run_dir = run.enc, run.run.path
    try:
        dm = run.run.datamodule()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} (needed for the training-size curve)") from None
    train_ids, test_ids = np.asarray(dm.split_ids["train"]), np.asarray(dm.split_ids["test"])
    if not (np.array_equal(train_ids, np.asarray(run.split["train"]))
            and np.array_equal(test_ids, np.asarray(run.split["test"]))):
        raise ValueError(f"{run_dir}: the rebuilt data split differs from split.json (was the dataset changed?)")
    train_x, test_x = enc.cached_features(train_ids), enc.cached_features(test_ids)
    if train_x is None or test_x is None:
        dm.set_transform(enc.backbone.transform)
        import torch

        def extract(ids):
            with torch.no_grad():
                return np.concatenate([enc.backbone(b["x"].to(enc.device)).float().cpu().numpy()
                                       for b in dm.images_loader(ids)])

        train_x, test_x = extract(train_ids), extract(test_ids)
    head = enc.config.get("head") or {}
    ridge = {"alphas": head.get("alphas"), "cv": int(head.get("cv", 5)), "score": head.get("score", "r2"),
             "shuffle": bool(head.get("shuffle_folds", True)), "seed": int(head.get("seed", enc.config.get("seed", 0)))}
    sizes = resolve_sizes(opts.curve_sizes, len(np.unique(train_ids)), min_size=max(ridge["cv"], 2))
    # the run's feature scaling (runs trained before it had none: plain z-scoring)
    scaling = enc.config.get("feature_scaling") or {"std_floor": None, "clip": False}
    curve = training_size_curve(train_x, dm.targets("train"), train_ids, test_x, dm.targets("test"), sizes,
                                ridge=ridge, seed=opts.curve_seed, device=opts.device, scaling=scaling,
                                blocks=enc.feature_slices)
    curve["rois"] = {"all": np.ones(len(run.voxel_xyz), bool), **run.rois}
    return curve


def write_training_curve(curve: dict, out: Path, title: str) -> list[Path]:
    """training_curve.csv (per size and ROI: mean R² and r) and training_curve.png."""
    rows = []
    for k, n in enumerate(curve["sizes"]):
        for roi, mask in curve["rois"].items():
            rows.append([int(n), int(curve["n_rows"][k]), roi, int(mask.sum()),
                         float(np.nanmean(curve["r2"][k, mask])), float(np.nanmean(curve["r"][k, mask]))])
    files = [write_csv(out / "training_curve.csv", ["n_train_images", "n_train_rows", "roi", "n_voxels",
                                                     "r2_mean", "r_mean"], rows)]
    return files + [figures.plot_training_curve(curve, out / "training_curve.png", title)]


# ----------------------------------------------------------------------------- across subjects


def paired_localizer_tests(results: list[dict], notes: list[str] | None = None) -> dict[tuple, dict]:
    """Per (backbone, head, dataset) group with >= 2 subjects: per concept, ttest_rel over subjects of
    r(MSM) vs r(CLIP-Dissect hard labels). {group: {"subjects", "rows": [concept, n, mean_msm, mean_hard, t, p]}}.
    A group with two runs of one subject is skipped (with a line in ``notes``): pairs must be subjects."""
    from scipy.stats import ttest_rel

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for res in results:
        s = res["summary"]
        groups[(s["backbone"], s["head"], s["dataset"])].append(res)
    out = {}
    for key, members in groups.items():
        subjects = [m["summary"]["subject"] for m in members]
        if len(set(subjects)) < 2:
            continue
        if len(set(subjects)) != len(subjects):
            if notes is not None:
                notes.append(f"{'/'.join(map(str, key))}: runs repeat a subject ({subjects}); no paired test over "
                             f"subjects (it needs one run per subject per backbone/head/dataset)")
            continue
        rows = []
        concepts = [row[0] for row in members[0]["localizer"]]
        for i, concept in enumerate(concepts):
            msm = np.array([m["localizer"][i][3] for m in members], dtype=np.float64)
            hard = np.array([m["localizer"][i][4] for m in members], dtype=np.float64)
            ok = np.isfinite(msm) & np.isfinite(hard)
            if ok.sum() >= 2:
                t, p = ttest_rel(msm[ok], hard[ok])
            else:
                t, p = np.nan, np.nan
            rows.append([concept, int(ok.sum()), float(np.nanmean(msm)) if ok.any() else np.nan,
                         float(np.nanmean(hard)) if ok.any() else np.nan, float(t), float(p)])
        out[key] = {"subjects": subjects, "rows": rows}
    return out


def write_sweep(combined: dict, target: Path, console: Console) -> list[Path]:
    """The paired tests (clip_msm_localizer_paired_*.csv/.png) and every run's training curve in one figure."""
    files = []
    for (backbone, head, dataset), res in combined["paired"].items():
        stem = f"clip_msm_localizer_paired_{backbone}_{head}_{dataset}"
        files.append(write_csv(target / f"{stem}.csv", ["concept", "n_subjects", "r_msm_mean", "r_hard_mean",
                                                          "t", "p"], res["rows"]))
        files.append(figures.plot_paired(res["rows"], target / f"{stem}.png",
                                         f"{backbone}/{head} {dataset}: subjects {res['subjects']}"))
        console.print(table(f"S map vs localizer, paired over subjects {res['subjects']} — {backbone}/{head}",
                            ("concept", "n", "r MSM", "r CLIP-Dissect", "t", "p"),
                            [[row[0], str(row[1]), *[fmt(v, spec="g") for v in row[2:]]] for row in res["rows"]],
                            right=("n", "r MSM", "r CLIP-Dissect", "t", "p")))
    if len(combined["curves"]) > 1:
        files.append(figures.plot_training_curves(combined["curves"], target / "clip_msm_training_curve.png"))
    print_notes(console, combined["notes"])
    return files


# ----------------------------------------------------------------------------- files and printing


def _num(v):
    return float(v) if isinstance(v, (float, np.floating)) and np.isfinite(v) else None


def _print_run(console: Console, label_rows: list[list], loc_rows: list[list], opts: ClipMSMOptions) -> None:
    console.print(table(f"CLIP-Dissect labels per ROI ({opts.similarity})",
                        ("ROI", "voxels", "top concept", "share", "expected", "expected share"),
                        [[row[0], str(row[1]), row[2], fmt(row[3], spec="g"), row[4] or "—", fmt(row[5], spec="g")]
                         for row in label_rows], right=("voxels", "share", "expected share")))
    if any(r[1] for r in loc_rows):
        console.print(table("S map vs localizer (Pearson r)", ("concept", "ground truth", "r MSM", "r CLIP-Dissect"),
                            [[row[0], row[1], fmt(row[3], spec="g"), fmt(row[4], spec="g")] for row in loc_rows if row[1]]))
