"""Log a sweep's report to Weights & Biases without duplicating any encoder run: offline by default,
uploadable later with the one ``wandb sync …`` line it prints.

An encoder run that trained with ``logger=wandb`` already has its W&B run (run.json's ``wandb``: id,
project, group), with its config, summary and per-ROI table: the report refers to it. A run that trained
without W&B gets its encoder run once, with the same content training would have logged (job_type
"train", ``encoders.wandb_run.log_encoder_run``), and its id is recorded in its run.json, so a second
report refers to it instead of making another. Then one ``job_type="analysis"`` run in the sweep's group
carries the report's figures, the table of every run (with its W&B id) and the per-ROI results of all runs.
Its CSV tables go there too: ``tables/encoder_table_<dataset>`` (the sweep's encoder x ROI table with CIs)
and ``tables/comparisons`` (the paired comparisons).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from analyses.jobs.console import progress_bar
from encoders.run_dir import RunDir
from encoders.storage import StorageError
from encoders.wandb_run import (JOB_ANALYSIS, JOB_TRAIN, encoder_group, encoder_run_name, flat_summary,  # noqa: F401
                                init_run, log_encoder_run, roi_rows, run_mode, run_record, run_tags, sync_line)

RUN_COLUMNS = ("r_mean", "r2_median", "nc_r2_median", "nc_r2_mean_reliable", "n_reliable", "n_voxels")


def csv_table(path: Path):
    """A CSV file (header row first) as a wandb.Table (e.g. the report's encoder x ROI table, comparisons)."""
    import csv

    import wandb

    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return wandb.Table(columns=rows[0], data=rows[1:])


@dataclass
class Logged:
    """Where the W&B runs went."""

    mode: str
    wandb_dir: Path
    run_dirs: list[Path]     # the W&B run directories this call wrote: new encoder runs, then the report run
    run_ids: list[str]
    referenced: list[str] = field(default_factory=list)   # encoder runs' W&B ids that already existed
    notes: list[str] = field(default_factory=list)

    @property
    def sync(self) -> str | None:
        """The one ``wandb sync`` line that uploads this call's offline runs (None when online)."""
        return sync_line(self.run_dirs) if self.mode == "offline" and self.run_dirs else None


def sweep_group(runs: list[RunDir], default: str) -> str:
    """The group of a sweep's report: the group its runs share, else ``default`` (the sweep directory's name)."""
    groups = {encoder_group(run, default) for run in runs}
    return groups.pop() if len(groups) == 1 else default


def log_encoder(run: RunDir, directory: Path, project: str, group: str, mode: str | None):
    """The W&B encoder run of a run that trained without W&B (job_type "train"): its config, summary, table
    and figures, as training would have logged them; the id goes into its run.json. Returns the W&B run
    (finished) and a note when run.json could not record it."""
    wb = init_run(directory=directory, project=project, group=group, name=encoder_run_name(run), job_type=JOB_TRAIN,
                  tags=run_tags(run.info), mode=mode,
                  config={**run.config, "run_dir": str(run.path), "logged_by": "analysis=report"})
    try:
        log_encoder_run(wb, run)
        record = run_record(wb)
    finally:
        wb.finish()
    try:
        run.record_wandb(record)
    except StorageError as err:
        return wb, f"{run.name}: W&B run {record['id']} not recorded in run.json ({err})"
    return wb, None


def log_report_to_wandb(report, project: str = "brainprobe", wandb_dir: str | Path | None = None,
                        mode: str | None = None, progress: bool = True) -> Logged:
    """Log ``report`` (an analyses.jobs.report.Report) to W&B: an encoder run for each of its runs that has none
    yet, then one analysis run with the report's figures and tables (see the module docstring).

    wandb_dir: where the W&B files go (default: the report's sweep directory, under ``wandb/``);
    mode: "offline" | "online" | "disabled" (default: ``encoders.wandb_mode``'s rule).
    """
    import wandb

    sweep_dir = report.directory
    base = Path(wandb_dir) if wandb_dir else sweep_dir
    base.mkdir(parents=True, exist_ok=True)
    group = sweep_group(report.runs, sweep_dir.resolve().name)
    logged = Logged(mode or "offline", base / "wandb", [], [])
    with progress_bar(progress) as bar:
        task = bar.add_task("W&B: runs", total=len(report.runs) + 1)
        for run in report.runs:
            if run.wandb and run.wandb.get("id"):
                logged.referenced.append(run.wandb["id"])
            else:
                wb, note = log_encoder(run, base, project if not run.wandb else run.wandb.get("project", project),
                                       encoder_group(run, group), mode)
                logged.run_dirs.append(Path(wb.dir).parent)
                logged.run_ids.append(wb.id)
                logged.notes += [note] if note else []
            bar.advance(task)
        wb = init_run(directory=base, project=project, group=group, name=f"report · {sweep_dir.resolve().name}",
                      job_type=JOB_ANALYSIS, tags=["report"], mode=mode,
                      config={"analysis": "report", "sweep_dir": str(sweep_dir), "split": report.split,
                              "metric": report.metric, "encoder_runs": {r.name: (r.wandb or {}).get("id") for r in report.runs}})
        # every run's per-ROI block of the report's split, one row per (run, ROI): roi_rows keyed by run name
        columns, rows = roi_rows({run.name: run.metrics.get(report.split, {}) for run in report.runs})
        by_name = {run.name: run for run in report.runs}
        roi_columns = ["run", "backbone", "head", *columns[1:]]
        roi_data = [[row[0], by_name[row[0]].backbone, by_name[row[0]].head, *row[1:]] for row in rows]
        payload = {f"figures/{Path(f['path']).stem}": wandb.Image(str(f["path"]), caption=f"{f['title']}: {f['caption']}")
                   for f in report.figures}
        payload["runs"] = wandb.Table(
            columns=["run", "wandb_id", "backbone", "head", "dataset", "subject", *RUN_COLUMNS],
            data=[[r.name, (r.wandb or {}).get("id"), r.backbone, r.head, r.dataset, str(r.subject),
                   *[r.metrics.get(report.split, {}).get(k) for k in RUN_COLUMNS]] for r in report.runs])
        if roi_data:
            payload["roi_results"] = wandb.Table(columns=roi_columns, data=roi_data)
        payload.update({f"tables/{p.stem}": csv_table(p) for p in getattr(report, "tables", []) if p.suffix == ".csv"})
        wb.log(payload)
        logged.mode = run_mode(wb)
        logged.run_dirs.append(Path(wb.dir).parent)
        logged.run_ids.append(wb.id)
        wb.finish()
        bar.advance(task)
    return logged
