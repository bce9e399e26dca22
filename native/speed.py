"""Prompt-processing and generation speed of a GGUF, measured the same way for every model.

Like llama.cpp's llama-bench: a prompt of `prompt_tokens` random tokens is decoded as one sequence from an empty
context (prompt processing), and `generated_tokens` tokens are decoded one at a time from an empty context, each
an output (generation; sampling is not part of it). Each is repeated and the median taken, after one warm-up
run of each. Random tokens keep the figure independent of any text; every model sees the same ids.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from native.activations import DEFAULT_UBATCH, ModelEvaluator
from native.child import isolated

__all__ = ["SpeedResult", "measure_speed"]


@dataclass(frozen=True)
class SpeedResult:
    prompt_tokens: int
    generated_tokens: int
    prompt_tps: float
    """Prompt tokens decoded per second (median over the repetitions)."""
    generation_tps: float
    """Tokens generated per second, one decode each (median over the repetitions)."""
    repetitions: int
    threads: int | None
    gpu_layers: int

    def to_json(self) -> dict[str, float | int | None]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prompt_tps": round(self.prompt_tps, 2),
            "generation_tps": round(self.generation_tps, 2),
            "repetitions": self.repetitions,
            "threads": self.threads,
            "gpu_layers": self.gpu_layers,
        }


def _prompt_seconds(evaluator: ModelEvaluator, prompt: np.ndarray) -> float:
    evaluator.clear()
    started = time.perf_counter()
    for start in range(0, prompt.size, DEFAULT_UBATCH):
        evaluator.decode_at(prompt[start : start + DEFAULT_UBATCH], start)
    return time.perf_counter() - started


def _generation_seconds(evaluator: ModelEvaluator, tokens: np.ndarray) -> float:
    evaluator.clear()
    started = time.perf_counter()
    for position in range(tokens.size):
        evaluator.decode_at(tokens[position : position + 1], position)
    return time.perf_counter() - started


@isolated("the speed measurement")
def measure_speed(
    model_path: str | Path,
    *,
    prompt_tokens: int = 512,
    generated_tokens: int = 128,
    repetitions: int = 3,
    n_threads: int | None = None,
    n_gpu_layers: int = 0,
    seed: int = 0,
    should_stop: Callable[[], bool] | None = None,
    loras: Sequence[tuple[Path | str, float]] = (),
) -> SpeedResult:
    """Measure prompt processing (pp`prompt_tokens`) and generation (tg`generated_tokens`) in tokens per second,
    with the LoRA adapters `loras` (path, scale) applied as `ModelEvaluator` applies them."""
    if prompt_tokens < 1 or generated_tokens < 1 or repetitions < 1:
        raise ValueError("prompt_tokens, generated_tokens and repetitions must be at least 1")
    n_ctx = max(prompt_tokens, generated_tokens)
    with ModelEvaluator(model_path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_threads=n_threads, collect=False,
                        should_stop=should_stop, loras=loras) as evaluator:
        ids = np.random.default_rng(seed).integers(0, evaluator.n_vocab(), size=n_ctx, dtype=np.int64)
        prompt, generated = ids[:prompt_tokens], ids[:generated_tokens]
        _prompt_seconds(evaluator, prompt[: min(prompt_tokens, 32)])
        _generation_seconds(evaluator, generated[: min(generated_tokens, 4)])
        prompt_times = [_prompt_seconds(evaluator, prompt) for _ in range(repetitions)]
        generation_times = [_generation_seconds(evaluator, generated) for _ in range(repetitions)]
    return SpeedResult(
        prompt_tokens=prompt_tokens,
        generated_tokens=generated_tokens,
        prompt_tps=prompt_tokens / statistics.median(prompt_times),
        generation_tps=generated_tokens / statistics.median(generation_times),
        repetitions=repetitions,
        threads=n_threads,
        gpu_layers=n_gpu_layers,
    )
