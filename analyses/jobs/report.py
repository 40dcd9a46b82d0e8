"""``analyze.py analysis=report``: a sweep's report, every run compared per ROI with paired tests between backbones.

``build_report(sweep_dir)`` reads the run directories below ``sweep_dir`` and writes ``report.html`` with its
PNG figures beside it (default ``<sweep_dir>/report/``): a table of every run (and of failed jobs), per-ROI
bar charts of a per-voxel accuracy (default the noise-normalised R²) per backbone with ±1 SE over the ROI's
voxels, paired tests between backbones per ROI, voxel-wise scatters of one backbone against another, and
learning curves from the runs' CSV logs. The page has no external resources and opens from file:// without
a server. With ``wandb: true`` the runs and figures also go to W&B (``analyses.jobs.dashboard``).

Comparisons are made within a *comparison group*: runs with the same head, dataset and subject. Every two
runs of a group with different backbones form a pair; its per-ROI test is paired over the voxels both runs
scored (matched by voxel coordinates). The statistics are the methods' (``analyses.methods.stats``:
``roi_summary``, ``paired_test``, ``fdr_bh``; ``analyses.methods.voxels.common_voxels``).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
from rich.console import Console

from analyses.jobs.base import Job, JobOptions
from analyses.jobs.console import progress_bar
from analyses.methods.stats import PAIRED_TESTS, fdr_bh, paired_test, roi_summary
from analyses.methods.voxels import common_voxels
from encoders.run_dir import RunDir, find_failed, find_runs

METRICS = ("nc_r2", "r", "r2")
METRIC_LABELS = {"nc_r2": "noise-normalised R² (R²/NC)", "r": "Pearson r", "r2": "R²"}
TESTS = PAIRED_TESTS
ALL_VOXELS = "all voxels"


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
    """Mean, standard error and count over the finite voxels of each ROI (``stats.roi_summary``), the key
    ALL_VOXELS first: values (n_voxels,); masks: name -> bool (n_voxels,). Returns name -> (mean, SE, n)."""
    summary = roi_summary(values, {ALL_VOXELS: np.ones(len(values), bool), **masks})
    return {name: (s["mean"], s["se"], s["n"]) for name, s in summary.items()}


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
    """Per-ROI paired tests of run_a vs run_b (ALL_VOXELS first) with Benjamini–Hochberg q over the ROIs of
    this pair. ROI masks are run_a's."""
    ia, ib = common_voxels(run_a.voxel_xyz, run_b.voxel_xyz)
    a, b = run_a.voxels().values(split, metric)[ia], run_b.voxels().values(split, metric)[ib]
    masks = run_a.rois()
    rows = []
    for name in [ALL_VOXELS, *rois]:
        if name != ALL_VOXELS and name not in masks:
            continue
        sel = np.ones(len(ia), bool) if name == ALL_VOXELS else masks[name][ia]
        rows.append({"roi": name, **paired_test(a[sel], b[sel], test)})
    for row, q in zip(rows, fdr_bh(np.array([r["p"] for r in rows]))):
        row["q"] = float(q)
    return rows


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


@dataclass
class ReportOptions(JobOptions):
    """conf/analysis/report.yaml."""

    JOB = "report"
    split: str = "test"
    metric: str = "nc_r2"
    rois: list[str] | None = None
    scatter: list[str] | None = None
    test: str = "ttest_rel"
    out_dir: str | None = None
    wandb: bool = False
    wandb_project: str = "brainprobe"
    wandb_dir: str | None = None

    def check(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"analysis.metric must be one of {METRICS}, got {self.metric!r}")
        if self.test not in TESTS:
            raise ValueError(f"analysis.test must be one of {TESTS}, got {self.test!r}")
        if self.scatter and (len(self.scatter) != 2 or self.scatter[0] == self.scatter[1]):
            raise ValueError(f"analysis.scatter must name two different backbones, got {list(self.scatter)}")


@dataclass
class ReportData:
    """What the report computed, before anything is drawn."""

    directory: Path
    runs: list[RunDir]
    failed: list[dict]
    rois: list[str]
    groups: dict[tuple[str, str, str], list[RunDir]]
    roi_stats: dict[str, dict]     # run name -> ROI -> (mean, SE, n)
    tests: list[dict]              # per pair: {"group", "a", "b", "rows"}
    scatters: list[dict]           # per group with two backbones: {"group", "a", "b", "x", "y", "nc", "n"}
    curves: dict[str, dict | None]  # run name -> learning curve (None without a CSV log)


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


class ReportJob(Job):
    """The HTML report of every run below the target (scope: all runs at once)."""

    name = "report"
    Options = ReportOptions
    scope = "sweep"

    def __init__(self, options: ReportOptions | None = None, console: Console | None = None, progress: bool = True):
        super().__init__(options, console or Console(soft_wrap=True))  # its one-line results stay whole
        self.progress = progress

    def runs(self, target: Path) -> list[RunDir]:
        return find_runs(target)  # a sweep whose jobs all failed still gets a report of its failures

    def compute_all(self, runs: list[RunDir], target: Path) -> ReportData:
        o = self.options
        failed = failed_jobs(target)
        if not runs and not failed:
            raise FileNotFoundError(f"{target}: no run directories (with metrics.json) or failed jobs found")
        if missing := [r.name for r in runs if o.split not in r.metrics]:
            raise ValueError(f"analysis.split: '{o.split}' is not in metrics.json of {', '.join(missing)} "
                             f"(it has: {', '.join(runs[0].metrics)})")
        rois = report_rois(runs, o.split, o.rois)
        known = set(report_rois(runs, o.split, None))
        if o.rois and runs and (unknown := [n for n in o.rois if n not in known]):
            raise ValueError(f"analysis.rois: {', '.join(unknown)} not in any run's metrics.json "
                             f"(the runs have: {', '.join(sorted(known))})")
        groups = comparison_groups(runs)
        pairs = [(g, a, b) for g, members in groups.items() for a, b in backbone_pairs(members)]
        roi_stats, tests, scatters = {}, [], []
        with progress_bar(self.progress) as bar:
            task = bar.add_task("report: runs", total=len(runs))
            for run in runs:
                roi_stats[run.name] = roi_mean_se(run.voxels().values(o.split, o.metric),
                                                  {n: m for n, m in run.rois().items() if n in rois})
                bar.advance(task)
            task = bar.add_task("report: paired tests", total=len(pairs))
            for group, a, b in pairs:
                tests.append({"group": group, "a": a, "b": b, "rows": pair_tests(a, b, o.split, o.metric, rois, o.test)})
                bar.advance(task)
        for group, members in groups.items():
            pair = choose_scatter_pair(members, o.scatter)
            if pair is None:
                continue
            a, b = pair
            ia, ib = common_voxels(a.voxel_xyz, b.voxel_xyz)
            nc = a.voxels().get(o.split, "nc")
            scatters.append({"group": group, "a": a, "b": b, "x": a.voxels().values(o.split, o.metric)[ia],
                             "y": b.voxels().values(o.split, o.metric)[ib], "nc": None if nc is None else nc[ia],
                             "n": len(ia)})
        curves = {run.name: run.learning_curve() for run in runs}
        return ReportData(target, runs, failed, rois, groups, roi_stats, tests, scatters, curves)

    def report_dir(self, target: Path) -> Path:
        return Path(self.options.out_dir) if self.options.out_dir else target / "report"

    def write_all(self, data: ReportData, target: Path) -> Report:
        """Draw the figures and write report.html (figures and page only; every number comes from ``data``)."""
        from analyses.jobs import report_figures, report_html

        o = self.options
        out_dir = self.report_dir(target)
        out_dir.mkdir(parents=True, exist_ok=True)
        label = METRIC_LABELS[o.metric]
        figures: list[dict] = []
        scatters = {s["group"]: s for s in data.scatters}
        with progress_bar(self.progress) as bar:
            task = bar.add_task("report: figures", total=2 * len(data.groups) + 1)
            for group, members in data.groups.items():
                path = out_dir / f"roi_{o.metric}_{_slug(*group)}.png"
                report_figures.roi_bar_chart(
                    [run.backbone if sum(r.backbone == run.backbone for r in members) == 1 else f"{run.backbone} ({run.name})"
                     for run in members],
                    [ALL_VOXELS] + [n for n in data.rois if any(n in data.roi_stats[r.name] for r in members)],
                    [data.roi_stats[run.name] for run in members], label,
                    f"{o.split} {label} per ROI — {group_title(group)}", path)
                figures.append({"path": path, "section": "roi", "title": group_title(group),
                                "caption": f"Mean {o.split} {label} over each ROI's voxels, one bar per "
                                           "run; error bars ±1 standard error over the ROI's voxels."})
                bar.advance(task)
                s = scatters.get(group)
                if s is not None:
                    a, b = s["a"], s["b"]
                    path = out_dir / f"scatter_{o.metric}_{_slug(a.backbone, 'vs', b.backbone, *group)}.png"
                    report_figures.voxel_scatter(s["x"], s["y"], s["nc"], f"{a.backbone} ({a.name})",
                                                 f"{b.backbone} ({b.name})", label,
                                                 f"{a.backbone} vs {b.backbone} — {group_title(group)}", path)
                    figures.append({"path": path, "section": "scatter",
                                    "title": f"{a.backbone} vs {b.backbone} — {group_title(group)}",
                                    "caption": f"One point per voxel ({s['n']} voxels both runs scored), {o.split} "
                                               f"{label}; colour: noise ceiling; dashed line: equal accuracy."})
                bar.advance(task)
            curves = {name: c for name, c in data.curves.items() if c is not None and len(c["epoch"]) > 1}
            if curves:
                path = out_dir / "learning_curves.png"
                report_figures.learning_curves(curves, path)
                figures.append({"path": path, "section": "curves", "title": "Learning curves",
                                "caption": "Per-epoch validation mean r and losses from each run's csv/metrics.csv "
                                           "(closed-form heads have no epochs and are not shown)."})
            bar.advance(task)
        html = report_html.render(directory=data.directory, out_dir=out_dir, runs=data.runs, failed=data.failed,
                                  figures=figures, roi_stats=data.roi_stats, tests=data.tests, rois=data.rois,
                                  split=o.split, metric_label=label, test=o.test,
                                  epochs={name: None if c is None else len(c["epoch"]) for name, c in data.curves.items()})
        path = out_dir / "report.html"
        tmp = path.with_suffix(".html.tmp")
        tmp.write_text(html, encoding="utf-8")
        os.replace(tmp, path)
        report = Report(path, data.directory, out_dir, data.runs, data.failed, figures, data.roi_stats, data.tests,
                        data.rois, o.split, o.metric)
        if o.wandb:
            from analyses.jobs.dashboard import log_report_to_wandb

            self.logged = log_report_to_wandb(report, project=o.wandb_project, wandb_dir=o.wandb_dir or target)
        return report

    def show_all(self, data: ReportData, report: Report) -> None:
        self.console.print(f"wrote {report.html} ({len(report.runs)} runs, {len(report.failed)} failed jobs, "
                           f"{len(report.figures)} figures, {sum(len(t['rows']) for t in report.tests)} paired tests)")
        logged = getattr(self, "logged", None)
        if logged is not None:
            self.console.print(f"W&B ({logged.mode}): {len(logged.run_dirs)} runs under {logged.wandb_dir} "
                               f"({len(logged.run_dirs) - 1} new encoder runs, {len(logged.referenced)} referred to)")
            self.notes(logged.notes)
            if logged.sync:
                self.console.print(f"upload with: {logged.sync}")


def build_report(directory: str | Path, out_dir: str | Path | None = None, split: str = "test",
                 metric: str = "nc_r2", rois: Sequence[str] | None = None,
                 scatter: Sequence[str] | None = None, test: str = "ttest_rel",
                 progress: bool = True) -> Report:
    """Write ``report.html`` and its figures for the runs at or below ``directory`` (library use).

    out_dir defaults to ``<directory>/report``; metric is the per-voxel accuracy compared
    (nc_r2, r or r2 from voxel_metrics.npz); rois defaults to every ROI the runs report; scatter
    names the two backbones to plot against each other (default: the first two of each group);
    test is ttest_rel or wilcoxon. Raises FileNotFoundError when there is neither a run nor a failed job.
    """
    options = ReportOptions(split=split, metric=metric, rois=list(rois) if rois else None,
                            scatter=list(scatter) if scatter else None, test=test,
                            out_dir=str(out_dir) if out_dir else None)
    options.check()
    job = ReportJob(options, progress=progress)
    directory = Path(directory)
    return job.write_all(job.compute_all(job.runs(directory), directory), directory)
