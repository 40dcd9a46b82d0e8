"""``analyze.py analysis=summary``: a table of every run's accuracy (overall and per ROI), the failed sweep
jobs below it, and ``summary.csv`` beside the runs: the demo's summary table."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from analyses.jobs.base import Job, JobOptions
from analyses.jobs.console import fmt, table
from analyses.jobs.outputs import write_csv
from encoders.run_dir import RunDir, find_failed, find_runs


# (column, metrics.json key): the headline summaries (encoders.metrics.summarize).
SCORE_COLUMNS = (("r", "r_mean"), ("R2 median", "r2_median"), ("NC-R2 median", "nc_r2_median"),
                 ("NC-R2 reliable", "nc_r2_mean_reliable"), ("n reliable", "n_reliable"), ("voxels", "n_voxels"))


def summary_rows(runs: list[RunDir], split: str = "test", rois: list[str] | None = None) -> tuple[list[str], list[list]]:
    """One row per run: backbone, head, data, subject, mean r, median R², median NC-R², mean NC-R² over the
    reliable voxels (noise ceiling above the run's ``metrics.nc_threshold``) and their count, voxels, the
    threshold, wall time, then per-ROI mean r.

    Returns (header, rows). ROIs default to every ROI any run reports, in first-seen order. Runs written
    before the median/reliable summaries existed show None there.
    """
    if rois is None:
        rois = []
        for run in runs:
            rois += [name for name in run.metrics.get(split, {}).get("rois", {}) if name not in rois]
    header = (["backbone", "head", "data", "subject"] + [c for c, _ in SCORE_COLUMNS] + ["NC threshold %", "wall_s"]
              + [f"r {n}" for n in rois])
    rows = []
    for run in runs:
        m, info = run.metrics.get(split, {}), run.info
        data = info.get("data", {})
        roi_r = [m.get("rois", {}).get(name, {}).get("r_mean") for name in rois]
        rows.append([info.get("backbone", "?"), info.get("head", "?"), data.get("dataset", "?"), data.get("subject", "?")]
                    + [m.get(key) for _, key in SCORE_COLUMNS] + [m.get("nc_threshold"), info.get("wall_time_s")]
                    + roi_r)
    return header, rows


def print_failed(console: Console, failed: list[dict], target: Path) -> None:
    """The sweep jobs that failed (failed.json), with their overrides and error."""
    rows = [(str(job["dir"].relative_to(target) if job["dir"].is_relative_to(target) else job["dir"]),
             " ".join(job.get("overrides", [])), f"{job.get('type', '?')}: {job.get('error', '')}") for job in failed]
    out = table(f"{len(failed)} failed job(s) — {target}", ("job", "overrides", "error"), rows)
    for column in out.columns:
        column.overflow = "fold"
    console.print(out)


@dataclass
class SummaryOptions(JobOptions):
    """conf/analysis/summary.yaml."""

    JOB = "summary"
    split: str = "test"
    rois: list[str] | None = None


@dataclass
class Summary:
    target: Path
    header: list[str]
    rows: list[list]
    failed: list[dict]


class SummaryJob(Job):
    """Every run's test accuracy in one table (scope: all runs at once)."""

    name = "summary"
    Options = SummaryOptions
    scope = "sweep"

    def runs(self, target: Path) -> list[RunDir]:
        return find_runs(target)  # none is fine when failed jobs are there to list

    def compute_all(self, runs: list[RunDir], target: Path) -> Summary:
        failed = find_failed(target)
        if not runs:
            if failed:
                print_failed(Console(width=160), failed, target)
            raise FileNotFoundError(f"{target}: no run directories (with metrics.json) found")
        header, rows = summary_rows(runs, self.options.split, list(self.options.rois) if self.options.rois else None)
        return Summary(target, header, rows, failed)

    def write_all(self, result: Summary, target: Path) -> list[Path]:
        return [write_csv(target / "summary.csv", result.header, result.rows)]

    def show_all(self, result: Summary, files: list[Path]) -> None:
        header, rows = result.header, result.rows
        console = Console(width=max(140, 12 * len(header)))
        main_cols = header.index("wall_s") + 1
        digits = {"wall_s": 1, "NC threshold %": 1}
        console.print(table(f"{self.options.split} accuracy — {result.target}", header[:main_cols],
                            [[fmt(v, digits.get(name, 3)) for name, v in zip(header, row[:main_cols])]
                             for row in rows], right=[h for h in header if h not in ("backbone", "head", "data")]))
        console.print("r: mean over voxels; R2, NC-R2 median: over voxels; NC-R2 reliable: mean over the n reliable "
                      "voxels, whose noise ceiling exceeds the NC threshold (% of variance, metrics.nc_threshold)")
        if len(header) > main_cols:
            console.print(table(f"{self.options.split} mean r per ROI", ["ROI", *[f"{row[0]}/{row[1]}" for row in rows]],
                                [[name.removeprefix("r "), *[fmt(row[j]) for row in rows]]
                                 for j, name in enumerate(header[main_cols:], start=main_cols)],
                                right=[f"{row[0]}/{row[1]}" for row in rows]))
        if result.failed:
            print_failed(console, result.failed, result.target)
        for path in files:
            console.print(f"wrote {path}")
