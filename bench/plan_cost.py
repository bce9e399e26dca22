"""What applying a saved mix plan costs against quantizing with a preset, through the command line.

    python bench/plan_cost.py REFERENCE.gguf PLAN.json --imatrix FILE [--preset Q4_K_M] [--repeat 3]

Issue 10 asks that quantizing with a plan cost the same as a preset. Three commands are timed as subprocesses
(interpreter start included on every side), in turn, `--repeat` times each, and their medians printed with the
ratio to the preset's:

* peer: `qdesk quantize REFERENCE --preset P --imatrix FILE`
* `qdesk quantize REFERENCE --plan PLAN --imatrix FILE --encoder ggml` (the plan's types, llama.cpp's rounding)
* `qdesk quantize REFERENCE --plan PLAN --imatrix FILE --encoder feedback` (the types and error feedback, which
  needs a pass over the calibration text for the input covariances and re-encodes the fed-back matrices)

Make PLAN with `qdesk quantize REFERENCE --like P --plan-out PLAN.json`. Prints figures; never passes or fails.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QDESK = [sys.executable, "-m", "qdesk"]


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("plan", type=Path)
    parser.add_argument("--imatrix", type=Path, required=True)
    parser.add_argument("--preset", default="Q4_K_M")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.reference.parent) as scratch:
        output = str(Path(scratch) / "out.gguf")
        common = [str(args.reference), "-o", output, "--imatrix", str(args.imatrix)]
        commands = {
            f"preset {args.preset} (peer)": [*QDESK, "quantize", *common, "--preset", args.preset],
            "plan, ggml rounding": [*QDESK, "quantize", *common, "--plan", str(args.plan), "--encoder", "ggml"],
            "plan, error feedback": [*QDESK, "quantize", *common, "--plan", str(args.plan), "--encoder", "feedback"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeat):
            for name, command in commands.items():
                times[name].append(timed(command))
    print(f"reference {args.reference.name}, plan {args.plan.name}, imatrix {args.imatrix.name}, "
          f"{args.repeat} runs each")
    peer = statistics.median(next(iter(times.values())))
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"{name:28s} median {median:6.2f} s  ({', '.join(f'{t:.2f}' for t in runs)})  "
              f"ratio to the preset {median / peer:.2f}x")


if __name__ == "__main__":
    main()
