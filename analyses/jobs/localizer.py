"""``analyze.py analysis=localizer``: category-selective units of a run's network vs the brain's
category-selective regions (Dipani & Murty 2026), over one run or a sweep (e.g. one run per subject).

    python analyze.py analysis=localizer run_dir=outputs/runs/<run>
    python analyze.py analysis=localizer sweep_dir=outputs/multirun/<date>   # subjects 1 and 2: + human–human ceiling

Library use (no Hydra): ``analyse(run_dirs, out_dir, LocalizerOptions(...))``. The job computes over every
run at once, in phases: ``prepare`` (runs, regions, localizer sets: every input checked), ``localize_runs``
(units), ``compare_with_brains`` (trials, ceiling, model vs brain, lesions); then ``write_results`` writes.
The plain functions are in ``analyses.methods.localizer``, the figures in ``analyses.jobs.localizer_figures``.

What it does, into ``<run_dir or sweep_dir>/<out_subdir>/``:

* localizer: the images of a localizer set (a folder with one sub-folder of images per category,
  fLoc-style; sub-folder names mapped to domains by ``domains``, e.g. adult/child -> face) go through the
  run's backbone (its own weights, rebuilt and checked by ``encoders.trained.load_trained``) and, with
  ``compare_random``, the same architecture at random init; per layer, unit and category a Welch t of
  the category vs every other image (streamed per-category sums); units with t > ``t_threshold`` (or the
  top ``top_percent`` %) are selective. -> unit_counts.csv/png, units.npz (every t-map).
  Without ``localizer_dir``, runs on the synthetic dataset draw their six categories afresh
  (``synthetic_seeds``: one set per seed, the first is the main localizer).
* localizer dependence: every further set (``alt_localizer_dirs`` or further synthetic seeds) is
  localized too; Jaccard overlap of its selected units with the main set's. -> overlap.csv
* brain regions: per category, the union of the run's ROIs in ``regions`` (voxel_metrics roi_* masks,
  NSD floc-* names) or a user t-map over the run's voxels (``tmaps``, t > ``tmap_threshold``). Single
  trials at those voxels are re-read by the run's own datamodule (z-scored per session like the run),
  and every test image's trials split alternately into two halves.
* comparison on the images common to every subject's test set (with >= ``min_trials`` trials): tuning =
  Pearson r between the selected units' mean response profile and the region's mean response profile;
  geometry = ``rdm_similarity`` (Pearson/Spearman) of the upper triangles of 1 - r RDMs; each with its
  split-half noise correction (score / sqrt(region reliability)) and bootstrap CIs over images.
  Human–human ceiling: the same measures between two subjects' regions, noise-corrected with both
  subjects' split halves. -> comparison.csv, ceiling.csv, comparison.png
* encoding lesions (main localizer, run weights): ridge (RidgeCV, per-voxel alpha by CV on the run's
  training images) from all units / all but the selective units / the selective units / random subsets
  of matched sizes, scored on the run's test images in the region. -> lesions.csv, lesions.png
* localizer.json: options, localizer sets, runs, notes and every table as records.
"""
from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from analyses.jobs import localizer_figures as figures
from analyses.jobs.base import Job, JobOptions
from analyses.jobs.console import fmt, print_notes
from analyses.jobs.outputs import write_csv
from analyses.methods import localizer as loc
from analyses.methods.categories import CategoryStats
from datamodules.image_folder import category_folder, read_image
from encoders.run_dir import RunDir
from encoders.run_record import write_json


DEFAULT_REGIONS = {"face": ["FFA-1", "FFA-2"], "body": ["EBA"], "place": ["PPA"], "word": ["VWFA-1", "VWFA-2"]}


@dataclass
class LocalizerOptions(JobOptions):
    """Every knob of the analysis (conf/analysis/localizer.yaml documents each)."""

    JOB = "localizer"

    localizer_dir: str | None = None
    alt_localizer_dirs: list[str] = field(default_factory=list)
    synthetic_n_per_category: int = 40
    synthetic_seeds: list[int] = field(default_factory=lambda: [0, 1])
    domains: dict[str, str] = field(default_factory=dict)
    layers: str | list[str] | None = "all"
    pooling: str | None = None
    t_threshold: float = 7.0
    top_percent: float | None = None
    compare_random: bool = True
    random_seed: int = 1
    regions: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_REGIONS.items()})
    tmaps: dict[str, str] = field(default_factory=dict)
    tmap_threshold: float = 3.0
    compare_layers: list[str] | None = None
    standardise_units: bool = True
    rdm_similarity: str = "spearman"
    min_trials: int = 2
    n_boot: int = 1000
    ci: float = 0.95
    seed: int = 0
    lesions: bool = True
    lesion_n_random: int = 10
    lesion_alphas: list[float] | None = None
    lesion_cv: int = 5
    batch_size: int = 32
    device: str = "cpu"
    data_dir: str = "data"
    out_subdir: str = "localizer"

    def check(self) -> None:
        opts = self
        if opts.rdm_similarity not in ("pearson", "spearman"):
            raise ValueError(f"analysis.rdm_similarity must be pearson or spearman, got {opts.rdm_similarity!r}")
        if opts.min_trials < 2:
            raise ValueError(f"analysis.min_trials must be >= 2 (split halves), got {opts.min_trials}")
        if opts.top_percent is not None and not 0 < float(opts.top_percent) <= 100:
            raise ValueError(f"analysis.top_percent must lie in (0, 100], got {opts.top_percent}")


# ----------------------------------------------------------------------------- localizer image sets


@dataclass
class LocalizerSet:
    """A localizer image set: files (n,), labels (n,) codes into ``categories`` (domains), and its source."""

    name: str
    source: str
    files: list[Path]
    labels: np.ndarray
    categories: list[str]

    def counts(self) -> dict[str, int]:
        return dict(zip(self.categories, np.bincount(self.labels, minlength=len(self.categories)).tolist()))


def read_localizer_set(folder: str | Path, domains: dict[str, str], name: str) -> LocalizerSet:
    """A folder of category sub-folders; sub-folder names mapped through ``domains`` (unmapped: kept)."""
    files, labels, names = category_folder(folder)
    mapped = [domains.get(n, n) for n in names]
    categories = list(dict.fromkeys(mapped))
    codes = np.array([categories.index(m) for m in mapped], dtype=np.int64)[labels]
    if len(categories) < 2:
        raise ValueError(f"{folder}: its sub-folders {names} map to one domain {categories}; a contrast needs >= 2")
    return LocalizerSet(name, str(folder), files, codes, categories)


def localizer_sets(opts: LocalizerOptions, runs: list["Run"]) -> list[LocalizerSet]:
    """The main localizer set and the alternatives: given folders, or drawn synthetic sets."""
    if opts.localizer_dir:
        dirs = [opts.localizer_dir, *opts.alt_localizer_dirs]
        return [read_localizer_set(d, opts.domains, f"localizer{i}" if i else "main") for i, d in enumerate(dirs)]
    out = []
    for i, seed in enumerate(opts.synthetic_seeds):
        folder = next((f for r in runs if (f := r.run.category_images(Path(opts.data_dir) / "localizer",
                                                                     opts.synthetic_n_per_category, seed))), None)
        if folder is None:
            raise ValueError("analysis.localizer_dir: give a localizer image folder (one sub-folder of images per "
                             "category, e.g. fLoc's); only runs on the synthetic dataset have a drawn default")
        out.append(read_localizer_set(folder, opts.domains, f"synthetic_seed{seed}" if i else "main"))
    if not out:
        raise ValueError("analysis.synthetic_seeds is empty: no localizer set")
    return out


# ----------------------------------------------------------------------------- runs


@dataclass
class Run:
    """What the analysis reads from a run directory."""

    run: RunDir
    test_ids: np.ndarray
    test_true: np.ndarray
    localizer_key: str = ""     # which localized backbone its units come from (set by analyse)

    @property
    def dir(self) -> Path:
        return self.run.path

    @property
    def config(self) -> dict:
        return self.run.config

    @property
    def info(self) -> dict:
        return self.run.info

    @property
    def split(self) -> dict:
        return self.run.split

    @property
    def voxel_xyz(self) -> np.ndarray:
        return self.run.voxel_xyz

    @cached_property
    def rois(self) -> dict[str, np.ndarray]:
        return self.run.rois()

    @property
    def data(self) -> dict:
        return self.info.get("data", {})

    @property
    def subject_key(self) -> tuple:
        return str(self.data.get("root")), self.data.get("subject")

    @property
    def label(self) -> str:
        return f"{self.info.get('backbone', '?')} sub{self.data.get('subject', '?')} ({self.dir.name})"


def read_run(run_dir: RunDir | Path) -> Run:
    """A run's config, run.json, split, voxels and test predictions; errors name the missing file."""
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    for name in ("config.yaml", "run.json", "split.json", "voxel_metrics.npz", "predictions.npz"):
        run.require(name)
    run.voxel_xyz  # noqa: B018  (a file without voxel_xyz fails here)
    preds = run.predictions("test")
    return Run(run, preds.ids.astype(np.int64), preds.true)


def has_trials(run: Run) -> bool:
    """The run's datamodule can re-read its single trials at any of its voxels (NSD layout: nsd, synthetic),
    and its data are still there."""
    root = run.data.get("root")
    return run.run.has_single_trials and root is not None and Path(root).is_dir()


def read_region_trials(run: Run, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every trial of the run's sessions at the run's voxels ``columns`` (indices into its voxels), read and
    z-scored per session by the run's own datamodule exactly as the run's data were: (trial ids (n_trials,)
    in presentation order, values (n_trials, n))."""
    from datamodules.errors import DataError

    try:
        return run.run.single_trials(columns)
    except DataError as err:
        raise ValueError(f"{run.dir}: reading its betas: {err}") from err


def region_masks(run: Run, opts: LocalizerOptions, notes: list[str]) -> dict[str, np.ndarray]:
    """{category: bool (n_voxels,)} over the run's voxels: a t-map (``tmaps``) or the union of ROIs (``regions``)."""
    n_vox = len(run.voxel_xyz)
    out = {}
    for category in dict.fromkeys([*opts.regions, *opts.tmaps]):
        if category in opts.tmaps:
            path = Path(str(opts.tmaps[category]).replace("{subject}", str(run.data.get("subject"))))
            if not path.is_file():
                raise FileNotFoundError(f"{path}: t-map for '{category}' not found")
            t = np.load(path)
            if t.shape != (n_vox,):
                raise ValueError(f"{path}: t-map of shape {t.shape}, expected ({n_vox},): one t per voxel of {run.dir}")
            mask = np.nan_to_num(t.astype(np.float64), nan=-np.inf) > opts.tmap_threshold
            source = f"t-map {path.name} > {opts.tmap_threshold}"
        else:
            names = [r for r in opts.regions[category] if r in run.rois]
            missing = [r for r in opts.regions[category] if r not in run.rois]
            if missing:
                notes.append(f"{run.dir.name}: ROI(s) {missing} for '{category}' not in the run (has {sorted(run.rois)})")
            mask = np.zeros(n_vox, bool)
            for r in names:
                mask |= run.rois[r]
            source = "+".join(names)
        if mask.sum() < 1:
            notes.append(f"{run.dir.name}: the '{category}' region ({source or 'no ROI'}) has no voxels; skipped")
            continue
        out[category] = mask
    return out


@dataclass
class SubjectBrain:
    """One subject's region responses: per category the region's voxel columns, and every trial there."""

    run: Run
    regions: dict[str, np.ndarray]       # category -> bool (n_voxels,) over the run's voxels
    columns: np.ndarray                  # the union of the regions: indices into the run's voxels
    trial_ids: np.ndarray                # (n_trials,)
    trial_values: np.ndarray             # (n_trials, len(columns))

    def region_trials(self, category: str) -> np.ndarray:
        """(n_trials, n_region_voxels) of the category's region."""
        return self.trial_values[:, np.isin(self.columns, np.flatnonzero(self.regions[category]))]


# ----------------------------------------------------------------------------- units


def backbone_layers(spec, requested, run_layers: Sequence[str], extra: Sequence[str]) -> list[str]:
    """The layers to localize, in registry order: "all", None (the run's) or a list, plus ``extra``."""
    if requested == "all":
        wanted = list(spec.layers)
    elif requested is None:
        wanted = list(run_layers)
    else:
        wanted = [requested] if isinstance(requested, str) else list(requested)
    wanted = set(wanted) | set(extra)
    unknown = sorted(wanted - set(spec.layers))
    if unknown:
        raise ValueError(f"analysis.layers: unknown layer(s) {unknown} of backbone '{spec.name}' "
                         f"(layers: {', '.join(spec.layers)})")
    return [name for name in spec.layers if name in wanted]


def weights_label(backbone_cfg: dict, seed) -> str:
    if backbone_cfg.get("weights_path"):
        return f"weights file {Path(str(backbone_cfg['weights_path'])).name}"
    if backbone_cfg.get("pretrained"):
        return "pretrained"
    return f"random-init (seed {seed})"


@torch.no_grad()
def images_features(backbone, images, batch_size: int) -> dict[str, np.ndarray]:
    """uint8 images (a sequence of (H, W, 3)) -> {layer: (n, width) float32} through the backbone's transform."""
    out = defaultdict(list)
    device = next(backbone.model.parameters()).device
    for start in range(0, len(images), batch_size):
        x = torch.stack([backbone.transform(np.asarray(im)) for im in images[start:start + batch_size]])
        for name, f in backbone.forward_layers(x.to(device)).items():
            out[name].append(f.cpu().numpy())
    return {name: np.concatenate(v) for name, v in out.items()}


def localize(backbone, sets: list[LocalizerSet], opts: LocalizerOptions) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """{set name: {layer: {category: t (n_units,)}}}: streamed per-category sums per layer, then Welch t."""
    out = {}
    for lset in sets:
        acc: dict[str, CategoryStats] = {}
        for start in range(0, len(lset.files), opts.batch_size):
            batch = [read_image(p) for p in lset.files[start:start + opts.batch_size]]
            labels = lset.labels[start:start + opts.batch_size]
            for layer, f in images_features(backbone, batch, opts.batch_size).items():
                if layer not in acc:
                    acc[layer] = CategoryStats(len(lset.categories), f.shape[1])
                acc[layer].update(f, labels)
        out[lset.name] = {layer: {c: loc.contrast_t(s, i)[0] for i, c in enumerate(lset.categories)}
                          for layer, s in acc.items()}
    return out


def run_features(run: Run, enc, backbone, layers: Sequence[str], ids: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """Activations of ``layers`` (localizer pooling) for stimulus ids: the run's feature cache where the
    layer and pooling are the run's own, else computed from the run's images (opened by its datamodule)."""
    out = {}
    same_units = backbone.pooling == enc.backbone.pooling and backbone.normalize == enc.backbone.normalize
    cached_layers = [name for name in layers if same_units and name in enc.layers]
    if cached_layers:
        raw = enc.cached_features(ids)
        if raw is not None:
            out = {name: raw[:, enc.feature_slices[name]] for name in cached_layers}
    todo = [name for name in layers if name not in out]
    if todo:
        stimuli = run.run.stimuli()
        feats = defaultdict(list)
        for start in range(0, len(ids), 256):
            chunk = images_features(backbone, [stimuli.image(int(i)) for i in ids[start:start + 256]], batch_size)
            for name in todo:
                feats[name].append(chunk[name])
        out.update({name: np.concatenate(feats[name]) for name in todo})
    return out


# ----------------------------------------------------------------------------- the analysis


@dataclass
class Study:
    """Phase 1: the runs, which of them have single trials to compare with, their brain regions, the
    localizer sets, and the notes gathered on the way."""

    runs: list[Run]
    brain_runs: list[Run]
    regions: dict[Path, dict[str, np.ndarray]]
    sets: list[LocalizerSet]
    notes: list[str]

    @property
    def main(self) -> LocalizerSet:
        return self.sets[0]


def prepare(run_dirs: Sequence[Path | RunDir], opts: LocalizerOptions) -> Study:
    """Read and check every input (runs, regions, t-maps, localizer sets) before any network runs."""
    runs = [read_run(d) for d in run_dirs]
    if not runs:
        raise FileNotFoundError("no run directories")
    notes: list[str] = []
    brain_runs = [r for r in runs if has_trials(r)]
    for r in runs:
        if r not in brain_runs:
            notes.append(f"{r.dir.name}: data '{r.data.get('dataset')}' is not NSD-layout: units only, no brain comparison")
    regions = {r.dir: region_masks(r, opts, notes) for r in brain_runs}  # bad t-maps fail here, before any work
    return Study(runs, brain_runs, regions, localizer_sets(opts, runs), notes)


@dataclass
class Units:
    """Phase 2: per distinct backbone, its localized units (t-maps, selected masks) and the tables."""

    encoders: dict[Path, object] = field(default_factory=dict)        # run dir -> TrainedEncoder
    localized: dict[str, dict] = field(default_factory=dict)          # backbone key -> what was localized
    masks: dict[tuple, np.ndarray] = field(default_factory=dict)      # (key, weights, set, layer, category) -> mask
    tmaps: dict[str, np.ndarray] = field(default_factory=dict)        # units.npz
    count_rows: list[dict] = field(default_factory=list)
    overlap_rows: list[dict] = field(default_factory=list)


def localize_runs(study: Study, opts: LocalizerOptions, console: Console) -> Units:
    """Localize the units of every distinct backbone of the runs (the run's weights, and the same architecture
    at random init), select the category-selective ones and count them; Jaccard overlaps between sets."""
    from encoders.backbones import FrozenBackbone
    from encoders.trained import rebuild_backbone

    units, sets, main, notes = Units(), study.sets, study.main, study.notes
    masks = units.masks
    for run in study.runs:
        enc = run.run.encoder(device=opts.device)
        if not enc.takes_backbone_features:
            raise ValueError(f"{run.dir}: its head reads datamodule-transformed features (e.g. video PCA + HRF), "
                             f"not a backbone layer's units")
        units.encoders[run.dir] = enc
        bb_cfg = run.config.get("backbone", {})
        random_init = not bb_cfg.get("pretrained") and not bb_cfg.get("weights_path")
        key = json.dumps({"backbone": bb_cfg, "seed": run.config.get("seed") if random_init else None}, sort_keys=True,
                         default=str)
        run.localizer_key = key
        if key in units.localized:
            continue
        compare = opts.compare_layers or enc.layers
        layers = backbone_layers(enc.backbone.spec, opts.layers, enc.layers, compare)
        pooling = opts.pooling or enc.backbone.pooling
        variants = {weights_label(bb_cfg, run.config.get("seed", 0)):
                    FrozenBackbone(enc.backbone.spec, enc.backbone.model, layers, pooling, enc.backbone.normalize)}
        same_random = random_init and int(run.config.get("seed", 0)) == int(opts.random_seed)
        if opts.compare_random and same_random:
            notes.append(f"{run.dir.name}: its backbone is the random init of seed {opts.random_seed} already; "
                         f"set analysis.random_seed to another seed for a second random network")
        elif opts.compare_random:
            cfg_random = {"backbone": {**bb_cfg, "pretrained": False, "weights_path": None, "pooling": pooling},
                          "seed": opts.random_seed}
            variants[f"random-init (seed {opts.random_seed})"] = rebuild_backbone(cfg_random, layers).to(opts.device)
        result = {}
        for label, bb in variants.items():
            console.print(f"localizing {enc.backbone.spec.name} ({label}): {len(layers)} layers, "
                          f"{sum(len(s.files) for s in sets)} images")
            result[label] = localize(bb, sets, opts)
        run_label = next(iter(variants))
        missing = [c for c in dict.fromkeys([*opts.regions, *opts.tmaps]) if c not in main.categories]
        if missing:
            notes.append(f"regions {missing} have no category in the localizer (categories: {main.categories}); "
                         f"map its folder names with analysis.domains")
        units.localized[key] = {"backbone": variants[run_label], "weights": run_label, "layers": layers, "t": result,
                                "compare": list(compare), "name": enc.backbone.spec.name}
        for label, per_set in result.items():
            for set_name, per_layer in per_set.items():
                for layer, per_cat in per_layer.items():
                    for category, t in per_cat.items():
                        m = loc.select_units(t, opts.t_threshold, opts.top_percent)
                        masks[(key, label, set_name, layer, category)] = m
                        units.tmaps[f"{enc.backbone.spec.name}__{label}__{set_name}__{layer}__{category}"] = t
                        units.count_rows.append({
                            "backbone": enc.backbone.spec.name, "weights": label,
                            "variant": "run" if label == run_label else "random", "localizer": set_name,
                            "layer": layer, "category": category, "n_units": int(t.size),
                            "n_selective": int(m.sum()), "percent": 100.0 * m.mean(),
                            "max_t": float(np.nanmax(t)) if np.isfinite(t).any() else float("nan")})
            for other in sets[1:]:
                for layer in per_set_layers(result[label]):
                    for category in main.categories:
                        if category in other.categories:
                            a = masks[(key, label, main.name, layer, category)]
                            b = masks[(key, label, other.name, layer, category)]
                            units.overlap_rows.append({
                                "backbone": enc.backbone.spec.name, "weights": label, "localizer_a": main.name,
                                "localizer_b": other.name, "layer": layer, "category": category, "n_a": int(a.sum()),
                                "n_b": int(b.sum()), "n_both": int((a & b).sum()), "jaccard": loc.jaccard(a, b)})
    return units


def subject_brains(group: list[Run], regions: dict[Path, dict], console: Console) -> dict[tuple, SubjectBrain]:
    """Each subject's single trials at its region voxels (one run per subject reads them)."""
    subjects: dict = {}
    for r in group:
        if r.subject_key in subjects or not regions[r.dir]:
            continue
        columns = np.flatnonzero(np.any(np.stack(list(regions[r.dir].values())), axis=0))
        console.print(f"reading subject {r.data['subject']}'s trials at {columns.size} region voxels")
        ids, values = read_region_trials(r, columns)
        subjects[r.subject_key] = SubjectBrain(r, regions[r.dir], columns, ids, values)
    return subjects


def common_images(subjects: dict[tuple, SubjectBrain], root: str, opts: LocalizerOptions) -> np.ndarray:
    """The test images every subject saw at least ``min_trials`` times (>= 10 of them, else ValueError)."""
    common = None
    for brain in subjects.values():
        test_ids = np.unique(brain.run.test_ids)
        counts = np.array([np.sum(brain.trial_ids == i) for i in test_ids])
        kept = test_ids[counts >= opts.min_trials]
        common = kept if common is None else np.intersect1d(common, kept)
    if common.size < 10:
        raise ValueError(f"{root}: only {common.size} test images with >= {opts.min_trials} trials are common to "
                         f"the subjects {[k[1] for k in subjects]}; need >= 10")
    return common


def human_ceiling(brain_views: dict[tuple, dict], n_images: int, opts: LocalizerOptions) -> list[dict]:
    """The same tuning and geometry measures between every two subjects' regions, noise-corrected by both."""
    rows = []
    for (ka, va), (kb, vb) in itertools.combinations(brain_views.items(), 2):
        for category in va:
            if category not in vb:
                continue
            for measure in ("tuning", "rdm"):
                res = loc.consistency(similarity_fn(measure, opts), va[category][measure], vb[category][measure],
                                      va[category][f"{measure}_halves"], vb[category][f"{measure}_halves"],
                                      n_boot=opts.n_boot, seed=opts.seed, level=opts.ci, n_images=n_images)
                rows.append({"subject_a": ka[1], "subject_b": kb[1], "category": category,
                             "n_voxels_a": int(va[category]["n_voxels"]), "n_voxels_b": int(vb[category]["n_voxels"]),
                             "measure": measure, **flatten_result(res)})
    return rows


def model_vs_brain(r: Run, enc, unit_info: dict, views: dict, masks: dict, sets: list[LocalizerSet],
                   common: np.ndarray, opts: LocalizerOptions) -> list[dict]:
    """The selected units' tuning and geometry vs the region's, per compared layer, localizer set and category."""
    rows = []
    feats = run_features(r, enc, unit_info["backbone"], unit_info["compare"], common, opts.batch_size)
    for layer in unit_info["compare"]:
        acts = feats[layer].astype(np.float64)
        for lset in sets:
            for category, view in views.items():
                m = masks.get((r.localizer_key, unit_info["weights"], lset.name, layer, category))
                if m is None:
                    continue
                base = {"run": r.dir.name, "backbone": unit_info["name"], "weights": unit_info["weights"],
                        "subject": r.data.get("subject"), "layer": layer, "localizer": lset.name,
                        "category": category, "n_units": int(m.sum()), "n_voxels": int(view["n_voxels"])}
                if not m.any():
                    for measure in ("tuning", "rdm"):
                        rows.append({**base, "measure": measure, **flatten_result(None)})
                    continue
                unit_views = {"tuning": loc.unit_profile(acts[:, m], opts.standardise_units),
                              "rdm": loc.correlation_rdm(acts[:, m], opts.standardise_units)}
                for measure in ("tuning", "rdm"):
                    res = loc.consistency(similarity_fn(measure, opts), unit_views[measure], view[measure],
                                          None, view[f"{measure}_halves"], n_boot=opts.n_boot, seed=opts.seed,
                                          level=opts.ci, n_images=common.size)
                    rows.append({**base, "measure": measure, **flatten_result(res)})
    return rows


def compare_with_brains(study: Study, units: Units, opts: LocalizerOptions,
                        console: Console) -> tuple[list[dict], list[dict], list[dict]]:
    """Phase 3, per data root: the subjects' regions and trials, the human–human ceiling, every run's units
    vs its subject's regions, and the encoding lesions. Returns (comparison, ceiling, lesion) rows."""
    comparison_rows, ceiling_rows, lesion_rows = [], [], []
    by_root = defaultdict(list)
    for r in study.brain_runs:
        by_root[str(r.data["root"])].append(r)
    for root, group in by_root.items():
        subjects = subject_brains(group, study.regions, console)
        if not subjects:
            continue
        common = common_images(subjects, root, opts)
        brain_views = {k: brain_measures(b, common, opts) for k, b in subjects.items()}
        ceiling_rows += human_ceiling(brain_views, common.size, opts)
        for r in group:
            brain = subjects.get(r.subject_key)
            if brain is None:
                continue
            enc, unit_info = units.encoders[r.dir], units.localized[r.localizer_key]
            comparison_rows += model_vs_brain(r, enc, unit_info, brain_views[r.subject_key], units.masks, study.sets,
                                              common, opts)
            if opts.lesions:
                lesion_rows += lesions_for_run(r, enc, unit_info, brain, units.masks, study.main, opts, console,
                                               study.notes)
    if not study.brain_runs:
        study.notes.append("no run with NSD-layout data: selective-unit counts only")
    return comparison_rows, ceiling_rows, lesion_rows


@dataclass
class LocalizerResult:
    """Everything the analysis found: localizer.json's content (``summary``) and the units' t-maps."""

    summary: dict
    tmaps: dict[str, np.ndarray]
    main: str


def compute_all(run_dirs: Sequence[Path | RunDir], opts: LocalizerOptions, console: Console) -> LocalizerResult:
    """Phases 1-3 over these runs; nothing is written."""
    study = prepare(run_dirs, opts)
    units = localize_runs(study, opts, console)
    comparison_rows, ceiling_rows, lesion_rows = compare_with_brains(study, units, opts, console)
    pooling_note = opts.pooling or "the run's"
    summary = {"runs": [str(r.dir) for r in study.runs],
               "options": {f.name: getattr(opts, f.name) for f in fields(opts)},
               "localizers": [{"name": s.name, "source": s.source, "images": s.counts()} for s in study.sets],
               "units": f"{pooling_note} pooling", "unit_counts": units.count_rows,
               "overlap": units.overlap_rows, "comparison": comparison_rows, "ceiling": ceiling_rows,
               "lesions": lesion_rows, "notes": study.notes}
    return LocalizerResult(summary, units.tmaps, study.main.name)


def write_results(result: LocalizerResult, out_dir: Path, opts: LocalizerOptions) -> list[Path]:
    """unit_counts.csv/.png, units.npz, overlap.csv, comparison.csv, ceiling.csv, comparison.png,
    lesions.csv/.png and localizer.json into ``out_dir``."""
    s = result.summary
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [write_dict_rows(out_dir / "unit_counts.csv", s["unit_counts"]),
             figures.plot_counts(s["unit_counts"], result.main, out_dir / "unit_counts.png", opts)]
    np.savez_compressed(out_dir / "units.npz", **{k: v.astype(np.float32) for k, v in result.tmaps.items()})
    files.append(out_dir / "units.npz")
    if s["overlap"]:
        files.append(write_dict_rows(out_dir / "overlap.csv", s["overlap"]))
    if s["comparison"]:
        files.append(write_dict_rows(out_dir / "comparison.csv", s["comparison"]))
        if s["ceiling"]:
            files.append(write_dict_rows(out_dir / "ceiling.csv", s["ceiling"]))
        files.append(figures.plot_comparison(s["comparison"], s["ceiling"], result.main, out_dir / "comparison.png"))
    if s["lesions"]:
        files.append(write_dict_rows(out_dir / "lesions.csv", s["lesions"]))
        files.append(figures.plot_lesions(s["lesions"], out_dir / "lesions.png"))
    write_json(out_dir / "localizer.json", s)
    files.append(out_dir / "localizer.json")
    return files


class LocalizerJob(Job):
    """Units vs regions over every run below the target at once (the ceiling needs all subjects)."""

    name = "localizer"
    Options = LocalizerOptions
    scope = "sweep"
    console_width = 140

    def compute_all(self, runs: list[RunDir], target: Path) -> LocalizerResult:
        return compute_all(runs, self.options, self.console)

    def write_all(self, result: LocalizerResult, target: Path) -> list[Path]:
        self.written_to = target / self.options.out_subdir
        return write_results(result, self.written_to, self.options)

    def show_all(self, result: LocalizerResult, files: list[Path]) -> None:
        s = result.summary
        print_tables(self.console, s["unit_counts"], s["comparison"], s["ceiling"], s["lesions"], result.main)
        self.notes(s["notes"])
        self.console.print(f"wrote {len(files)} files to {self.written_to}")


def analyse(run_dirs: Sequence[Path | RunDir], out_dir: Path, opts: LocalizerOptions | None = None,
            console: Console | None = None) -> dict:
    """Every part of the analysis over these runs (library use); writes ``out_dir`` and returns the tables
    as records, with "out_dir" and "files"."""
    opts = opts or LocalizerOptions()
    console = console or Console(quiet=True)
    result = compute_all(run_dirs, opts, console)
    files = write_results(result, Path(out_dir), opts)
    print_tables(console, result.summary["unit_counts"], result.summary["comparison"], result.summary["ceiling"],
                 result.summary["lesions"], result.main)
    print_notes(console, result.summary["notes"])
    return {**result.summary, "out_dir": Path(out_dir), "files": files}


def per_set_layers(per_set: dict) -> list[str]:
    first = next(iter(per_set.values()))
    return list(first)


def similarity_fn(measure: str, opts: LocalizerOptions):
    if measure == "tuning":
        return loc.profile_similarity
    return lambda a, b, idx: loc.rdm_similarity(a, b, idx, opts.rdm_similarity)


def brain_measures(brain: SubjectBrain, common: np.ndarray, opts: LocalizerOptions) -> dict[str, dict]:
    """Per category: the region's mean profile and RDM over the common images, and their split-half versions."""
    out = {}
    for category in brain.regions:
        full, half_a, half_b, k_a, k_b, kept = loc.split_halves(brain.trial_ids, brain.region_trials(category), common,
                                                                opts.min_trials)
        assert np.array_equal(kept, common)
        out[category] = {"n_voxels": full.shape[1],
                         "tuning": full.mean(1), "tuning_halves": (half_a.mean(1), half_b.mean(1), k_a, k_b),
                         "rdm": loc.correlation_rdm(full),
                         "rdm_halves": (loc.correlation_rdm(half_a), loc.correlation_rdm(half_b), k_a, k_b)}
    return out


def flatten_result(res: dict | None) -> dict:
    """consistency() -> flat table columns (NaN everywhere for None)."""
    keys = ("score", "score_ci", "score_nc", "score_nc_ci", "reliability_x", "reliability_x_ci", "reliability_y",
            "reliability_y_ci")
    out = {}
    for k in keys:
        v = res.get(k, float("nan")) if res else (float("nan"), float("nan")) if k.endswith("_ci") else float("nan")
        if k.endswith("_ci"):
            out[f"{k[:-3]}_lo"], out[f"{k[:-3]}_hi"] = v
        else:
            out[k] = v
    out["n_images"] = res["n_images"] if res else 0
    return out


def lesions_for_run(run: Run, enc, unit_info: dict, brain: SubjectBrain, masks: dict, main: LocalizerSet,
                    opts: LocalizerOptions, console: Console, notes: list[str]) -> list[dict]:
    """Ridge on unit subsets of each compared layer, per category region; train = the run's train split."""
    train_ids = np.asarray(run.split.get("train", []), dtype=np.int64)
    test_ids = np.unique(run.test_ids)
    if train_ids.size < opts.lesion_cv:
        notes.append(f"{run.dir.name}: {train_ids.size} training images; no lesions")
        return []
    feats_train = run_features(run, enc, unit_info["backbone"], unit_info["compare"], train_ids, opts.batch_size)
    feats_test = run_features(run, enc, unit_info["backbone"], unit_info["compare"], test_ids, opts.batch_size)
    head = run.config.get("head", {})
    alphas = opts.lesion_alphas if opts.lesion_alphas is not None else head.get("alphas")
    rows = []
    for category in brain.regions:
        values = brain.region_trials(category)
        Y_train = loc.image_means(brain.trial_ids, values, train_ids)
        Y_test = loc.image_means(brain.trial_ids, values, test_ids)
        for layer in unit_info["compare"]:
            m = masks.get((run.localizer_key, unit_info["weights"], main.name, layer, category))
            if m is None:
                continue
            console.print(f"lesions: {run.dir.name} {layer} {category} ({int(m.sum())} of {m.size} units selective)")
            for row in loc.encoding_lesions(feats_train[layer], Y_train, feats_test[layer], Y_test, m,
                                            n_random=opts.lesion_n_random, seed=opts.seed, alphas=alphas,
                                            cv=opts.lesion_cv, device=opts.device if opts.device != "cpu" else None):
                rows.append({"run": run.dir.name, "backbone": unit_info["name"], "subject": run.data.get("subject"),
                             "layer": layer, "category": category, "n_voxels": int(values.shape[1]),
                             "n_train": int(train_ids.size), "n_test": int(test_ids.size), **row})
    return rows


# ----------------------------------------------------------------------------- outputs


def write_dict_rows(path: Path, rows: list[dict]) -> Path:
    """rows: dicts with the same keys, in column order -> a CSV with those keys as its header."""
    return write_csv(path, list(rows[0]), [list(row.values()) for row in rows])


def print_tables(console: Console, counts, comparison, ceiling, lesions, set_name: str) -> None:
    table = Table(title=f"selective units per layer ({set_name} localizer)")
    for col in ("backbone", "weights", "layer", "category", "selective / units"):
        table.add_column(col)
    for r in counts:
        if r["localizer"] == set_name:
            table.add_row(r["backbone"], r["weights"], r["layer"], r["category"], f"{r['n_selective']} / {r['n_units']}")
    console.print(table)
    if comparison or ceiling:
        table = Table(title="units vs region, and human–human (r [95% CI]; noise-corrected)")
        for col in ("who", "layer", "localizer", "category", "measure", "r", "noise-corrected"):
            table.add_column(col)
        for r in comparison:
            table.add_row(f"{r['backbone']} → sub{r['subject']}", r["layer"], r["localizer"], r["category"], r["measure"],
                          f"{fmt(r['score'])} [{fmt(r['score_lo'])}, {fmt(r['score_hi'])}]", fmt(r["score_nc"]))
        for r in ceiling:
            table.add_row(f"sub{r['subject_a']} ↔ sub{r['subject_b']}", "", "", r["category"], r["measure"],
                          f"{fmt(r['score'])} [{fmt(r['score_lo'])}, {fmt(r['score_hi'])}]", fmt(r["score_nc"]))
        console.print(table)
    if lesions:
        table = Table(title="encoding lesions (test r in the region)")
        for col in ("run", "layer", "category", "condition", "units", "r"):
            table.add_column(col)
        for r in lesions:
            table.add_row(r["run"], r["layer"], r["category"], r["condition"], str(r["n_units"]),
                          f"{fmt(r['r_mean'])}" + (f" ± {fmt(r['r_sd'])}" if np.isfinite(r["r_sd"]) else ""))
        console.print(table)




