"""Hydra's command-line mistakes as one ``error:`` line and exit code 2 (train.py and analyze.py).

    if __name__ == "__main__":
        with one_line_hydra_errors():
            main()          # a @hydra.main function

Hydra reports an unknown config choice (``head=lineer``), a key the config does not have (``head.foo=1``) or
an override that does not parse as 6-13 lines and exits 1. Inside this context Hydra raises them instead (its
documented switch ``HYDRA_FULL_ERROR=1``), and the ones raised while Hydra composes a config (the run's, or a
sweep's jobs', which Hydra composes before launching any) become one line that names the override and lists
the valid choices. Anything raised inside a job passes through unchanged, as do --help and --cfg (which raise
nothing).
"""
from __future__ import annotations

import contextlib
import difflib
import os
import re
import sys
import traceback

from hydra.errors import (ConfigCompositionException, MissingConfigException, OverrideParseException,
                          SearchPathException)
from omegaconf.errors import OmegaConfBaseException

COMPOSITION_ERRORS = (ConfigCompositionException, OverrideParseException, SearchPathException, OmegaConfBaseException)


def _first_lines(text: str, n: int = 2) -> str:
    """The first ``n`` meaningful lines of a Hydra message, joined (its search-path listing and hints left out)."""
    lines = []
    for line in str(text).splitlines():
        if line.startswith(("Config search path", "\tprovider=", "Set the environment variable")):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines[:n]) or "Hydra could not compose the config"


def _choices(options, wrong: str) -> str:
    """'did you mean X? choose from: a, b, c' (or 'there are none')."""
    options = [str(o) for o in options]
    close = difflib.get_close_matches(wrong, options, n=1)
    listed = f"choose from: {', '.join(options)}" if options else "there are none"
    return (f"did you mean {close[0]}? " if close else "") + listed


def describe(err: BaseException) -> str:
    """One line for a config-composition error: the override at fault and what would be valid."""
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options is not None:
        group, _, option = str(err.missing_cfg_file).rpartition("/")
        where = re.match(r"In '([^']+)'", str(err))
        inside = f" (asked for in conf/{where.group(1)}.yaml)" if where and "/" in where.group(1) \
            and not where.group(1).startswith("hydra/") else ""
        return f"{group}={option}: there is no {group} config '{option}'{inside} ({_choices(err.options, option)})"
    if isinstance(err, OverrideParseException):
        return f"{err.override}: not a valid override ({_first_lines(err.message, 1)}; see " \
               f"https://hydra.cc/docs/advanced/override_grammar/basic/)"
    cause = err.__cause__
    if isinstance(err, ConfigCompositionException) and isinstance(cause, OmegaConfBaseException) \
            and "not in struct" in str(cause) and getattr(cause, "full_key", None):
        key, name = str(cause.full_key), str(getattr(cause, "key", "") or cause.full_key.rpartition(".")[2])
        append = re.search(r"use \+(\S+)", str(err))
        override = append.group(1) if append else key
        parent = key.rpartition(".")[0]
        node = getattr(cause, "parent_node", None)
        keys = [str(k) for k in (node.keys() if hasattr(node, "keys") else ())
                if not str(k).startswith("_") and str(k) != "hydra"]
        close = difflib.get_close_matches(name, keys, n=1)
        listed = (f"did you mean {close[0]}? " if close else "") + (
            f"its keys: {', '.join(keys)}" if keys else "it has none")
        return f"{override}: {parent or 'the config'} has no key '{name}' ({listed}; +{override} would add it)"
    if isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None):
        return f"{err.full_key}: {_first_lines(getattr(err, 'msg', err), 1)}"
    return _first_lines(err)


def raised_in_job(err: BaseException) -> bool:
    """Whether ``err`` comes from inside a job (Hydra's run_job is on its traceback), not from composing."""
    return any(frame.f_code.co_name == "run_job" and "hydra" in frame.f_code.co_filename
               for frame, _ in traceback.walk_tb(err.__traceback__))


@contextlib.contextmanager
def one_line_hydra_errors():
    """Run a @hydra.main function: Hydra's composition errors become one ``error:`` line on stderr and exit
    code 2; everything else propagates (HYDRA_FULL_ERROR is set while inside: full tracebacks)."""
    before = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except COMPOSITION_ERRORS as err:
        if raised_in_job(err):
            raise
        print(f"error: {describe(err)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before
