"""Progress of the steps that run for minutes: a bar on a terminal, a plain line now and then elsewhere.

    with Progress() as progress:                                  # on stdout
        task = progress.add_task("features alexnet", total=n_images, unit="images")
        for batch in loader:
            ...
            progress.advance(task, len(batch))

On a terminal this is a transient rich progress bar (count, rate, time left). When stdout is not a
terminal (SLURM, nohup, a pipe) it prints one line per task at most every ``interval`` seconds (default
30, or ``BRAINPROBE_PROGRESS_INTERVAL``), e.g.

    features alexnet: 1,200/5,000 images (24%), 41.2 images/s, 1m32s left

and, for a task that printed a line, one closing line with the count, the time and the rate. A step
shorter than ``interval`` prints nothing. Feature extraction, the ridge fit's voxel batches, the
bootstrap and permutation p-values, BrainSAIL's distillation and the report use it (``encoders`` and
``datamodules`` cannot import ``analyses``, so the one helper lives here).
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

INTERVAL_ENV = "BRAINPROBE_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0
T = TypeVar("T")


def progress_interval() -> float:
    """Seconds between two lines of a task off a terminal: ``BRAINPROBE_PROGRESS_INTERVAL``, else 30."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise ValueError(f"{INTERVAL_ENV}={raw!r} must be >= 0")
    return value


def duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s, 0.8s."""
    seconds = max(0.0, float(seconds))
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


@dataclass
class _Task:
    description: str
    total: float | None
    unit: str
    started: float
    last_line: float
    done: float = 0.0
    lines: int = 0
    rich_id: int | None = None


class Progress:
    """One or more progress tasks (see the module docstring).

    enabled: False shows and prints nothing. stream: where lines go (default sys.stdout; a terminal
    stream gets the bar instead). interval: seconds between lines (default ``progress_interval()``).
    clock: the time source (tests pass a fake one). ``add_task`` / ``advance`` / ``update`` follow rich's
    ``Progress`` (``update(task, advance=n)``), so callers need not know which form is shown.
    """

    def __init__(self, enabled: bool = True, *, stream=None, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic, console=None):
        self.stream = stream if stream is not None else (console.file if console is not None else sys.stdout)
        self.interval = progress_interval() if interval is None else float(interval)
        self.clock = clock
        self.tasks: list[_Task] = []
        self._bar = None
        self.lines = False
        if not enabled:
            return
        from rich import get_console
        from rich.console import Console

        # stdout: rich's one global console, so a step inside a step finds the outer bar live (see __enter__)
        console = console or (get_console() if self.stream is sys.stdout else Console(file=self.stream))
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn
            from rich.progress import TimeElapsedColumn, TimeRemainingColumn

            self._bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=console, transient=True)
        else:
            self.lines = True

    # -- context ---------------------------------------------------------------------------------
    def __enter__(self) -> "Progress":
        if self._bar is not None:
            from rich.errors import LiveError

            try:
                self._bar.start()
            except LiveError:  # another bar is live on this console (a step inside a step): show only that one
                self._bar = None
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
        if exc[0] is None:
            for task in self.tasks:
                if task.lines:
                    self._write(self._closing(task))

    # -- tasks -----------------------------------------------------------------------------------
    def add_task(self, description: str, total: float | None = None, unit: str = "", **_fields) -> int:
        now = self.clock()
        task = _Task(description, total, unit, now, now)
        if self._bar is not None:
            task.rich_id = self._bar.add_task(description, total=total, rate="")
        self.tasks.append(task)
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, advance: float = 0, **_fields) -> None:
        task = self.tasks[task_id]
        task.done += advance
        now = self.clock()
        if self._bar is not None:
            self._bar.update(task.rich_id, advance=advance, rate=self._rate_text(task, now))
        elif self.lines and now - task.last_line >= self.interval and (task.total is None or task.done < task.total):
            task.last_line = now
            task.lines += 1
            self._write(self._line(task, now))

    # -- text ------------------------------------------------------------------------------------
    @staticmethod
    def _count(x: float) -> str:
        return f"{int(x):,}" if float(x).is_integer() else f"{x:,.1f}"

    def _rate_text(self, task: _Task, now: float) -> str:
        elapsed = now - task.started
        if not task.unit or elapsed <= 0:
            return ""
        return f"{task.done / elapsed:.1f} {task.unit}/s"

    def _line(self, task: _Task, now: float) -> str:
        elapsed = now - task.started
        unit = f" {task.unit}" if task.unit else ""
        text = f"{task.description}: {self._count(task.done)}"
        if task.total:
            text += f"/{self._count(task.total)}{unit} ({100 * task.done / task.total:.0f}%)"
        else:
            text += unit
        if elapsed > 0 and task.done > 0:
            rate = task.done / elapsed
            text += f", {rate:.1f} {task.unit or 'steps'}/s"
            if task.total:
                text += f", {duration((task.total - task.done) / rate)} left"
        return text + f" ({duration(elapsed)} so far)"

    def _closing(self, task: _Task) -> str:
        elapsed = self.clock() - task.started
        unit = f" {task.unit}" if task.unit else ""
        rate = f" ({task.done / elapsed:.1f} {task.unit or 'steps'}/s)" if elapsed > 0 and task.done else ""
        return f"{task.description}: done, {self._count(task.done)}{unit} in {duration(elapsed)}{rate}"

    def _write(self, line: str) -> None:
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or full log: progress is never worth a failure
            pass


def track(items: Iterable[T], description: str, total: float | None = None, unit: str = "",
          size: Callable[[T], float] | None = None, enabled: bool = True) -> Iterator[T]:
    """Iterate over ``items`` with progress: ``size(item)`` units per item (default 1), ``total`` units in
    all (default len(items) when it has one).

        for start in track(range(0, n_vox, batch), "ridge fit", total=n_vox, unit="voxels",
                           size=lambda s: min(batch, n_vox - s)):
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with Progress(enabled) as progress:
        task = progress.add_task(description, total=total, unit=unit)
        for item in items:
            yield item
            progress.advance(task, 1 if size is None else size(item))
