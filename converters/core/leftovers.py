"""Temporary files and folders that name their owner, and the removal of those whose owner is dead.

Every temporary name qdesk writes records the process that made it: its id and its start time (whole seconds
since the epoch, from psutil), so that a process id the system has since given to another program does not
pass for the owner.

    .model.gguf.<pid>-<start>-<random>.partial       a file being written (`temporary_file`)
    .qdesk-reference-<pid>-<start>-<random>          a folder of work in progress (`temporary_folder`)

A process killed mid-way (kill -9, a crash, a power cut) leaves such names behind. The next qdesk process that
makes a temporary name in the same folder first removes the ones whose owner is no longer running
(`remove_leftovers`). A name whose owner is alive, or whose owner cannot be
checked, is never touched, nor is anything without such a name.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import tempfile
from pathlib import Path

import psutil

__all__ = ["is_leftover", "owner_alive", "owner_tag", "remove_leftovers", "temporary_file", "temporary_folder"]

_FILE = re.compile(r"^\..+\.(?P<pid>\d+)-(?P<start>\d+)-[A-Za-z0-9_]+\.partial$")
_FOLDER = re.compile(r"^\.qdesk-[a-z]+-(?P<pid>\d+)-(?P<start>\d+)-[A-Za-z0-9_]+$")
_START_TOLERANCE_S = 1
"""Start times are compared to the second, with this much slack for rounding."""


@functools.cache
def _start_time(pid: int) -> int:
    return int(psutil.Process(pid).create_time())


def owner_tag() -> str:
    """`<pid>-<start>` of this process, as temporary names carry it."""
    pid = os.getpid()
    return f"{pid}-{_start_time(pid)}"


def owner_alive(pid: int, start: int) -> bool:
    """Whether the process `pid` that started at `start` still runs; True when that cannot be known."""
    try:
        started = int(psutil.Process(pid).create_time())
    except psutil.NoSuchProcess:
        return False
    except (psutil.Error, OSError):
        return True
    return abs(started - start) <= _START_TOLERANCE_S


def is_leftover(name: str) -> bool:
    """Whether `name` is a temporary name of qdesk's whose owner is dead."""
    match = _FILE.match(name) or _FOLDER.match(name)
    return match is not None and not owner_alive(int(match["pid"]), int(match["start"]))


def remove_leftovers(folder: Path) -> list[Path]:
    """Remove the temporary files and folders in `folder` whose owner is dead (see the module docstring); the paths
    removed. Errors are ignored: a leftover that cannot be removed now is tried again by the next process."""
    removed = []
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            if not entry.name.startswith(".") or not is_leftover(entry.name):
                continue
            path = Path(entry.path)
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(path)
    return removed


def temporary_file(folder: Path, name: str) -> Path:
    """A new empty file `.<name>.<pid>-<start>-<random>.partial` in `folder`, after removing dead owners' leftovers
    there; raises OSError when it cannot be created."""
    remove_leftovers(folder)
    fd, path = tempfile.mkstemp(prefix=f".{name}.{owner_tag()}-", suffix=".partial", dir=folder)
    os.close(fd)
    return Path(path)


def temporary_folder(folder: Path | None, kind: str) -> Path:
    """A new folder `.qdesk-<kind>-<pid>-<start>-<random>` in `folder` (the system's temporary folder when None),
    after removing dead owners' leftovers there; raises OSError when it cannot be created."""
    folder = Path(folder) if folder is not None else Path(tempfile.gettempdir())
    remove_leftovers(folder)
    return Path(tempfile.mkdtemp(prefix=f".qdesk-{kind}-{owner_tag()}-", dir=folder))
