"""Writing an analysis's outputs: CSV tables and matplotlib figures (Agg, no display needed)."""
from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported on first use: it costs about a second)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def csv_cell(value):
    """A table cell: floats to 6 significant digits, NaN/inf as an empty cell, anything else as it is."""
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}" if np.isfinite(value) else ""
    return value


def write_csv(path: str | Path, header: Sequence[str], rows: Sequence[Sequence]) -> Path:
    """Write ``rows`` under ``header`` to ``path`` (cells through ``csv_cell``); returns the path."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([[csv_cell(v) for v in row] for row in rows])
    return path
