"""``analyze.py analysis=report``: a sweep's report — every run, the encoders compared per ROI over test stimuli,
the sweep's encoder × ROI table, brain maps.

``build_report(sweep_dir)`` reads the run directories below ``sweep_dir`` and writes ``report.html`` with its
figures and tables beside it (default ``<sweep_dir>/report/``): a table of every run (and of failed jobs); the
encoder × ROI table of the metric (default NC-R²) with 95 % CIs, the best encoder per ROI marked
(``encoder_table_<dataset>.csv/.md``); per-ROI bar charts whose error bars are bootstrap CIs over the test stimuli;
paired comparisons between encoders per ROI — the difference of the ROI mean and median of r and of the metric
with a CI and p from a paired bootstrap over test stimuli, Benjamini–Hochberg q over the ROI × pair family
(``comparisons.csv``) — and, with ≥ 2 subjects, a t-test across subjects (``subject_comparisons.csv``); brain
maps of every run and of the difference between the two encoders of each group, in the dataset's own space;
voxel-wise scatters; learning curves. The page has no external resources and opens from file:// without a server.
With ``wandb: true`` the runs, figures and tables also go to W&B (``analyses.jobs.dashboard``).

Comparisons are made within a *comparison group*: runs with the same head, dataset and subject
(``analyses.jobs.encoder_pairs``). The statistics are the methods' (``analyses.methods.stats``:
``resample_counts``, ``bootstrap_scores``, ``fdr_bh``; ``analyses.methods.compare``), run by
``analyses.jobs.report_compare``.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console

from analyses.jobs.base import Job, JobOptions
from analyses.jobs.console import progress_bar, table
from analyses.jobs.encoder_pairs import comparison_groups, encoder_labels, encoder_pairs
from analyses.jobs.outputs import write_csv
from analyses.jobs.report_compare import ALL_VOXELS, Bootstraps, compare_pairs, compare_subjects, encoder_table
from analyses.jobs.report_html import cell_text
from analyses.methods.stats import roi_summary
from analyses.methods.voxels import common_voxels
from encoders.run_dir import RunDir, find_failed, find_runs

METRICS = ("nc_r2", "r", "r2")
METRIC_LABELS = {"nc_r2": "noise-normalised R² (R²/NC)", "r": "Pearson r", "r2": "R²"}
SHORT_LABELS = {"nc_r2": "NC-R²", "r": "r", "r2": "R²"}
INTERVAL_NAMES = {"bca": "BCa", "percentile": "percentile"}

__all__ = ["ALL_VOXELS", "build_report", "ReportJob", "ReportOptions", "Report"]


def failed_jobs(directory: str | Path) -> list[dict]:
    """Sweep jobs that failed (``find_failed``), as {"name", "dir", "error", "type", "overrides",
    "traceback"} with ``name`` relative to ``directory``."""
    directory = Path(directory)
    return [{"name": str(job["dir"].relative_to(directory)), "dir": job["dir"],
             "error": str(job.get("error", "?")), "type": str(job.get("type", "?")),
             "overrides": [str(o) for o in job.get("overrides", [])], "traceback": str(job.get("traceback", ""))}
            for job in find_failed(directory)]


def roi_mean_se(values: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, tuple[float, float, int]]:
    """Mean, standard error over voxels and count of the finite voxels of each ROI (``stats.roi_summary``; a
    description of the map, not an inference), the key ALL_VOXELS first: values (n_voxels,); masks: name -> bool
    (n_voxels,). Returns name -> (mean, SE, n)."""
    summary = roi_summary(values, {ALL_VOXELS: np.ones(len(values), bool), **masks})
    return {name: (s["mean"], s["se"], s["n"]) for name, s in summary.items()}


def report_rois(runs: Sequence[RunDir], split: str, rois: Sequence[str] | None) -> list[str]:
    """The ROIs to report: the given list, or every ROI any run's metrics.json lists (first-seen order)."""
    if rois:
        return list(rois)
    names: list[str] = []
    for run in runs:
        names += [n for n in run.metrics.get(split, {}).get("rois", {}) if n not in names]
    return names


def choose_scatter_pair(group: Sequence[RunDir], backbones: Sequence[str] | None) -> tuple[RunDir, RunDir] | None:
    """The pair to scatter (and map the difference of) in a group: the runs of ``backbones`` [x, y] if both are
    there, else the first two runs with different encoders; None when the group has a single encoder."""
    if backbones:
        if len(backbones) != 2 or backbones[0] == backbones[1]:
            raise ValueError(f"analysis.scatter must name two different backbones, got {list(backbones)}")
        by_name = {}
        for run in group:
            by_name.setdefault(run.backbone, run)
        if all(b in by_name for b in backbones):
            return by_name[backbones[0]], by_name[backbones[1]]
    pairs = encoder_pairs(group)
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
    n_boot: int = 1000
    seed: int = 0
    ci: float = 0.95
    block: int = 20
    interval: str = "bca"
    maps: bool = True
    surfaces: dict | None = None
    background: str = "auto"
    out_dir: str | None = None
    wandb: bool = False
    wandb_project: str = "brainprobe"
    wandb_dir: str | None = None

    def check(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"analysis.metric must be one of {METRICS}, got {self.metric!r}")
        if self.scatter and (len(self.scatter) != 2 or self.scatter[0] == self.scatter[1]):
            raise ValueError(f"analysis.scatter must name two different backbones, got {list(self.scatter)}")
        if int(self.n_boot) < 100:
            raise ValueError(f"analysis.n_boot must be >= 100 (resamples of the test stimuli), got {self.n_boot}")
        if not 0.5 <= float(self.ci) < 1:
            raise ValueError(f"analysis.ci must lie in [0.5, 1), got {self.ci}")
        if self.interval not in ("bca", "percentile"):
            raise ValueError(f"analysis.interval must be bca or percentile, got {self.interval!r}")
        if int(self.block) < 1:
            raise ValueError(f"analysis.block must be >= 1 (TRs per resampled block), got {self.block}")

    @property
    def compared_metrics(self) -> list[str]:
        """The metrics compared between encoders: the report's metric, then r (and NC-R²)."""
        return list(dict.fromkeys([self.metric, "r", "nc_r2"]))


@dataclass
class ReportData:
    """What the report computed, before anything is drawn."""

    directory: Path
    runs: list[RunDir]
    failed: list[dict]
    rois: list[str]
    groups: dict[tuple[str, str, str], list[RunDir]]
    roi_stats: dict[str, dict]     # run name -> ROI -> (mean, SE over voxels, n)
    roi_ci: dict[str, dict]        # run name -> ROI -> (low, high): bootstrap CI over test stimuli of the ROI mean
    comparisons: list[dict]        # compare_pairs rows
    subject_tests: list[dict]      # compare_subjects rows
    tables: list[dict]             # encoder_table per dataset
    resampling: dict               # unit, n_units, n_boot, seed, ci
    scatters: list[dict]           # per group with two encoders: {"group", "a", "b", "x", "y", "nc", "n"}
    curves: dict[str, dict | None]  # run name -> learning curve (None without a CSV log)
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    """What build_report wrote and computed (for callers, the W&B dashboard and tests)."""

    html: Path
    directory: Path                # the sweep (or run) directory reported on
    out_dir: Path
    runs: list[RunDir]
    failed: list[dict]
    figures: list[dict]            # {"path", "title", "caption", "section"}
    roi_stats: dict[str, dict]     # run name -> ROI -> (mean, SE over voxels, n)
    roi_ci: dict[str, dict]        # run name -> ROI -> (low, high), bootstrap over test stimuli
    comparisons: list[dict]
    subject_tests: list[dict]
    encoder_tables: list[dict]
    tables: list[Path]             # the CSV tables written (comparisons, encoder tables, ...)
    resampling: dict
    rois: list[str]
    split: str
    metric: str
    notes: list[str] = field(default_factory=list)


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
        pairs = [(a, b) for members in groups.values() for a, b in encoder_pairs(members)]
        boots = Bootstraps(o.split, o.compared_metrics, rois, o.n_boot, o.seed, o.block, o.interval)
        roi_stats, roi_ci = {}, {}
        with progress_bar(self.progress) as bar:
            task = bar.add_task("report: bootstrap per run", total=len(runs))
            for run in runs:
                roi_stats[run.name] = roi_mean_se(run.voxels().values(o.split, o.metric),
                                                  {n: m for n, m in run.rois().items() if n in rois})
                boot = boots.of(run)
                roi_ci[run.name] = {} if boot is None else {r: boot.ci(o.metric, "mean", r, o.ci) for r in boot.rois}
                bar.advance(task)
            task = bar.add_task("report: paired comparisons", total=1)
            comparisons = compare_pairs(pairs, boots, o.compared_metrics, o.ci)
            subject_tests = compare_subjects(runs, boots, o.compared_metrics, rois, o.ci)
            tables = encoder_table(runs, boots, o.split, o.metric, rois, o.ci)
            bar.advance(task)
        done = [b for b in boots.runs.values() if b is not None]
        units = sorted({(b.unit, b.n_units) for b in done})
        resampling = {"unit": "; ".join(f"{u} (n = {n})" for u, n in units) or "—", "n_boot": o.n_boot, "seed": o.seed,
                      "ci": o.ci, "interval": o.interval, "time_series": any(b.run.is_time_series for b in done)}
        scatters = []
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
        return ReportData(target, runs, failed, rois, groups, roi_stats, roi_ci, comparisons, subject_tests, tables,
                          resampling, scatters, curves, list(boots.notes))

    def report_dir(self, target: Path) -> Path:
        return Path(self.options.out_dir) if self.options.out_dir else target / "report"

    def write_all(self, data: ReportData, target: Path) -> Report:
        """Draw the figures, write the tables and report.html (every number comes from ``data``)."""
        from analyses.jobs import report_figures, report_html

        o = self.options
        out_dir = self.report_dir(target)
        out_dir.mkdir(parents=True, exist_ok=True)
        label = METRIC_LABELS[o.metric]
        figures: list[dict] = []
        notes = list(data.notes)
        scatters = {s["group"]: s for s in data.scatters}
        names = encoder_labels(data.runs)
        with progress_bar(self.progress) as bar:
            task = bar.add_task("report: figures", total=2 * len(data.groups) + len(data.runs) + 1)
            for group, members in data.groups.items():
                path = out_dir / f"roi_{o.metric}_{_slug(*group)}.png"
                report_figures.roi_bar_chart(
                    [names[run.name] if sum(names[r.name] == names[run.name] for r in members) == 1
                     else f"{names[run.name]} ({run.name})" for run in members],
                    [ALL_VOXELS] + [n for n in data.rois if any(n in data.roi_stats[r.name] for r in members)],
                    [{roi: (data.roi_stats[run.name][roi][0], *data.roi_ci[run.name].get(roi, (np.nan, np.nan)))
                      for roi in data.roi_stats[run.name]} for run in members], label,
                    f"{o.split} {label} per ROI — {group_title(group)}", path)
                figures.append({"path": path, "section": "roi", "title": group_title(group),
                                "caption": f"Mean {o.split} {label} over each ROI's voxels, one bar per run; error "
                                           f"bars: {o.ci:.0%} {INTERVAL_NAMES[o.interval]} bootstrap CI over the test stimuli "
                                           f"({data.resampling['unit']}; {o.n_boot} resamples)."})
                bar.advance(task)
                s = scatters.get(group)
                if s is not None:
                    a, b = s["a"], s["b"]
                    path = out_dir / f"scatter_{o.metric}_{_slug(a.backbone, 'vs', b.backbone, *group)}.png"
                    report_figures.voxel_scatter(s["x"], s["y"], s["nc"], f"{names[a.name]} ({a.name})",
                                                 f"{names[b.name]} ({b.name})", label,
                                                 f"{names[a.name]} vs {names[b.name]} — {group_title(group)}", path)
                    figures.append({"path": path, "section": "scatter",
                                    "title": f"{names[a.name]} vs {names[b.name]} — {group_title(group)}",
                                    "caption": f"One point per voxel ({s['n']} voxels both runs scored), {o.split} "
                                               f"{label}; colour: noise ceiling; dashed line: equal accuracy."})
                bar.advance(task)
            if o.maps:
                figures += self.map_figures(data, out_dir, notes, lambda: bar.advance(task))
            curves = {name: c for name, c in data.curves.items() if c is not None and len(c["epoch"]) > 1}
            if curves:
                path = out_dir / "learning_curves.png"
                report_figures.learning_curves(curves, path)
                figures.append({"path": path, "section": "curves", "title": "Learning curves",
                                "caption": "Per-epoch validation mean r and losses from each run's csv/metrics.csv "
                                           "(closed-form heads have no epochs and are not shown)."})
            bar.advance(task)
        tables = self.write_tables(data, out_dir)
        html = report_html.render(directory=data.directory, out_dir=out_dir, runs=data.runs, failed=data.failed,
                                  figures=figures, roi_stats=data.roi_stats, roi_ci=data.roi_ci,
                                  comparisons=data.comparisons, subject_tests=data.subject_tests,
                                  encoder_tables=data.tables, resampling=data.resampling, rois=data.rois,
                                  split=o.split, metric=o.metric, metric_label=label, short_labels=SHORT_LABELS,
                                  names=names, tables=tables, notes=notes,
                                  epochs={name: None if c is None else len(c["epoch"]) for name, c in data.curves.items()})
        path = out_dir / "report.html"
        tmp = path.with_suffix(".html.tmp")
        tmp.write_text(html, encoding="utf-8")
        os.replace(tmp, path)
        report = Report(path, data.directory, out_dir, data.runs, data.failed, figures, data.roi_stats, data.roi_ci,
                        data.comparisons, data.subject_tests, data.tables, tables, data.resampling, data.rois, o.split,
                        o.metric, notes)
        if o.wandb:
            from analyses.jobs.dashboard import log_report_to_wandb

            self.logged = log_report_to_wandb(report, project=o.wandb_project, wandb_dir=o.wandb_dir or target)
        return report

    def map_figures(self, data: ReportData, out_dir: Path, notes: list[str], advance) -> list[dict]:
        """Per run the brain map of the report's metric (the run's own ``maps/<split>_<metric>.png`` copied, else
        drawn), and per group the difference map of its scatter pair; in ``<out_dir>/maps/``."""
        from analyses.jobs.maps import difference_maps, draw, run_title
        from analyses.jobs.maps_figures import style_for

        o = self.options
        name = f"{o.split}_{o.metric}"
        folder = out_dir / "maps"
        folder.mkdir(exist_ok=True)
        figures = []
        spaces = {}
        for run in data.runs:
            path = folder / f"{_slug(run.name)}_{name}.png"
            own = run.maps_dir / f"{name}.png"
            try:
                if own.is_file():
                    shutil.copyfile(own, path)
                else:
                    spaces[run.name] = space = run.brain_space()
                    draw(space, {path.stem: run.voxels().values(o.split, o.metric)}, run.voxel_xyz, folder,
                         run_title(run), {path.stem: style_for(name)}, o.surfaces, o.background, run.rois())
            except (FileNotFoundError, ValueError) as err:
                notes.append(f"{run.name}: no brain map ({err})")
                advance()
                continue
            figures.append({"path": path, "section": "maps", "title": f"{run.backbone} ({run.name})",
                            "caption": f"{o.split} {METRIC_LABELS[o.metric]} of every voxel in the dataset's own "
                                       f"space (the file: {run.name}/maps/{name}.*)."})
            advance()
        for s in data.scatters:
            a, b = s["a"], s["b"]
            path = folder / f"diff_{_slug(a.name)}_minus_{_slug(b.name)}_{name}.png"
            try:
                space = spaces.get(a.name) or a.brain_space()
                if not space.same_grid(spaces.get(b.name) or b.brain_space()):
                    notes.append(f"{a.name} vs {b.name}: not in the same space; no difference map")
                    continue
                diff = difference_maps(a, b, o.split, [o.metric])[f"diff_{name}"]
                draw(space, {path.stem: diff}, a.voxel_xyz, folder,
                     f"{a.backbone} ({a.name}) − {b.backbone} ({b.name})", {path.stem: style_for(f"diff_{name}")},
                     o.surfaces, o.background, a.rois())
            except (FileNotFoundError, ValueError) as err:
                notes.append(f"{a.name} vs {b.name}: no difference map ({err})")
                continue
            figures.append({"path": path, "section": "maps", "title": f"{a.backbone} − {b.backbone} ({group_title(s['group'])})",
                            "caption": f"Per-voxel difference of the {o.split} {METRIC_LABELS[o.metric]}, A − B, at "
                                       f"the voxels both runs scored (red: A better). `analyze.py analysis=maps` "
                                       f"writes it as a map file."})
        return figures

    def write_tables(self, data: ReportData, out_dir: Path) -> list[Path]:
        """comparisons.csv, subject_comparisons.csv and per dataset encoder_table_<dataset>.csv / .md."""
        o = self.options
        files = []
        if data.comparisons:
            header = ["run_a", "backbone_a", "run_b", "backbone_b", "roi", "metric", "statistic", "n_voxels",
                      "value_a", "value_b", "diff", "ci_low", "ci_high", "p", "q"]
            files.append(write_csv(out_dir / "comparisons.csv", header, [
                [r["a"].name, r["a"].backbone, r["b"].name, r["b"].backbone, r["roi"], r["metric"], r["statistic"],
                 r["n_voxels"], r["value_a"], r["value_b"], r["diff"], r["ci_low"], r["ci_high"], r["p"], r["q"]]
                for r in data.comparisons]))
        if data.subject_tests:
            header = ["model_a", "model_b", "head", "dataset", "subjects", "roi", "metric", "statistic", "n", "diff",
                      "ci_low", "ci_high", "t", "p", "q"]
            files.append(write_csv(out_dir / "subject_comparisons.csv", header, [
                [r["a"], r["b"], r["head"], r["dataset"], " ".join(r["subjects"]), r["roi"], r["metric"],
                 r["statistic"], int(r["n"]), r["diff"], r["ci_low"], r["ci_high"], r["t"], r["p"], r["q"]]
                for r in data.subject_tests]))
        for t in data.tables:
            stem = f"encoder_table_{_slug(t['dataset'])}"
            rows = [[row["model"], row["n_subjects"], roi, c["value"], c["ci_low"], c["ci_high"], int(c["best"])]
                    for row in t["rows"] for roi, c in zip(t["rois"], row["cells"])]
            files.append(write_csv(out_dir / f"{stem}.csv", ["encoder", "n_subjects", "roi", f"{t['metric']}_mean",
                                                             "ci_low", "ci_high", "best"], rows))
            md = out_dir / f"{stem}.md"
            md.write_text(markdown_table(t, o.ci), encoding="utf-8")
            files.append(md)
        return files

    def show_all(self, data: ReportData, report: Report) -> None:
        for t in report.encoder_tables:  # printed with the ROIs down (the files have the encoders down)
            models = [row["model"] for row in t["rows"]]
            out = table(f"{SHORT_LABELS[t['metric']]} per ROI, {t['dataset']} — mean [{self.options.ci:.0%} CI: "
                        f"{t['ci']}], ★ best per ROI", ["ROI", *models],
                        [[roi, *[cell_text(row["cells"][j]) for row in t["rows"]]] for j, roi in enumerate(t["rois"])],
                        right=models)
            Console(width=max(100, 28 * (len(models) + 1)), soft_wrap=True).print(out)
        for note in report.notes:
            self.console.print(f"note: {note}")
        n_tests = len({(r["a"].name, r["b"].name) for r in report.comparisons})
        self.console.print(f"wrote {report.html} ({len(report.runs)} runs, {len(report.failed)} failed jobs, "
                           f"{len(report.figures)} figures, {n_tests} paired comparisons over "
                           f"{report.resampling['unit']})")
        logged = getattr(self, "logged", None)
        if logged is not None:
            self.console.print(f"W&B ({logged.mode}): {len(logged.run_dirs)} runs under {logged.wandb_dir} "
                               f"({len(logged.run_dirs) - 1} new encoder runs, {len(logged.referenced)} referred to)")
            self.notes(logged.notes)
            if logged.sync:
                self.console.print(f"upload with: {logged.sync}")


def markdown_table(t: dict, level: float) -> str:
    """The encoder × ROI table as Markdown (best per ROI in bold), with a line saying what the numbers are."""
    lines = [f"| encoder | {' | '.join(t['rois'])} |", "|---|" + "---:|" * len(t["rois"])]
    for row in t["rows"]:
        cells = [f"**{cell_text(c, '')}**" if c["best"] else cell_text(c, "") for c in row["cells"]]
        lines.append(f"| {row['model']} | {' | '.join(cells)} |")
    lines.append("")
    lines.append(f"{SHORT_LABELS[t['metric']]}: mean over each ROI's voxels, {t['dataset']}; [{level:.0%} CI: {t['ci']}]; "
                 f"bold: the best encoder per ROI.")
    return "\n".join(lines) + "\n"


def build_report(directory: str | Path, out_dir: str | Path | None = None, split: str = "test",
                 metric: str = "nc_r2", rois: Sequence[str] | None = None,
                 scatter: Sequence[str] | None = None, n_boot: int = 1000, seed: int = 0, ci: float = 0.95,
                 block: int = 20, interval: str = "bca", maps: bool = True, progress: bool = True) -> Report:
    """Write ``report.html``, its figures and tables for the runs at or below ``directory`` (library use).

    out_dir defaults to ``<directory>/report``; metric is the per-voxel accuracy compared (nc_r2, r or r2 from
    voxel_metrics.npz; r is always compared too); rois defaults to every ROI the runs report; scatter names the
    two backbones to plot against each other (default: the first two of each group); n_boot resamples of the test
    stimuli (seed), ci the interval level, block the TRs per resampled block of a time series, interval bca or
    percentile; maps: brain-map pictures. Raises FileNotFoundError when there is neither a run nor a failed job.
    """
    options = ReportOptions(split=split, metric=metric, rois=list(rois) if rois else None,
                            scatter=list(scatter) if scatter else None, n_boot=n_boot, seed=seed, ci=ci, block=block,
                            interval=interval, maps=maps, out_dir=str(out_dir) if out_dir else None)
    options.check()
    job = ReportJob(options, progress=progress)
    directory = Path(directory)
    return job.write_all(job.compute_all(job.runs(directory), directory), directory)
