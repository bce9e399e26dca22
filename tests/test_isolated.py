"""Long steps in a child process: result, progress, the child's errors, cancellation and a child that dies."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from converters.core.errors import Cancelled, CheckpointError
from converters.core.isolation import WorkerDied, run_isolated
from converters.core.jobs import CancelToken, Progress
from converters.writing.convert import convert_checkpoint


def counting(*, steps: int, progress, cancel) -> int:
    for step in range(steps):
        progress(Progress(step + 1, steps, "steps"))
        time.sleep(0.01)
    return os.getpid()


def waiting(*, marker: Path, progress, cancel) -> None:
    marker.write_text("started")
    while True:
        cancel.raise_if_cancelled()
        time.sleep(0.01)


def dying(*, progress, cancel) -> None:
    os._exit(3)


def test_the_result_and_the_last_progress_come_back_from_another_process() -> None:
    reports: list[Progress] = []
    child = run_isolated(counting, {"steps": 20}, progress=reports.append)
    assert child != os.getpid()
    assert reports and reports[-1].done == 20


def test_a_user_error_keeps_its_sentence(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as raised:
        run_isolated(convert_checkpoint, {"source": tmp_path / "missing", "output": tmp_path / "out.gguf"})
    assert "missing" in str(raised.value)
    assert not list(tmp_path.iterdir())


def test_cancelling_stops_the_child(tmp_path: Path) -> None:
    cancel = CancelToken()
    marker = tmp_path / "started"

    def cancel_once_started() -> None:
        while not marker.exists():
            time.sleep(0.01)
        cancel.cancel()

    threading.Thread(target=cancel_once_started, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        run_isolated(waiting, {"marker": marker}, cancel=cancel)
    assert time.monotonic() - started < 60


def test_a_child_that_dies_is_one_sentence() -> None:
    with pytest.raises(WorkerDied, match="exit status 3"):
        run_isolated(dying, {})
