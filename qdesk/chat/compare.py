"""Side-by-side compare: one prompt through several variants, answers streamed, and where they part ways.

`compare(models, prompt, ...)` loads each GGUF in its own worker (`qdesk.chat.engine`), sends every variant
the same conversation with the same sampling settings, and returns each answer with its timings. The
variants generate at the same time when the machine's free memory holds them all, otherwise one after
another. `first_divergence(a, b)` finds the first generated token where two answers differ: the cheapest
signal of what quantization changed.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from converters.core.errors import Cancelled, UserError
from converters.core.jobs import CancelToken
from converters.core.units import format_size
from qdesk.chat.engine import ChatResult, EngineError, LoadOptions, SamplingOptions, TokenEvent, load_model
from qdesk.chat.lora import LoraChoice, described
from qdesk.display.tables import text_table
from qdesk.memory.fit import available_ram

MIN_VARIANTS = 1
MAX_VARIANTS = 4
_MEMORY_HEADROOM = 1.3
"""Weights are memory-mapped, but a variant also needs its KV cache and compute buffers: count 30% on top."""


RANDOM_SEED = 0
"""A seed of 0 asks for a new random seed each turn (one seed shared by every pane, recorded with the answers)."""
SEED_LIMIT = 2**31 - 1


def deterministic(sampling: SamplingOptions) -> SamplingOptions:
    """Greedy decoding (temperature 0): every pane picks its likeliest token, so answers that differ show a difference
    between the variants, never sampling noise. Compare's default."""
    return replace(sampling, temperature=0.0)


def turn_seed(samplings: Sequence[SamplingOptions], draw: Callable[[int], int]) -> int | None:
    """The seed every pane of one turn shares: None when no pane samples at random with `RANDOM_SEED` (greedy panes
    need none, a fixed seed stays), else a new one from `draw(SEED_LIMIT)` (e.g. `random.randrange`), at least 1."""
    if not any(sampling.temperature > 0 and sampling.seed == RANDOM_SEED for sampling in samplings):
        return None
    return 1 + draw(SEED_LIMIT - 1)


@dataclass(frozen=True)
class Divergence:
    """Where an answer first differs from the first variant's: generated-token index and the texts from there."""

    token_index: int
    common_text: str
    reference_continues: str
    this_continues: str


@dataclass(frozen=True)
class VariantAnswer:
    path: Path
    result: ChatResult | None
    error: str | None = None
    divergence: Divergence | None = None
    """Against the first variant; None for the first variant, for identical answers and for failures."""
    loras: tuple[LoraChoice, ...] = ()
    """The LoRA adapters this variant ran with (besides any that `LoadOptions.loras` gave every variant)."""

    @property
    def name(self) -> str:
        """The file's name, with its adapters: `base.gguf + style.gguf×0.5`."""
        return described(self.path, self.loras)

    @property
    def text(self) -> str:
        return self.result.text if self.result is not None else ""

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {"path": str(self.path), "name": self.name, "answer": self.text,
                                    "error": self.error}
        if self.loras:
            document["loras"] = [{"path": str(lora.path), "scale": lora.scale} for lora in self.loras]
        if self.result is not None:
            stats = self.result.stats
            document.update(
                prompt_tokens=stats.prompt_tokens, generated_tokens=stats.generated_tokens,
                time_to_first_token_s=round(stats.time_to_first_token_s, 4),
                tokens_per_second=round(stats.tokens_per_second, 2), total_s=round(stats.total_s, 4),
                stop_reason=stats.stop_reason, memory_bytes=stats.memory_bytes, bytes=self.path.stat().st_size,
            )
        if self.divergence is not None:
            document["divergence"] = {"token_index": self.divergence.token_index,
                                      "common_text": self.divergence.common_text,
                                      "first_continues": self.divergence.reference_continues,
                                      "this_continues": self.divergence.this_continues}
        return document


@dataclass(frozen=True)
class Comparison:
    prompt: str
    system: str | None
    answers: tuple[VariantAnswer, ...]
    concurrent: bool
    sampling: SamplingOptions = field(default_factory=SamplingOptions)

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "system": self.system,
            "concurrent": self.concurrent,
            "sampling": {"temperature": self.sampling.temperature, "top_p": self.sampling.top_p,
                         "top_k": self.sampling.top_k, "repeat_penalty": self.sampling.repeat_penalty,
                         "max_tokens": self.sampling.max_tokens, "seed": self.sampling.seed},
            "variants": [answer.to_json() for answer in self.answers],
        }


TokenCallback = Callable[[int, TokenEvent], None]
"""Called with (variant index, token event) as tokens arrive, from the variant's own thread."""


def compare(
    models: Sequence[str | Path],
    prompt: str,
    *,
    system: str | None = None,
    history: Sequence[Mapping[str, str]] = (),
    sampling: SamplingOptions | None = None,
    load: LoadOptions | None = None,
    on_token: TokenCallback | None = None,
    cancel: CancelToken | None = None,
    concurrent: bool | None = None,
    adapters: Sequence[tuple[LoraChoice, ...]] | None = None,
) -> Comparison:
    """The same conversation through every model in `models` (1 to 4 GGUF files); answers in the given order.

    Variants run at the same time when their weights fit in free memory (`concurrent` forces either way);
    unless `load` names a thread count, concurrent variants share the CPU cores between them. `adapters`, one
    tuple per model, applies LoRA adapters to that variant alone: the same base with and without an adapter then
    answers side by side.
    """
    paths = [Path(model) for model in models]
    per_variant = list(adapters) if adapters is not None else [()] * len(paths)
    if len(per_variant) != len(paths):
        raise UserError(f"compare got adapters for {len(per_variant)} variants and {len(paths)} models; give one "
                        "entry per model.")
    if not MIN_VARIANTS <= len(paths) <= MAX_VARIANTS:
        raise UserError(f"compare takes {MIN_VARIANTS} to {MAX_VARIANTS} models, not {len(paths)}; pass fewer files.")
    if not prompt.strip():
        raise UserError("the prompt is empty; give the question to ask every model with --prompt.")
    sampling = sampling or SamplingOptions()
    load = load or LoadOptions()
    cancel = cancel or CancelToken()
    messages = [*({"role": m["role"], "content": m["content"]} for m in history), {"role": "user", "content": prompt}]
    # a ggml RPC worker serves one client at a time: variants that use workers take turns
    together = (fits_together(paths) and not load.rpc) if concurrent is None else concurrent
    if together and load.n_threads is None:
        load = replace(load, n_threads=max(1, (os.cpu_count() or 1) // len(paths)))

    results: list[VariantAnswer | None] = [None] * len(paths)

    def run(index: int) -> None:
        variant_load = replace(load, loras=load.loras + per_variant[index])
        answer = _answer(index, paths[index], messages, system, sampling, variant_load, on_token, cancel)
        results[index] = replace(answer, loras=per_variant[index])

    if together:
        threads = [threading.Thread(target=run, args=(index,), daemon=True) for index in range(len(paths))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    else:
        for index in range(len(paths)):
            run(index)
    if cancel.cancelled:
        raise Cancelled("the comparison was stopped")
    answers = [answer for answer in results if answer is not None]
    return Comparison(prompt, system, tuple(_with_divergences(answers)), together, sampling)


def _answer(
    index: int,
    path: Path,
    messages: list[dict[str, str]],
    system: str | None,
    sampling: SamplingOptions,
    load: LoadOptions,
    on_token: TokenCallback | None,
    cancel: CancelToken,
) -> VariantAnswer:
    def forward(event: TokenEvent) -> None:
        if on_token is not None:
            on_token(index, event)

    try:
        with load_model(path, load) as model:
            result = model.chat(messages, sampling, system=system, on_token=forward, cancel=cancel)
    except (EngineError, UserError) as error:
        return VariantAnswer(path, None, str(error))
    return VariantAnswer(path, result)


def _with_divergences(answers: list[VariantAnswer]) -> list[VariantAnswer]:
    if not answers or answers[0].result is None:
        return answers
    first = answers[0].result
    marked = [answers[0]]
    for answer in answers[1:]:
        divergence = first_divergence(first, answer.result) if answer.result is not None else None
        marked.append(replace(answer, divergence=divergence))
    return marked


def first_divergence(reference: ChatResult, other: ChatResult) -> Divergence | None:
    """The first generated token where `other` differs from `reference`, or None if the answers are identical."""
    position = 0
    for mine, theirs in zip(reference.token_ids, other.token_ids, strict=False):
        if mine != theirs:
            break
        position += 1
    else:
        if len(reference.token_ids) == len(other.token_ids):
            return None
    common = _common_prefix(reference.text, other.text)
    return Divergence(position, common, reference.text[len(common):], other.text[len(common):])


def _common_prefix(a: str, b: str) -> str:
    length = 0
    for mine, theirs in zip(a, b, strict=False):
        if mine != theirs:
            break
        length += 1
    return a[:length]


def fits_together(paths: Sequence[Path]) -> bool:
    """Whether every variant's weights, with headroom for caches, fit in the memory that is free now."""
    needed = sum(path.stat().st_size for path in paths if path.is_file()) * _MEMORY_HEADROOM
    return needed <= available_ram()


def render_comparison(comparison: Comparison, width: int = 100) -> str:
    """The terminal view: a table of sizes and speeds, then each answer, with where it left the first one's path."""
    rows = [("model", "size", "tokens", "tok/s", "first token", "diverges at")]
    for answer in comparison.answers:
        size = format_size(answer.path.stat().st_size) if answer.path.is_file() else "-"
        if answer.result is None:
            rows.append((answer.name, size, "-", "-", "-", "failed"))
            continue
        stats = answer.result.stats
        diverges = ("identical" if answer.divergence is None else f"token {answer.divergence.token_index}") \
            if answer is not comparison.answers[0] else "(first)"
        rows.append((answer.name, size, str(stats.generated_tokens), f"{stats.tokens_per_second:.1f}",
                     f"{stats.time_to_first_token_s:.2f} s", diverges))
    lines = text_table(rows[0], rows[1:], right=range(1, len(rows[0])), rule=True)
    lines.append("")
    lines.append(f"prompt: {comparison.prompt}")
    for answer in comparison.answers:
        lines.append("")
        lines.append(f"── {answer.name} " + "─" * max(0, width - len(answer.name) - 4))
        lines.append(answer.text.strip() if answer.result is not None else f"(failed: {answer.error})")
    return "\n".join(lines)
