"""What applying a saved mix plan costs against quantizing with a preset, through the command line.

    python bench/plan_cost.py REFERENCE.gguf --imatrix FILE [--plan PLAN.json | --like Q4_K_M] [--preset Q4_K_M]
                              [--repeat 3]

Issue 10 asks that quantizing with a plan cost the same as a preset, issue 20 that applying a plan with error
feedback cost at most 3× a preset. Without `--plan` the plan is made first (`qdesk quantize REFERENCE --like P
--plan-out PLAN`, timed once, as a user would have done before), with its own `QDESK_CACHE_DIR`, which then holds
what planning re-encoded. Four commands are timed as subprocesses (interpreter start included on every side), in
turn, `--repeat` times each, and their medians printed with the ratio to the preset's:

* peer: `qdesk quantize REFERENCE --preset P --imatrix FILE`
* `--plan PLAN --encoder ggml` (the plan's types, llama.cpp's rounding)
* `--plan PLAN --encoder feedback`, with the cache planning filled (the re-encoded tensors are copied)
* the same with an empty cache each time (the inputs are collected on calibration text and every fed-back matrix
  re-encoded: what applying a plan costs on another machine, or after its cache was cleared)

Prints figures; never passes or fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QDESK = [sys.executable, "-m", "qdesk"]


def timed(command: list[str], cache: Path) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                   env={**os.environ, "QDESK_CACHE_DIR": str(cache)})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("--plan", type=Path, default=None)
    parser.add_argument("--like", default="Q4_K_M", help="the budget of the plan made when no --plan is given")
    parser.add_argument("--imatrix", type=Path, required=True)
    parser.add_argument("--preset", default="Q4_K_M")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-cold", action="store_true", help="leave out the run with an empty cache")
    parser.add_argument("--scratch", type=Path, default=None, help="where outputs and caches go (default: beside "
                        "the reference)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.scratch or args.reference.parent, prefix="plan-cost-") as scratch:
        warm, cold = Path(scratch) / "cache", Path(scratch) / "cold"
        output = str(Path(scratch) / "out.gguf")
        common = [str(args.reference), "-o", output, "--imatrix", str(args.imatrix)]
        plan = args.plan
        if plan is None:
            plan = Path(scratch) / "plan.json"
            seconds = timed([*QDESK, "quantize", *common, "--like", args.like, "--plan-out", str(plan)], warm)
            print(f"planning --like {args.like} (once, filling the cache): {seconds:.1f} s")
        commands = {
            f"preset {args.preset} (peer)": ([*QDESK, "quantize", *common, "--preset", args.preset], warm),
            "plan, ggml rounding": ([*QDESK, "quantize", *common, "--plan", str(plan), "--encoder", "ggml"], warm),
            "plan, feedback, cached": ([*QDESK, "quantize", *common, "--plan", str(plan), "--encoder", "feedback"],
                                       warm),
        }
        if not args.skip_cold:
            commands["plan, feedback, empty cache"] = (
                [*QDESK, "quantize", *common, "--plan", str(plan), "--encoder", "feedback"], cold)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeat):
            for name, (command, cache) in commands.items():
                if cache == cold:
                    shutil.rmtree(cold, ignore_errors=True)
                times[name].append(timed(command, cache))
    print(f"reference {args.reference.name}, plan {plan.name}, imatrix {args.imatrix.name}, {args.repeat} runs each, "
          f"load average now {os.getloadavg()[0]:.2f}")
    peer = statistics.median(next(iter(times.values())))
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"{name:30s} median {median:7.2f} s  ({', '.join(f'{t:.2f}' for t in runs)})  "
              f"ratio to the preset {median / peer:.2f}x")


if __name__ == "__main__":
    main()
