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

from analyses.methods import attribution as attr
from analyses.jobs.outputs import pyplot, write_csv
from datamodules.errors import DataError
from datamodules.image_folder import image_files, read_image
from encoders.distill import FILLS, distill, make_views
from encoders.run_dir import SPLIT, RunDir, require_runs
from encoders.run_record import write_json

log = logging.getLogger(__name__)

CAPTIONS_DIR = Path(__file__).resolve().parents[2] / "conf" / "captions"
# conf/analysis/brainsail.yaml (group, key) -> BrainSAILOptions field
CONFIG_KEYS = {("dense", "method"): "method", ("dense", "sigma"): "sigma", ("dense", "image_size"): "image_size",
               ("distill", "n_views"): "n_views", ("distill", "max_shift"): "max_shift",
               ("distill", "flip"): "flip", ("distill", "fill"): "fill", ("distill", "seed"): "seed",
               ("distill", "view_batch"): "view_batch", ("properties", "depth"): "depth"}


@dataclass
class BrainSAILOptions:
    """Every knob (conf/analysis/brainsail.yaml documents each)."""

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

    @classmethod
    def from_config(cls, analysis: dict) -> "BrainSAILOptions":
        """conf/analysis/brainsail.yaml as a dict (nested groups flattened by CONFIG_KEYS)."""
        known = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in analysis.items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    if (key, sub) not in CONFIG_KEYS:
                        raise ValueError(f"analysis.{key}.{sub}: unknown option")
                    kwargs[CONFIG_KEYS[(key, sub)]] = v
            elif key in known:
                kwargs[key] = value
            elif key != "name":
                raise ValueError(f"analysis.{key}: unknown option")
        opts = cls(**kwargs)
        opts.check()
        return opts

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


def analyse_run(run_dir: str | Path, opts: BrainSAILOptions | None = None, console: Console | None = None) -> dict:
    """Every BrainSAIL output of one run (see the module doc); returns {"out_dir", "files", "summary"}."""
    opts = opts or BrainSAILOptions()
    opts.check()
    console = console or Console(width=120)
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    run_dir = run.path
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
        raise ValueError(f"{run_dir}: no images to analyse")
    if opts.depth:
        check_depth_file(opts.depth, source.ids)
    size = primary.dense.image_size
    views = make_views(opts.n_views, opts.max_shift, opts.seed, opts.flip)

    captions = categories = text = cap_index = None
    if opts.captions:
        captions = load_captions(opts.captions)
        categories = list(captions)
        flat = [c for k in categories for c in captions[k]]
        cap_index = np.array([i for i, k in enumerate(categories) for _ in captions[k]])
        try:
            text = attr.text_embeddings(primary.encoder.backbone, flat)
        except ValueError as err:
            notes.append(f"caption probes skipped: {err}")
            captions = None

    R = len(primary.columns)
    predicted, props, cap_r, agree = [], {"luminance": [], "saturation": []}, [], {}
    if opts.depth:
        props["depth"] = []
    for e in encoders:
        e.allocate(len(source))
    pairs = [(a, b) for a in range(len(encoders)) for b in range(a + 1, len(encoders))]
    for a, b in pairs:
        agree[(a, b)] = []
    console.print(f"BrainSAIL: {len(source)} images x {len(views)} views, {R} columns, "
                  f"{primary.dense.method} dense features at {size} px ({primary.dense.grid}x{primary.dense.grid} patches)")
    for start in range(0, len(source), opts.batch_size):
        idx = range(start, min(start + opts.batch_size, len(source)))
        images = [source.image(k) for k in idx]
        disp = display_images(images, size)
        feats = None
        for e in encoders:
            f = e.distilled(images, views, opts)
            e.store(slice(idx.start, idx.stop), attr.relevance_maps(f, e.readout))
            if e is primary:
                feats = f
        predicted.append(primary.encoder.predict_images(images) @ primary.readout.columns.numpy())
        up = attr.upsample(primary.maps[primary.latest], size)
        props["luminance"].append(attr.pixel_correlation(up, attr.luminance(disp)))
        props["saturation"].append(attr.pixel_correlation(up, attr.saturation(disp)))
        if opts.depth:
            props["depth"].append(attr.pixel_correlation(up, depth_maps(opts.depth, [source.ids[k] for k in idx], size)))
        if captions is not None:
            cap_r.append(attr.map_correlation(primary.maps[primary.latest], attr.caption_maps(feats, text)))
        for a, b in pairs:
            agree[(a, b)].append(_agreement(encoders[a], encoders[b], primary.columns, size))
        console.print(f"  {idx.stop}/{len(source)} images")

    maps = {e.label: e.maps for e in encoders}
    predicted = np.concatenate(predicted)
    props = {k: np.concatenate(v) for k, v in props.items()}
    agree = {k: np.concatenate(v) for k, v in agree.items()}
    k_top = min(opts.top_k, len(source))
    top = np.argsort(-predicted, axis=0, kind="stable")[:k_top].T  # (R, k)

    out = run_dir / opts.out_subdir
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    summary: dict = {"run_dir": str(run_dir), "options": {f.name: getattr(opts, f.name) for f in fields(opts)},
                     "n_images": len(source), "views": [vars(v) for v in views], "dense": {
                         e.label: {"method": e.dense.method, "sigma": e.dense.sigma, "image_size": e.dense.image_size,
                                   "grid": e.dense.grid, "unit_norm_patches": e.normalize} for e in encoders},
                     "columns": primary.columns, "notes": notes}

    prop_rows = []
    prop_stats = {k: attr.summarize(v) for k, v in props.items()}
    for j, col in enumerate(primary.columns):
        for name, st in prop_stats.items():
            prop_rows.append([col, name, st[j]["mean"], st[j]["se"], st[j]["t"], st[j]["p"], st[j]["n"]])
    files.append(write_csv(out / "properties.csv", ["column", "property", "r_mean", "r_se", "t", "p", "n_images"],
                            prop_rows))
    summary["properties"] = {name: {col: st[j] for j, col in enumerate(primary.columns)} for name, st in prop_stats.items()}

    top_category = {}
    if captions is not None:
        cap_r = np.concatenate(cap_r)
        winner, best = attr.assign_categories(cap_r, cap_index, len(categories))
        cap_rows = []
        for j, col in enumerate(primary.columns):
            counts_top = np.bincount(winner[top[j], j][winner[top[j], j] >= 0], minlength=len(categories))
            valid = winner[:, j] >= 0
            for k, cat_name in enumerate(categories):
                cap_rows.append([col, cat_name, int(counts_top[k]),
                                 float((winner[valid, j] == k).mean()) if valid.any() else float("nan"),
                                 float(np.nanmean(best[:, j, k])) if np.isfinite(best[:, j, k]).any() else float("nan")])
            mean_top = np.array([np.nanmean(best[top[j], j, k]) if np.isfinite(best[top[j], j, k]).any() else -np.inf
                                 for k in range(len(categories))])
            top_category[col] = categories[int(np.lexsort((-mean_top, -counts_top))[0])] if counts_top.sum() else ""
        files.append(write_csv(out / "captions.csv",
                                ["column", "category", "n_top_images", "frac_all_images", "mean_best_r"], cap_rows))
        summary["captions"] = {"source": str(opts.captions), "categories": categories, "top_category": top_category,
                               "backbone": primary.encoder.backbone.spec.name}

    agree_rows, agree_stats = [], {}
    for (a, b), r in agree.items():
        st = attr.summarize(r)
        for j, col in enumerate(primary.columns):
            agree_rows.append([col, encoders[a].label, encoders[b].label, st[j]["mean"], st[j]["se"], st[j]["n"]])
            agree_stats.setdefault(col, []).append(st[j]["mean"])
    if agree_rows:
        files.append(write_csv(out / "agreement.csv", ["column", "encoder_a", "encoder_b", "r_mean", "r_se", "n_images"],
                                agree_rows))
        summary["agreement"] = {col: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
                                for col, v in agree_stats.items()}

    masks_n = {c: int((primary.readout.columns[:, j] > 0).sum()) for j, c in enumerate(primary.columns)}
    header = ["column", "n_voxels", "top_ids", *[f"r_{k}" for k in props]]
    header += ["caption_category"] if captions is not None else []
    header += ["agreement_r"] if agree_rows else []
    rows = []
    for j, col in enumerate(primary.columns):
        row = [col, masks_n[col], " ".join(str(source.ids[i]) for i in top[j]),
               *[prop_stats[k][j]["mean"] for k in props]]
        row += [top_category.get(col, "")] if captions is not None else []
        row += [summary["agreement"][col]] if agree_rows else []
        rows.append(row)
    files.append(write_csv(out / "rois.csv", header, rows))
    summary["rois"] = [dict(zip(header, row)) for row in rows]

    top_images = {i: source.image(i) for i in np.unique(top)}
    for j, col in enumerate(primary.columns):
        disp = display_images([top_images[i] for i in top[j]], size)
        files.append(plot_overlays(disp, maps[primary.label][top[j], j], [source.ids[i] for i in top[j]],
                                   predicted[top[j], j], out / "overlays" / f"{_slug(col)}.png",
                                   f"{col} — {primary.label} ({primary.dense.method}, {len(views)} views)"))
        if len(encoders) > 1:
            (out / "compare").mkdir(exist_ok=True)
            rows_maps = {e.label: (maps[e.label][top[j], e.columns.index(col)] if col in e.columns else None)
                         for e in encoders}
            files.append(plot_comparison(disp, rows_maps, [source.ids[i] for i in top[j]],
                                         out / "compare" / f"{_slug(col)}.png",
                                         f"{col}: agreement r = {summary['agreement'][col]:.2f}"))

    arrays = {"ids": np.asarray([str(i) for i in source.ids]), "columns": np.asarray(primary.columns),
              "predicted": predicted.astype(np.float32), "top": top,
              **{f"maps_{i}": maps[e.label] for i, e in enumerate(encoders)},
              "encoders": np.asarray([e.label for e in encoders]),
              **{f"r_{k}": v.astype(np.float32) for k, v in props.items()}}
    if captions is not None:
        arrays.update(caption_r=cap_r.astype(np.float32), caption_category=cap_index,
                      categories=np.asarray(categories))
    for (a, b), r in agree.items():
        arrays[f"agreement_{a}_{b}"] = r.astype(np.float32)
    np.savez_compressed(out / "maps.npz", **arrays)
    files.append(out / "maps.npz")
    write_json(out / "brainsail.json", summary)
    files.append(out / "brainsail.json")
    for note in notes:
        console.print(f"note: {note}")
    return {"out_dir": out, "files": files, "summary": summary}


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


# ----------------------------------------------------------------------------- figures


def _scaled(m: np.ndarray, size: int) -> np.ndarray:
    up = attr.upsample(m[None, None], size)[0, 0]
    lo, hi = up.min(), up.max()
    return (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)


def plot_overlays(images: np.ndarray, maps: np.ndarray, ids: Sequence, predicted: np.ndarray, path: Path,
                  title: str) -> Path:
    """Top row the images (n, S, S, 3), bottom row each with its map (n, h, w) overlaid (jet, min-max)."""
    plt = pyplot()
    n, size = len(images), images.shape[1]
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
    for k in range(n):
        axes[0, k].imshow(images[k])
        axes[0, k].set_title(f"id {ids[k]}\npred {predicted[k]:.2f}", fontsize=7)
        axes[1, k].imshow(images[k])
        axes[1, k].imshow(_scaled(maps[k], size), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        for ax in axes[:, k]:
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_comparison(images: np.ndarray, maps: dict[str, np.ndarray | None], ids: Sequence, path: Path,
                    title: str) -> Path:
    """The images (top row) and each encoder's maps overlaid (one row per encoder)."""
    plt = pyplot()
    n, size = len(images), images.shape[1]
    fig, axes = plt.subplots(1 + len(maps), n, figsize=(2.2 * n, 2.2 * (1 + len(maps))), squeeze=False)
    for k in range(n):
        axes[0, k].imshow(images[k])
        axes[0, k].set_title(f"id {ids[k]}", fontsize=7)
        for row, (label, m) in enumerate(maps.items(), start=1):
            axes[row, k].imshow(images[k])
            if m is not None:
                axes[row, k].imshow(_scaled(m[k], size), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if k == 0:
                axes[row, k].set_title(label, fontsize=6, loc="left")
        for ax in axes[:, k]:
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- entry


def run_brainsail(cfg, target: Path) -> None:
    """analyze.py entry: ``run_dir`` (or every embedding run under ``sweep_dir``)."""
    from omegaconf import OmegaConf

    opts = BrainSAILOptions.from_config(OmegaConf.to_container(cfg.analysis, resolve=True))
    console = Console(width=120)
    if cfg.get("sweep_dir"):
        run_dirs = require_runs(target)
    else:
        run_dirs = [target]
    done = 0
    for d in run_dirs:
        console.rule(str(d))
        try:
            res = analyse_run(d, opts, console)
        except ValueError as err:
            if len(run_dirs) == 1:
                raise
            console.print(f"skipped: {err}")
            continue
        done += 1
        console.print(f"wrote {len(res['files'])} files to {res['out_dir']}")
    if not done:
        raise ValueError(f"{target}: no run could be analysed (BrainSAIL needs ViT runs on backbone.layers=[embed])")


# ----------------------------------------------------------------------------- output helpers


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


