"""Wen et al. 2018's analyses over run directories: accuracy maps with significance, the best layer per
voxel, virtual fMRI and the category organisation of cortex.

    python analyze.py analysis=wen2018 run_dir=outputs/runs/<run>
    python analyze.py analysis=wen2018 sweep_dir=outputs/multirun/<date>   # every run, + the sweep form
                                                                            #   of the best layer

Library use (no Hydra): ``analyse_run(run_dir, Wen2018Options(...))`` and
``sweep_best_layer(run_dirs, out_dir, split)``; the job (``Wen2018Job``) computes everything of a run
(``compute``) before it writes anything (``write``). The statistics are the methods' (``analyses.methods``:
stats, layers, categories); the figures are in ``analyses.jobs.wen2018_figures``.

Per run, into ``<run_dir>/wen2018/`` (the README's "Wen 2018 analyses" lists every file):

* accuracy: per-voxel r and R² of the test predictions (predictions.npz), one-sided p-values
  (``significance``: bootstrap of R² over test rows, CLIP-MSM; or block permutation of r, Wen; ``auto``
  = permutation for time-series runs, bootstrap otherwise), Benjamini–Hochberg at ``q``; per ROI the
  voxel and significant counts and mean ± SE of r, R², noise-ceiling-normalised r. For a video run also
  Wen's own accuracy next to the pooled r: r within each test movie, averaged over the movies
  (``r_per_movie``; the movie of each sample from the run, ``RunDir.stimuli().locate``).
  -> accuracy.csv, accuracy.json, accuracy.png
* best layer (runs trained on >= 2 layers): single-layer predictions of the test images (all other
  layers' standardised features set to 0), explained variance per layer, argmax per voxel; voxel
  counts per best layer in each ROI. -> best_layer.csv, best_layer.png
* virtual fMRI: predicted responses to a folder of images with one sub-folder per category
  (``image_dir``; for a run on the synthetic dataset it defaults to freshly drawn images of its six
  categories, written once under ``<data_dir>/virtual_fmri/``): category maps, d' per voxel and
  ROI, the voxel's selectivity (max d') and top categories. Images go through the run's saved
  transform (``TrainedEncoder.image_inputs``): for a video run its frame z-score and PCA, without the
  HRF and TR averaging, as Wen et al. predicted responses to images. -> dprime.csv, dprime.png, category_maps.npz
* category organisation: Pearson similarity of the category maps over the predictable voxels
  (significant and r > ``predictable_r``), k-means clusters with the k of highest signed modularity
  Q, Q's permutation p-value; correlation with a semantic similarity (a CSV or CLIP text embeddings);
  the same similarity and Q from single-layer predictions per layer (Wen Fig. 6); sub-clusters inside
  each cluster's own region (Wen Fig. 7). -> categories.json, similarity.png, layers_categories.csv/png
* voxels.npz: every per-voxel array above; W&B: the figures and tables, when the run logged to W&B.

Sweep form of the best layer: runs that differ only in their (single) layer -> the best layer per voxel
by held-out accuracy -> ``<sweep_dir>/wen2018_best_layer_<backbone>_<head>.csv/png``.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from analyses.jobs import wen2018_figures as figures
from analyses.jobs.base import Job, JobOptions
from analyses.jobs.console import fmt
from analyses.jobs.maps import wen2018_maps, write_job_maps
from analyses.jobs.outputs import write_csv
from analyses.methods import categories as cat
from datamodules.errors import DataError
from datamodules.image_folder import category_folder, read_image
from encoders.run_dir import RunDir
from encoders.run_record import write_json

# analyses.methods.stats and analyses.methods.layers (torch) are imported inside the functions that use them.

SIGNIFICANCE = ("auto", "bootstrap", "permutation")


@dataclass
class Wen2018Options(JobOptions):
    """Every knob of the analysis (conf/analysis/wen2018.yaml documents each; its groups are flattened)."""

    JOB = "wen2018"
    GROUPS = ("significance", "layers", "virtual_fmri", "clustering", "semantic")
    ALIASES = {("significance", "method"): "significance", ("semantic", "source"): "semantic"}

    split: str = "test"
    significance: str = "auto"
    n_boot: int = 2000
    n_perm: int = 1000
    block: int = 20
    q: float = 0.01
    seed: int = 0
    predictable_r: float = 0.2
    layer_score: str = "r2"
    image_dir: str | None = None
    n_per_category: int = 50
    image_seed: int = 0
    data_dir: str = "data"
    batch_size: int = 32
    k_min: int = 2
    k_max: int = 10
    n_perm_modularity: int = 1000
    recluster: bool = True
    semantic: str | None = None
    clip_backbone: str = "clip_vitb32"
    clip_template: str = "a photo of a {}."
    n_perm_semantic: int = 10000
    finer_alpha: float = 0.01
    rois: list[str] | None = None
    sweep_split: str = "val"
    out_subdir: str = "wen2018"
    wandb: str = "auto"
    device: str = "cpu"

    def check(self) -> None:
        if self.significance not in SIGNIFICANCE:
            raise ValueError(f"analysis.significance.method must be one of {SIGNIFICANCE}, got {self.significance!r}")


# ----------------------------------------------------------------------------- reading a run


@dataclass
class RunData:
    """What the analysis reads from a run directory (arrays for ``split``)."""

    run: RunDir
    pred: np.ndarray
    true: np.ndarray
    ids: np.ndarray
    rois: dict[str, np.ndarray]
    nc: np.ndarray | None
    movies: np.ndarray | None = None   # (n,) the test movie of each sample (time-series runs), else None

    @property
    def dir(self) -> Path:
        return self.run.path

    @property
    def info(self) -> dict:
        return self.run.info

    @property
    def is_time_series(self) -> bool:
        """Video-style runs (samples are TRs), as the run's datamodule recorded it."""
        return self.run.is_time_series


def read_run(run: RunDir | Path, split: str = "test", rois: Sequence[str] | None = None) -> RunData:
    """The split's predictions, ROIs and noise ceiling of one run; errors name the missing file or key."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    preds = run.predictions(split)
    voxels = run.voxels()
    return RunData(run, preds.pred, preds.true, preds.ids, voxels.rois(rois), voxels.get(split, "nc"),
                   sample_movies(run, preds.ids))


def sample_movies(run: RunDir, ids: np.ndarray) -> np.ndarray | None:
    """The movie each sample id belongs to, for a time-series run whose stimulus source can say
    (``locate(id)`` -> (movie, frame), as ``datamodules.video_stimuli.VideoFrames``: ids are movie
    position × n_volumes + volume); None otherwise. Reads run.json only, no movie file."""
    if not run.is_time_series:
        return None
    try:
        locate = getattr(run.stimuli(), "locate", None)
        return None if locate is None else np.array([locate(int(i))[0] for i in ids])
    except (DataError, ValueError, KeyError, IndexError):
        return None


# ----------------------------------------------------------------------------- accuracy


def accuracy(run: RunData, opts: Wen2018Options) -> dict:
    """Per-voxel r, R², p, FDR-adjusted p and significance, and the per-ROI table."""
    from analyses.methods import stats

    r = stats.pearson_r(run.pred, run.true)
    r2 = stats.r2_score(run.pred, run.true)
    method = opts.significance
    if method == "auto":
        method = "permutation" if run.is_time_series else "bootstrap"
    if method == "bootstrap":
        p = stats.bootstrap_pvalues(run.pred, run.true, n_boot=opts.n_boot, seed=opts.seed, device=opts.device)
        detail = {"n_boot": opts.n_boot, "h0": "R2 <= 0"}
    else:
        p = stats.permutation_pvalues(run.pred, run.true, n_perm=opts.n_perm, block=opts.block, seed=opts.seed,
                                      device=opts.device)
        n_blocks = -(-run.true.shape[0] // opts.block)
        detail = {"n_perm": opts.n_perm, "block": opts.block, "n_blocks": n_blocks, "h0": "r <= 0"}
    p_fdr = stats.fdr_bh(p)
    significant = np.nan_to_num(p_fdr, nan=1.0) < opts.q
    predictable = significant & (np.nan_to_num(r, nan=-1.0) > opts.predictable_r)
    nc_r = stats.nc_normalised_r(r, run.nc) if run.nc is not None else np.full_like(r, np.nan)
    movies, r_movies = (stats.pearson_r_by_group(run.pred, run.true, run.movies) if run.movies is not None
                        else ([], np.empty((0, r.size))))
    r_movie = r_movies.mean(0) if len(movies) else np.full_like(r, np.nan)  # Wen: per test movie, averaged
    rois = {"all": np.ones(r.shape, bool), **run.rois}
    summ_r, summ_rm, summ_r2, summ_nc = (stats.roi_summary(v, rois) for v in (r, r_movie, r2, nc_r))
    header = ["roi", "n_voxels", "n_nan", "n_significant", "frac_significant", "n_predictable",
              "r_mean", "r_se", "r_per_movie_mean", "r_per_movie_se", "r2_mean", "r2_se", "nc_r_mean", "nc_r_se"]
    rows = []
    for name, sel in rois.items():
        n = int(sel.sum())
        rows.append([name, n, summ_r[name]["n_nan"], int(significant[sel].sum()),
                     float(significant[sel].mean()) if n else float("nan"), int(predictable[sel].sum()),
                     summ_r[name]["mean"], summ_r[name]["se"], summ_rm[name]["mean"], summ_rm[name]["se"],
                     summ_r2[name]["mean"], summ_r2[name]["se"], summ_nc[name]["mean"], summ_nc[name]["se"]])
    per_movie = None
    if len(movies):
        per_movie = {"movies": [str(m) for m in movies], "r_mean": summ_rm["all"]["mean"], "r_se": summ_rm["all"]["se"],
                     "r_mean_by_movie": {str(m): float(np.nanmean(v)) for m, v in zip(movies, r_movies)},
                     "definition": "per voxel: Pearson r within each test movie, averaged over the movies (Wen et al. 2018)"}
    summary = {"split": opts.split, "method": method, **detail, "q": opts.q, "seed": opts.seed,
               "n_samples": int(run.true.shape[0]), "n_voxels": int(r.size), "n_nan": stats.count_nan(r),
               "n_significant": int(significant.sum()), "predictable_r": opts.predictable_r,
               "n_predictable": int(predictable.sum()), "r_mean": summ_r["all"]["mean"],
               "r_se": summ_r["all"]["se"], "r_per_movie": per_movie}
    return {"r": r, "r2": r2, "p": p, "p_fdr": p_fdr, "significant": significant, "predictable": predictable,
            "nc_r": nc_r, "r_per_movie": r_movie, "r_movies": r_movies, "movies": [str(m) for m in movies],
            "header": header, "rows": rows, "summary": summary}


# ----------------------------------------------------------------------------- best layer


def test_features(enc, run: RunData) -> np.ndarray | None:
    """The run's raw test features: its feature cache, else recomputed from its images (opened by its own
    datamodule); None when neither is available."""
    raw = enc.cached_features(run.ids)
    if raw is not None:
        return raw
    try:
        source = run.run.stimuli()
    except (DataError, ValueError, KeyError):
        return None
    return np.concatenate([enc.image_features([source.image(i) for i in run.ids[s:s + 64]])
                           for s in range(0, len(run.ids), 64)])


def best_layer_analysis(enc, raw: np.ndarray, run: RunData, opts: Wen2018Options) -> dict:
    """Single-layer scores (n_layers, n_voxels), best layer per voxel, counts per ROI."""
    from analyses.methods import layers as lay

    slices = enc.feature_slices
    z = enc.head_inputs(raw)
    scores = lay.layer_scores(enc.predict_standardised, z, run.true, slices, score=opts.layer_score)
    best = lay.best_layer(scores)
    counts = lay.best_layer_counts(best, {"all": np.ones(best.shape, bool), **run.rois}, len(slices))
    return {"layers": list(slices), "scores": scores, "best": best, "counts": counts}


# ----------------------------------------------------------------------------- images by category


def resolve_image_dir(run: RunData, opts: Wen2018Options) -> Path | None:
    """``image_dir`` if given; for a run on the synthetic dataset, freshly drawn images of its categories
    (asked of the run's datamodule); else None."""
    if opts.image_dir:
        return Path(opts.image_dir)
    return run.run.category_images(Path(opts.data_dir) / "virtual_fmri", opts.n_per_category, opts.image_seed)


def virtual_fmri(enc, files: Sequence[Path], labels: np.ndarray, n_categories: int, per_layer: bool,
                 batch_size: int = 32) -> tuple[cat.CategoryStats, dict[str, cat.CategoryStats]]:
    """Predicted responses to every image, accumulated per category (and per single layer), batch by batch."""
    from analyses.methods import layers as lay

    stats_all = cat.CategoryStats(n_categories, enc.n_voxels)
    slices = enc.feature_slices if per_layer else {}
    stats_layer = {name: cat.CategoryStats(n_categories, enc.n_voxels) for name in slices}
    for start in range(0, len(files), batch_size):
        images = [read_image(p) for p in files[start:start + batch_size]]
        lab = labels[start:start + batch_size]
        z = enc.image_inputs(images, batch_size)
        stats_all.update(enc.predict_standardised(z), lab)
        for name in slices:
            stats_layer[name].update(enc.predict_standardised(lay.keep_one_layer(z, slices, name)), lab)
    return stats_all, stats_layer


# ----------------------------------------------------------------------------- category organisation


def load_similarity_csv(path: str | Path, names: Sequence[str]) -> np.ndarray:
    """A user-supplied (C, C) similarity matrix from a CSV whose header row and first column are category
    names (any order, at least ``names``), reordered to ``names``. ValueError naming the file otherwise."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: semantic similarity CSV not found")
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    header = [h.strip() for h in rows[0][1:]]
    index = {r[0].strip(): r[1:] for r in rows[1:]}
    missing = [n for n in names if n not in header or n not in index]
    if missing:
        raise ValueError(f"{path}: categories {missing} missing from the header row or first column")
    col = {h: j for j, h in enumerate(header)}
    try:
        mat = np.array([[float(index[a][col[b]]) for b in names] for a in names])
    except (ValueError, IndexError) as err:
        raise ValueError(f"{path}: not a numeric similarity matrix ({err})") from err
    if not np.allclose(mat, mat.T, equal_nan=True):
        raise ValueError(f"{path}: the similarity matrix is not symmetric")
    return mat


def semantic_matrix(enc, names: Sequence[str], opts: Wen2018Options) -> tuple[np.ndarray, str] | None:
    """The semantic similarity to compare with: a CSV (``semantic`` = path) or CLIP text embeddings (``clip``:
    the run's own text tower when its backbone is an open_clip model, else ``clip_backbone``'s)."""
    if not opts.semantic:
        return None
    if str(opts.semantic).lower() != "clip":
        return load_similarity_csv(opts.semantic, names), str(opts.semantic)
    from encoders.backbones import build_backbone, get_spec
    from encoders.text import TextEncoder, tokenizer_for

    if enc.backbone.spec.library == "open_clip":
        model, spec = enc.backbone.model, enc.backbone.spec
    else:
        spec = get_spec(opts.clip_backbone)
        if spec.library != "open_clip":
            raise ValueError(f"analysis.semantic=clip needs an open_clip backbone; "
                             f"clip_backbone={opts.clip_backbone!r} is not")
        try:
            model = build_backbone(opts.clip_backbone, pretrained=True).model
        except Exception as err:  # noqa: BLE001  (WeightsError: not cached, no network)
            raise ValueError(f"analysis.semantic=clip: {err}") from err
    emb = TextEncoder(model, tokenizer_for(spec, model), spec.name).encode(names, [opts.clip_template])
    return cat.cosine_similarity(emb), f"CLIP text ({spec.name}, '{opts.clip_template}')"


def category_organisation(stats_all: cat.CategoryStats, stats_layer: dict[str, cat.CategoryStats],
                          names: list[str], acc: dict, semantic: tuple[np.ndarray, str] | None,
                          opts: Wen2018Options) -> dict:
    """Similarity over the predictable voxels, clusters, Q and its p-value, semantic correlation, per-layer
    similarity and Q, sub-clusters. Falls back to all finite voxels if fewer than 3 are predictable."""
    voxels, rule = acc["predictable"], f"FDR q<{opts.q} and r>{opts.predictable_r}"
    if voxels.sum() < 3:
        voxels, rule = np.isfinite(acc["r"]), f"all voxels (only {int(acc['predictable'].sum())} predictable)"
    sim = cat.category_similarity(stats_all.means, voxels)
    out: dict = {"categories": names, "n_images": stats_all.counts.astype(int).tolist(),
                 "voxels": rule, "n_voxels": int(voxels.sum()), "similarity": sim}
    if len(names) >= 3:
        W = cat.network(sim)
        res = cat.cluster_categories(W, range(opts.k_min, opts.k_max + 1), seed=opts.seed)
        p_q, _ = cat.modularity_pvalue(W, res, n_perm=opts.n_perm_modularity, seed=opts.seed,
                                       recluster=opts.recluster)
        out["clusters"] = {"labels": res.labels.tolist(), "k": res.k, "q": res.q, "p": p_q,
                           "q_by_k": {str(k): v for k, v in res.q_by_k.items()}, "n_perm": opts.n_perm_modularity,
                           "recluster": opts.recluster,
                           "members": [[names[i] for i in np.flatnonzero(res.labels == c)] for c in range(res.k)]}
        finer = cat.finer_clusters(stats_all, res, voxels, alpha=opts.finer_alpha, seed=opts.seed)
        for entry in finer:
            entry["members"] = [names[i] for i in entry["members"]]
        out["finer"] = finer
        if stats_layer:
            per_layer = cat.layerwise_organisation({k: s.means for k, s in stats_layer.items()}, res.labels, voxels)
            out["layers"] = {k: {"similarity": v["similarity"], "q": v["q"]} for k, v in per_layer.items()}
    if semantic is not None and len(names) >= 3:
        matrix, source = semantic
        r, p = cat.similarity_correlation(sim, matrix, n_perm=opts.n_perm_semantic, seed=opts.seed)
        out["semantic"] = {"source": source, "r": r, "p": p, "n_perm": opts.n_perm_semantic}
        for name, block in out.get("layers", {}).items():
            block["semantic_r"], block["semantic_p"] = cat.similarity_correlation(
                block["similarity"], matrix, n_perm=opts.n_perm_semantic, seed=opts.seed)
    return out


def compute_categories(enc, run: RunData, images: tuple, semantic: tuple | None, acc: dict,
                       opts: Wen2018Options) -> dict:
    """Virtual fMRI of ``images`` (``category_folder``'s files, labels, names) and the category organisation,
    compared with ``semantic`` (``semantic_matrix``, or None): d', selectivity, the per-ROI table and
    categories.json's content."""
    from analyses.methods import stats

    paths, labels, names = images
    stats_all, stats_layer = virtual_fmri(enc, paths, labels, len(names),
                                          per_layer=len(enc.layers) >= 2 and enc.takes_backbone_features,
                                          batch_size=opts.batch_size)
    d = stats_all.dprime()
    sel, pref = cat.selectivity(d)
    rois = {"all": np.ones(d.shape[1], bool), **run.rois}
    profile = cat.roi_profile(d, rois)
    sel_summary = stats.roi_summary(sel, rois)
    header = ["roi", "n_voxels", "top_category", "selectivity_mean", "selectivity_se"] + [f"dprime_{n}" for n in names]
    rows = [[roi, int(rois[roi].sum()), names[int(np.nanargmax(v))] if np.isfinite(v).any() else "",
             sel_summary[roi]["mean"], sel_summary[roi]["se"], *v.tolist()] for roi, v in profile.items()]
    organisation = category_organisation(stats_all, stats_layer, names, acc, semantic, opts)
    return {"names": names, "n_images": len(paths), "dprime": d, "means": stats_all.means, "counts": stats_all.counts,
            "voxels": dict(dprime=d, selectivity=sel, preferred=pref, category_maps=stats_all.means),
            "profile": profile, "header": header, "rows": rows, "organisation": organisation}


# ----------------------------------------------------------------------------- the job


@dataclass
class Wen2018Result:
    """Everything one run's analysis found (nothing of it written yet)."""

    run: RunData
    title: str
    accuracy: dict
    best_layer: dict | None = None
    categories: dict | None = None
    voxels: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Wen2018Job(Job):
    """Wen et al. 2018's analyses of every run (see the module docstring)."""

    name = "wen2018"
    Options = Wen2018Options

    def load_encoder(self, run: RunDir, notes: list[str]):
        """The run's TrainedEncoder for image-based analyses, or None (with a note) when images cannot reach
        its head."""
        enc = run.encoder(device=self.options.device)
        if not enc.predicts_images:
            notes.append("best layer and virtual fMRI: the run's head reads datamodule-transformed features "
                         "(e.g. video PCA + HRF), and the run saved no frame stage to map image features to them")
            return None
        return enc

    def compute(self, run: RunDir) -> Wen2018Result:
        """Every analysis of one run; every input is read and checked here, before anything is written."""
        opts = self.options
        data = read_run(run, opts.split, opts.rois)
        notes: list[str] = []
        enc = self.load_encoder(run, notes)
        image_dir = resolve_image_dir(data, opts) if enc is not None else None
        images = category_folder(image_dir) if image_dir is not None else None
        semantic = semantic_matrix(enc, images[2], opts) if images is not None else None
        title = f"{run.info.get('backbone', '?')}/{run.info.get('head', '?')} — {run.path.name}"

        acc = accuracy(data, opts)
        result = Wen2018Result(data, title, acc, notes=notes,
                               voxels={k: acc[k] for k in ("r", "r2", "p", "p_fdr", "significant", "predictable", "nc_r",
                                                           "r_per_movie", "r_movies")})
        n_blocks = acc["summary"].get("n_blocks")
        if n_blocks is not None and math.factorial(min(n_blocks, 20)) * opts.q < 1:
            notes.append(f"significance: {n_blocks} blocks of {opts.block} samples have only {math.factorial(n_blocks)} "
                         f"orders, so no p-value can reach q={opts.q}; lower analysis.significance.block")
        if enc is not None and len(enc.layers) >= 2 and data.is_time_series:
            notes.append("best layer: not available for time-series runs (the head reads HRF-convolved features per TR, "
                         "which the run does not keep per layer)")
        elif enc is not None and len(enc.layers) >= 2:
            raw = test_features(enc, data)
            if raw is None:
                notes.append("best layer: the run's test features are not available (no cache, no stimulus file)")
            else:
                result.best_layer = best_layer_analysis(enc, raw, data, opts)
                result.voxels.update(layer_scores=result.best_layer["scores"], best_layer=result.best_layer["best"])
        elif enc is not None:
            notes.append(f"best layer: the run used one layer ({enc.layers[0]}); train on several "
                         f"(backbone.layers=[...]) or run a sweep over layers")
        if enc is not None and images is None:
            notes.append("virtual fMRI: no images (give analysis.virtual_fmri.image_dir=<folder of category sub-folders>)")
        elif enc is not None:
            result.categories = compute_categories(enc, data, images, semantic, acc, opts)
            result.categories["organisation"]["image_dir"] = str(image_dir)
            result.voxels.update(result.categories["voxels"])
        return result

    def write(self, run: RunDir, result: Wen2018Result) -> list[Path]:
        """accuracy.*, best_layer.*, dprime.*, category_maps.npz, categories.json, similarity.png,
        layers_categories.*, voxels.npz and notes.json into the run's output folder."""
        out = self.make_out_dir(run)
        acc, title = result.accuracy, result.title
        files = [write_csv(out / "accuracy.csv", acc["header"], acc["rows"])]
        write_json(out / "accuracy.json", acc["summary"])
        files += [out / "accuracy.json", figures.plot_accuracy(acc, out / "accuracy.png", title)]
        if result.best_layer is not None:
            files += write_best_layer(result.best_layer, out,
                                      f"best layer per voxel ({self.options.layer_score}) — {title}")
        if result.categories is not None:
            files += write_categories(result.categories, out, title)
        np.savez_compressed(out / "voxels.npz", **{k: np.asarray(v) for k, v in result.voxels.items()})
        files.append(out / "voxels.npz")
        map_files, map_notes = write_job_maps(run, *wen2018_maps(  # <run>/maps/: q and best layer in the data's space
            result.voxels, result.best_layer["layers"] if result.best_layer is not None else None, self.options.q))
        files, result.notes = files + map_files, result.notes + map_notes
        (out / "notes.json").unlink(missing_ok=True)  # never a stale one from an earlier analysis
        if result.notes:
            write_json(out / "notes.json", {"notes": result.notes})
            files.append(out / "notes.json")
        return files

    def show(self, run: RunDir, result: Wen2018Result) -> None:
        _print_accuracy(self.console, result.accuracy, result.title)
        if result.best_layer is not None:
            _print_best_layer(self.console, result.best_layer)
        if result.categories is not None:
            _print_dprime(self.console, result.categories["rows"])
            organisation = result.categories["organisation"]
            self.console.print(f"categories: {q_text(organisation)}; clusters "
                               f"{organisation.get('clusters', {}).get('members')}")
        self.notes(result.notes)

    def wandb_summary(self, result: Wen2018Result) -> dict:
        summary = dict(result.accuracy["summary"])
        per_movie = summary.pop("r_per_movie")
        if per_movie is not None:
            summary.update(r_per_movie_mean=per_movie["r_mean"], r_per_movie_se=per_movie["r_se"])
        return summary

    def combine(self, results: list[tuple[RunDir, Wen2018Result]]) -> list[dict]:
        """The sweep form of the best layer over the analysed runs."""
        return compute_sweep_best_layer([run for run, _ in results], self.options.sweep_split)

    def write_combined(self, groups: list[dict], target: Path) -> list[Path]:
        return write_sweep_best_layer(groups, target)


def analyse_run(run_dir: str | Path | RunDir, opts: Wen2018Options | None = None, console: Console | None = None) -> dict:
    """Every Wen 2018 analysis of one run; writes ``<run_dir>/<out_subdir>/`` and returns what it found.

    Returns {"out_dir", "files", "notes", "wandb" (its run directory or None), "accuracy" (summary),
    "best_layer" (counts per ROI or None), "categories" (categories.json content or None)}.
    """
    job = Wen2018Job(opts or Wen2018Options(), console or Console(quiet=True))
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    result, files = job.process(run)
    layer = result.best_layer
    return {"out_dir": job.out_dir(run), "files": files, "notes": result.notes, "wandb": job.last_wandb_dir,
            "accuracy": result.accuracy["summary"],
            "best_layer": ({k: v.tolist() for k, v in layer["counts"].items()} | {"layers": layer["layers"]}
                           if layer else None),
            "categories": result.categories["organisation"] if result.categories else None}


# ----------------------------------------------------------------------------- writing


def write_best_layer(res: dict, out: Path, title: str) -> list[Path]:
    """best_layer.csv (voxels per best layer and mean layer index per ROI) and best_layer.png."""
    header = ["roi", "n_voxels", "mean_layer_index"] + [f"n_{name}" for name in res["layers"]]
    rows = []
    for roi, counts in res["counts"].items():
        total = int(counts.sum())
        mean = float((counts * np.arange(len(counts))).sum() / total) if total else float("nan")
        rows.append([roi, total, mean, *[int(c) for c in counts]])
    csv_path = write_csv(out / "best_layer.csv", header, rows)
    png = figures.plot_best_layer_per_roi({k: v for k, v in res["counts"].items()}, res["layers"],
                                          out / "best_layer.png", title)
    return [csv_path, png]


def q_text(organisation: dict) -> str:
    clusters = organisation.get("clusters")
    if clusters is None:
        return "no clustering (< 3 categories)"
    return f"k={clusters['k']}, Q={clusters['q']:.2f} (p={clusters['p']:.3g})"


def write_categories(res: dict, out: Path, title: str) -> list[Path]:
    """dprime.csv/.png, category_maps.npz, categories.json, similarity.png, layers_categories.csv/.png."""
    names, organisation = res["names"], res["organisation"]
    files = [write_csv(out / "dprime.csv", res["header"], res["rows"]),
             figures.plot_roi_profile(dict(res["profile"]), names, out / "dprime.png",
                                      f"mean d' per ROI ({res['n_images']} images) — {title}")]
    np.savez_compressed(out / "category_maps.npz", maps=res["means"].astype(np.float32),
                        dprime=res["dprime"].astype(np.float32), names=np.array(names), counts=res["counts"])
    files.append(out / "category_maps.npz")
    write_json(out / "categories.json", organisation)
    files.append(out / "categories.json")
    labels_c = np.asarray(organisation["clusters"]["labels"]) if "clusters" in organisation else None
    files.append(figures.plot_similarity(organisation["similarity"], names, labels_c, out / "similarity.png",
                                         f"category similarity, {organisation['n_voxels']} voxels\n{q_text(organisation)}"))
    if "layers" in organisation:
        layer_rows = [[name, b["q"], b.get("semantic_r"), b.get("semantic_p")]
                      for name, b in organisation["layers"].items()]
        files.append(write_csv(out / "layers_categories.csv", ["layer", "q", "semantic_r", "semantic_p"], layer_rows))
        files.append(figures.plot_layers_categories(organisation["layers"], names, labels_c,
                                                    out / "layers_categories.png",
                                                    f"single-layer category similarity and Q — {title}"))
    return files


# ----------------------------------------------------------------------------- sweep form


def compute_sweep_best_layer(run_dirs: Sequence[Path | RunDir], split: str = "val") -> list[dict]:
    """Best layer per voxel across runs that differ only in their single layer (held-out r of ``split``).

    Runs are grouped by (backbone, head, dataset, subject); a group needs >= 2 runs with different single
    layers and the same voxels. Returns per group {"backbone", "head", "layers", "counts" {roi: (n_layers,)}}.
    """
    from analyses.methods import layers as lay
    from encoders.backbones import REGISTRY

    groups: dict[tuple, list[tuple[str, RunDir]]] = defaultdict(list)
    for d in run_dirs:
        d = d if isinstance(d, RunDir) else RunDir(d)
        if not d.info:
            continue
        info = d.info
        layers = info.get("layers") or []
        data = info.get("data", {})
        if len(layers) == 1:
            key = (info.get("backbone"), info.get("head"), data.get("dataset"), data.get("subject"))
            groups[key].append((layers[0], d))
    out = []
    for (backbone, head, _, _), members in groups.items():
        if len({layer for layer, _ in members}) < 2:
            continue
        order = list(REGISTRY[backbone].layers) if backbone in REGISTRY else []
        members = sorted(members, key=lambda m: order.index(m[0]) if m[0] in order else len(order))
        scores, xyz, rois = [], None, None
        for layer, d in members:
            voxels = d.voxels()
            if xyz is None:
                xyz, rois = voxels.voxel_xyz, voxels.rois()
            elif not np.array_equal(xyz, voxels.voxel_xyz):
                raise ValueError(f"{d.path}: its voxels differ from {members[0][1].path}'s; cannot compare layers")
            scores.append(voxels.values(split, "r"))
        best = lay.best_layer(np.stack(scores))
        layer_names = [m[0] for m in members]
        out.append({"backbone": backbone, "head": head, "split": split, "layers": layer_names,
                    "counts": lay.best_layer_counts(best, {"all": np.ones(best.shape, bool), **rois}, len(layer_names))})
    return out


def write_sweep_best_layer(groups: list[dict], out_dir: Path) -> list[Path]:
    """wen2018_best_layer_<backbone>_<head>.csv/png per group into out_dir."""
    written = []
    for g in groups:
        stem = f"wen2018_best_layer_{g['backbone']}_{g['head']}"
        header = ["roi", "n_voxels"] + [f"n_{n}" for n in g["layers"]]
        rows = [[roi, int(c.sum()), *c.tolist()] for roi, c in g["counts"].items()]
        written.append(write_csv(out_dir / f"{stem}.csv", header, rows))
        written.append(figures.plot_best_layer_per_roi(
            g["counts"], g["layers"], out_dir / f"{stem}.png",
            f"best layer per voxel ({g['split']} r, one run per layer): {g['backbone']}/{g['head']}"))
    return written


def sweep_best_layer(run_dirs: Sequence[Path | RunDir], out_dir: Path, split: str = "val") -> list[Path]:
    """``compute_sweep_best_layer`` then ``write_sweep_best_layer`` (library use)."""
    return write_sweep_best_layer(compute_sweep_best_layer(run_dirs, split), Path(out_dir))


# ----------------------------------------------------------------------------- printing



def _print_accuracy(console: Console, acc: dict, title: str) -> None:
    s = acc["summary"]
    table = Table(title=f"accuracy ({s['method']}, FDR q<{s['q']}) — {title}")
    per_movie = s.get("r_per_movie") is not None
    columns = ["ROI", "voxels", "significant", "mean r ± SE"] + (["mean r per movie ± SE"] if per_movie else []) + ["mean NC-r"]
    for col in columns:
        table.add_column(col, justify="left" if col == "ROI" else "right")
    at = {name: i for i, name in enumerate(acc["header"])}
    for row in acc["rows"]:
        movie = [f"{fmt(row[at['r_per_movie_mean']])} ± {fmt(row[at['r_per_movie_se']])}"] if per_movie else []
        table.add_row(row[0], str(row[1]), str(row[3]), f"{fmt(row[at['r_mean']])} ± {fmt(row[at['r_se']])}", *movie,
                      fmt(row[at["nc_r_mean"]]))
    console.print(table)
    if per_movie:
        console.print(f"r per test movie (mean over voxels): " + ", ".join(
            f"{m} {fmt(v)}" for m, v in s["r_per_movie"]["r_mean_by_movie"].items()))


def _print_best_layer(console: Console, res: dict) -> None:
    table = Table(title="voxels per best layer")
    table.add_column("ROI")
    for name in res["layers"]:
        table.add_column(name, justify="right")
    for roi, counts in res["counts"].items():
        table.add_row(roi, *[str(int(c)) for c in counts])
    console.print(table)


def _print_dprime(console: Console, rows: list[list]) -> None:
    table = Table(title="category selectivity (mean d' per ROI)")
    for col in ("ROI", "top category", "max d' (mean ± SE)"):
        table.add_column(col)
    for row in rows:
        table.add_row(row[0], row[2], f"{fmt(row[3], 2)} ± {fmt(row[4], 2)}")
    console.print(table)
