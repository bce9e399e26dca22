"""What a job writes, checked before it does any work: never onto one of its inputs, never one file for two
outputs, and only into a folder that exists and takes new files.

`check_outputs(inputs, outputs)` compares paths after resolving links, and for files that exist already their
device and inode too, so a hard link, a symbolic link or another spelling of an input (`./x.gguf`, a
case-insensitive file system) is caught as well. `check_output_folder(path)` makes sure a long job will be able
to write its result at the end. `place_as_new(staged, folder, name)` puts a finished file into a folder under a
name no other file has, in one atomic step that two processes cannot both win.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from converters.core.atomic import describe_os_error
from converters.core.errors import OutputError

__all__ = ["check_output_folder", "check_outputs", "disk_full", "place_as_new", "same_file"]

PathLike = str | os.PathLike[str]
FULL_DISK_BYTES = 16 << 20
"""Free space below which a failed write is blamed on a full disk."""


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except (OSError, ValueError):
        return None
    return stat.st_dev, stat.st_ino


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a link loop: compare the path as given
        return path.absolute()


def same_file(first: PathLike, second: PathLike) -> bool:
    """Whether two paths name one file: the same path once links are resolved, or the same device and inode."""
    first, second = Path(first), Path(second)
    if _resolved(first) == _resolved(second):
        return True
    identity = _identity(first)
    return identity is not None and identity == _identity(second)


def check_outputs(inputs: Iterable[PathLike | None], outputs: Iterable[PathLike | None]) -> None:
    """Raise OutputError when an output is one of the inputs, or two outputs are one file (None entries are
    skipped). An input may be a folder; the outputs are compared with the folder itself, not what is inside."""
    input_paths = [Path(path) for path in inputs if path is not None]
    output_paths = [Path(path) for path in outputs if path is not None]
    for output in output_paths:
        for source in input_paths:
            if same_file(output, source):
                how = "" if _resolved(output) == _resolved(source) else " (they are links to one file)"
                raise OutputError(f"Refusing to write {output}: it is the input {source}{how}, which writing would "
                                  "destroy; choose another output file.")
    for index, output in enumerate(output_paths):
        for other in output_paths[index + 1:]:
            if same_file(output, other):
                raise OutputError(f"Two outputs are the same file ({output} and {other}); give each its own name.")


def check_output_folder(path: PathLike) -> None:
    """Raise OutputError unless a file `path` could be created now: its folder exists, is a folder, and takes a new
    file (tried with a temporary file, removed at once), and `path` itself is not a folder."""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise OutputError(f"Cannot write {path}: it is a folder; give a file name inside it.")
    if not folder.exists():
        raise OutputError(describe_os_error(OSError(errno.ENOENT, "No such file or directory"), path))
    if not folder.is_dir():
        raise OutputError(f"Cannot write {path}: {folder} is a file, not a folder; choose another output path.")
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".qdesk-write-test-", dir=folder)
    except OSError as error:
        raise OutputError(describe_os_error(error, path)) from error
    os.close(descriptor)
    os.unlink(probe)


def place_as_new(staged: PathLike, folder: PathLike, name: str) -> Path:
    """Give the complete file `staged` (in `folder`) the name `name` there, or `stem-2.ext`, `stem-3.ext`, … when
    that is taken; returns the new path. Taking a name is atomic (a hard link, which never replaces a file), so
    two processes placing files of one name at once get two names; `staged` is gone afterwards. On a file system
    without hard links the name is claimed with O_EXCL and the file renamed onto the claim."""
    staged, folder = Path(staged), Path(folder)
    stem, dot, suffix = name.rpartition(".")
    stem, suffix = (stem, dot + suffix) if stem else (name, "")
    number = 1
    try:
        while True:
            candidate = folder / (name if number == 1 else f"{stem}-{number}{suffix}")
            number += 1
            try:
                os.link(staged, candidate)
            except FileExistsError:
                continue
            except OSError as error:
                if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise OutputError(describe_os_error(error, candidate)) from error
                if not _claim(candidate):
                    continue
                os.replace(staged, candidate)
            return candidate
    finally:
        staged.unlink(missing_ok=True)


def _claim(candidate: Path) -> bool:
    try:
        descriptor = os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as error:
        raise OutputError(describe_os_error(error, candidate)) from error
    os.close(descriptor)
    return True


def disk_full(path: PathLike) -> OutputError | None:
    """The error to report when a write to `path` failed (in a child process, say, whose errno is lost) and the
    disk holding it has almost no free space left; None when the disk is not the likely cause."""
    path = Path(path)
    try:
        stats = os.statvfs(path.parent)
    except OSError:
        return None
    if stats.f_bavail * stats.f_frsize >= FULL_DISK_BYTES:
        return None
    return OutputError(describe_os_error(OSError(errno.ENOSPC, "No space left on device"), path))
