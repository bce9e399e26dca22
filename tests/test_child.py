"""`native.child`: children die with their parent, and a function run in a child comes back as its result, its
error, or one sentence for an abort, a crash or a hang."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from native.child import ORPHANED_EXIT_STATUS, run_in_child, spawn_python
from native.errors import ChildFailed, ChildStalled, Stopped
from tests.builders import child_work

REPO = Path(__file__).resolve().parent.parent
SLEEPER = "tests.builders.child_work"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}


def _gone(pid: int, timeout: float = 15.0) -> bool:
    """Whether the process `pid` has ended (a zombie waiting for a parent to reap it counts as ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_a_child_dies_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\nfrom native.child import spawn_python\n"
         f"print(spawn_python({SLEEPER!r}, stdout=None, stderr=subprocess.DEVNULL).pid, flush=True)\n"
         "time.sleep(600)"],
        stdout=subprocess.PIPE, env=_environment(), text=True)
    try:
        child = int(parent.stdout.readline())  # type: ignore[union-attr]
        time.sleep(1.0)
        assert not _gone(child, timeout=0.1)
    finally:
        parent.kill()
        parent.wait()
    assert _gone(child)


@linux_only
def test_a_child_started_from_a_thread_that_ends_lives_on() -> None:
    """Linux sends the parent-death signal when the *thread* that started a child ends: children must be started
    from a thread that lives as long as the process."""
    started: list[subprocess.Popen[bytes]] = []
    thread = threading.Thread(target=lambda: started.append(
        spawn_python(SLEEPER, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    thread.start()
    thread.join()
    try:
        time.sleep(1.5)
        assert started[0].poll() is None
    finally:
        started[0].kill()
        started[0].wait()


@linux_only
def test_a_child_whose_parent_is_already_gone_exits_at_once() -> None:
    """The race: a parent that dies before the child asked to die with it has handed the child to another parent."""
    environment = {**_environment(), "QDESK_PARENT_PID": str(os.getpid() + 1_000_000)}
    ended = subprocess.run([sys.executable, "-m", "native.child", SLEEPER], env=environment, timeout=60,
                           capture_output=True, check=False)
    assert ended.returncode == ORPHANED_EXIT_STATUS


def test_a_grandchild_dies_with_the_child_that_started_it() -> None:
    grandchild = run_in_child(child_work.spawn_sleeper, {}, what="a test")
    assert _gone(grandchild)


def test_the_result_and_the_progress_come_back_from_another_process() -> None:
    reports: list[object] = []
    pid = run_in_child(child_work.report_and_return, {"steps": 20, "progress": reports.append}, what="a test")
    assert pid != os.getpid()
    assert reports and reports[-1] == 20


def test_a_function_can_be_named_rather_than_imported() -> None:
    assert run_in_child(f"{SLEEPER}:environment", {"name": "GGML_NO_BACKTRACE"}, what="a test") == "1"


def test_large_results_come_back_whole() -> None:
    result = run_in_child(child_work.large_result, {"megabytes": 64}, what="a test")
    expected = child_work.large_result(64)
    for name, values in expected.items():
        np.testing.assert_array_equal(result[name], values)


def test_nothing_the_child_prints_reaches_the_callers_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    assert run_in_child(child_work.print_to_stdout, {}, what="a test") == "done"
    assert capfd.readouterr().out == ""


def test_an_abort_inside_ggml_is_one_sentence_without_a_backtrace() -> None:
    started = time.monotonic()
    with pytest.raises(ChildFailed) as raised:
        run_in_child(child_work.ggml_abort, {}, what="the test step")
    message = str(raised.value)
    assert message.startswith("llama.cpp stopped the test step on an internal check")
    assert "(ops.cpp:4132: GGML_ASSERT(eps >= 0.0f) failed)" in message
    assert "\n" not in message and "gdb" not in message
    assert time.monotonic() - started < 60


def test_a_crash_is_one_sentence() -> None:
    with pytest.raises(ChildFailed, match=r"^llama\.cpp crashed during the test step"):
        run_in_child(child_work.segfault, {}, what="the test step")


def test_a_child_that_makes_no_progress_is_stopped() -> None:
    started = time.monotonic()
    with pytest.raises(ChildStalled, match="QDESK_STALL_MINUTES"):
        run_in_child(child_work.sleep, {"seconds": 60}, what="the test step", stall_s=1.0)
    assert time.monotonic() - started < 30


def test_a_child_that_works_without_reporting_is_not_taken_as_hung(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("native.child.CPU_SAMPLE_S", 0.5)
    monkeypatch.setattr("native.child.CPU_WORK_S", 0.01)
    assert run_in_child(child_work.busy, {"seconds": 6.0}, what="the test step", stall_s=3.0) == "done"


def test_the_watchdog_limit_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QDESK_STALL_MINUTES", "0.02")
    with pytest.raises(ChildStalled, match=r"made no progress and did no work for 1\.2 seconds"):
        run_in_child(child_work.sleep, {"seconds": 60, "progress": lambda _: None}, what="the test step")


def test_a_stop_reaches_the_child(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    stop = threading.Event()

    def stop_once_started() -> None:
        while not marker.exists():
            time.sleep(0.01)
        stop.set()

    threading.Thread(target=stop_once_started, daemon=True).start()
    assert run_in_child(child_work.wait_for_stop, {"should_stop": stop.is_set, "marker": marker},
                        what="a test") == "stopped"


def test_a_child_that_cannot_stop_is_killed() -> None:
    started = time.monotonic()
    with pytest.raises(Stopped):
        run_in_child(child_work.sleep, {"seconds": 60, "should_stop": lambda: True}, what="a test", stop_grace_s=0)
    assert time.monotonic() - started < 30
