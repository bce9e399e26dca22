"""What planning a sensitivity mix from scratch costs, stage by stage, in time and in memory.

    python bench/plan_time.py REFERENCE.gguf [--like Q4_K_M] [--encoder ggml|feedback] [--imatrix FILE]
                              [--mix-effort fast|default|thorough] [--chunks N] [--keep OUT.gguf]

Runs `converters.quantization.quantize.quantize(REFERENCE, OUT, MixBudget(like=…))` with an empty `QDESK_CACHE_DIR`
(a temporary folder, so the importance matrix unless given, the sensitivity measurement, the feedback ratios and
re-encodings are all computed), and adds up the wall time between progress reports by stage: the text of each
report up to its first digit, colon or parenthesis, with every probe counted as "probing". Memory: the resident
set of the whole process tree (this process and every child, such as llama.cpp's quantizer) is sampled with
psutil every 0.2 s; the peak is printed overall and per stage, next to the reference's size, with the largest
the spill folder (error feedback's input rows on disk) grew. Issue 20 asks for the 1.5B model within 45 minutes at
`default` and 15 at `fast`, at a peak no larger than the F16 reference + 3 GB. Prints figures; never passes or
fails.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SAMPLE_SECONDS = 0.2


class StageClock:
    """Wall time and peak tree memory per stage, a stage being what consecutive progress reports say they do."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_rss: dict[str, int] = {}
        self.stage: str | None = None
        self._since = time.monotonic()

    def report(self, progress: object) -> None:
        message = getattr(progress, "message", "") or getattr(progress, "unit", "")
        stage = re.split(r" \(|:|\d", message)[0].strip() or "(unnamed)"
        self.switch("probing" if stage.startswith("probing") else stage)

    def switch(self, stage: str | None) -> None:
        if stage == self.stage:
            return
        now = time.monotonic()
        if self.stage is not None:
            self.seconds[self.stage] = self.seconds.get(self.stage, 0.0) + now - self._since
            print(f"  ({now - self._since:.1f} s in {self.stage})", flush=True)
        self.stage, self._since = stage, now

    def note_memory(self, rss: int) -> None:
        stage = self.stage or "(before the first report)"
        self.peak_rss[stage] = max(self.peak_rss.get(stage, 0), rss)


def tree_rss() -> int:
    """Resident bytes of this process and all its descendants."""
    me = psutil.Process()
    total = 0
    for process in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += process.memory_info().rss
    return total


def folder_bytes(folder: Path, prefix: str) -> int:
    total = 0
    for entry in folder.glob(f"{prefix}*"):
        for path in entry.rglob("*"):
            with contextlib.suppress(OSError):
                total += path.stat().st_size
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("--like", default="Q4_K_M")
    parser.add_argument("--encoder", choices=("ggml", "feedback"), default=None,
                        help="default: quantize's own choice (feedback for a mix)")
    parser.add_argument("--imatrix", default="auto", help="auto (calibrate, the default), none or a file")
    parser.add_argument("--mix-effort", default="default", choices=("fast", "default", "thorough"))
    parser.add_argument("--chunks", type=int, default=None, help="calibration chunks (default: quantize's)")
    parser.add_argument("--scratch", type=Path, default=None, help="where the output, cache and spill go "
                        "(default: beside the reference)")
    parser.add_argument("--keep", type=Path, default=None, metavar="GGUF",
                        help="keep the planned model there, to measure its quality (default: deleted with the rest)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.scratch or args.reference.parent, prefix="plan-time-") as scratch:
        os.environ["QDESK_CACHE_DIR"] = str(Path(scratch) / "cache")
        from converters.mix.allocate import MixBudget
        from converters.mix.feedback_inputs import SPILL_PREFIX
        from converters.quantization.quantize import quantize

        clock = StageClock()
        peak = {"rss": 0, "spill": 0}
        done = threading.Event()

        def sample() -> None:
            while not done.wait(SAMPLE_SECONDS):
                rss = tree_rss()
                peak["rss"] = max(peak["rss"], rss)
                clock.note_memory(rss)
                peak["spill"] = max(peak["spill"], folder_bytes(Path(scratch), SPILL_PREFIX))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        extra = {"chunks": args.chunks} if args.chunks else {}
        try:
            result = quantize(args.reference, Path(scratch) / "out.gguf", MixBudget(like=args.like.upper()),
                              imatrix=args.imatrix, encoder=args.encoder, mix_effort=args.mix_effort,
                              progress=clock.report, **extra)
        finally:
            done.set()
            sampler.join()
            clock.switch(None)
        total = time.monotonic() - started
        if args.keep is not None:
            shutil.move(Path(scratch) / "out.gguf", args.keep)
    reference_gb = args.reference.stat().st_size / 1e9
    print(f"{args.reference.name} ({reference_gb:.2f} GB), like {args.like.upper()}, effort {args.mix_effort}, "
          f"imatrix {args.imatrix}, encoder {result.plan.encoder}: {total:.1f} s wall; peak RSS of the process tree "
          f"{peak['rss'] / 1e9:.2f} GB (reference + {(peak['rss'] / 1e9 - reference_gb):.2f} GB); spill folder at "
          f"most {peak['spill'] / 1e9:.2f} GB; load average now {os.getloadavg()[0]:.2f}")
    for stage, seconds in clock.seconds.items():
        print(f"  {seconds:8.1f} s  peak {clock.peak_rss.get(stage, 0) / 1e9:5.2f} GB  {stage}")


if __name__ == "__main__":
    main()
