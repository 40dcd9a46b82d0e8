"""A sweep's report: every run compared, per ROI, with paired tests between backbones.

``build_report(sweep_dir)`` reads the run directories below ``sweep_dir`` (see README, "The run
directory") and writes ``report.html`` with its PNG figures beside it (default ``<sweep_dir>/report/``):
a table of every run (and of failed jobs), per-ROI bar charts of a per-voxel accuracy (default the
noise-normalised R²) per backbone with ±1 SE over the ROI's voxels, paired tests between backbones
per ROI, voxel-wise scatters of one backbone against another, and learning curves from the runs'
CSV logs. The page has no external resources and opens from file:// without a server.

Comparisons are made within a *comparison group*: runs with the same head, dataset and subject.
Every two runs of a group with different backbones form a pair; its per-ROI test is paired over
the voxels both runs scored (matched by voxel coordinates).
"""
from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from scipy import stats

from encoders.run_dir import RunDir, find_failed, find_runs

METRICS = ("nc_r2", "r", "r2")
METRIC_LABELS = {"nc_r2": "noise-normalised R² (R²/NC)", "r": "Pearson r", "r2": "R²"}
TESTS = ("ttest_rel", "wilcoxon")
ALL_VOXELS = "all voxels"


def load_runs(directory: str | Path) -> list[RunDir]:
    """Every run at or below ``directory``, named by its path relative to ``directory``."""
    return find_runs(directory)


def comparison_group(run: RunDir) -> tuple[str, str, str]:
    """The comparison group of a run: (head, dataset, subject)."""
    return run.head, run.dataset, str(run.subject)


def failed_jobs(directory: str | Path) -> list[dict]:
    """Sweep jobs that failed (``find_failed``), as {"name", "dir", "error", "type", "overrides",
    "traceback"} with ``name`` relative to ``directory``."""
    directory = Path(directory)
    return [{"name": str(job["dir"].relative_to(directory)), "dir": job["dir"],
             "error": str(job.get("error", "?")), "type": str(job.get("type", "?")),
             "overrides": [str(o) for o in job.get("overrides", [])], "traceback": str(job.get("traceback", ""))}
            for job in find_failed(directory)]


def roi_mean_se(values: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, tuple[float, float, int]]:
    """Mean and standard error over the finite voxels of each ROI.

    values: (n_voxels,); masks: name -> bool (n_voxels,). Returns name -> (mean, SE, n) with
    SE = SD(ddof=1)/sqrt(n) over the ROI's voxels (NaN when n < 2), the key ALL_VOXELS first.
    """
    values = np.asarray(values, dtype=np.float64)
    out = {}
    for name, mask in {ALL_VOXELS: np.ones(len(values), bool), **masks}.items():
        x = values[np.asarray(mask, bool)]
        x = x[np.isfinite(x)]
        mean = float(x.mean()) if x.size else float("nan")
        se = float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("nan")
        out[name] = (mean, se, int(x.size))
    return out


def common_voxels(xyz_a: np.ndarray, xyz_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices (ia, ib) of the voxels two runs share, matched by coordinates: xyz (n, 3) each."""
    xyz_a, xyz_b = np.asarray(xyz_a), np.asarray(xyz_b)
    if xyz_a.shape == xyz_b.shape and np.array_equal(xyz_a, xyz_b):
        return np.arange(len(xyz_a)), np.arange(len(xyz_b))
    dtype = np.result_type(xyz_a, xyz_b)

    def rows(x):
        x = np.ascontiguousarray(x, dtype=dtype)
        return x.view([("", dtype)] * x.shape[1]).ravel()

    _, ia, ib = np.intersect1d(rows(xyz_a), rows(xyz_b), assume_unique=True, return_indices=True)
    return ia, ib


def paired_test(a: np.ndarray, b: np.ndarray, test: str = "ttest_rel") -> dict:
    """Paired test of a vs b over voxels (both (n,)); voxels non-finite in either are dropped.

    Returns {"n", "mean_a", "mean_b", "diff", "stat", "p"}: diff = mean(a − b); stat is t
    (scipy.stats.ttest_rel) or the signed-rank W (scipy.stats.wilcoxon); two-sided p.
    """
    if test not in TESTS:
        raise ValueError(f"analysis.test must be one of {TESTS}, got {test!r}")
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    out = {"n": int(a.size), "mean_a": float(a.mean()) if a.size else float("nan"),
           "mean_b": float(b.mean()) if b.size else float("nan"),
           "diff": float((a - b).mean()) if a.size else float("nan"), "stat": float("nan"), "p": float("nan")}
    if a.size < 2 or not np.any(a != b):
        return out
    result = stats.ttest_rel(a, b) if test == "ttest_rel" else stats.wilcoxon(a, b)
    out.update(stat=float(result.statistic), p=float(result.pvalue))
    return out


def comparison_groups(runs: Sequence[RunDir]) -> dict[tuple[str, str, str], list[RunDir]]:
    """Runs by (head, dataset, subject), in first-seen order."""
    groups: dict[tuple[str, str, str], list[RunDir]] = {}
    for run in runs:
        groups.setdefault(comparison_group(run), []).append(run)
    return groups


def backbone_pairs(group: Sequence[RunDir]) -> list[tuple[RunDir, RunDir]]:
    """Every two runs of a comparison group whose backbones differ, in run order."""
    return [(a, b) for a, b in combinations(group, 2) if a.backbone != b.backbone]


def pair_tests(run_a: RunDir, run_b: RunDir, split: str, metric: str, rois: Sequence[str],
               test: str = "ttest_rel") -> list[dict]:
    """Per-ROI paired tests of run_a vs run_b (ALL_VOXELS first) with Benjamini–Hochberg q over
    the ROIs of this pair (scipy.stats.false_discovery_control). ROI masks are run_a's."""
    ia, ib = common_voxels(run_a.voxel_xyz, run_b.voxel_xyz)
    a, b = run_a.voxels().values(split, metric)[ia], run_b.voxels().values(split, metric)[ib]
    masks = run_a.rois()
    rows = []
    for name in [ALL_VOXELS, *rois]:
        if name != ALL_VOXELS and name not in masks:
            continue
        sel = np.ones(len(ia), bool) if name == ALL_VOXELS else masks[name][ia]
        rows.append({"roi": name, **paired_test(a[sel], b[sel], test)})
    p = np.array([r["p"] for r in rows])
    q = np.full(len(rows), np.nan)
    finite = np.isfinite(p)
    if finite.any():
        q[finite] = stats.false_discovery_control(p[finite])
    for row, qi in zip(rows, q):
        row["q"] = float(qi)
    return rows


def learning_curve(run: RunDir | Path) -> dict[str, np.ndarray] | None:
    """Per-epoch curves from the run's Lightning CSV log (csv/metrics.csv), or None without one.

    Returns {"epoch": (e,), "train/loss": (e,), "val/loss": (e,), "val/r_mean": (e,)}, NaN where an
    epoch did not log a key. Closed-form heads log one validation row (a single "epoch").
    """
    path = (run if isinstance(run, RunDir) else RunDir(run)).csv_log
    if not path.exists():
        return None
    keys = ("train/loss", "val/loss", "val/r_mean")
    per_epoch: dict[int, dict[str, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("epoch"):
                continue
            entry = per_epoch.setdefault(int(float(row["epoch"])), {})
            for key in keys:
                if row.get(key) not in (None, ""):
                    entry[key] = float(row[key])
    epochs = sorted(e for e, v in per_epoch.items() if v)
    if not epochs:
        return None
    out = {"epoch": np.array(epochs)}
    for key in keys:
        out[key] = np.array([per_epoch[e].get(key, np.nan) for e in epochs])
    return out


@dataclass
class Report:
    """What build_report wrote and computed (for callers, the W&B dashboard and tests)."""

    html: Path
    directory: Path                # the sweep (or run) directory reported on
    out_dir: Path
    runs: list[RunDir]
    failed: list[dict]
    figures: list[dict]            # {"path", "title", "caption", "section"}
    roi_stats: dict[str, dict]     # run name -> ROI -> (mean, SE, n)
    tests: list[dict]              # per pair: {"group", "a", "b", "rows"}
    rois: list[str]
    split: str
    metric: str


def progress_bar(enabled: bool = True) -> Progress:
    """A rich progress bar (step counts, elapsed time) shown on a terminal only, so logs stay clean."""
    console = Console()
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    return Progress(*columns, console=console, transient=True, disable=not enabled or not console.is_terminal)


def report_rois(runs: Sequence[RunDir], split: str, rois: Sequence[str] | None) -> list[str]:
    """The ROIs to report: the given list, or every ROI any run's metrics.json lists (first-seen order)."""
    if rois:
        return list(rois)
    names: list[str] = []
    for run in runs:
        names += [n for n in run.metrics.get(split, {}).get("rois", {}) if n not in names]
    return names


def choose_scatter_pair(group: Sequence[RunDir], backbones: Sequence[str] | None) -> tuple[RunDir, RunDir] | None:
    """The pair to scatter in a group: the runs of ``backbones`` [x, y] if both are there, else the
    first two runs with different backbones; None when the group has a single backbone."""
    if backbones:
        if len(backbones) != 2 or backbones[0] == backbones[1]:
            raise ValueError(f"analysis.scatter must name two different backbones, got {list(backbones)}")
        by_name = {}
        for run in group:
            by_name.setdefault(run.backbone, run)
        if all(b in by_name for b in backbones):
            return by_name[backbones[0]], by_name[backbones[1]]
    pairs = backbone_pairs(group)
    return pairs[0] if pairs else None


def group_title(group: tuple[str, str, str]) -> str:
    head, dataset, subject = group
    return f"head {head} · {dataset} subject {subject}"


def _slug(*parts: str) -> str:
    text = "_".join(parts)
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text)


def build_report(directory: str | Path, out_dir: str | Path | None = None, split: str = "test",
                 metric: str = "nc_r2", rois: Sequence[str] | None = None,
                 scatter: Sequence[str] | None = None, test: str = "ttest_rel",
                 progress: bool = True) -> Report:
    """Write ``report.html`` and its figures for the runs at or below ``directory``.

    out_dir defaults to ``<directory>/report``; metric is the per-voxel accuracy compared
    (nc_r2, r or r2 from voxel_metrics.npz); rois defaults to every ROI the runs report; scatter
    names the two backbones to plot against each other (default: the first two of each group);
    test is ttest_rel or wilcoxon. Raises FileNotFoundError when there is neither a run nor a failed job.
    """
    from analyses.jobs import report_figures, report_html

    directory = Path(directory)
    if metric not in METRICS:
        raise ValueError(f"analysis.metric must be one of {METRICS}, got {metric!r}")
    if test not in TESTS:
        raise ValueError(f"analysis.test must be one of {TESTS}, got {test!r}")
    if scatter and (len(scatter) != 2 or scatter[0] == scatter[1]):
        raise ValueError(f"analysis.scatter must name two different backbones, got {list(scatter)}")
    runs, failed = load_runs(directory), failed_jobs(directory)
    if not runs and not failed:
        raise FileNotFoundError(f"{directory}: no run directories (with metrics.json) or failed jobs found")
    if missing := [r.name for r in runs if split not in r.metrics]:
        raise ValueError(f"analysis.split: '{split}' is not in metrics.json of {', '.join(missing)} "
                         f"(it has: {', '.join(runs[0].metrics)})")
    roi_names = report_rois(runs, split, rois)
    known = set(report_rois(runs, split, None))
    if rois and runs and (unknown := [n for n in rois if n not in known]):
        raise ValueError(f"analysis.rois: {', '.join(unknown)} not in any run's metrics.json "
                         f"(the runs have: {', '.join(sorted(known))})")
    out_dir = Path(out_dir) if out_dir else directory / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = comparison_groups(runs)
    pairs = [(g, a, b) for g, members in groups.items() for a, b in backbone_pairs(members)]
    figures: list[dict] = []
    roi_stats: dict[str, dict] = {}
    tests: list[dict] = []
    with progress_bar(progress) as bar:
        task = bar.add_task("report: runs", total=len(runs))
        for run in runs:
            roi_stats[run.name] = roi_mean_se(run.voxels().values(split, metric),
                                              {n: m for n, m in run.rois().items() if n in roi_names})
            bar.advance(task)
        task = bar.add_task("report: paired tests", total=len(pairs))
        for group, a, b in pairs:
            tests.append({"group": group, "a": a, "b": b, "rows": pair_tests(a, b, split, metric, roi_names, test)})
            bar.advance(task)
        task = bar.add_task("report: figures", total=2 * len(groups) + 1)
        for group, members in groups.items():
            path = out_dir / f"roi_{metric}_{_slug(*group)}.png"
            report_figures.roi_bar_chart(
                [run.backbone if sum(r.backbone == run.backbone for r in members) == 1 else f"{run.backbone} ({run.name})"
                 for run in members],
                [ALL_VOXELS] + [n for n in roi_names if any(n in roi_stats[r.name] for r in members)],
                [roi_stats[run.name] for run in members], METRIC_LABELS[metric],
                f"{split} {METRIC_LABELS[metric]} per ROI — {group_title(group)}", path)
            figures.append({"path": path, "section": "roi", "title": group_title(group),
                            "caption": f"Mean {split} {METRIC_LABELS[metric]} over each ROI's voxels, one bar per "
                                       "run; error bars ±1 standard error over the ROI's voxels."})
            bar.advance(task)
            pair = choose_scatter_pair(members, scatter)
            if pair is not None:
                a, b = pair
                ia, ib = common_voxels(a.voxel_xyz, b.voxel_xyz)
                nc_key = f"{split}_nc"
                nc = a.voxels()[nc_key][ia] if nc_key in a.voxels() else None
                path = out_dir / f"scatter_{metric}_{_slug(a.backbone, 'vs', b.backbone, *group)}.png"
                report_figures.voxel_scatter(
                    a.voxels().values(split, metric)[ia], b.voxels().values(split, metric)[ib], nc,
                    f"{a.backbone} ({a.name})", f"{b.backbone} ({b.name})", METRIC_LABELS[metric],
                    f"{a.backbone} vs {b.backbone} — {group_title(group)}", path)
                figures.append({"path": path, "section": "scatter", "title": f"{a.backbone} vs {b.backbone} — {group_title(group)}",
                                "caption": f"One point per voxel ({len(ia)} voxels both runs scored), {split} "
                                           f"{METRIC_LABELS[metric]}; colour: noise ceiling; dashed line: equal accuracy."})
            bar.advance(task)
        logged = {run.name: learning_curve(run) for run in runs}
        curves = {name: c for name, c in logged.items() if c is not None and len(c["epoch"]) > 1}
        if curves:
            path = out_dir / "learning_curves.png"
            report_figures.learning_curves(curves, path)
            figures.append({"path": path, "section": "curves", "title": "Learning curves",
                            "caption": "Per-epoch validation mean r and losses from each run's csv/metrics.csv "
                                       "(closed-form heads have no epochs and are not shown)."})
        bar.advance(task)
    html = report_html.render(directory=directory, out_dir=out_dir, runs=runs, failed=failed, figures=figures,
                              roi_stats=roi_stats, tests=tests, rois=roi_names, split=split,
                              metric_label=METRIC_LABELS[metric], test=test,
                              epochs={name: None if c is None else len(c["epoch"]) for name, c in logged.items()})
    path = out_dir / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, path)
    return Report(path, directory, out_dir, runs, failed, figures, roi_stats, tests, roi_names, split, metric)


def run_report(cfg, target: Path) -> Report:
    """analyze.py entry: build the report for ``target`` with ``cfg.analysis`` (conf/analysis/report.yaml),
    then log the runs to W&B when ``cfg.analysis.wandb`` is true."""
    a = cfg.analysis
    console = Console(soft_wrap=True)
    report = build_report(target, out_dir=a.get("out_dir"), split=a.get("split", "test"),
                          metric=a.get("metric", "nc_r2"), rois=list(a.rois) if a.get("rois") else None,
                          scatter=list(a.scatter) if a.get("scatter") else None, test=a.get("test", "ttest_rel"))
    console.print(f"wrote {report.html} ({len(report.runs)} runs, {len(report.failed)} failed jobs, "
                  f"{len(report.figures)} figures, {sum(len(t['rows']) for t in report.tests)} paired tests)")
    if a.get("wandb", False):
        from analyses.jobs.dashboard import log_report_to_wandb
        logged = log_report_to_wandb(report, project=a.get("wandb_project", "brainprobe"),
                                     wandb_dir=a.get("wandb_dir") or target)
        console.print(f"W&B ({logged.mode}): {len(logged.run_dirs)} runs under {logged.wandb_dir}"
                      + (f"; upload later with `wandb sync {logged.wandb_dir}/offline-run-*`" if logged.mode == "offline" else ""))
    return report
