"""BrainSAIL over a run directory: which part of each image drives each ROI (or voxel).

    python analyze.py analysis=brainsail run_dir=outputs/runs/<run>
    python analyze.py analysis=brainsail run_dir=<clip run> 'analysis.compare_runs=[<dinov2 run>,<siglip run>]'

The run must have been trained on the backbone's image embedding alone (``backbone.layers=[embed]``; BrainSAIL
also sets ``backbone.normalize=true``) with a ViT backbone. Images: the run's ``split`` images, opened by the
run's own datamodule (``RunDir.stimuli()``), or every image of ``image_dir``. Per image batch: dense
features (``encoders.dense``: MaskCLIP / NACLIP last block, ``method=auto`` = NACLIP for CLIP ViTs, MaskCLIP
otherwise) are distilled over ``n_views`` shifted / flipped views (``encoders.distill``), unit-normalised per
patch when the run normalised its embeddings, and the run's head is applied to every patch
(``analyses.methods.attribution``). Written to ``<run_dir>/<out_subdir>/``:

* ``overlays/<column>.png``: the ``top_k`` images with the highest predicted response of the column (ROI
  mean, or ``voxel<i>``), each with its relevance map overlaid (map upsampled to the image, min-max scaled).
* ``rois.csv``: per column: voxels, top-k ids, mean relevance-map correlation with luminance / saturation
  (/ depth), the caption category of its top-k images, agreement with the compared encoders.
* ``properties.csv``: per column and property: mean per-image Pearson r (map vs the property over pixels),
  SE, one-sample t and p over images, n.
* ``captions.csv`` (text tower only): per column and caption category, the number of top-k images and the
  fraction of all images whose best-correlated caption is of that category, and the mean best r.
* ``agreement.csv`` and ``compare/<column>.png`` (``compare_runs``): per column and pair of encoders the mean
  per-image Pearson r between their maps (upsampled to the image), SE, n; the maps side by side.
* ``maps.npz`` (ids, columns, maps per encoder at patch resolution, predicted responses, per-image
  correlations) and ``brainsail.json`` (options, every table, notes).

The job's phases: ``prepare`` (every input loaded and checked), ``map_images`` (the streamed maps and
their per-image correlates), ``summarise`` (the tables) compute; ``write_outputs`` writes. The plain
functions are in ``analyses.methods.attribution``, the figures in ``analyses.jobs.brainsail_figures``.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.console import Console

from analyses.jobs import brainsail_figures as figures
from analyses.jobs.base import Job, JobOptions
from analyses.jobs.outputs import write_csv
from analyses.methods import attribution as attr
from datamodules.errors import DataError
from datamodules.image_folder import image_files, read_image
from encoders.distill import FILLS, distill, make_views
from encoders.progress import track
from encoders.run_dir import SPLIT, RunDir
from encoders.run_record import write_json

log = logging.getLogger(__name__)

CAPTIONS_DIR = Path(__file__).resolve().parents[2] / "conf" / "captions"


@dataclass
class BrainSAILOptions(JobOptions):
    """Every knob (conf/analysis/brainsail.yaml documents each; its groups dense, distill and properties
    are flattened)."""

    JOB = "brainsail"
    GROUPS = ("dense", "distill", "properties")

    split: str = "test"
    max_images: int | None = None
    image_dir: str | None = None
    rois: list[str] | None = None
    voxels: list[int] = field(default_factory=list)
    method: str = "auto"
    sigma: float = 5.0
    image_size: int | None = None
    n_views: int = 51
    max_shift: int = 3
    flip: bool = True
    fill: str = "edge"
    seed: int = 0
    view_batch: int = 8
    batch_size: int = 8
    top_k: int = 5
    depth: str | None = None
    captions: str | None = "brainsail"
    compare_runs: list[str] = field(default_factory=list)
    device: str = "cpu"
    out_subdir: str = "brainsail"

    def check(self) -> None:
        if self.method not in ("auto", "maskclip", "naclip"):
            raise ValueError(f"analysis.dense.method must be auto, maskclip or naclip, got {self.method!r}")
        if self.fill not in FILLS:
            raise ValueError(f"analysis.distill.fill must be one of {FILLS}, got {self.fill!r}")
        for name in ("n_views", "view_batch", "batch_size", "top_k"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"analysis.{name} must be >= 1, got {getattr(self, name)}")


# ----------------------------------------------------------------------------- inputs


def load_captions(source: str | Path) -> dict[str, list[str]]:
    """Caption lists per category: a name in conf/captions/ (``brainsail``) or a YAML file path.

    The YAML maps category -> list of captions; ValueError naming the file otherwise.
    """
    path = Path(source)
    if not path.suffix:
        path = CAPTIONS_DIR / f"{source}.yaml"
    if not path.is_file():
        avail = sorted(p.stem for p in CAPTIONS_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"{path}: caption file not found (names in conf/captions: {avail})")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not data or not all(
            isinstance(v, list) and v and all(isinstance(c, str) for c in v) for v in data.values()):
        raise ValueError(f"{path}: expected a mapping category -> non-empty list of caption strings")
    return {str(k): list(v) for k, v in data.items()}


class ImageSource:
    """The images to analyse: ``ids`` (stimulus ids or file names) and ``image(k)`` -> uint8 (H, W, 3)."""

    def __init__(self, ids: Sequence, reader):
        self.ids, self._reader = list(ids), reader

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, k: int) -> np.ndarray:
        img = np.asarray(self._reader(self.ids[k]))
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        return img[..., :3].astype(np.uint8)


def image_source(run: RunDir, opts: BrainSAILOptions) -> ImageSource:
    """``image_dir`` files (sorted), else the run's ``split`` ids, read by the run's own datamodule."""
    if opts.image_dir:
        folder = Path(opts.image_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: image_dir not found")
        files = image_files(folder)
        files = files[:opts.max_images] if opts.max_images else files
        return ImageSource([p.name for p in files], lambda name: read_image(folder / name))
    run.require(SPLIT, "or give analysis.image_dir=<folder of images>")
    ids = run.split_ids(opts.split)
    ids = ids[:opts.max_images] if opts.max_images else ids
    try:
        stimuli = run.stimuli()
    except (DataError, KeyError) as err:
        raise ValueError(f"{run.path}: its images cannot be read ({err}); give analysis.image_dir=<folder of images>") from None
    return ImageSource(ids.tolist(), stimuli.image)


def display_images(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """uint8 images -> (n, size, size, 3) uint8 as the model sees them (shorter side resized, centre crop)."""
    from torchvision.transforms import v2

    geo = v2.Compose([v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    return np.stack([geo(np.ascontiguousarray(im)).permute(1, 2, 0).numpy() for im in images]).astype(np.uint8)


def check_depth_file(path: str | Path, ids: Sequence) -> None:
    """FileNotFoundError / ValueError (one line) unless ``path`` is an HDF5 file with a dataset ``depth``
    (n_stimuli, H, W) holding a row for every stimulus id in ``ids``."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: depth file not found")
    try:
        with h5py.File(path, "r") as f:
            shape = f["depth"].shape if "depth" in f else None
    except OSError as err:
        raise ValueError(f"{path}: cannot read as HDF5 ({err})") from None
    if shape is None or len(shape) != 3:
        raise ValueError(f"{path}: needs a dataset 'depth' of shape (n_stimuli, H, W), found {shape}")
    bad = [i for i in ids if not isinstance(i, (int, np.integer)) or not 0 <= int(i) < shape[0]]
    if bad:
        raise ValueError(f"{path}: no depth rows for ids {bad[:5]} ('depth' holds {shape[0]} rows)")


def depth_maps(path: str | Path, ids: Sequence, size: int) -> np.ndarray:
    """Depth maps of stimulus ids from an HDF5 file (dataset ``depth`` (n_stimuli, H, W), rows = stimulus ids),
    resized and centre-cropped like the images -> (n, size, size) float32."""
    import h5py
    from torchvision.transforms import v2

    check_depth_file(path, ids)
    with h5py.File(path, "r") as f:
        maps = [np.asarray(f["depth"][int(i)], np.float32) for i in ids]
    geo = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    return np.stack([geo(torch.from_numpy(m)[None])[0].numpy() for m in maps])


# ----------------------------------------------------------------------------- encoders


@dataclass
class EncoderMaps:
    """One run's pipeline: its TrainedEncoder, dense features, views, columns and its maps (n, R, h, w),
    allocated once (``allocate``) and filled batch by batch (``latest`` = the last batch's rows)."""

    label: str
    run_dir: Path
    encoder: object
    dense: object
    readout: attr.Readout
    columns: list[str]
    normalize: bool
    maps: np.ndarray | None = None
    latest: slice = field(default_factory=lambda: slice(0, 0))

    def allocate(self, n_images: int) -> None:
        g = self.dense.grid
        self.maps = np.zeros((n_images, len(self.columns), g, g), np.float32)

    def store(self, rows: slice, maps: np.ndarray) -> None:
        self.maps[rows] = maps
        self.latest = rows

    def distilled(self, images: Sequence[np.ndarray], views, opts: BrainSAILOptions) -> torch.Tensor:
        x = torch.stack([self.dense.transform(np.ascontiguousarray(im)) for im in images])
        return distill(self.dense, x, views, self.dense.patch_size, opts.view_batch, opts.fill, self.normalize)


def build_encoder(run: RunDir, opts: BrainSAILOptions, columns: Sequence[str] | None = None) -> EncoderMaps:
    """Load a run, check it maps (embedding run, ViT), and set up its dense features and readout.

    columns: the primary run's column names (compared runs keep those they also have, in that order).
    """
    from encoders.dense import dense_features

    enc = run.encoder(device=opts.device)
    attr.check_embedding_run(enc)
    dense = dense_features(enc.backbone, None if opts.method == "auto" else opts.method, opts.sigma,
                           opts.image_size)
    masks = run.rois(opts.rois if columns is None else None)
    if columns is None:
        names, A = attr.roi_columns(masks, opts.voxels)
    else:
        keep = {c: masks[c] for c in columns if c in masks}
        voxels = [int(c[5:]) for c in columns if c.startswith("voxel") and c not in masks]
        names, A = attr.roi_columns(keep, voxels)
        names_order = [c for c in columns if c in names]
        A = A[:, [names.index(c) for c in names_order]]
        names = names_order
    label = f"{enc.backbone.spec.name}:{run.path.name}"
    return EncoderMaps(label, run.path, enc, dense, attr.Readout(enc, A), names, bool(enc.backbone.normalize))


# ----------------------------------------------------------------------------- the analysis


@dataclass
class Setup:
    """Phase 1: the encoders (the run's first, then the compared runs'), the images, the views, the captions."""

    run: RunDir
    encoders: list[EncoderMaps]
    source: ImageSource
    views: list
    size: int
    notes: list[str]
    categories: list[str] | None = None     # caption categories (None: no caption probes)
    cap_index: np.ndarray | None = None     # (C,) category of each caption
    text: np.ndarray | None = None          # (C, e) caption embeddings

    @property
    def primary(self) -> EncoderMaps:
        return self.encoders[0]


def prepare(run: RunDir, opts: BrainSAILOptions) -> Setup:
    """Load and check every input (encoders, images, depth file, captions) before any image is mapped."""
    notes: list[str] = []
    primary = build_encoder(run, opts)
    encoders = [primary]
    for other in opts.compare_runs:
        enc = build_encoder(RunDir(other), opts, primary.columns)
        if enc.label in {e.label for e in encoders}:
            enc.label = f"{enc.label}#{len(encoders) + 1}"
        missing = [c for c in primary.columns if c not in enc.columns]
        if missing:
            notes.append(f"{other}: no columns {missing}; they are not compared")
        encoders.append(enc)
    source = image_source(run, opts)
    if len(source) < 1:
        raise ValueError(f"{run.path}: no images to analyse")
    if opts.depth:
        check_depth_file(opts.depth, source.ids)
    setup = Setup(run, encoders, source, make_views(opts.n_views, opts.max_shift, opts.seed, opts.flip),
                  primary.dense.image_size, notes)
    if opts.captions:
        from encoders.text import TextEncoder

        captions = load_captions(opts.captions)
        categories = list(captions)
        flat = [c for k in categories for c in captions[k]]
        try:
            setup.text = TextEncoder.from_backbone(primary.encoder.backbone).encode(flat)
            setup.categories = categories
            setup.cap_index = np.array([i for i, k in enumerate(categories) for _ in captions[k]])
        except ValueError as err:
            notes.append(f"caption probes skipped: {err}")
    return setup


@dataclass
class Maps:
    """Phase 2: per image and column, the primary run's prediction and map correlates (every encoder's maps
    are in its EncoderMaps)."""

    predicted: np.ndarray                   # (n, R)
    props: dict[str, np.ndarray]            # property -> (n, R) per-image r of the map with it
    caption_r: np.ndarray | None            # (n, R, C)
    agree: dict[tuple[int, int], np.ndarray]  # (a, b) -> (n, R)


def map_images(setup: Setup, opts: BrainSAILOptions, console: Console) -> Maps:
    """Stream the images ``batch_size`` at a time: distilled dense features, every encoder's relevance maps,
    the primary run's predictions, the map correlates (luminance, saturation, depth, captions) and the
    agreement between encoders."""
    encoders, source, size, primary = setup.encoders, setup.source, setup.size, setup.primary
    predicted, props, cap_r = [], {"luminance": [], "saturation": []}, []
    if opts.depth:
        props["depth"] = []
    for e in encoders:
        e.allocate(len(source))
    pairs = [(a, b) for a in range(len(encoders)) for b in range(a + 1, len(encoders))]
    agree = {pair: [] for pair in pairs}
    console.print(f"BrainSAIL: {len(source)} images x {len(setup.views)} views, {len(primary.columns)} columns, "
                  f"{primary.dense.method} dense features at {size} px ({primary.dense.grid}x{primary.dense.grid} patches)")
    n = len(source)
    for start in track(range(0, n, opts.batch_size), "BrainSAIL distillation", total=n, unit="images",
                       size=lambda s: min(opts.batch_size, n - s)):
        idx = range(start, min(start + opts.batch_size, len(source)))
        images = [source.image(k) for k in idx]
        disp = display_images(images, size)
        feats = None
        for e in encoders:
            f = e.distilled(images, setup.views, opts)
            e.store(slice(idx.start, idx.stop), attr.relevance_maps(f, e.readout))
            if e is primary:
                feats = f
        predicted.append(primary.encoder.predict_images(images) @ primary.readout.columns.numpy())
        up = attr.upsample(primary.maps[primary.latest], size)
        props["luminance"].append(attr.pixel_correlation(up, attr.luminance(disp)))
        props["saturation"].append(attr.pixel_correlation(up, attr.saturation(disp)))
        if opts.depth:
            props["depth"].append(attr.pixel_correlation(up, depth_maps(opts.depth, [source.ids[k] for k in idx], size)))
        if setup.categories is not None:
            cap_r.append(attr.map_correlation(primary.maps[primary.latest], attr.caption_maps(feats, setup.text)))
        for a, b in pairs:
            agree[(a, b)].append(_agreement(encoders[a], encoders[b], primary.columns, size))
    return Maps(np.concatenate(predicted), {k: np.concatenate(v) for k, v in props.items()},
                np.concatenate(cap_r) if setup.categories is not None else None,
                {k: np.concatenate(v) for k, v in agree.items()})


def summarise(setup: Setup, maps: Maps, opts: BrainSAILOptions) -> dict:
    """Phase 3: the tables (properties, captions, agreement, per-column rows), the top images per column
    and brainsail.json's content."""
    encoders, primary, source = setup.encoders, setup.primary, setup.source
    columns, categories = primary.columns, setup.categories
    top = np.argsort(-maps.predicted, axis=0, kind="stable")[:min(opts.top_k, len(source))].T  # (R, k)
    summary: dict = {"run_dir": str(setup.run.path), "options": {f.name: getattr(opts, f.name) for f in fields(opts)},
                     "n_images": len(source), "views": [vars(v) for v in setup.views], "dense": {
                         e.label: {"method": e.dense.method, "sigma": e.dense.sigma, "image_size": e.dense.image_size,
                                   "grid": e.dense.grid, "unit_norm_patches": e.normalize} for e in encoders},
                     "columns": columns, "notes": setup.notes}
    prop_stats = {k: attr.summarize(v) for k, v in maps.props.items()}
    prop_rows = [[col, name, st[j]["mean"], st[j]["se"], st[j]["t"], st[j]["p"], st[j]["n"]]
                 for j, col in enumerate(columns) for name, st in prop_stats.items()]
    summary["properties"] = {name: {col: st[j] for j, col in enumerate(columns)} for name, st in prop_stats.items()}

    top_category, cap_rows = {}, None
    if categories is not None:
        winner, best = attr.assign_categories(maps.caption_r, setup.cap_index, len(categories))
        cap_rows = []
        for j, col in enumerate(columns):
            counts_top = np.bincount(winner[top[j], j][winner[top[j], j] >= 0], minlength=len(categories))
            valid = winner[:, j] >= 0
            for k, cat_name in enumerate(categories):
                cap_rows.append([col, cat_name, int(counts_top[k]),
                                 float((winner[valid, j] == k).mean()) if valid.any() else float("nan"),
                                 float(np.nanmean(best[:, j, k])) if np.isfinite(best[:, j, k]).any() else float("nan")])
            mean_top = np.array([np.nanmean(best[top[j], j, k]) if np.isfinite(best[top[j], j, k]).any() else -np.inf
                                 for k in range(len(categories))])
            top_category[col] = categories[int(np.lexsort((-mean_top, -counts_top))[0])] if counts_top.sum() else ""
        summary["captions"] = {"source": str(opts.captions), "categories": categories, "top_category": top_category,
                               "backbone": primary.encoder.backbone.spec.name}

    agree_rows, agree_stats = [], {}
    for (a, b), r in maps.agree.items():
        st = attr.summarize(r)
        for j, col in enumerate(columns):
            agree_rows.append([col, encoders[a].label, encoders[b].label, st[j]["mean"], st[j]["se"], st[j]["n"]])
            agree_stats.setdefault(col, []).append(st[j]["mean"])
    if agree_rows:
        summary["agreement"] = {col: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
                                for col, v in agree_stats.items()}

    masks_n = {c: int((primary.readout.columns[:, j] > 0).sum()) for j, c in enumerate(columns)}
    header = ["column", "n_voxels", "top_ids", *[f"r_{k}" for k in maps.props]]
    header += ["caption_category"] if categories is not None else []
    header += ["agreement_r"] if agree_rows else []
    rows = []
    for j, col in enumerate(columns):
        row = [col, masks_n[col], " ".join(str(source.ids[i]) for i in top[j]),
               *[prop_stats[k][j]["mean"] for k in maps.props]]
        row += [top_category.get(col, "")] if categories is not None else []
        row += [summary["agreement"][col]] if agree_rows else []
        rows.append(row)
    summary["rois"] = [dict(zip(header, row)) for row in rows]
    top_images = {i: source.image(i) for i in np.unique(top)}
    displays = [display_images([top_images[i] for i in top[j]], setup.size) for j in range(len(columns))]
    return {"top": top, "displays": displays, "prop_rows": prop_rows, "cap_rows": cap_rows, "agree_rows": agree_rows,
            "header": header, "rows": rows, "summary": summary}


@dataclass
class BrainSAILResult:
    setup: Setup
    maps: Maps
    tables: dict

    @property
    def summary(self) -> dict:
        return self.tables["summary"]


def write_outputs(result: BrainSAILResult, out: Path) -> list[Path]:
    """Phase 4: properties.csv, captions.csv, agreement.csv, rois.csv, overlays/, compare/, maps.npz,
    brainsail.json into ``out``."""
    setup, maps, t = result.setup, result.maps, result.tables
    encoders, primary, source, top = setup.encoders, setup.primary, setup.source, t["top"]
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    files = [write_csv(out / "properties.csv", ["column", "property", "r_mean", "r_se", "t", "p", "n_images"],
                       t["prop_rows"])]
    if t["cap_rows"] is not None:
        files.append(write_csv(out / "captions.csv",
                               ["column", "category", "n_top_images", "frac_all_images", "mean_best_r"], t["cap_rows"]))
    if t["agree_rows"]:
        files.append(write_csv(out / "agreement.csv", ["column", "encoder_a", "encoder_b", "r_mean", "r_se", "n_images"],
                               t["agree_rows"]))
    files.append(write_csv(out / "rois.csv", t["header"], t["rows"]))
    for j, col in enumerate(primary.columns):
        files.append(figures.plot_overlays(t["displays"][j], primary.maps[top[j], j], [source.ids[i] for i in top[j]],
                                           maps.predicted[top[j], j], out / "overlays" / f"{_slug(col)}.png",
                                           f"{col} — {primary.label} ({primary.dense.method}, {len(setup.views)} views)"))
        if len(encoders) > 1:
            (out / "compare").mkdir(exist_ok=True)
            rows_maps = {e.label: (e.maps[top[j], e.columns.index(col)] if col in e.columns else None) for e in encoders}
            files.append(figures.plot_comparison(t["displays"][j], rows_maps, [source.ids[i] for i in top[j]],
                                                 out / "compare" / f"{_slug(col)}.png",
                                                 f"{col}: agreement r = {t['summary']['agreement'][col]:.2f}"))
    arrays = {"ids": np.asarray([str(i) for i in source.ids]), "columns": np.asarray(primary.columns),
              "predicted": maps.predicted.astype(np.float32), "top": top,
              **{f"maps_{i}": e.maps for i, e in enumerate(encoders)},
              "encoders": np.asarray([e.label for e in encoders]),
              **{f"r_{k}": v.astype(np.float32) for k, v in maps.props.items()}}
    if setup.categories is not None:
        arrays.update(caption_r=maps.caption_r.astype(np.float32), caption_category=setup.cap_index,
                      categories=np.asarray(setup.categories))
    for (a, b), r in maps.agree.items():
        arrays[f"agreement_{a}_{b}"] = r.astype(np.float32)
    np.savez_compressed(out / "maps.npz", **arrays)
    files.append(out / "maps.npz")
    write_json(out / "brainsail.json", t["summary"])
    files.append(out / "brainsail.json")
    return files


class BrainSAILJob(Job):
    """BrainSAIL of every embedding run (in a sweep, runs it cannot map are skipped with a line)."""

    name = "brainsail"
    Options = BrainSAILOptions
    skip_unfit = True

    def compute(self, run: RunDir) -> BrainSAILResult:
        setup = prepare(run, self.options)
        maps = map_images(setup, self.options, self.console)
        return BrainSAILResult(setup, maps, summarise(setup, maps, self.options))

    def write(self, run: RunDir, result: BrainSAILResult) -> list[Path]:
        return write_outputs(result, self.out_dir(run))

    def show(self, run: RunDir, result: BrainSAILResult) -> None:
        for note in result.setup.notes:
            self.console.print(f"note: {note}")

    def nothing_done(self, target: Path) -> str:
        return f"{target}: no run could be analysed (BrainSAIL needs ViT runs on backbone.layers=[embed])"


def analyse_run(run_dir: str | Path | RunDir, opts: BrainSAILOptions | None = None,
                console: Console | None = None) -> dict:
    """Every BrainSAIL output of one run (see the module doc); returns {"out_dir", "files", "summary"}."""
    opts = opts or BrainSAILOptions()
    opts.check()
    job = BrainSAILJob(opts, console or Console(width=120))
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    result, files = job.process(run)
    return {"out_dir": job.out_dir(run), "files": files, "summary": result.summary}


def _agreement(a: EncoderMaps, b: EncoderMaps, columns: Sequence[str], size: int) -> np.ndarray:
    """Per image and column of ``columns``: Pearson r between two encoders' latest maps at image size (n, R)."""
    ma, mb = a.maps[a.latest], b.maps[b.latest]
    n = ma.shape[0]
    out = np.full((n, len(columns)), np.nan)
    common = [c for c in columns if c in a.columns and c in b.columns]
    if not common:
        return out
    ma = attr.upsample(ma[:, [a.columns.index(c) for c in common]], size)
    mb = attr.upsample(mb[:, [b.columns.index(c) for c in common]], size)
    r = attr.pearson_rows(ma.reshape(n, len(common), -1).astype(np.float64), mb.reshape(n, len(common), -1).astype(np.float64))
    out[:, [list(columns).index(c) for c in common]] = r
    return out


# ----------------------------------------------------------------------------- output helpers


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


