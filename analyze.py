"""Run analyses over finished runs.

    python analyze.py analysis=summary sweep_dir=outputs/multirun/2026-01-01_12-00-00
    python analyze.py analysis=summary run_dir=outputs/runs/<run>

Analyses: summary, report (HTML comparison), wen2018, clip_msm, brainsail, localizer
(conf/analysis/<name>.yaml lists each one's options).
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

os.environ.setdefault("WANDB_SILENT", "true")

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from analyses.jobs.outputs import write_csv
from analyses.jobs.summary import summary_rows
from encoders.run_dir import find_failed, find_runs
from encoders.weights import WeightsError


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_failed(console: Console, failed: list[dict], target: Path) -> None:
    """The sweep jobs that failed (failed.json), with their overrides and error."""
    table = Table(title=f"{len(failed)} failed job(s) — {target}")
    for name in ("job", "overrides", "error"):
        table.add_column(name, overflow="fold")
    for job in failed:
        where = job["dir"].relative_to(target) if job["dir"].is_relative_to(target) else job["dir"]
        table.add_row(str(where), " ".join(job.get("overrides", [])), f"{job.get('type', '?')}: {job.get('error', '')}")
    console.print(table)


def run_summary(cfg: DictConfig, target: Path) -> None:
    runs = find_runs(target)
    failed = find_failed(target)
    if not runs:
        if failed:
            print_failed(Console(width=160), failed, target)
        raise FileNotFoundError(f"{target}: no run directories (with metrics.json) found")
    header, rows = summary_rows(runs, cfg.analysis.split, list(cfg.analysis.rois) if cfg.analysis.rois else None)
    console = Console(width=max(120, 12 * len(header)))
    main_cols = header.index("wall_s") + 1
    table = Table(title=f"{cfg.analysis.split} accuracy — {target}")
    for name in header[:main_cols]:
        table.add_column(name, justify="right" if name not in ("backbone", "head", "data") else "left")
    for row in rows:
        table.add_row(*[fmt(v, 1 if name == "wall_s" else 3) for name, v in zip(header, row[:main_cols])])
    console.print(table)
    if len(header) > main_cols:
        roi_table = Table(title=f"{cfg.analysis.split} mean r per ROI")
        roi_table.add_column("ROI")
        for row in rows:
            roi_table.add_column(f"{row[0]}/{row[1]}", justify="right")
        for j, name in enumerate(header[main_cols:], start=main_cols):
            roi_table.add_row(name.removeprefix("r "), *[fmt(row[j]) for row in rows])
        console.print(roi_table)
    if failed:
        print_failed(console, failed, target)
    write_csv(target / "summary.csv", header, rows)
    console.print(f"wrote {target / 'summary.csv'}")


# analysis name -> function(cfg, target directory), or "module:function" imported only when that
# analysis is chosen (the analyses pull in torch, scipy, open_clip: seconds per import). Each analysis
# has a conf/analysis/<name>.yaml whose `name` is its key here; user errors are raised as
# FileNotFoundError or ValueError.
ANALYSES = {
    "summary": run_summary,
    "report": "analyses.jobs.report:run_report",
    "wen2018": "analyses.jobs.wen2018:run_wen2018",
    "clip_msm": "analyses.jobs.clip_msm:run_clip_msm",
    "brainsail": "analyses.jobs.brainsail:run_brainsail",
    "localizer": "analyses.jobs.localizer:run_localizer",
}


def analysis_function(name: str):
    """The function that runs analysis ``name`` (importing its module on first use)."""
    entry = ANALYSES[name]
    if isinstance(entry, str):
        module, _, function = entry.partition(":")
        entry = getattr(importlib.import_module(module), function)
    return entry


@hydra.main(version_base="1.3", config_path="conf", config_name="analyze")
def main(cfg: DictConfig) -> None:
    target = cfg.sweep_dir or cfg.run_dir
    if target is None:
        print("error: give run_dir=<run directory> or sweep_dir=<multirun directory>", file=sys.stderr)
        sys.exit(2)
    if cfg.analysis.name not in ANALYSES:
        print(f"error: analysis '{cfg.analysis.name}' is not available (available: {', '.join(ANALYSES)})",
              file=sys.stderr)
        sys.exit(2)
    try:
        analysis_function(cfg.analysis.name)(cfg, Path(target))
    except (FileNotFoundError, ValueError, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
