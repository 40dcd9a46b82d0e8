"""The report's comparisons between encoders, over test stimuli (not voxels), and the sweep's encoder × ROI table.

Per run, a bootstrap over its test stimuli (``bootstrap_run``): the rows of predictions.npz are sorted by sample id,
the units (test images; for time-series runs blocks of ``block`` consecutive TRs) are resampled ``n_boot`` times with
replacement (``stats.resample_counts``: the same resamples for every run with the same test ids and seed), every
voxel's r, R² and R²/NC is recomputed on each resample (``stats.bootstrap_scores``) and summarised per ROI (mean,
median; ``compare.roi_draws``); for BCa intervals (the default) also with each unit left out once (the jackknife,
``stats.jackknife_counts``). Intervals and p-values: ``compare.bootstrap_interval`` / ``bootstrap_p``. From these:

* ``compare_pairs``: for two runs of a comparison group (same head, dataset, subject; different encoders), per ROI,
  metric and statistic, the difference A − B with its bootstrap CI and two-sided bootstrap p (paired: the same
  resamples for both), and Benjamini–Hochberg q over the ROI × pair family of each (metric, statistic);
* ``compare_subjects``: with ≥ 2 subjects, the same difference per subject and a t-test across subjects, q over
  the ROI × pair family;
* ``encoder_table``: one encoder × ROI table of a metric's ROI mean with its 95 % CI (bootstrap over test stimuli
  for one subject; t interval across subjects for several), sorted by the all-voxels value, the best per ROI marked.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from analyses.jobs.encoder_pairs import model_key, model_labels
from analyses.methods import compare, stats
from analyses.methods.voxels import common_voxels
from encoders.run_dir import RunDir

ALL_VOXELS = "all voxels"
MIN_UNITS = 20  # fewer resampling units than this: the bootstrap distribution is too coarse to trust, say so


@dataclass
class RunBootstrap:
    """A run's per-ROI summaries: observed, on every resample of its test stimuli, and with each unit left out."""

    run: RunDir
    rois: list[str]                               # ALL_VOXELS first, then the reported ROIs the run has
    n_voxels: list[int]                           # voxels per ROI (of the columns used)
    observed: dict[tuple[str, str], np.ndarray]   # (metric, statistic) -> (n_rois,)
    draws: dict[tuple[str, str], np.ndarray]      # (metric, statistic) -> (n_boot, n_rois)
    jackknife: dict[tuple[str, str], np.ndarray]  # (metric, statistic) -> (n_units, n_rois), for BCa
    ids: np.ndarray                               # the sorted test sample ids (what pairs two runs' resamples)
    unit: str                                     # what one resampled unit is, in words
    n_units: int
    interval: str = "bca"

    def value(self, metric: str, statistic: str, roi: str) -> float:
        return float(self.observed[metric, statistic][self.rois.index(roi)]) if roi in self.rois else float("nan")

    def ci(self, metric: str, statistic: str, roi: str, level: float) -> tuple[float, float]:
        if roi not in self.rois:
            return float("nan"), float("nan")
        j = self.rois.index(roi)
        key = (metric, statistic)
        lo, hi = compare.bootstrap_interval(self.draws[key][:, j], self.observed[key][j:j + 1],
                                            self.jackknife[key][:, j], level, self.interval)
        return float(lo[0]), float(hi[0])


def resampling_units(ids: np.ndarray, time_series: bool, block: int) -> tuple[np.ndarray, str]:
    """The unit label of each (id-sorted) test row and its description: the image id, or for time series the
    block of ``block`` consecutive samples."""
    if time_series:
        units = np.arange(len(ids)) // max(int(block), 1)
        return units, f"blocks of {block} consecutive TRs"
    return np.asarray(ids), "test images"


def bootstrap_run(run: RunDir, split: str, metrics: Sequence[str], rois: Sequence[str], n_boot: int, seed: int,
                  block: int, interval: str = "bca", columns: np.ndarray | None = None,
                  chunk: int = 256) -> RunBootstrap:
    """The bootstrap of one run (see the module docstring); ``columns``: only these voxels (a pair's common voxels).
    The resamples go through in chunks of ``chunk``, so memory is O(chunk · n_voxels) whatever n_boot is.
    FileNotFoundError / ValueError (one line) when the run has no predictions for ``split``."""
    pr = run.predictions(split)
    order = np.argsort(pr.ids, kind="stable")
    ids = np.asarray(pr.ids)[order]
    pred, true = pr.pred[order], pr.true[order]
    vox = run.voxels()
    cols = np.arange(vox.n_voxels) if columns is None else np.asarray(columns)
    if pred.shape[1] != vox.n_voxels:
        raise ValueError(f"{run.path}: predictions.npz has {pred.shape[1]} voxels, voxel_metrics.npz {vox.n_voxels}")
    pred, true = pred[:, cols], true[:, cols]
    units, unit = resampling_units(ids, run.is_time_series, block)
    # row 0: the observed data; then the resamples; then (BCa) every unit left out once
    weights = [np.ones((1, len(ids))), stats.resample_counts(units, n_boot, seed)]
    if interval == "bca":
        weights.append(stats.jackknife_counts(units))
    counts = np.vstack(weights)
    nc = vox.get(split, "nc")
    masks_all = run.rois()
    names = [ALL_VOXELS] + [n for n in rois if n in masks_all and masks_all[n][cols].any()]
    masks = {n: np.ones(len(cols), bool) if n == ALL_VOXELS else masks_all[n][cols] for n in names}
    parts: dict[tuple[str, str], list[np.ndarray]] = {}
    for start in range(0, len(counts), chunk):
        scores = stats.bootstrap_scores(pred, true, counts[start:start + chunk], None if nc is None else nc[cols])
        for metric in metrics:
            if metric in scores:
                for statistic, values in compare.roi_draws(scores[metric], masks).items():
                    parts.setdefault((metric, statistic), []).append(values)
    observed, draws, jack = {}, {}, {}
    for key, values in parts.items():
        allv = np.concatenate(values)
        observed[key], draws[key], jack[key] = allv[0], allv[1:n_boot + 1], allv[n_boot + 1:]
    return RunBootstrap(run, names, [int(m.sum()) for m in masks.values()], observed, draws, jack, ids, unit,
                        int(len(np.unique(units))), interval)


class Bootstraps:
    """Every run's bootstrap, computed once (and once more per pair whose runs scored different voxels)."""

    def __init__(self, split: str, metrics: Sequence[str], rois: Sequence[str], n_boot: int, seed: int, block: int,
                 interval: str = "bca"):
        self.args = (split, list(metrics), list(rois), int(n_boot), int(seed), int(block), interval)
        self.runs: dict[str, RunBootstrap | None] = {}
        self.notes: list[str] = []

    def of(self, run: RunDir) -> RunBootstrap | None:
        """The run's bootstrap over all its voxels; None (with a note) when it has no predictions."""
        if run.name not in self.runs:
            try:
                self.runs[run.name] = boot = bootstrap_run(run, *self.args)
            except (FileNotFoundError, ValueError) as err:
                self.notes.append(f"{run.name}: no bootstrap ({err}); its CIs and comparisons are left out")
                self.runs[run.name] = None
            else:
                if boot.n_units < MIN_UNITS:
                    self.notes.append(f"{run.name}: only {boot.n_units} resampling units ({boot.unit}): its CIs "
                                      f"and p-values are coarse" + (" (a smaller analysis.block gives more)"
                                                                    if run.is_time_series else ""))
        return self.runs[run.name]

    def pair(self, a: RunDir, b: RunDir) -> tuple[RunBootstrap, RunBootstrap] | None:
        """Both runs' bootstraps over the voxels both scored, on the same resamples; None (with a note) when the
        runs were tested on different samples or one has no predictions."""
        ba, bb = self.of(a), self.of(b)
        if ba is None or bb is None:
            return None
        if not np.array_equal(ba.ids, bb.ids):
            self.notes.append(f"{a.name} vs {b.name}: tested on different samples; no paired comparison")
            return None
        ia, ib = common_voxels(a.voxel_xyz, b.voxel_xyz)
        if len(ia) == a.voxels().n_voxels == b.voxels().n_voxels and np.array_equal(ia, ib):
            return ba, bb
        return bootstrap_run(a, *self.args, columns=ia), bootstrap_run(b, *self.args, columns=ib)


def _add_fdr(rows: list[dict], keys: Sequence[str] = ("metric", "statistic")) -> None:
    """q = Benjamini–Hochberg over every row with the same ``keys`` (the ROI × pair family of a metric/statistic)."""
    families: dict[tuple, list[dict]] = {}
    for row in rows:
        families.setdefault(tuple(row[k] for k in keys), []).append(row)
    for family in families.values():
        for row, q in zip(family, stats.fdr_bh(np.array([r["p"] for r in family], dtype=np.float64))):
            row["q"] = float(q)


def compare_pairs(pairs: Sequence[tuple[RunDir, RunDir]], boots: Bootstraps, metrics: Sequence[str], level: float
                  ) -> list[dict]:
    """Per pair, ROI, metric and statistic: {"a", "b" (runs), "roi", "metric", "statistic", "n_voxels", "value_a",
    "value_b", "diff", "ci_low", "ci_high", "p", "q"} (see the module docstring)."""
    rows = []
    for a, b in pairs:
        both = boots.pair(a, b)
        if both is None:
            continue
        ba, bb = both
        common = [r for r in ba.rois if r in bb.rois]
        ja, jb = [ba.rois.index(r) for r in common], [bb.rois.index(r) for r in common]
        for metric in metrics:
            for statistic in compare.STATISTICS:
                if (metric, statistic) not in ba.observed or (metric, statistic) not in bb.observed:
                    continue
                key = (metric, statistic)
                d = compare.paired_difference(ba.observed[key][ja], bb.observed[key][jb], ba.draws[key][:, ja],
                                              bb.draws[key][:, jb], ba.jackknife[key][:, ja], bb.jackknife[key][:, jb],
                                              level, ba.interval)
                for k, roi in enumerate(common):
                    rows.append({"a": a, "b": b, "roi": roi, "metric": metric, "statistic": statistic,
                                 "n_voxels": ba.n_voxels[ja[k]], "value_a": float(d["a"][k]), "value_b": float(d["b"][k]),
                                 "diff": float(d["diff"][k]), "ci_low": float(d["ci_low"][k]),
                                 "ci_high": float(d["ci_high"][k]), "p": float(d["p"][k])})
    _add_fdr(rows)
    return rows


def compare_subjects(runs: Sequence[RunDir], boots: Bootstraps, metrics: Sequence[str], rois: Sequence[str],
                     level: float) -> list[dict]:
    """Models (backbone, layers, head, dataset) seen on ≥ 2 subjects: for every two models of the same head and
    dataset, per ROI, metric and statistic, the per-subject difference of the observed ROI summaries and a
    t-test across the subjects both have: {"a", "b" (model names), "head", "dataset", "subjects", "roi",
    "metric", "statistic", "n", "diff", "ci_low", "ci_high", "t", "p", "q"}."""
    labels = model_labels(runs)
    models: dict[tuple, dict[str, RunDir]] = {}
    for run in runs:
        models.setdefault(model_key(run), {}).setdefault(str(run.subject), run)
    names = [ALL_VOXELS, *rois]
    rows = []
    for ka, kb in combinations([k for k, subj in models.items() if len(subj) >= 2], 2):
        if ka[2:] != kb[2:]:  # another head or dataset
            continue
        subjects = sorted(set(models[ka]) & set(models[kb]))
        if len(subjects) < 2:
            continue
        pairs = [(boots.of(models[ka][s]), boots.of(models[kb][s])) for s in subjects]
        pairs = [(ba, bb) for ba, bb in pairs if ba is not None and bb is not None]
        if len(pairs) < 2:
            continue
        for metric in metrics:
            for statistic in compare.STATISTICS:
                d = np.array([[ba.value(metric, statistic, r) - bb.value(metric, statistic, r) if (metric, statistic)
                               in ba.observed and (metric, statistic) in bb.observed else np.nan for r in names]
                              for ba, bb in pairs])
                res = compare.across_subjects(d, level)
                for k, roi in enumerate(names):
                    if res["n"][k] < 2:
                        continue
                    rows.append({"a": labels[models[ka][subjects[0]].name], "b": labels[models[kb][subjects[0]].name],
                                 "head": ka[2], "dataset": ka[3], "subjects": subjects, "roi": roi, "metric": metric,
                                 "statistic": statistic, **{key: float(res[key][k]) for key in
                                                            ("n", "diff", "ci_low", "ci_high", "t", "p")}})
    _add_fdr(rows)
    return rows


def encoder_table(runs: Sequence[RunDir], boots: Bootstraps, split: str, metric: str, rois: Sequence[str],
                  level: float) -> list[dict]:
    """Per dataset: {"dataset", "metric", "rois" (ALL_VOXELS first), "rows": [{"model", "runs", "n_subjects",
    "cells": [{"value", "ci_low", "ci_high", "best"}, ...]}] sorted by the all-voxels value, best first, "ci"
    (how the CI was made)}. One subject: the run's ROI mean and its bootstrap CI over test stimuli; several: the
    mean over subjects of the per-subject ROI means with a t interval across subjects."""
    labels = model_labels(runs)
    names = [ALL_VOXELS, *rois]
    tables = []
    for dataset in dict.fromkeys(run.dataset for run in runs):
        members = [run for run in runs if run.dataset == dataset]
        by_model: dict[str, list[RunDir]] = {}
        for run in members:
            by_model.setdefault(labels[run.name], []).append(run)
        rows = []
        for model, model_runs in by_model.items():
            subjects: dict[str, RunDir] = {}
            for run in model_runs:
                subjects.setdefault(str(run.subject), run)
            per_subject = np.array([[boots.of(run).value(metric, "mean", r) if boots.of(run) is not None
                                     else run_roi_mean(run, split, metric, r) for r in names] for run in subjects.values()])
            if len(subjects) == 1:
                run = next(iter(subjects.values()))
                boot = boots.of(run)
                cis = [boot.ci(metric, "mean", r, level) if boot is not None else (np.nan, np.nan) for r in names]
                values = per_subject[0]
            else:
                res = compare.across_subjects(per_subject, level)
                values, cis = res["diff"], list(zip(res["ci_low"], res["ci_high"]))
            rows.append({"model": model, "runs": [r.name for r in model_runs], "n_subjects": len(subjects),
                         "cells": [{"value": float(v), "ci_low": float(lo), "ci_high": float(hi), "best": False}
                                   for v, (lo, hi) in zip(values, cis)]})
        rows.sort(key=lambda row: -np.nan_to_num(row["cells"][0]["value"], nan=-np.inf))
        best = compare.best_per_column(np.array([[c["value"] for c in row["cells"]] for row in rows]))
        for j, i in enumerate(best):
            if i >= 0:
                rows[i]["cells"][j]["best"] = True
        kinds = {row["n_subjects"] > 1 for row in rows}
        across = "t interval across subjects of the per-subject ROI means"
        within = f"{'BCa' if boots.args[-1] == 'bca' else 'percentile'} bootstrap over the test stimuli"
        tables.append({"dataset": dataset, "metric": metric, "rois": names, "rows": rows,
                       "ci": across if kinds == {True} else within if kinds == {False} else
                       f"{across} (rows with several subjects); {within} (rows with one)"})
    return tables


def run_roi_mean(run: RunDir, split: str, metric: str, roi: str) -> float:
    """An ROI's mean per-voxel score from voxel_metrics.npz (runs without predictions.npz)."""
    values = run.voxels().get(split, metric)
    if values is None:
        return float("nan")
    mask = np.ones(len(values), bool) if roi == ALL_VOXELS else run.rois().get(roi)
    if mask is None:
        return float("nan")
    x = values[mask]
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")
