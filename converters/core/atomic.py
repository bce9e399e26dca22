"""Outputs appear complete or not at all: written to a temporary file beside the target, then renamed.

The temporary file's name records its owner (`converters.core.leftovers`), so that one left by a killed process is
removed by the next process that writes into the same folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from converters.core.errors import OutputError
from converters.core.leftovers import temporary_file
from converters.core.units import format_size


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


def check_free_space(path: Path, needed_bytes: int, *, purpose: str | None = None,
                     advice: str = "free some space or choose another folder") -> None:
    """Refuse to start when the file system that will hold `path` cannot take `needed_bytes` more.

    The sentence says what the space is for (`purpose`, by default "for <file name>") and what to do (`advice`).
    """
    folder = path.parent
    free = free_bytes(folder)
    if free is not None and free < needed_bytes:
        raise OutputError(
            f"Not enough disk space {purpose or f'for {path.name}'}: it needs about {format_size(needed_bytes)} "
            f"and {folder} has {format_size(free)} free; {advice}."
        )


def free_bytes(folder: Path) -> int | None:
    """Bytes free to this user on the file system of `folder` (or of its nearest existing parent); None if unknown."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


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
