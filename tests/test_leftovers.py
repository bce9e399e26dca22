"""Temporary names record their owner; the next writer in a folder removes those of dead owners, never a live one's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil

from converters.core.atomic import atomic_output
from converters.core.leftovers import owner_tag, remove_leftovers, temporary_file, temporary_folder


def _dead_owner_tag() -> str:
    """The tag of a process that has ended (its id is not reused this quickly)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    tag = f"{process.pid}-{int(psutil.Process(process.pid).create_time())}"
    process.wait()
    return tag


def test_temporary_names_carry_their_owner(tmp_path: Path) -> None:
    pid, start = owner_tag().split("-")
    assert int(pid) == os.getpid()
    assert abs(int(start) - psutil.Process().create_time()) < 2
    file = temporary_file(tmp_path, "model.gguf")
    folder = temporary_folder(tmp_path, "reference")
    assert file.name.startswith(f".model.gguf.{owner_tag()}-") and file.name.endswith(".partial")
    assert folder.name.startswith(f".qdesk-reference-{owner_tag()}-") and folder.is_dir()


def test_the_next_writer_removes_dead_owners_leftovers_only(tmp_path: Path) -> None:
    dead = _dead_owner_tag()
    pid = str(os.getpid())
    reused = f"{pid}-{int(psutil.Process().create_time()) - 3600}"  # this process id, another process's start
    dead_file = tmp_path / f".model.gguf.{dead}-abc123.partial"
    dead_folder = tmp_path / f".qdesk-reference-{dead}-abc123"
    reused_file = tmp_path / f".other.gguf.{reused}-abc123.partial"
    live_file = tmp_path / f".model.gguf.{owner_tag()}-abc123.partial"
    live_folder = tmp_path / f".qdesk-reference-{owner_tag()}-abc123"
    untagged = tmp_path / ".model.gguf.abc123.partial"
    ours = tmp_path / "model.gguf"
    for file in (dead_file, reused_file, live_file, untagged, ours):
        file.write_bytes(b"x")
    for folder in (dead_folder, live_folder):
        folder.mkdir()
        (folder / "reference.gguf").write_bytes(b"x")

    with atomic_output(tmp_path / "output.gguf") as temporary:
        temporary.write_bytes(b"new")

    remaining = {path.name for path in tmp_path.iterdir()}
    assert remaining == {live_file.name, live_folder.name, untagged.name, ours.name, "output.gguf"}


def test_a_folder_that_cannot_be_read_is_left_alone(tmp_path: Path) -> None:
    assert remove_leftovers(tmp_path / "missing") == []
