"""kill -9 of `qdesk quantize` and `qdesk convert` mid-way (issue 21, item 4): no child survives its parent, and the
next run that writes into the folder removes what the killed one left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="kill -9 is a POSIX signal")]

WAIT_S = 600


def _start(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "qdesk", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ))


def _wait_for(condition: Callable[[], bool], cli: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert cli.poll() is None, f"the command ended (status {cli.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {WAIT_S} s"
        time.sleep(0.02)


def _kill(cli: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """kill -9 the command; its descendants as they were just before."""
    descendants = psutil.Process(cli.pid).children(recursive=True)
    os.kill(cli.pid, signal.SIGKILL)
    cli.wait()
    return descendants


def _gone(process: psutil.Process, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _qdesk_children(cli: subprocess.Popen[bytes]) -> list[psutil.Process]:
    try:
        return [child for child in psutil.Process(cli.pid).children(recursive=True)
                if "native.child" in " ".join(child.cmdline())]
    except psutil.Error:
        return []


def _partials(folder: Path) -> list[Path]:
    return [path for path in folder.iterdir() if path.name.endswith(".partial")]


def _next_run_in(folder: Path, kquant_f16: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "qdesk", "quantize", str(kquant_f16), "-o",
                             str(folder / "next.gguf"), "--preset", "Q8_0", "--imatrix", "none"],
                            capture_output=True, text=True, timeout=WAIT_S, env=dict(os.environ))
    assert result.returncode == 0, result.stderr


def test_kill_9_of_quantize_stops_the_quantizer_and_the_next_run_removes_its_partial(
        smollm2_f16: Path, kquant_f16: Path, tmp_path: Path) -> None:
    cli = _start("quantize", str(smollm2_f16), "-o", str(tmp_path / "model-Q4_K_M.gguf"), "--preset", "Q4_K_M",
                 "--imatrix", "none")
    _wait_for(lambda: bool(_qdesk_children(cli)) and any(path.stat().st_size for path in _partials(tmp_path)), cli,
              "quantizer writing its output")
    descendants = _kill(cli)

    assert descendants and all(_gone(process) for process in descendants)
    [partial] = _partials(tmp_path)
    size = partial.stat().st_size
    time.sleep(1.0)
    assert partial.stat().st_size == size  # nothing writes it any more

    _next_run_in(tmp_path, kquant_f16)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["next.gguf"]


def test_kill_9_of_quantize_from_a_checkpoint_while_calibrating(smollm2_hf: Path, kquant_f16: Path,
                                                                  tmp_path: Path) -> None:
    """Converted in the command's own process (a temporary reference folder), then calibrated in a child."""
    cli = _start("quantize", str(smollm2_hf), "-o", str(tmp_path / "model-Q4_K_M.gguf"), "--preset", "Q4_K_M",
                 "--chunks", "64", "--ctx", "128")
    _wait_for(lambda: bool(_qdesk_children(cli)), cli, "calibration child")
    descendants = _kill(cli)

    assert descendants and all(_gone(process) for process in descendants)
    assert [path.name.startswith(f".qdesk-reference-{cli.pid}-") for path in tmp_path.iterdir()] == [True]

    _next_run_in(tmp_path, kquant_f16)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["next.gguf"]


def test_kill_9_of_convert_and_the_next_run_removes_its_partial(smollm2_hf: Path, kquant_f16: Path,
                                                                tmp_path: Path) -> None:
    cli = _start("convert", str(smollm2_hf), "-o", str(tmp_path / "model.gguf"))
    _wait_for(lambda: any(path.stat().st_size > 1 << 20 for path in _partials(tmp_path)), cli,
              "conversion writing its output")
    _kill(cli)

    [partial] = _partials(tmp_path)
    assert partial.name.startswith(f".model.gguf.{cli.pid}-")

    _next_run_in(tmp_path, kquant_f16)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["next.gguf"]
