"""Whether a run directory can take a run of this config: go on from the earlier attempt's checkpoint, start
afresh, or refuse because the directory holds a run of another config.

    resume_checkpoint(config, run_dir)   # checkpoints/last.ckpt to resume from, None to start afresh;
                                         # RunDirInUse (nothing in run_dir touched) for another config's run
    other_run(config, run_dir)           # the differences, without raising: [(key, recorded, new), ...]

A directory *holds a run* when it has a finished run (metrics.json) or a checkpoint to resume
(checkpoints/last.ckpt), with the config.yaml that run recorded. The configs are compared as plain values,
resolved, with the keys that may change between attempts left out (logger, resume, analyze). ``resume=false``
starts afresh whatever the directory holds (overwriting it). train.py asks before Hydra writes anything into
the directory (its RunDirChecks callback), so a refused rerun leaves the directory byte-identical.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from encoders.config_checks import ConfigError, resolved_config
from encoders.run_dir import CONFIG, LAST_CHECKPOINT, RunDir, RunFileError, read_file

log = logging.getLogger(__name__)

# Keys that may change between an interrupted run and its restart.
RESUME_IGNORED_KEYS = ("logger", "resume", "analyze", "metrics", "maps")  # metrics, maps: outputs made after the fit
_MISSING = object()


class RunDirInUse(ConfigError):
    """The run directory holds a run of another config; nothing in it was changed. The message names the
    directory and the keys that differ."""


def config_differences(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs (plain dicts)."""
    return [key for key, _, _ in _differences(old, new, prefix)]


def _differences(old: Mapping, new: Mapping, prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def recorded_config(run_dir: str | os.PathLike) -> dict | None:
    """The config a run directory's config.yaml records (OmegaConf's reading, as it was written), or None
    without one; RunFileError naming the file when it cannot be read."""
    path = RunDir(run_dir).file(CONFIG)
    if not path.is_file():
        return None
    return read_file(path, lambda p: OmegaConf.to_container(OmegaConf.load(p)), "YAML", dict)


def holds_run(run_dir: str | os.PathLike) -> bool:
    """Whether the directory holds a finished run or a checkpoint to resume."""
    run = RunDir(run_dir)
    return run.is_run or run.file(LAST_CHECKPOINT).is_file()


def other_run(config: Mapping | DictConfig, run_dir: str | os.PathLike) -> list[tuple[str, object, object]]:
    """(key, recorded value, new value) for every key in which the run ``run_dir`` holds differs from
    ``config`` (logger, resume and analyze aside); [] when the directory holds no run, or one of this config."""
    if not holds_run(run_dir):
        return []
    old = recorded_config(run_dir)
    if old is None:
        return []  # nothing recorded to compare with (written before config.yaml existed)
    new = resolved_config(config) if isinstance(config, DictConfig) else dict(config)
    old, new = dict(old), dict(new)
    for key in (*RESUME_IGNORED_KEYS, "hydra"):  # hydra: in configs composed with return_hydra_config (tests)
        old.pop(key, None), new.pop(key, None)
    return _differences(old, new)


def _show(value) -> str:
    return "(absent)" if value is _MISSING else repr(value) if isinstance(value, str) else str(value)


def describe(run_dir: str | os.PathLike, differences: list[tuple[str, object, object]]) -> str:
    """The one-line refusal: the directory, what it holds, the first differing keys with both values."""
    shown = ", ".join(f"{key}: {_show(a)} -> {_show(b)}" for key, a, b in differences[:3])
    more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
    what = "a finished run" if RunDir(run_dir).is_run else "a run to resume"
    return (f"{run_dir}: holds {what} with another config ({shown}{more}); nothing there was changed. "
            f"Use another hydra.run.dir (or hydra.sweep.dir), or resume=false to start afresh there")


def check_run_dir(config: Mapping | DictConfig, run_dir: str | os.PathLike) -> None:
    """RunDirInUse when ``run_dir`` holds a run of another config and ``config`` does not say resume=false."""
    plain = resolved_config(config) if isinstance(config, DictConfig) else config
    if not plain.get("resume", True):
        return
    try:
        differences = other_run(plain, run_dir)
    except RunFileError as err:  # its config.yaml is damaged: it cannot be compared, nor may it be overwritten
        raise RunDirInUse(f"{err}; {run_dir} holds a run, so nothing there was changed (resume=false starts "
                          f"afresh there)") from None
    if differences:
        raise RunDirInUse(describe(run_dir, differences))


def resume_checkpoint(config: Mapping | DictConfig, run_dir: str | os.PathLike) -> str | None:
    """``<run_dir>/checkpoints/last.ckpt`` if an earlier attempt of this run left one and ``resume`` is on.

    A restarted command (same ``hydra.run.dir``, or the same multirun ``hydra.sweep.dir``) goes on from the
    last completed epoch. The directory must not hold a run of another config (RunDirInUse: continuing
    another model's checkpoint, or overwriting another finished run, would be silently wrong).
    """
    plain = resolved_config(config) if isinstance(config, DictConfig) else config
    check_run_dir(plain, run_dir)
    last = Path(run_dir) / LAST_CHECKPOINT
    if not plain.get("resume", True) or not last.exists():
        return None
    log.info("resuming from %s", last)
    return str(last)
