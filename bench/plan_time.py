"""What planning a sensitivity mix from scratch costs, stage by stage.

    python bench/plan_time.py REFERENCE.gguf [--like Q4_K_M] [--encoder ggml|feedback]

Runs `converters.quantization.quantize.quantize(REFERENCE, OUT, MixBudget(like=…))` with an empty `QDESK_CACHE_DIR` (a
temporary
folder, so the importance matrix, the sensitivity measurement and, with error feedback, the input covariances are
all computed), and adds up the wall time between progress reports by stage: the text of each report up to its
first digit, colon or parenthesis, with every probe counted as "probing". Prints the total, each stage, and the
peak resident memory of the process. Issue 10 asks for planning the starter model within 5 minutes on a desktop
CPU. Prints figures; never passes or fails.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class StageClock:
    """Wall time per stage, a stage being what consecutive progress reports say they are doing."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._stage: str | None = None
        self._since = time.monotonic()

    def report(self, progress: object) -> None:
        message = getattr(progress, "message", "") or getattr(progress, "unit", "")
        stage = re.split(r" \(|:|\d", message)[0].strip() or "(unnamed)"
        self.switch("probing" if stage.startswith("probing") else stage)

    def switch(self, stage: str | None) -> None:
        now = time.monotonic()
        if self._stage is not None:
            self.seconds[self._stage] = self.seconds.get(self._stage, 0.0) + now - self._since
        self._stage, self._since = stage, now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("--like", default="Q4_K_M")
    parser.add_argument("--encoder", choices=("ggml", "feedback"), default=None,
                        help="default: quantize's own choice (feedback for a model whose covariances fit)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.reference.parent) as scratch:
        os.environ["QDESK_CACHE_DIR"] = str(Path(scratch) / "cache")
        from converters.mix.allocate import MixBudget
        from converters.quantization.quantize import quantize

        clock = StageClock()
        started = time.monotonic()
        result = quantize(args.reference, Path(scratch) / "out.gguf", MixBudget(like=args.like.upper()),
                          encoder=args.encoder, progress=clock.report)
        clock.switch(None)
        total = time.monotonic() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.reference.name}, like {args.like.upper()}, encoder {result.plan.encoder}: "
          f"{total:.1f} s wall, peak RSS {peak_mb:.0f} MB, load average now {os.getloadavg()[0]:.2f}")
    for stage, seconds in clock.seconds.items():
        print(f"  {seconds:7.1f} s  {stage}")


if __name__ == "__main__":
    main()
