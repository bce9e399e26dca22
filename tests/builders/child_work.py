"""Work for `native.child` tests, in a module a child process can import: functions that report, wait, abort
inside llama.cpp's ggml, crash or return large results; run as a module (`python -m native.child
tests.builders.child_work`), it sleeps until killed."""

from __future__ import annotations

import ctypes
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def report_and_return(*, steps: int, progress: Callable[[object], None]) -> int:
    for step in range(steps):
        progress(step + 1)
        time.sleep(0.01)
    return os.getpid()


def environment(name: str) -> str | None:
    return os.environ.get(name)


def print_to_stdout() -> str:
    print("printed by the child", flush=True)
    os.write(1, b"written to descriptor 1 by the child\n")
    return "done"


def ggml_abort() -> None:
    """What llama.cpp does on a failed GGML_ASSERT: ggml's own abort handler, which prints and aborts."""
    import llama_cpp

    library = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    library.ggml_abort(b"/somewhere/ggml/src/ops.cpp", 4132, b"GGML_ASSERT(%s) failed", b"eps >= 0.0f")


def segfault() -> None:
    ctypes.string_at(0)


def sleep(seconds: float, *, progress: Callable[[object], None] | None = None) -> None:
    if progress is not None:
        progress("started")
    time.sleep(seconds)


def busy(seconds: float) -> str:
    """Work without reporting progress."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sum(range(10_000))
    return "done"


def wait_for_stop(*, should_stop: Callable[[], bool], marker: Path) -> str:
    marker.write_text("started")
    while not should_stop():
        time.sleep(0.01)
    return "stopped"


def large_result(megabytes: int) -> dict[str, np.ndarray]:
    values = np.arange(megabytes * (1 << 20) // 8, dtype=np.float64)
    return {"values": values, "copy": values[::-1].copy()}


def evaluate_first_chunk(path: Path, *, progress: object = None, cancel: object = None) -> None:
    """Load `path` in llama.cpp and decode a few tokens, with none of qdesk's checks first."""
    from native.activations import ModelEvaluator

    with ModelEvaluator(path, n_ctx=64, collect=False) as evaluator:
        evaluator.evaluate_chunk(evaluator.tokenize("The cat sat on the mat."))


def spawn_sleeper() -> int:
    """In a child: start a grandchild that sleeps, and return its process id."""
    from native.child import spawn_python

    return spawn_python("tests.builders.child_work", stdout=None, stderr=None).pid


if __name__ == "__main__":
    print(os.getpid(), flush=True, file=sys.stderr)
    time.sleep(3600)
