"""Log a sweep's runs to Weights & Biases: offline by default, uploadable later with `wandb sync`.

One W&B run per encoder run (job_type "summary"): group = the sweep directory's name (or the group
the run already used if it trained with logger=wandb), tags = backbone, head, dataset, subj<N>;
config = the run's config.yaml and run.json; summary = metrics.json flattened
("test/r_mean", "test/roi/FFA-1/nc_r2_mean", ...); a wandb.Table "roi_results" of the per-ROI
results. One more run (job_type "report", same group) carries the report's figures as wandb.Image,
the table of every run and the report's CSV tables (``tables/encoder_table_<dataset>``: the sweep's
encoder x ROI table with CIs; ``tables/comparisons``: the paired comparisons).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from analyses.jobs.base import run_group, run_tags, wandb_init
from analyses.jobs.console import progress_bar
from encoders.wandb_mode import wandb_mode

ROI_COLUMNS = ("r_mean", "r_median", "r2_mean", "nc_r2_mean", "n_voxels", "n_nan")


def csv_table(path: Path):
    """A CSV file (header row first) as a wandb.Table (e.g. the report's encoder x ROI table, comparisons)."""
    import csv

    import wandb

    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return wandb.Table(columns=rows[0], data=rows[1:])


def flat_summary(metrics: dict) -> dict[str, float]:
    """metrics.json -> {"<split>/<key>": value, "<split>/roi/<ROI>/<key>": value} (numbers only)."""
    out = {}
    for split, block in metrics.items():
        for key, value in block.items():
            if key != "rois" and isinstance(value, (int, float)):
                out[f"{split}/{key}"] = value
        for roi, roi_block in block.get("rois", {}).items():
            for key, value in roi_block.items():
                if isinstance(value, (int, float)):
                    out[f"{split}/roi/{roi}/{key}"] = value
    return out


def roi_table_rows(metrics: dict, roi_stats: dict | None = None) -> tuple[list[str], list[list]]:
    """Per-ROI rows for every split: columns split, roi, ROI_COLUMNS, and (with the report's
    roi_stats for the report split) metric_mean and metric_se."""
    columns = ["split", "roi", *ROI_COLUMNS, "metric_mean", "metric_se"]
    rows = []
    for split, block in metrics.items():
        for roi, roi_block in block.get("rois", {}).items():
            mean, se, _ = (roi_stats or {}).get(split, {}).get(roi, (None, None, 0))
            rows.append([split, roi, *[roi_block.get(c) for c in ROI_COLUMNS], mean, se])
    return columns, rows


@dataclass
class Logged:
    """Where the W&B runs went."""

    mode: str
    wandb_dir: Path
    run_dirs: list[Path]     # the W&B run directories (offline-run-*/ or run-*/), encoder runs then the report run
    run_ids: list[str]


def log_report_to_wandb(report, project: str = "brainprobe", wandb_dir: str | Path | None = None,
                        mode: str | None = None, progress: bool = True) -> Logged:
    """Log every run of ``report`` (an analyses.jobs.report.Report) and its figures to W&B.

    wandb_dir: where the W&B files go (default: the report's sweep directory, under ``wandb/``);
    mode: "offline" | "online" | "disabled" (default wandb_mode()).
    """
    import wandb

    mode = mode or wandb_mode()
    sweep_dir = report.directory
    base = Path(wandb_dir) if wandb_dir else sweep_dir
    base.mkdir(parents=True, exist_ok=True)
    default_group = sweep_dir.resolve().name
    run_dirs, run_ids = [], []
    with progress_bar(progress) as bar:
        task = bar.add_task("W&B: runs", total=len(report.runs) + 1)
        for run in report.runs:
            config = run.config
            wb = wandb_init(directory=base, project=project, mode=mode, group=run_group(config, default_group),
                            name=run.name, tags=run_tags(run.info), job_type="summary",
                            config={"config": config, "run": {k: v for k, v in run.info.items() if k != "versions"},
                                    "run_dir": str(run.path)})
            wb.summary.update(flat_summary(run.metrics))
            table_columns, rows = roi_table_rows(run.metrics, {report.split: report.roi_stats.get(run.name, {})})
            wb.log({"roi_results": wandb.Table(columns=table_columns, data=rows)})
            run_dirs.append(Path(wb.dir).parent)
            run_ids.append(wb.id)
            wb.finish()
            bar.advance(task)
        wb = wandb_init(directory=base, project=project, mode=mode, group=default_group, name=f"{default_group} report",
                        tags=["report"], job_type="report",
                        config={"sweep_dir": str(sweep_dir), "split": report.split, "metric": report.metric})
        wb.log({**{f"figures/{Path(f['path']).stem}": wandb.Image(str(f["path"]), caption=f"{f['title']}: {f['caption']}")
                   for f in report.figures},
                "runs": wandb.Table(columns=["run", "backbone", "head", "dataset", "subject", "r_mean", "r2_mean",
                                             "nc_r2_mean", "n_voxels"],
                                    data=[[r.name, r.backbone, r.head, r.dataset, r.subject,
                                           *[r.metrics.get(report.split, {}).get(k) for k in
                                             ("r_mean", "r2_mean", "nc_r2_mean", "n_voxels")]] for r in report.runs]),
                **{f"tables/{p.stem}": csv_table(p) for p in getattr(report, "tables", []) if p.suffix == ".csv"}})
        run_dirs.append(Path(wb.dir).parent)
        run_ids.append(wb.id)
        wb.finish()
        bar.advance(task)
    return Logged(mode, base / "wandb", run_dirs, run_ids)
