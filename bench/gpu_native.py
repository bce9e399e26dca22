"""The native bridge on a GPU build of llama.cpp: device discovery, and activation statistics read back from
device memory agreeing with the same statistics on the CPU.

    python bench/gpu_native.py [MODEL.gguf] [--chunks 4] [--ctx 512]

Without MODEL it builds a random Llama (hidden 1024, 16 layers) with the test builders and converts it to F16.
Prints the backends, then for the same chunks evaluated with every layer on the GPU and with none: tokens/s
and, per weight, the correlation of the mean squares and whether the token counts agree. Run it where a CUDA
(or Metal, Vulkan) build of llama-cpp-python is installed (packaging/README.md); it prints, never fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import llama_cpp  # noqa: F401 - first: on CUDA builds numpy loaded before llama_cpp has crashed model loading
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.imatrix_overhead import calibration_chunks  # noqa: E402
from native.activations import ModelEvaluator  # noqa: E402
from native.backends import discover  # noqa: E402
from qdesk.display.backends import render_text  # noqa: E402

BUILT_SIZES = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 16, "num_attention_heads": 16}


def build_model(folder: Path) -> Path:
    from converters.writing.convert import convert_checkpoint
    from tests.builders.checkpoints import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint(folder / "hf", "llama", tied=False, sizes=BUILT_SIZES)
    return convert_checkpoint(checkpoint, folder / "model-f16.gguf", outtype="f16").path


def collect(model: Path, chunks: list[list[int]], ctx: int, gpu_layers: int) -> tuple[dict, float]:
    with ModelEvaluator(model, n_ctx=ctx, n_gpu_layers=gpu_layers) as evaluator:
        evaluator.evaluate_chunk(chunks[0][: ctx // 4])  # warm-up, not counted in the timing
        warm = evaluator.stats().matrices
        started = time.perf_counter()
        for chunk in chunks:
            evaluator.evaluate_chunk(chunk)
        seconds = time.perf_counter() - started
        stats = evaluator.stats().matrices
    return {name: (stats[name].sums - warm[name].sums, stats[name].counts - warm[name].counts) for name in stats}, \
        seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=512)
    args = parser.parse_args()
    print(render_text(discover()))
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or build_model(Path(scratch))
        with ModelEvaluator(model, n_ctx=args.ctx, collect=False) as tokenizer:
            chunks = calibration_chunks(tokenizer, args.chunks, args.ctx)
        tokens = sum(len(chunk) for chunk in chunks)
        gpu, gpu_seconds = collect(model, chunks, args.ctx, gpu_layers=999)
        cpu, cpu_seconds = collect(model, chunks, args.ctx, gpu_layers=0)
    print(f"\nmodel: {model.name}, {args.chunks} chunks of {args.ctx} tokens")
    print(f"collecting on the GPU: {tokens / gpu_seconds:8.0f} tokens/s")
    print(f"collecting on the CPU: {tokens / cpu_seconds:8.0f} tokens/s")
    correlations = []
    counts_agree = True
    for name, (sums, counts) in cpu.items():
        gpu_sums, gpu_counts = gpu[name]
        counts_agree &= bool(np.array_equal(counts, gpu_counts))
        cpu_means, gpu_means = sums / counts[:, None], gpu_sums / gpu_counts[:, None]
        correlations.append(np.corrcoef(cpu_means.ravel(), gpu_means.ravel())[0, 1])
    print(f"weights: {len(cpu)} on the CPU, {len(gpu)} on the GPU; same names: {set(cpu) == set(gpu)}")
    print(f"token counts agree: {counts_agree}; mean-square correlation GPU vs CPU: min {min(correlations):.6f}, "
          f"median {float(np.median(correlations)):.6f}")


if __name__ == "__main__":
    main()
