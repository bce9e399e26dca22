"""`evaluate`: how far each quantized variant is from its reference, in quality, tasks, memory and speed.

Quality is measured as llama.cpp's perplexity tool measures it (see `qdesk.evaluation.text` for the chunks and
`converters.calibration.divergence` for the arithmetic): perplexity of each model over the scored tokens, and per
token the KL divergence KL(P_ref ‖ P_cand), whether both put the same token first, and the change in the
probability of the token that actually follows. The reference is evaluated once, chunk by chunk, into an on-disk
cache (`qdesk.evaluation.reference_cache`); each candidate then streams through the same chunks, so memory stays
bounded by one chunk whatever the length of the text, and a second evaluation against the same reference and text
skips the reference entirely.
"""

from __future__ import annotations

import codecs
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from converters.calibration.divergence import (
    CandidateRows,
    ReferenceRows,
    compare_candidate,
    encode_reference,
    join_reference,
    log_probabilities_of,
)
from converters.core.errors import Cancelled
from converters.core.gguf_file import check_gguf
from converters.core.hyperparameters import check_model_gguf
from converters.core.isolation import isolated
from converters.core.jobs import CancelToken, Progress, ProgressFn, no_progress
from converters.mix.report import recorded_prediction
from qdesk.chat.lora import LoraChoice, check_adapters
from qdesk.evaluation.text import (
    DEFAULT_CTX,
    EvalError,
    EvalText,
    TokenChunks,
    builtin_eval_texts,
    check_ctx,
    chunk_tokens,
)

if TYPE_CHECKING:
    from native.activations import ModelEvaluator
    from native.speed import SpeedResult
    from qdesk.evaluation.reference_cache import CacheEntry
    from qdesk.evaluation.tasks import TaskRun, TaskSuite, TaskVerdict
    from qdesk.memory import MemoryEstimate

SAMPLE_TOKENS = 160
"""Tokens of the sample paragraph whose per-token divergence the report shows as a heat map."""
DEFAULT_THRESHOLD_PCT = 5.0
DEFAULT_MEMORY_CTX = 4096
REPORT_FORMAT = 1


@dataclass(frozen=True)
class Divergence:
    """Summary of the per-token KL divergence of one candidate (nats per token)."""

    mean: float
    median: float
    p99: float
    max: float
    top1_agreement: float
    delta_p_mean: float

    @classmethod
    def of(cls, kld: np.ndarray, top_matches: np.ndarray, delta_p: np.ndarray) -> Divergence:
        return cls(
            mean=float(kld.mean()),
            median=float(np.median(kld)),
            p99=float(np.percentile(kld, 99)),
            max=float(kld.max()),
            top1_agreement=float(top_matches.mean()),
            delta_p_mean=float(delta_p.mean()),
        )


@dataclass(frozen=True)
class ModelFacts:
    path: Path
    bytes: int
    bpw: float | None

    @classmethod
    def of(cls, path: Path) -> ModelFacts:
        header = check_gguf(path)
        parameters = sum(math.prod(tensor.shape) for tensor in header.tensors)
        tensor_bytes = sum(tensor.n_bytes for tensor in header.tensors)
        return cls(path=path, bytes=path.stat().st_size, bpw=tensor_bytes * 8 / parameters if parameters else None)

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "name": self.path.name, "bytes": self.bytes,
                "bpw": None if self.bpw is None else round(self.bpw, 4)}


@dataclass(frozen=True)
class ReferenceResult:
    model: ModelFacts
    ppl: float
    tasks: TaskRun | None = None
    speed: SpeedResult | None = None
    memory: MemoryEstimate | None = None
    cached: bool = False
    """Whether the reference's distributions all came from the cache."""

    def to_json(self) -> dict[str, Any]:
        return {
            **self.model.to_json(),
            "ppl": self.ppl,
            "tasks": None if self.tasks is None else self.tasks.to_json(),
            "speed": None if self.speed is None else self.speed.to_json(),
            "memory": None if self.memory is None else self.memory.to_json(),
        }


@dataclass(frozen=True)
class CandidateResult:
    model: ModelFacts
    ppl: float
    divergence: Divergence | None
    """None when the candidate's vocabulary differs from the reference's."""
    notes: tuple[str, ...] = ()
    sample_kld: np.ndarray | None = field(default=None, compare=False)
    tasks: TaskVerdict | None = None
    speed: SpeedResult | None = None
    memory: MemoryEstimate | None = None
    predicted_kld: float | None = None
    """The mean KLD a sensitivity mix predicted for itself (`qdesk.mix.predicted_kld`), None for other files."""

    @property
    def same_vocab(self) -> bool:
        return self.divergence is not None

    def to_json(self) -> dict[str, Any]:
        divergence = self.divergence
        return {
            **self.model.to_json(),
            "ppl": self.ppl,
            "kld_mean": None if divergence is None else divergence.mean,
            "predicted_kld": self.predicted_kld,
            "kld_median": None if divergence is None else divergence.median,
            "kld_p99": None if divergence is None else divergence.p99,
            "kld_max": None if divergence is None else divergence.max,
            "top1_agreement": None if divergence is None else divergence.top1_agreement,
            "delta_p_mean": None if divergence is None else divergence.delta_p_mean,
            "same_vocab": self.same_vocab,
            "notes": list(self.notes),
            "tasks": None if self.tasks is None else self.tasks.to_json(),
            "speed": None if self.speed is None else self.speed.to_json(),
            "memory": None if self.memory is None else self.memory.to_json(),
        }


@dataclass(frozen=True)
class Evaluation:
    reference: ReferenceResult
    candidates: tuple[CandidateResult, ...]
    text_tokens: int
    chunks: int
    ctx: int
    scored_tokens: int
    sources: tuple[str, ...]
    sample_tokens: tuple[str, ...] = ()
    seconds: float = 0.0
    loras: tuple[LoraChoice, ...] = ()
    """The LoRA adapters applied to every model evaluated (the reference and each candidate)."""

    def to_json(self) -> dict[str, Any]:
        """The document of `qdesk eval --json` (docs/eval.md) and of the HTML report."""
        sample = None
        with_sample = [candidate for candidate in self.candidates if candidate.sample_kld is not None]
        if self.sample_tokens and with_sample:
            sample = {
                "tokens": list(self.sample_tokens),
                "candidates": [{"name": candidate.model.path.name,
                                "kld": [round(float(value), 6) for value in candidate.sample_kld]}
                               for candidate in with_sample if candidate.sample_kld is not None],
            }
        return {
            "qdesk_eval": REPORT_FORMAT,
            "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "reference": self.reference.to_json(),
            "text": {"tokens": self.chunks * self.ctx, "scored_tokens": self.scored_tokens,
                     "text_tokens": self.text_tokens, "chunks": self.chunks, "ctx": self.ctx,
                     "sources": list(self.sources)},
            "loras": [{"path": str(lora.path), "scale": lora.scale} for lora in self.loras],
            "candidates": [candidate.to_json() for candidate in self.candidates],
            "sample": sample,
            "seconds": round(self.seconds, 2),
        }


@dataclass
class _Work:
    """Overall progress across the phases of an evaluation."""

    progress: ProgressFn
    total: float
    done: float = 0.0

    def step(self, amount: float, message: str) -> None:
        self.done += amount
        self.progress(Progress(self.done, self.total, "steps", message))


@dataclass(frozen=True)
class _Settings:
    ctx: int
    n_threads: int | None
    n_gpu_layers: int
    cancel: CancelToken | None
    rpc_free: tuple[int, ...] = ()
    """Free bytes of each RPC worker's device (added to this process); empty: no workers."""
    loras: tuple[LoraChoice, ...] = ()
    """LoRA adapters applied to every model opened for evaluation."""

    @property
    def adapters(self) -> tuple[tuple[Path, float], ...]:
        """The adapters as `ModelEvaluator` and `measure_speed` take them."""
        return tuple((lora.path, lora.scale) for lora in self.loras)

    def gpu_layers_for(self, path: Path) -> int:
        """The layers to offload: to the RPC workers in proportion to free memory when there are any."""
        if not self.rpc_free:
            return self.n_gpu_layers
        from qdesk.memory import available_ram, read_model_shape
        from qdesk.rpc.placement import split_by_memory

        return split_by_memory(read_model_shape(path), available_ram(), self.rpc_free)[0]


def _add_rpc_workers(rpc: Sequence[str]) -> tuple[int, ...]:
    """Make the workers devices of this process (after asking them from a child: ggml aborts on a missing one)."""
    from native.rpc import add_servers
    from qdesk.rpc.probe import describe_workers

    describe_workers(rpc)
    return tuple(device.memory_free for device in add_servers(rpc))


def _open(path: Path, settings: _Settings, *, vocab_only: bool = False) -> ModelEvaluator:
    from native.activations import ModelEvaluator

    cancel = settings.cancel
    return ModelEvaluator(path, n_ctx=settings.ctx, n_gpu_layers=settings.gpu_layers_for(path),
                          n_threads=settings.n_threads,
                          collect=False, should_stop=None if cancel is None else (lambda: cancel.cancelled),
                          vocab_only=vocab_only, loras=settings.adapters)


def _stopped(cancel: CancelToken | None) -> None:
    if cancel is not None:
        cancel.raise_if_cancelled()


def _chunk_logits(evaluator: ModelEvaluator, chunks: TokenChunks, index: int,
                  consume: Callable[[int, np.ndarray], None]) -> None:
    """Hand the scored rows of chunk `index` (row offset within the scored rows, float32 logits) to `consume`."""
    first, last = chunks.first_scored, chunks.ctx - 1

    def scored(position: int, logits: np.ndarray) -> None:
        end = min(position + logits.shape[0], last)
        if end > position:
            consume(position - first, logits[: end - position])

    evaluator.evaluate_logits(chunks.ids[index], first, scored)


def _reference_pass(reference: Path, chunks: TokenChunks, entry: CacheEntry, work: _Work, settings: _Settings
                    ) -> tuple[float, bool]:
    """Fill the cache entry with every chunk's reference rows; returns (perplexity, all from cache).

    Chunks already in the cache are not evaluated again; the model is loaded only if one is missing.
    """
    nll_sum = 0.0
    missing = []
    for index in range(chunks.count):
        cached = entry.logp_correct(index, chunks.scored_per_chunk)
        if cached is None:
            missing.append(index)
        else:
            nll_sum -= float(cached.sum())
            work.step(1, f"reference chunk {index + 1}/{chunks.count} (cached)")
    if missing:
        with _open(reference, settings) as evaluator:
            for index in missing:
                _stopped(settings.cancel)
                parts: list[ReferenceRows] = []
                next_tokens = chunks.next_tokens(index)

                def encode(offset: int, logits: np.ndarray, parts: list[ReferenceRows] = parts,
                           next_tokens: np.ndarray = next_tokens) -> None:
                    parts.append(encode_reference(logits, next_tokens[offset : offset + logits.shape[0]]))

                _chunk_logits(evaluator, chunks, index, encode)
                rows = join_reference(parts)
                entry.store(index, rows)
                nll_sum -= float(rows.logp_correct.sum())
                work.step(1, f"reference chunk {index + 1}/{chunks.count}")
    return float(np.exp(nll_sum / chunks.scored_tokens)), not missing


def _candidate_pass(evaluator: ModelEvaluator, chunks: TokenChunks, entry: CacheEntry, work: _Work, label: str,
                    cancel: CancelToken | None) -> tuple[float, Divergence, np.ndarray]:
    kld, logp, matches, delta_p = [], [], [], []
    for index in range(chunks.count):
        _stopped(cancel)
        reference = entry.load(index)
        if reference is None:
            raise EvalError("the cached reference distributions disappeared during the evaluation; run it again.")
        next_tokens = chunks.next_tokens(index)
        scored: list[CandidateRows] = []

        def compare(offset: int, logits: np.ndarray, reference: ReferenceRows = reference,
                    next_tokens: np.ndarray = next_tokens, scored: list[CandidateRows] = scored) -> None:
            rows = slice(offset, offset + logits.shape[0])
            scored.append(compare_candidate(logits, reference.window(rows), next_tokens[rows]))

        _chunk_logits(evaluator, chunks, index, compare)
        chunk_kld = np.concatenate([part.kld for part in scored])
        chunk_logp = np.concatenate([part.logp_correct for part in scored])
        kld.append(chunk_kld)
        logp.append(chunk_logp)
        matches.append(np.concatenate([part.top_matches for part in scored]))
        delta_p.append(np.exp(chunk_logp) - np.exp(reference.logp_correct))
        work.step(1, f"{label} chunk {index + 1}/{chunks.count}")
    all_kld = np.concatenate(kld)
    ppl = float(np.exp(-np.concatenate(logp).mean()))
    return ppl, Divergence.of(all_kld, np.concatenate(matches), np.concatenate(delta_p)), kld[0]


def _perplexity_pass(evaluator: ModelEvaluator, chunks: TokenChunks, work: _Work, label: str,
                     cancel: CancelToken | None) -> float:
    """Perplexity alone, over the candidate's own tokenization (a different vocabulary)."""
    logp: list[np.ndarray] = []
    for index in range(chunks.count):
        _stopped(cancel)
        next_tokens = chunks.next_tokens(index)

        def score(offset: int, logits: np.ndarray, next_tokens: np.ndarray = next_tokens) -> None:
            logp.append(log_probabilities_of(logits, next_tokens[offset : offset + logits.shape[0]]))

        _chunk_logits(evaluator, chunks, index, score)
        work.step(1, f"{label} chunk {index + 1}/{chunks.count}")
    return float(np.exp(-np.concatenate(logp).mean()))


def _sample_pieces(evaluator: ModelEvaluator, tokens: np.ndarray) -> tuple[str, ...]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return tuple(decoder.decode(evaluator.token_piece(int(token))) for token in tokens)


def _chunks_of(tokenizer: ModelEvaluator, sources: Sequence[EvalText], ctx: int, chunks: int | None) -> TokenChunks:
    bos = tokenizer.bos_token() if tokenizer.adds_bos() else None
    return chunk_tokens([tokenizer.tokenize(source.text) for source in sources], ctx, chunks, bos)


@isolated("reading the evaluation text")
def prepare_chunks(model: str | Path, texts: Sequence[EvalText] | None = None, *, ctx: int = DEFAULT_CTX,
                   chunks: int | None = None) -> TokenChunks:
    """The chunks of token ids `evaluate` scores, as `model`'s tokenizer makes them from `texts`."""
    path = Path(model)
    check_model_gguf(path)
    with _open(path, _Settings(ctx, None, 0, None), vocab_only=True) as tokenizer:
        return _chunks_of(tokenizer, list(texts) if texts else builtin_eval_texts(), ctx, chunks)


def _vocabulary_note(candidate: Path, reference: Path, candidate_vocab: list[bytes], reference_vocab: list[bytes]
                     ) -> str:
    if len(candidate_vocab) != len(reference_vocab):
        difference = f"{len(candidate_vocab)} tokens against the reference's {len(reference_vocab)}"
    else:
        first = next(index for index, (a, b) in enumerate(zip(candidate_vocab, reference_vocab, strict=True))
                     if a != b)
        difference = f"token {first} differs"
    return (f"{candidate.name} has a different vocabulary from {reference.name} ({difference}); KL divergence and "
            "top-1 agreement need the same vocabulary, so only perplexity is reported, over its own tokenization "
            "of the text.")


def _check_models(reference: Path, candidates: Sequence[Path], loras: tuple[LoraChoice, ...]) -> None:
    """Every model is a GGUF llama.cpp can run, and every adapter fits every model, before any is loaded."""
    for path in (reference, *candidates):
        check_model_gguf(path)
    for path in (reference, *candidates):
        check_adapters(path, loras)


@isolated("the evaluation")
def evaluate(
    reference: str | Path,
    candidates: Sequence[str | Path] = (),
    *,
    texts: Sequence[EvalText] | None = None,
    ctx: int = DEFAULT_CTX,
    chunks: int | None = None,
    tasks: Sequence[str | Path] = (),
    threshold_pct: float = DEFAULT_THRESHOLD_PCT,
    speed: bool = False,
    memory_ctx: int | None = DEFAULT_MEMORY_CTX,
    n_threads: int | None = None,
    n_gpu_layers: int = 0,
    cache: bool = True,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
    rpc: Sequence[str] = (),
    loras: Sequence[LoraChoice] = (),
) -> Evaluation:
    """Evaluate each candidate GGUF against the reference GGUF on `texts` (built-in held-out text when None).

    `chunks` limits the number of chunks of `ctx` tokens (all whole chunks of the text when None). `tasks` names
    task suites (built-in names or JSONL files) run on every model, `speed` measures prompt and generation
    speed, `memory_ctx` sets the context for the memory estimate (None: no estimate). With `cache` the
    reference's distributions are kept in the user's cache for the next evaluation on the same text.
    `rpc` names RPC workers (`host:port`) that take a share of every model's layers by free memory.
    `loras` are LoRA adapters applied to every model loaded (the reference and each candidate, for text, tasks and
    speed), so the figures are what quantization costs the adapted model; each is checked against every model
    first (`AdapterError` when one does not fit), and the cached reference is kept apart per adapters and scales.
    Raises `EvalError` for unusable input and `Cancelled` when `cancel` fires. It runs in a child process
    (`converters.core.isolation`): llama.cpp aborts on some models it cannot run, and the GUI must survive that.
    """
    from native.errors import Stopped
    from qdesk.evaluation import reference_cache

    started = time.monotonic()
    reference_path = Path(reference)
    candidate_paths = [Path(path) for path in candidates]
    adapters = tuple(loras)
    check_ctx(ctx)
    _check_models(reference_path, candidate_paths, adapters)
    sources = list(texts) if texts else builtin_eval_texts()
    suites = _load_suites(tasks)

    settings = _Settings(ctx, n_threads, n_gpu_layers, cancel, _add_rpc_workers(rpc) if rpc else (), adapters)
    with _open(reference_path, settings, vocab_only=True) as tokenizer:
        chunk_set = _chunks_of(tokenizer, sources, ctx, chunks)
        reference_vocab = tokenizer.vocabulary()
        sample_tokens = _sample_pieces(tokenizer, chunk_set.next_tokens(0)[:SAMPLE_TOKENS])
    work = _Work(progress, total=chunk_set.count * (1 + len(candidate_paths))
                 + _extra_steps(suites, speed, 1 + len(candidate_paths)))
    work.step(0, "reading the text")
    key = reference_cache.entry_key(reference_path, chunk_set.ids, chunk_set.first_scored,
                                    "rpc" if rpc else "gpu" if n_gpu_layers else "cpu", settings.adapters)
    entry = reference_cache.open_entry(key, persistent=cache)
    try:
        reference_ppl, all_cached = _reference_pass(reference_path, chunk_set, entry, work, settings)
        if cache:
            entry.touch({"reference": str(reference_path), "ctx": ctx, "chunks": chunk_set.count,
                         "loras": [[str(path), scale] for path, scale in settings.adapters]})
            reference_cache.trim(keep=key)
        results = [_evaluate_candidate(path, reference_path, reference_vocab, sources, chunk_set, entry, work,
                                       settings) for path in candidate_paths]
    except Stopped as stopped:
        raise Cancelled("the evaluation was cancelled") from stopped
    finally:
        entry.discard()

    reference_result = ReferenceResult(ModelFacts.of(reference_path), reference_ppl, cached=all_cached)
    candidates_result = tuple(results)
    reference_result, candidates_result = _add_tasks(reference_result, candidates_result, suites, threshold_pct,
                                                     n_threads, n_gpu_layers, work, cancel, tuple(rpc), adapters)
    reference_result, candidates_result = _add_speed(reference_result, candidates_result, speed, n_threads,
                                                     settings, work, cancel)
    reference_result, candidates_result = _add_memory(reference_result, candidates_result, memory_ctx)
    return Evaluation(
        reference=reference_result,
        candidates=candidates_result,
        text_tokens=chunk_set.text_tokens,
        chunks=chunk_set.count,
        ctx=ctx,
        scored_tokens=chunk_set.scored_tokens,
        sources=tuple(source.name for source in sources),
        sample_tokens=sample_tokens,
        seconds=time.monotonic() - started,
        loras=adapters,
    )


def _evaluate_candidate(path: Path, reference_path: Path, reference_vocab: list[bytes], sources: list[EvalText],
                        chunk_set: TokenChunks, entry: CacheEntry, work: _Work, settings: _Settings) -> CandidateResult:
    cancel = settings.cancel
    with _open(path, settings) as evaluator:
        vocab = evaluator.vocabulary()
        if vocab == reference_vocab:
            ppl, divergence, sample_kld = _candidate_pass(evaluator, chunk_set, entry, work, path.name, cancel)
            return CandidateResult(ModelFacts.of(path), ppl, divergence, sample_kld=sample_kld[:SAMPLE_TOKENS],
                                   predicted_kld=recorded_prediction(path))
        note = _vocabulary_note(path, reference_path, vocab, reference_vocab)
        own_chunks = _chunks_of(evaluator, sources, settings.ctx, chunk_set.count)
        work.total += own_chunks.count - chunk_set.count
        ppl = _perplexity_pass(evaluator, own_chunks, work, path.name, cancel)
        return CandidateResult(ModelFacts.of(path), ppl, None, notes=(note,))


def _load_suites(tasks: Sequence[str | Path]) -> list[TaskSuite]:
    """Every suite named (built-in names, `builtin`, comma-separated lists, JSONL paths), read and checked now,
    before any model is loaded, so that a malformed line stops the evaluation at once."""
    if not tasks:
        return []
    from qdesk.evaluation.tasks import load_suites

    entries = [part.strip() for task in tasks
               for part in (task.split(",") if isinstance(task, str) else [task]) if str(part).strip()]
    return load_suites(entries)


def _extra_steps(suites: list[TaskSuite], speed: bool, models: int) -> int:
    items = sum(len(suite.items) for suite in suites)
    return models * (items + (1 if speed else 0))


def _add_tasks(reference: ReferenceResult, candidates: tuple[CandidateResult, ...], suites: list[TaskSuite],
               threshold_pct: float, n_threads: int | None, n_gpu_layers: int, work: _Work,
               cancel: CancelToken | None, rpc: tuple[str, ...] = (), loras: tuple[LoraChoice, ...] = ()
               ) -> tuple[ReferenceResult, tuple[CandidateResult, ...]]:
    if not suites:
        return reference, candidates
    from dataclasses import replace

    from qdesk.evaluation.tasks import compare_runs, run_tasks

    def run(path: Path) -> TaskRun:
        done_before = work.done

        def advance(progress: Progress) -> None:
            work.done = done_before + progress.done
            work.progress(Progress(work.done, work.total, "steps", f"tasks on {path.name}: {progress.message}"))

        return run_tasks(path, suites, n_threads=n_threads, n_gpu_layers=n_gpu_layers, progress=advance,
                         cancel=cancel, rpc=rpc, loras=loras)

    reference_run = run(reference.model.path)
    updated = []
    for candidate in candidates:
        candidate_run = run(candidate.model.path)
        verdict = compare_runs(reference_run, candidate_run, threshold_pct=threshold_pct)
        updated.append(replace(candidate, tasks=verdict, notes=(*candidate.notes, *candidate_run.warnings())))
    return replace(reference, tasks=reference_run), tuple(updated)


def _add_speed(reference: ReferenceResult, candidates: tuple[CandidateResult, ...], speed: bool,
               n_threads: int | None, settings: _Settings, work: _Work, cancel: CancelToken | None
               ) -> tuple[ReferenceResult, tuple[CandidateResult, ...]]:
    if not speed:
        return reference, candidates
    from dataclasses import replace

    from native.errors import Stopped
    from native.speed import measure_speed

    def measure(path: Path) -> SpeedResult:
        try:
            result = measure_speed(path, n_threads=n_threads, n_gpu_layers=settings.gpu_layers_for(path),
                                   should_stop=None if cancel is None else (lambda: cancel.cancelled),
                                   loras=settings.adapters)
        except Stopped as stopped:
            raise Cancelled("the evaluation was cancelled") from stopped
        work.step(1, f"speed of {path.name}")
        return result

    reference = replace(reference, speed=measure(reference.model.path))
    return reference, tuple(replace(candidate, speed=measure(candidate.model.path)) for candidate in candidates)


def _add_memory(reference: ReferenceResult, candidates: tuple[CandidateResult, ...], memory_ctx: int | None
                ) -> tuple[ReferenceResult, tuple[CandidateResult, ...]]:
    if memory_ctx is None:
        return reference, candidates
    from dataclasses import replace

    from qdesk.memory import estimate_memory

    return (replace(reference, memory=estimate_memory(reference.model.path, n_ctx=memory_ctx)),
            tuple(replace(candidate, memory=estimate_memory(candidate.model.path, n_ctx=memory_ctx))
                  for candidate in candidates))
