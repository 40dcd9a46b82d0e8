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


def save_figure(fig, path: str | Path, dpi: int, **savefig_kwargs) -> Path:
    """Save a matplotlib figure to ``path`` (``fig.savefig(path, dpi=dpi, **savefig_kwargs)``), close it (pyplot
    keeps every open figure in memory) and return the path."""
    path = Path(path)
    fig.savefig(path, dpi=dpi, **savefig_kwargs)
    pyplot().close(fig)
    return path


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
