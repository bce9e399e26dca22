"""The inputs error feedback needs: each weight matrix's input rows on calibration text, spilled to a scratch folder.

`CalibrationInputs` owns one spill folder for one reference. The rows get there either from a calibration pass
that collects the importance matrix at the same time (`calibrate(..., spill_folder=inputs.folder_for_spill())`,
then `inputs.adopt(result)`), or from a pass of their own the first time something asks for them
(`inputs.spilled()`): applying a plan whose re-encoded tensors are all cached never evaluates the model.

The folder is created beside the output, after checking that its disk can hold the rows (about
chunks × ctx × Σ n_in × 2 bytes: one float16 row per token and distinct input), and is removed however the job
ends. Its name records the owner's process id and start time (`.qdesk-spill-<pid>-<start>-<random>`), so that
the next job writing into that folder removes what a killed process left (`converters.core.leftovers`), and
never a live process's.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from converters.calibration.calibrate import CalibrationResult, CalibrationText, builtin_texts, calibration_chunks
from converters.core.errors import Cancelled, UserError
from converters.core.gguf_file import GGUFHeader, check_gguf, file_fingerprint
from converters.core.isolation import isolated
from converters.core.jobs import CancelToken, Progress, ProgressFn, no_progress
from converters.core.leftovers import remove_leftovers, temporary_folder
from converters.mix.factor_store import FactorStore

if TYPE_CHECKING:
    from native.input_spill import SpilledInputs

SPILL_PREFIX = ".qdesk-spill-"
_SHARED_INPUTS = {"attn_q": "attn_in", "attn_k": "attn_in", "attn_v": "attn_in", "attn_qkv": "attn_in",
                  "ffn_gate": "ffn_in", "ffn_up": "ffn_in", "ffn_gate_up": "ffn_in"}
"""Weights whose products read the same input (counted once when the spill's size is estimated)."""
_BLK = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")
_HEADROOM = 256 << 20
"""Free space left on the disk beyond the estimate (the output is written there too, and checked on its own)."""


class FeedbackError(UserError):
    """Error feedback that cannot be applied as asked."""


def spill_tag_of(fingerprint: str) -> bytes:
    from native.input_spill import spill_tag

    return spill_tag(fingerprint)


def spill_bytes(header: GGUFHeader, tokens: int) -> int:
    """About how many bytes the rows of `tokens` tokens take for this model: float16 per distinct input column."""
    from native.kernels import quantizable_weight

    widths: dict[tuple[str, str], int] = {}
    for tensor in header.tensors:
        if len(tensor.shape) != 2 or not quantizable_weight(tensor.name, 2):
            continue
        found = _BLK.match(tensor.name)  # outside the blocks: the output product, reading the final norm's output
        key = ("", "output") if found is None else (found[1], _SHARED_INPUTS.get(found[2], found[2]))
        widths[key] = max(widths.get(key, 0), int(tensor.shape[0]))
    return tokens * sum(width + 1 for width in widths.values()) * 2


def texts_digest(texts: Sequence[CalibrationText] | None) -> str:
    """A digest of the calibration text (the built-in text when None)."""
    digest = hashlib.sha256()
    for text in texts or ():
        digest.update(text.name.encode() + b"\0" + "\0".join(text.documents).encode()
                      + json.dumps(text.conversations).encode() + b"\0")
    return digest.hexdigest()[:32] if texts else "builtin"


class CalibrationInputs:
    """The input rows of `reference`'s weight matrices on `texts` (the built-in text when None), in the first
    `chunks` chunks of `ctx` tokens, spilled to a folder under `scratch` (the reference's folder by default)."""

    def __init__(self, reference: Path, texts: Sequence[CalibrationText] | None = None, *, chunks: int, ctx: int,
                 gpu_layers: int = 0, scratch: Path | None = None) -> None:
        self.reference = Path(reference)
        self.texts = tuple(texts) if texts else None
        self.chunks = chunks
        self.ctx = ctx
        self.gpu_layers = gpu_layers
        self.scratch = Path(scratch) if scratch is not None else self.reference.parent
        self._fingerprint: str | None = None
        self._folder: Path | None = None
        self._remover: weakref.finalize | None = None
        self._spilled: SpilledInputs | None = None
        self._factors: FactorStore | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = file_fingerprint(self.reference)
        return self._fingerprint

    @property
    def provenance(self) -> tuple[str, ...]:
        """What the rows depend on besides the model: the text and how much of it (part of cache keys)."""
        return (texts_digest(self.texts), str(self.chunks), str(self.ctx))

    def __enter__(self) -> CalibrationInputs:
        remove_leftovers(self.scratch)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the spill folder (safe to call twice; done at exit or collection too)."""
        self._spilled = None
        self._factors = None
        if self._remover is not None:
            self._remover()
            self._remover = None
        self._folder = None

    def folder_for_spill(self) -> Path:
        """A new, empty spill folder (any earlier one removed), after checking that the disk can hold the rows."""
        self.close()
        header = check_gguf(self.reference)
        needed = spill_bytes(header, self.chunks * self.ctx)
        try:
            free = shutil.disk_usage(self.scratch).free
        except OSError:
            free = None
        if free is not None and free < needed + _HEADROOM:
            raise FeedbackError(
                f"error feedback needs about {(needed + _HEADROOM) / 1e9:.1f} GB of scratch space in {self.scratch} "
                f"for the calibration inputs and {free / 1e9:.1f} GB are free; free some space, write the output "
                "elsewhere, or quantize with --encoder ggml.")
        try:
            self._folder = temporary_folder(self.scratch, "spill")
        except OSError as error:
            raise FeedbackError(f"cannot create a scratch folder in {self.scratch} for error feedback "
                                f"({error.strerror}); choose an output folder you can write to.") from error
        self._remover = weakref.finalize(self, shutil.rmtree, self._folder, True)
        return self._folder

    def adopt(self, result: CalibrationResult) -> None:
        """Take the rows a calibration pass spilled into `folder_for_spill()`."""
        if result.spill_folder is None or result.spill_folder != self._folder:
            raise FeedbackError("the calibration pass spilled no input rows into this job's scratch folder; "
                                "quantize again.")
        self._spilled = self._open()

    @property
    def collected(self) -> bool:
        return self._spilled is not None

    def spilled(self, progress: ProgressFn = no_progress, cancel: CancelToken | None = None) -> SpilledInputs:
        """The spilled rows, collected by a pass over the calibration text the first time they are asked for."""
        if self._spilled is None:
            self._collect(progress, cancel)
        assert self._spilled is not None
        return self._spilled

    def factor_store(self) -> FactorStore | None:
        """Where factored covariances are kept for the rest of the job (None before the rows are spilled)."""
        if self._factors is None and self._spilled is not None and self._folder is not None:
            needed = sum(entry.n_in * entry.n_in * 2 for entry in self._spilled.inputs)
            self._factors = FactorStore(self._folder / "factors", spill_tag_of(self.fingerprint), needed)
        return self._factors

    def _open(self) -> SpilledInputs:
        from native.input_spill import SpilledInputs, SpillMismatch, spill_tag

        assert self._folder is not None
        try:
            return SpilledInputs(self._folder, spill_tag(self.fingerprint))
        except SpillMismatch as error:
            raise FeedbackError(f"{error}; quantize again (the scratch folder was changed while qdesk worked).") \
                from error

    def _collect(self, progress: ProgressFn, cancel: CancelToken | None) -> None:
        from native.input_spill import spill_tag

        folder = self.folder_for_spill()
        try:
            collect_inputs(self.reference, self.texts, folder=folder, tag=spill_tag(self.fingerprint),
                           chunks=self.chunks, ctx=self.ctx, gpu_layers=self.gpu_layers, progress=progress,
                           cancel=cancel)
        except BaseException:
            self.close()
            raise
        self._spilled = self._open()


@isolated("the input collection")
def collect_inputs(reference: Path, texts: Sequence[CalibrationText] | None, *, folder: Path, tag: bytes,
                   chunks: int, ctx: int, gpu_layers: int, progress: ProgressFn = no_progress,
                   cancel: CancelToken | None = None) -> None:
    """Evaluate `reference` on the calibration text (built-in when None) and write each weight matrix's input rows
    of the first `chunks` chunks into `folder` (`native.input_spill`). It runs in a child process
    (`converters.core.isolation`): llama.cpp aborts on some models it cannot run."""
    from native.activations import ModelEvaluator
    from native.errors import NativeError, Stopped
    from native.input_spill import InputSpillWriter

    writer = InputSpillWriter(folder, tag)
    should_stop = (lambda: cancel.cancelled) if cancel is not None else None
    progress(Progress(0, chunks, "chunks", "collecting inputs"))
    try:
        with ModelEvaluator(reference, n_ctx=ctx, n_gpu_layers=gpu_layers, covariance_chunks=chunks, spill=writer,
                            should_stop=should_stop) as evaluator:
            token_chunks = calibration_chunks(evaluator, list(texts or builtin_texts()), ctx, chunks)
            for index, chunk in enumerate(token_chunks):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                evaluator.evaluate_chunk(chunk)
                progress(Progress(index + 1, len(token_chunks), "chunks", "collecting inputs"))
            evaluator.finish_spill()
    except Stopped:
        writer.abandon()
        raise Cancelled("quantization was cancelled") from None
    except NativeError as error:
        writer.abandon()
        raise FeedbackError(str(error)) from error
    except BaseException:
        writer.abandon()
        raise
