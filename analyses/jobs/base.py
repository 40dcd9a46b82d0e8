"""The job base: what every analysis over run directories shares, so that each job is only its own steps.

    python analyze.py analysis=<name> run_dir=DIR | sweep_dir=DIR       # = run_job(cfg, DIR)
    job = Wen2018Job(Wen2018Options(...)); result, files = job.process(RunDir(DIR))   # library use

A job lives in ``analyses/jobs/<name>.py`` (its options in ``conf/analysis/<name>.yaml``) and is registered
there by its ``name`` (``JOBS``); analyze.py imports the module of the analysis asked for and nothing else.
A job has

* ``Options``: a ``JobOptions`` dataclass parsed from the analysis config (``from_config``: the YAML's
  groups flattened, unknown keys refused with one line naming them, values checked by ``check``);
* per run (``scope = "run"``): ``compute(run)`` reads and computes and writes nothing; ``write(run, result)``
  writes the run's output folder (``out_dir``) and computes nothing; ``show`` prints. Over the runs of a
  sweep, ``combine(results)`` computes and ``write_combined`` writes the sweep-level outputs;
* or once over all runs (``scope = "sweep"``): ``compute_all(runs, target)``, ``write_all``, ``show_all``.

The base owns the rest: finding the runs, the loop, the console, and W&B (``log_files``: a job's figures
and tables in a ``job_type="analysis"`` W&B run of the encoder run's group that refers to the encoder run,
when its ``wandb`` option says so).
"""
from __future__ import annotations

import csv
import importlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

from rich.console import Console

from analyses.jobs.console import print_notes
from encoders.run_dir import RunDir, require_runs
from encoders.wandb_run import analysis_run, run_mode, sync_line

JOBS: dict[str, type["Job"]] = {}


# ----------------------------------------------------------------------------- options


@dataclass
class JobOptions:
    """A job's options. Subclasses are dataclasses whose fields are the options; ``GROUPS`` names the
    YAML groups whose keys are options too (``ALIASES`` maps a (group, key) to another field name)."""

    JOB: ClassVar[str] = "analysis"
    GROUPS: ClassVar[tuple[str, ...]] = ()
    ALIASES: ClassVar[dict[tuple[str, str], str]] = {}

    @classmethod
    def from_config(cls, analysis: Mapping, data_dir: str | None = None):
        """The options from conf/analysis/<name>.yaml as a plain dict; ``data_dir`` fills a ``data_dir`` field
        the config leaves unset. ValueError naming every unknown key."""
        names = {f.name for f in fields(cls)}
        flat, unknown = {}, []
        for key, value in analysis.items():
            if key == "name":
                continue
            if key in cls.GROUPS and isinstance(value, Mapping):
                for sub, v in value.items():
                    target = cls.ALIASES.get((key, sub), sub)
                    if target in names:
                        flat[target] = v
                    else:
                        unknown.append(f"{key}.{sub}")
            elif key in names:
                flat[key] = value
            else:
                unknown.append(key)
        if unknown:
            raise ValueError(f"{', '.join('analysis.' + k for k in unknown)}: unknown {cls.JOB} option(s)")
        if data_dir is not None and "data_dir" in names:
            flat.setdefault("data_dir", data_dir)
        opts = cls(**flat)
        opts.check()
        return opts

    def check(self) -> None:
        """ValueError (one line naming the key) for a bad value."""

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ----------------------------------------------------------------------------- W&B
# The runs themselves (modes, names, groups, what an encoder run logs) are encoders/wandb_run.py's.


def run_group(config: dict, default: str) -> str:
    """The W&B group a run trained under (logger.wandb.group in its config), else ``default``."""
    group = ((config.get("logger") or {}).get("wandb") or {}).get("group")
    return str(group) if group else default


# ----------------------------------------------------------------------------- jobs


class Job:
    """One analysis over run directories; see the module docstring. Subclasses set ``name`` and ``Options``
    and implement either the per-run steps or the all-runs steps."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[JobOptions]] = JobOptions
    scope: ClassVar[str] = "run"          # "run": compute/write per run, then combine; "sweep": once over all
    skip_unfit: ClassVar[bool] = False    # in a sweep, skip the runs compute() refuses (ValueError)
    console_width: ClassVar[int] = 120

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            JOBS[cls.name] = cls

    def __init__(self, options: JobOptions | None = None, console: Console | None = None):
        self.options = options if options is not None else self.Options()
        self.console = console or Console(width=self.console_width)
        self.last_wandb_dir: str | None = None  # the W&B run directory of the last process(), if it logged

    @classmethod
    def from_config(cls, cfg, console: Console | None = None) -> "Job":
        """The job with options from the composed analyze config (``cfg.analysis``, ``cfg.paths.data_dir``)."""
        from omegaconf import OmegaConf

        analysis = OmegaConf.to_container(cfg.analysis, resolve=True)
        data_dir = OmegaConf.select(cfg, "paths.data_dir", default="data")
        return cls(cls.Options.from_config(analysis, data_dir=str(data_dir)), console)

    # -- where outputs go ------------------------------------------------------------------------
    def runs(self, target: Path) -> list[RunDir]:
        return require_runs(target)

    def out_dir(self, run: RunDir) -> Path:
        """A run's output folder: ``<run>/<out_subdir>``."""
        return run.path / self.options.out_subdir

    def make_out_dir(self, run: RunDir) -> Path:
        out = self.out_dir(run)
        out.mkdir(parents=True, exist_ok=True)
        return out

    # -- per run -------------------------------------------------------------------------------
    def compute(self, run: RunDir):
        raise NotImplementedError(f"{type(self).__name__} computes over all runs at once (scope 'sweep')")

    def write(self, run: RunDir, result) -> list[Path]:
        raise NotImplementedError

    def show(self, run: RunDir, result) -> None:
        """Print what a run's result says (tables, notes)."""

    def wandb_summary(self, result) -> dict:
        """Numbers of a run's result for its W&B run's summary (keys without the job prefix)."""
        return {}

    def process(self, run: RunDir) -> tuple[object, list[Path]]:
        """compute, write, show and (if asked) log one run: (result, files written)."""
        result = self.compute(run)
        files = self.write(run, result)
        self.show(run, result)
        self.last_wandb_dir = self.log_files(run, files, self.wandb_summary(result))
        return result, files

    def combine(self, results: list[tuple[RunDir, object]]):
        """The sweep-level result over every analysed run (None: nothing to combine)."""
        return None

    def write_combined(self, combined, target: Path) -> list[Path]:
        return []

    # -- once over all runs --------------------------------------------------------------------
    def compute_all(self, runs: list[RunDir], target: Path):
        raise NotImplementedError

    def write_all(self, result, target: Path):
        """Write the outputs; returns what was written (the files, or a record of them)."""
        raise NotImplementedError

    def show_all(self, result, written) -> None:
        """Print what the result says (``written``: what ``write_all`` returned)."""

    # -- the loop ------------------------------------------------------------------------------
    def execute(self, target: str | os.PathLike):
        """Run the job on ``target`` (a run directory, or a sweep directory holding runs)."""
        target = Path(target)
        runs = self.runs(target)
        if self.scope == "sweep":
            result = self.compute_all(runs, target)
            written = self.write_all(result, target)
            self.show_all(result, written)
            return written
        done = []
        for run in runs:
            self.console.rule(str(run))
            try:
                result, files = self.process(run)
            except ValueError as err:
                if not self.skip_unfit or len(runs) == 1:
                    raise
                self.console.print(f"skipped: {err}")
                continue
            self.console.print(f"wrote {len(files)} files to {self.out_dir(run)}")
            done.append((run, result))
        if not done:
            raise ValueError(self.nothing_done(target))
        if len(runs) > 1:
            combined = self.combine(done)
            if combined is not None:
                for path in self.write_combined(combined, target):
                    self.console.print(f"wrote {path}")
        return done

    def nothing_done(self, target: Path) -> str:
        return f"{target}: no run could be analysed"

    # -- W&B -------------------------------------------------------------------------------------
    def wants_wandb(self, run: RunDir) -> bool:
        """The ``wandb`` option: "auto" = only if the run trained with logger=wandb; true / false force it.
        Jobs without the option never log."""
        choice = str(getattr(self.options, "wandb", False)).lower()
        if choice in ("false", "none", "off", "0"):
            return False
        return choice != "auto" or "wandb" in (run.config.get("logger") or {})

    def log_files(self, run: RunDir, files: Sequence[Path], summary: dict | None = None) -> str | None:
        """Log a run's figures (PNG -> wandb.Image) and tables (CSV -> wandb.Table), and ``summary``'s numbers
        (as ``<job>/<key>``), when ``wants_wandb``: in a ``job_type="analysis"`` W&B run of the encoder run's
        group that names the encoder run in its config (``encoders.wandb_run.analysis_run``; never a second
        encoder run). Prints the ``wandb sync`` line of an offline run. Returns the W&B run directory, or None."""
        if not self.wants_wandb(run):
            return None
        import wandb

        wb = analysis_run(run, self.name, config={"options": self.options.as_dict()})
        try:
            payload = {}
            for path in files:
                if path.suffix == ".png":
                    payload[f"{self.name}/{path.stem}"] = wandb.Image(str(path))
                elif path.suffix == ".csv":
                    with open(path, newline="") as f:
                        rows = list(csv.reader(f))
                    payload[f"{self.name}/{path.stem}"] = wandb.Table(columns=rows[0], data=rows[1:])
            wb.log(payload)
            wb.summary.update({f"{self.name}/{k}": v for k, v in (summary or {}).items()
                               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)})
            directory, mode = str(Path(wb.dir).parent), run_mode(wb)
        finally:
            wb.finish()
        if mode == "offline":
            self.console.print(f"W&B (offline): upload with: {sync_line([directory])}", soft_wrap=True)
        return directory

    def notes(self, notes: Sequence[str]) -> None:
        print_notes(self.console, notes)


def job_class(name: str) -> type[Job]:
    """The job registered as ``name``, importing ``analyses.jobs.<name>`` (where it is defined) first.
    ValueError when there is none."""
    if name not in JOBS:
        try:
            importlib.import_module(f"analyses.jobs.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"analyses.jobs.{name}":
                raise
    if name not in JOBS:
        raise ValueError(f"analysis '{name}' is not available (no job '{name}' in analyses/jobs/{name}.py)")
    return JOBS[name]


def run_job(cfg, target: str | os.PathLike, console: Console | None = None):
    """What analyze.py does: the job of ``cfg.analysis.name`` with its options, on ``target``."""
    return job_class(str(cfg.analysis.name)).from_config(cfg, console).execute(target)
