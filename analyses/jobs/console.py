"""Printing for every job: the console, number formatting, tables and progress (``encoders.progress``)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from encoders.progress import Progress


def fmt(value, digits: int = 3, spec: str = "f") -> str:
    """A table cell: None and non-finite floats as "—", floats with ``digits`` (format ``spec``: "f" or "g"),
    anything else as str."""
    if value is None or (isinstance(value, (float, np.floating)) and not np.isfinite(value)):
        return "—"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}{spec}}"
    return str(value)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence], right: Sequence[str] = ()) -> Table:
    """A rich table; ``right``: the columns aligned right (numbers). Cells are printed as given (str)."""
    out = Table(title=title)
    for name in columns:
        out.add_column(name, justify="right" if name in right else "left")
    for row in rows:
        out.add_row(*[str(c) for c in row])
    return out


def progress_bar(enabled: bool = True, console: Console | None = None) -> Progress:
    """Progress of a job's steps (``encoders.progress.Progress``): a rich bar on a terminal, a line at most
    every ~30 s in a log; ``add_task(description, total)``, ``advance(task)``."""
    return Progress(enabled, console=console)


def print_notes(console: Console, notes: Iterable[str]) -> None:
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
