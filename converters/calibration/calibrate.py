"""Importance-matrix calibration: evaluate text with llama.cpp and keep the activation statistics.

`calibrate(model, output, texts, chunks, ctx)` tokenizes calibration text with the model's own
tokenizer, cuts it into chunks of `ctx` tokens (each starting with BOS when the model uses one),
evaluates them and returns (and, given `output`, writes) an `ImportanceMatrix` in llama.cpp's
format. Without `texts` it mixes chunks from every domain of the built-in text in
`resources/calibration/`; chat conversations are rendered through the model's own chat template.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np

from converters.calibration.imatrix import ImatrixEntry, ImportanceMatrix, write_imatrix
from converters.core.errors import Cancelled, UserError
from converters.core.gguf_file import file_fingerprint
from converters.core.hyperparameters import check_model_gguf
from converters.core.isolation import isolated
from converters.core.jobs import CancelToken, Progress, ProgressFn, no_progress
from converters.core.outputs import check_output_folder, check_outputs
from converters.core.paths import resources_dir

DEFAULT_CHUNKS = 48
DEFAULT_CTX = 512
MIN_CTX = 16
BUILTIN_DATASET_PREFIX = "qdesk-builtin:"


class CalibrationError(UserError):
    """Calibration text that cannot be used, or settings that cannot work."""


@dataclass(frozen=True)
class CalibrationText:
    """One source of calibration text: plain documents, or chat conversations to render with the template."""

    name: str
    documents: tuple[str, ...] = ()
    conversations: tuple[tuple[dict[str, str], ...], ...] = ()


@dataclass(frozen=True)
class CalibrationResult:
    matrix: ImportanceMatrix
    path: Path | None
    chunks: int
    tokens: int
    seconds: float
    covariances: dict[str, np.ndarray] = field(default_factory=dict)
    """With `covariance_chunks` and no spill folder: the inputs' second moments per weight, in memory
    (`native.activations.CollectedStats`)."""
    spill_folder: Path | None = None
    """With `covariance_chunks` and a spill folder: that folder, now holding the input rows and their manifest
    (`native.input_spill`)."""


def builtin_texts() -> list[CalibrationText]:
    """The built-in calibration text, one entry per domain (prose, chat, math, code, other languages)."""
    folder = resources_dir() / "calibration"
    texts: list[CalibrationText] = []
    for path in sorted(folder.glob("*.txt")):
        texts.append(CalibrationText(BUILTIN_DATASET_PREFIX + path.stem, _documents(path.read_text(encoding="utf-8"))))
    for path in sorted(folder.glob("*.jsonl")):
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        conversations = tuple(tuple(json.loads(line)["messages"]) for line in lines)
        texts.append(CalibrationText(BUILTIN_DATASET_PREFIX + path.stem, conversations=conversations))
    if not texts:
        raise CalibrationError(f"the built-in calibration text is missing from {folder}; reinstall qdesk or pass "
                               "--text FILE.")
    return texts


def read_plain_text(path: str | Path, purpose: str = "calibration") -> str:
    """A user's UTF-8 text file, with one clear sentence for anything unusable (`purpose` names its use)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"the {purpose} text {path} does not exist or is not a file; check the path.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise CalibrationError(f"{path} is not UTF-8 text; pass a plain text file for {purpose}.") from None
    except OSError as error:
        raise CalibrationError(f"{path} cannot be read ({error.strerror}); check its permissions.") from error
    if "\x00" in text[:4096]:
        raise CalibrationError(f"{path} looks like a binary file, not text; pass a plain text file for {purpose}.")
    if not text.strip():
        raise CalibrationError(f"{path} is empty; pass a file with text from your task.")
    return text


def read_text_file(path: str | Path) -> CalibrationText:
    """A user's calibration text file (UTF-8 plain text), with one clear sentence for anything unusable."""
    return CalibrationText(str(path), _documents(read_plain_text(path)))


def _documents(text: str) -> tuple[str, ...]:
    return tuple(part for part in text.split("\n\n") if part.strip())


@isolated("the calibration")
def calibrate(
    model: str | Path,
    output: str | Path | None = None,
    texts: Sequence[CalibrationText] | None = None,
    *,
    chunks: int = DEFAULT_CHUNKS,
    ctx: int = DEFAULT_CTX,
    gpu_layers: int = 0,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
    covariance_chunks: int = 0,
    spill_folder: Path | None = None,
) -> CalibrationResult:
    """Compute the importance matrix of the GGUF `model` on `texts` (built-in text when None); with
    `covariance_chunks`, also the inputs of every weight matrix in the first that many chunks (for error
    feedback): their covariances in memory, or, given `spill_folder` (an empty folder), their rows written there
    (`native.input_spill`, read back with `SpilledInputs(spill_folder, spill_tag(file_fingerprint(model)))`).

    It runs in a child process (`converters.core.isolation`): llama.cpp aborts on some models it cannot run."""
    from native.activations import ModelEvaluator
    from native.errors import NativeError, Stopped
    from native.input_spill import InputSpillWriter, spill_tag

    model = Path(model)
    check_model_gguf(model)
    if output is not None:
        check_output_folder(Path(output))
        check_outputs([model], [output])
    spill = None
    if spill_folder is not None and covariance_chunks > 0:
        spill = InputSpillWriter(Path(spill_folder), spill_tag(file_fingerprint(model)))
    if chunks < 1:
        raise CalibrationError(f"--chunks must be at least 1 (got {chunks}).")
    if ctx < MIN_CTX:
        raise CalibrationError(f"--ctx must be at least {MIN_CTX} tokens (got {ctx}).")
    sources = list(texts) if texts else builtin_texts()
    started = time.monotonic()
    progress(Progress(0, chunks, "chunks", "reading calibration text"))
    try:
        should_stop = (lambda: cancel.cancelled) if cancel is not None else None
        with ModelEvaluator(model, n_ctx=ctx, n_gpu_layers=gpu_layers, should_stop=should_stop,
                            covariance_chunks=covariance_chunks, spill=spill) as evaluator:
            token_chunks = calibration_chunks(evaluator, sources, ctx, chunks)
            for index, chunk in enumerate(token_chunks):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                evaluator.evaluate_chunk(chunk)
                progress(Progress(index + 1, len(token_chunks), "chunks", "calibrating"))
            stats = evaluator.stats()
            if spill is not None:
                evaluator.finish_spill()
    except BaseException as error:
        if spill is not None:
            spill.abandon()
        if isinstance(error, Stopped):
            raise Cancelled("calibration was cancelled") from None
        if isinstance(error, NativeError):
            raise CalibrationError(str(error)) from error
        raise

    matrix = ImportanceMatrix(
        entries={name: ImatrixEntry(s.sums, s.counts) for name, s in sorted(stats.matrices.items())},
        datasets=[source.name for source in sources],
        chunk_count=len(token_chunks),
        chunk_size=ctx,
    )
    if not matrix.entries:
        raise CalibrationError(f"llama.cpp evaluated {model.name} but multiplied no weight matrices that qdesk could "
                               "record; this model cannot be calibrated.")
    path = Path(output) if output is not None else None
    if path is not None:
        write_imatrix(matrix, path)
    tokens = sum(len(chunk) for chunk in token_chunks)
    return CalibrationResult(matrix, path, len(token_chunks), tokens, time.monotonic() - started, stats.covariances,
                             Path(spill_folder) if spill is not None else None)


def calibration_chunks(evaluator: Any, sources: Sequence[CalibrationText], ctx: int, chunks: int) -> list[list[int]]:
    """Up to `chunks` chunks of `ctx` tokens, taken in turn from each source so every domain is represented."""
    bos = evaluator.tokenize("", add_special=True)
    body = ctx - len(bos)
    template = evaluator.chat_template()
    token_lists = [evaluator.tokenize(_render(source, template), add_special=False) for source in sources]
    picked: list[list[int]] = []
    for round_ in zip_longest(*(_chunks_of(tokens, body) for tokens in token_lists)):
        for chunk in round_:
            if chunk is not None and len(picked) < chunks:
                picked.append(bos + chunk)
    if not picked:
        counted = sum(len(tokens) for tokens in token_lists)
        raise CalibrationError(f"the calibration text has {counted} tokens, fewer than one chunk of {ctx}; "
                               "give more text or a smaller --ctx.")
    return picked


def _chunks_of(tokens: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(tokens) - size + 1, size):
        yield tokens[start:start + size]


def _render(source: CalibrationText, template: str | None) -> str:
    parts = list(source.documents)
    parts.extend(render_conversation(conversation, template) for conversation in source.conversations)
    return "\n\n".join(parts)


def render_conversation(messages: Sequence[dict[str, str]], template: str | None) -> str:
    """A conversation as the model sees it: through its chat template (sandboxed), else as plain role lines."""
    if template:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = raise_exception
        try:
            return environment.from_string(template).render(
                messages=list(messages), add_generation_prompt=False, bos_token="", eos_token=""
            )
        except Exception:  # a template that rejects these messages; fall back to plain text
            pass
    return "\n".join(f"{message['role']}: {message['content']}" for message in messages)
