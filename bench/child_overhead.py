"""What running a step in a child process costs (`native.child`): calibration in a child against the same
calibration in this process, and a large result coming back from a child against copying it here.

    python bench/child_overhead.py [MODEL.gguf] [--chunks 4] [--ctx 128] [--repeats 3] [--megabytes 800]

MODEL defaults to the F16 SmolLM2 the tests build (`.cache/tests/smollm2-135m-f16.gguf`). `calibrate` is what
the CLI and the GUI call (a child per call); `calibrate.__wrapped__` is the same function in this process, the
peer. The result transfer sends a dict of float64 arrays of `--megabytes` (the size of SmolLM2's error-feedback
covariances) back from a child; the peer is `numpy.copy` of the same arrays here. Medians of `--repeats` runs,
each with its runs listed. Prints figures; never passes or fails.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402 - after the path setup

from converters.calibration.calibrate import calibrate  # noqa: E402
from native.child import run_in_child  # noqa: E402
from tests.builders.child_work import large_result  # noqa: E402

DEFAULT_MODEL = REPO_ROOT / ".cache" / "tests" / "smollm2-135m-f16.gguf"


def median_of(runs: int, work: Callable[[], object]) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def show(label: str, median: float, runs: list[float]) -> None:
    print(f"{label:>34}: median {median:7.2f} s   (runs: {', '.join(f'{run:.2f}' for run in runs)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--megabytes", type=int, default=800)
    args = parser.parse_args()

    print(f"model: {args.model.name}; calibration {args.chunks} chunks × {args.ctx} tokens; {platform.machine()}, "
          f"{os.cpu_count()} logical cores; load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    settings = {"chunks": args.chunks, "ctx": args.ctx}
    here, here_runs = median_of(args.repeats, lambda: calibrate.__wrapped__(args.model, None, **settings))
    child, child_runs = median_of(args.repeats, lambda: calibrate(args.model, None, **settings))
    show("calibrate in this process", here, here_runs)
    show("calibrate in a child", child, child_runs)
    print(f"{'child/in-process time':>34}: {child / here:.2f}×  (+{child - here:.2f} s a call)")

    arrays = large_result(args.megabytes // 2)  # two arrays of half the size each
    copied, copied_runs = median_of(args.repeats, lambda: {name: np.copy(a) for name, a in arrays.items()})
    sent, sent_runs = median_of(args.repeats,
                                lambda: run_in_child(large_result, {"megabytes": args.megabytes // 2}, what="bench"))
    made, made_runs = median_of(args.repeats, lambda: large_result(args.megabytes // 2))
    show(f"{args.megabytes} MB result made here", made, made_runs)
    show(f"{args.megabytes} MB copied here (peer)", copied, copied_runs)
    show(f"{args.megabytes} MB made in a child, sent", sent, sent_runs)
    print(f"{'transfer over copy':>34}: {(sent - made) / copied:.2f}×  ({args.megabytes / max(sent - made, 1e-9):.0f} "
          "MB/s through the pipe, start-up included)")


if __name__ == "__main__":
    main()
