"""Write a generated dataset directory all at once, or not at all, and reuse it when it matches.

The synthetic generators (NSD, NOD, video layouts) build into a sibling ``DIR.tmp-<pid>`` and move it
into place with ``os.replace``: an interrupted generation never leaves a half-written ``DIR``.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Callable


def nonempty(path: pathlib.Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(out: pathlib.Path) -> None:
    """Delete ``DIR.tmp-<pid>`` / ``DIR.old-<pid>`` leftovers of generations whose process is gone."""
    for kind in ("tmp", "old"):
        for d in out.parent.glob(f"{out.name}.{kind}-*"):
            pid = d.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)


def _exists_error(out: pathlib.Path) -> FileExistsError:
    return FileExistsError(f"{out} exists and is not empty (use --force to overwrite or --if-missing to reuse)")


def publish(tmp: pathlib.Path, out: pathlib.Path, force: bool) -> None:
    """Move the finished ``tmp`` dir to ``out`` atomically (replacing ``out`` only if ``force``)."""
    old = None
    if nonempty(out):
        if not force:
            raise _exists_error(out)
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    elif out.is_dir():
        out.rmdir()
    try:
        os.replace(tmp, out)
    except OSError as e:
        if old is not None:
            os.replace(old, out)  # put the previous dataset back
        raise FileExistsError(f"{out} appeared while generating: {e}") from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_dir_atomically(out_dir, build: Callable[[pathlib.Path], None], force: bool = False) -> pathlib.Path:
    """Run ``build(tmp_dir)`` and move the result to ``out_dir``; an existing non-empty ``out_dir``
    raises FileExistsError unless ``force`` (then it is replaced only once the new one is complete)."""
    out = pathlib.Path(out_dir)
    if nonempty(out) and not force:
        raise _exists_error(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
        publish(tmp, out, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_generated(out_dir, meta_file: str, wanted: dict, generate: Callable[[], pathlib.Path],
                     what: str) -> pathlib.Path:
    """``generate()`` unless ``out_dir/meta_file`` exists; if it exists, its values for the keys of
    ``wanted`` must equal them, otherwise ValueError naming the directory and the keys that differ.
    ``what`` names the dataset in that message (e.g. "synthetic NOD dataset")."""
    out = pathlib.Path(out_dir)
    meta = out / meta_file
    if not meta.exists():
        try:
            return generate()
        except FileExistsError:
            if not meta.exists():  # a non-dataset dir is in the way
                raise
    existing = json.loads(meta.read_text())
    diff = [k for k in wanted if existing.get(k) != wanted[k]]
    if diff:
        details = ", ".join(f"{k}: {existing.get(k)!r} != {wanted[k]!r}" for k in diff)
        raise ValueError(f"{out} holds a {what} made with different parameters ({details}); "
                         f"delete it or regenerate with --force")
    return out
