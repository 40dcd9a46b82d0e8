"""Tabulate the accuracy of run directories: the demo's summary table."""
from __future__ import annotations

from encoders.run_dir import RunDir


def summary_rows(runs: list[RunDir], split: str = "test", rois: list[str] | None = None) -> tuple[list[str], list[list]]:
    """One row per run: backbone, head, data, subject, r, R², NC-R², voxels, wall time, then per-ROI r.

    Returns (header, rows). ROIs default to every ROI any run reports, in first-seen order.
    """
    if rois is None:
        rois = []
        for run in runs:
            rois += [name for name in run.metrics.get(split, {}).get("rois", {}) if name not in rois]
    header = ["backbone", "head", "data", "subject", "r", "R2", "NC-R2", "voxels", "wall_s"] + [f"r {n}" for n in rois]
    rows = []
    for run in runs:
        m, info = run.metrics.get(split, {}), run.info
        data = info.get("data", {})
        roi_r = [m.get("rois", {}).get(name, {}).get("r_mean") for name in rois]
        rows.append([info.get("backbone", "?"), info.get("head", "?"), data.get("dataset", "?"),
                     data.get("subject", "?"), m.get("r_mean"), m.get("r2_mean"), m.get("nc_r2_mean"),
                     m.get("n_voxels"), info.get("wall_time_s")] + roi_r)
    return header, rows
