"""Collect run directories and tabulate their accuracy: the demo's summary table."""
from __future__ import annotations

import json
from pathlib import Path


def find_runs(directory: str | Path) -> list[Path]:
    """Run directories (holding metrics.json) at or below ``directory``, sorted by path."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory")
    return sorted(p.parent for p in directory.rglob("metrics.json"))


def require_runs(directory: str | Path) -> list[Path]:
    """``find_runs(directory)``, or FileNotFoundError naming the directory when it holds no run."""
    runs = find_runs(directory)
    if not runs:
        raise FileNotFoundError(f"{directory}: no run directories (with metrics.json) found")
    return runs


def find_failed(directory: str | Path) -> list[dict]:
    """Sweep jobs that failed, at or below ``directory``: the failed.json train.py writes in a failed job's
    directory, {"error": one line, "type": exception class, "overrides": [...], "traceback": text},
    each with "dir" added; sorted by path. An unreadable failed.json is reported as such; one beside a
    metrics.json (a later attempt succeeded) is not a failure."""
    failed = []
    for path in sorted(Path(directory).rglob("failed.json")):
        if (path.parent / "metrics.json").exists():
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            record = {"error": f"unreadable failed.json: {err}", "type": "?", "overrides": []}
        failed.append({**record, "dir": path.parent})
    return failed


def load_run(run_dir: Path) -> dict:
    """metrics.json and run.json of one run -> {"dir", "metrics", "run"}."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    run_file = run_dir / "run.json"
    run = json.loads(run_file.read_text()) if run_file.exists() else {}
    return {"dir": run_dir, "metrics": metrics, "run": run}


def summary_rows(runs: list[dict], split: str = "test", rois: list[str] | None = None) -> tuple[list[str], list[list]]:
    """One row per run: backbone, head, data, subject, r, R², NC-R², voxels, wall time, then per-ROI r.

    Returns (header, rows). ROIs default to every ROI any run reports, in first-seen order.
    """
    if rois is None:
        rois = []
        for run in runs:
            rois += [name for name in run["metrics"].get(split, {}).get("rois", {}) if name not in rois]
    header = ["backbone", "head", "data", "subject", "r", "R2", "NC-R2", "voxels", "wall_s"] + [f"r {n}" for n in rois]
    rows = []
    for run in runs:
        m, info = run["metrics"].get(split, {}), run["run"]
        data = info.get("data", {})
        roi_r = [m.get("rois", {}).get(name, {}).get("r_mean") for name in rois]
        rows.append([info.get("backbone", "?"), info.get("head", "?"), data.get("dataset", "?"),
                     data.get("subject", "?"), m.get("r_mean"), m.get("r2_mean"), m.get("nc_r2_mean"),
                     m.get("n_voxels"), info.get("wall_time_s")] + roi_r)
    return header, rows


