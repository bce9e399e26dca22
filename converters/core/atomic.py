"""Outputs appear complete or not at all: written to a temporary file beside the target, then renamed.

The temporary file's name records its owner (`converters.core.leftovers`), so that one left by a killed process is
removed by the next process that writes into the same folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from converters.core.errors import OutputError
from converters.core.leftovers import temporary_file


def describe_os_error(error: OSError, path: Path) -> str:
    """One sentence for an OS error met while writing `path`."""
    if error.errno == errno.ENOSPC:
        return f"The disk is full while writing {path}; free some space or choose another output folder."
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"Cannot write {path}: permission denied; choose an output folder you can write to."
    if error.errno == errno.ENOENT:
        return f"Cannot write {path}: the folder {path.parent} does not exist; create it or choose another."
    if error.errno == errno.EISDIR:
        return f"Cannot write {path}: it is a folder; give a file name ending in .gguf."
    return f"Cannot write {path}: {error.strerror or error}; choose another output path."


def check_free_space(path: Path, needed_bytes: int) -> None:
    """Refuse to start when the output's file system cannot hold `needed_bytes` more."""
    free = _free_bytes(path.parent)
    if free is not None and free < needed_bytes:
        raise OutputError(
            f"Not enough disk space for {path.name}: it needs about {needed_bytes / 1e9:.2f} GB "
            f"and {path.parent} has {free / 1e9:.2f} GB free; free some space or choose another folder."
        )


def _free_bytes(folder: Path) -> int | None:
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"Cannot write {path}: it is a folder; give a file name ending in .gguf.")
    try:
        temporary = temporary_file(path.parent, path.name)
    except OSError as error:
        raise OutputError(describe_os_error(error, path)) from error
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, path)
    except OSError as error:
        raise OutputError(describe_os_error(error, path)) from error
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
