"""What collecting activation statistics costs: the same chunks evaluated by llama.cpp with and without collection.

    python bench/imatrix_overhead.py [MODEL.gguf] [--chunks 8] [--ctx 512] [--repeats 3] [--threads N]
                                     [--gpu-layers 0]

MODEL defaults to the F16 SmolLM2 the tests build (`.cache/tests/smollm2-135m-f16.gguf`). Both runs go through
`native.activations.ModelEvaluator` (collect=True and collect=False), loaded side by side; the two are timed
in turn over all chunks, `--repeats` times, after one warm-up chunk each, and the median of each is reported
with tokens/s and the ratio collecting/plain. The text is qdesk's built-in calibration text, repeated if short.
Prints figures; never passes or fails.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from native.activations import ModelEvaluator  # noqa: E402 - after the path setup; loads llama_cpp before numpy

DEFAULT_MODEL = REPO_ROOT / ".cache" / "tests" / "smollm2-135m-f16.gguf"
TEXT_FOLDER = REPO_ROOT / "resources" / "calibration"


def calibration_chunks(evaluator: ModelEvaluator, n_chunks: int, size: int) -> list[list[int]]:
    """`n_chunks` chunks of `size` tokens of the built-in text, each led by the model's BOS when it wants one."""
    text = "\n\n".join(path.read_text(encoding="utf-8") for path in sorted(TEXT_FOLDER.glob("*.txt")))
    prefix = evaluator.tokenize("", add_special=True)
    body = evaluator.tokenize(text, add_special=False)
    step = size - len(prefix)
    while len(body) < step * n_chunks:
        body = body + body
    return [prefix + body[i * step : (i + 1) * step] for i in range(n_chunks)]


def timed_pass(evaluator: ModelEvaluator, chunks: list[list[int]]) -> float:
    started = time.perf_counter()
    for chunk in chunks:
        evaluator.evaluate_chunk(chunk)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="default: os.cpu_count()")
    parser.add_argument("--gpu-layers", type=int, default=0)
    args = parser.parse_args()

    settings = {"n_ctx": args.ctx, "n_threads": args.threads, "n_gpu_layers": args.gpu_layers}
    with ModelEvaluator(args.model, collect=True, **settings) as collecting, \
            ModelEvaluator(args.model, collect=False, **settings) as plain:
        chunks = calibration_chunks(plain, args.chunks, args.ctx)
        tokens = sum(len(chunk) for chunk in chunks)
        for evaluator in (plain, collecting):
            evaluator.evaluate_chunk(chunks[0])
        times: dict[str, list[float]] = {"plain": [], "collecting": []}
        for _ in range(args.repeats):
            times["plain"].append(timed_pass(plain, chunks))
            times["collecting"].append(timed_pass(collecting, chunks))
        matrices = len(collecting.stats().matrices)

    print(f"model: {args.model.name}; {args.chunks} chunks × {args.ctx} tokens = {tokens} tokens; "
          f"threads {args.threads or os.cpu_count()}; GPU layers {args.gpu_layers}; {platform.machine()}, "
          f"{os.cpu_count()} logical cores")
    print(f"collecting records {matrices} weight matrices")
    for mode, runs in times.items():
        median = statistics.median(runs)
        print(f"{mode:>10}: median {median:7.2f} s  {tokens / median:8.1f} tokens/s   "
              f"(runs: {', '.join(f'{run:.2f}' for run in runs)})")
    ratio = statistics.median(times["collecting"]) / statistics.median(times["plain"])
    print(f"collecting/plain time: {ratio:.2f}×")


if __name__ == "__main__":
    main()
