"""Writing files so that a full disk or an unwritable folder is one line naming the path, never a
half-written file.

    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))   # temp file beside it, then rename
    atomic_write(path, lambda f: torch.save(obj, f))
    require_writable_dir(run_dir, "run directory")                   # StorageError if nothing can be written there

A failed write removes its temp file, so the destination holds either its complete new content or
what it held before. ``StorageError`` (an OSError) carries the message users see: path, what, why.
"""
from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


class StorageError(OSError):
    """A file or folder could not be written (read-only, no permission, disk full); the message names it."""


def reason(err: BaseException) -> str:
    """Why a write failed, in a few words: the OS's text for its errno (also when a library such as HDF5
    only mentions the errno inside its own message), else the error's first line."""
    code = getattr(err, "errno", None)
    if code is None:
        found = re.search(r"errno = (\d+)", str(err))
        code = int(found.group(1)) if found else None
    if code:
        return os.strerror(code)
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def is_storage_failure(err: BaseException) -> bool:
    """Whether an OSError (or a library's RuntimeError around one) says the disk or folder refused a write."""
    code = getattr(err, "errno", None)
    if code is None:
        found = re.search(r"errno = (\d+)", str(err))
        code = int(found.group(1)) if found else None
    return code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


class _RecordingFile:
    """A binary file whose write errors are remembered: torch.save turns them into a RuntimeError."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.error = raw, None

    def write(self, data) -> int:
        try:
            return self.raw.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name):
        return getattr(self.raw, name)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], what: str = "") -> None:
    """Write ``path`` through ``write(binary file)`` into ``<path>.tmp``, then rename it into place.

    StorageError naming ``path`` if the folder or the disk refuses (the temp file is removed); any other
    error from ``write`` propagates unchanged (also after removing the temp file).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        try:
            with open(tmp, "wb") as raw:
                f = _RecordingFile(raw)
                try:
                    write(f)
                except RuntimeError as err:  # torch.save reports a failed write as a RuntimeError
                    if f.error is None:
                        raise
                    raise f.error from err
            os.replace(tmp, path)
        except BaseException:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise
    except OSError as err:
        raise StorageError(f"{path}: cannot write {what + ' ' if what else ''}({reason(err)})") from None


def write_text(path: str | Path, text: str, what: str = "") -> None:
    """A text file (UTF-8), atomically: see atomic_write."""
    atomic_write(path, lambda f: f.write(text.encode()), what)


def require_writable_dir(directory: str | Path, what: str = "folder") -> Path:
    """Create ``directory`` if needed and check that a file can be created in it (then removed).

    StorageError naming it otherwise (read-only file system, no permission, a file in the way).
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise StorageError(f"{directory}: cannot write the {what} there ({reason(err)})") from None
    return directory
