"""Several variants of one model in one go: convert (when the source is a checkpoint), calibrate once, quantize each.

A `VariantBatch` turns a `BatchRequest` into `BatchStep`s, each a plain `work(progress, cancel)` function that the
caller runs in order (the desktop app's job queue; any loop would do). The steps share what the earlier ones made:
the reference GGUF and the importance matrix, computed once for every choice that uses one. Each step writes
through `converters.core.atomic.atomic_output`, so a cancelled or failed step leaves no file behind; the converted
reference lives in a hidden temporary folder of the output folder unless the request keeps it, and `close()`
removes that folder. Every finished GGUF is added to the library when one is given. Convert, calibrate and
quantize each run in a child process (`converters.core.isolation`), so the caller's event loop keeps the GIL and a
native crash ends only the step.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converters.calibration.calibrate import DEFAULT_CHUNKS, DEFAULT_CTX, CalibrationResult, CalibrationText, calibrate
from converters.calibration.imatrix import ImportanceMatrix
from converters.core.isolation import run_isolated
from converters.core.jobs import CancelToken, Progress, ProgressFn
from converters.core.leftovers import temporary_folder
from converters.core.units import format_size
from converters.mix.allocate import MixBudget
from converters.quantization.presets import preset_named
from converters.quantization.quantize import NONE, QuantizeResult, quantize, reference_outtype, variant_file_name
from converters.writing.convert import ConversionResult, convert_checkpoint
from qdesk.library.store import Library, LibraryEntry

__all__ = ["BatchRequest", "BatchStep", "StepOutcome", "VariantBatch", "VariantChoice", "run_batch", "texts_from_files"]

StepWork = Callable[[ProgressFn, CancelToken], "StepOutcome"]


@dataclass(frozen=True)
class VariantChoice:
    """One variant to make: a llama.cpp preset, or a sensitivity mix of at most `size_bytes`."""

    preset: str | None = None
    size_bytes: int | None = None

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.size_bytes is None):
            raise ValueError("give exactly one of preset, size_bytes")
        if self.preset is not None:
            preset_named(self.preset)

    @property
    def label(self) -> str:
        return self.preset if self.preset is not None else f"mix {format_size(self.size_bytes or 0)}"

    @property
    def recipe(self) -> str | MixBudget:
        return self.preset if self.preset is not None else MixBudget(size_bytes=self.size_bytes)

    @property
    def type_label(self) -> str:
        """The type part of the output's name: Q4_K_M, or mix-95MB."""
        if self.preset is not None:
            return preset_named(self.preset).name
        return "mix-" + format_size(self.size_bytes or 0).replace(" ", "")

    @property
    def uses_imatrix(self) -> bool:
        return self.preset is None or preset_named(self.preset).uses_imatrix


@dataclass(frozen=True)
class BatchRequest:
    source: Path
    """An HF checkpoint folder (or a file inside one) or a float GGUF."""
    choices: tuple[VariantChoice, ...]
    output_folder: Path
    use_imatrix: bool = True
    text_files: tuple[Path, ...] = ()
    """The user's calibration text files; none: the built-in text."""
    keep_reference: bool = True
    """Keep the converted F16/BF16 reference in the output folder (for evaluation) rather than deleting it."""
    chunks: int = DEFAULT_CHUNKS
    ctx: int = DEFAULT_CTX
    gpu_layers: int = 0
    threads: int = 0
    feedback_presets: bool = False
    """Round the presets' weights with error feedback too (`quantize(encoder="feedback")`); a mix always is."""
    awq: bool = False
    """Activation-aware scaling before rounding (`quantize(awq=True)`) for every choice that uses the importance
    matrix; the others are made without it."""


@dataclass(frozen=True)
class StepOutcome:
    """What a step made: its function's result and the GGUF it added to the library, if any."""

    result: Any
    path: Path | None = None
    entry: LibraryEntry | None = None


@dataclass(frozen=True)
class BatchStep:
    key: str
    """"convert", "calibrate", or the variant's type label."""
    title: str
    work: StepWork
    needs: tuple[str, ...] = ()
    """The keys of the earlier steps this one uses (the reference, the importance matrix): when one of them fails
    or is cancelled, this step cannot run; the others still can."""


@dataclass
class VariantBatch:
    """The steps of one request and what they share; call `close()` when done (or given up)."""

    request: BatchRequest
    library: Library | None = None
    reference: Path | None = None
    matrix: ImportanceMatrix | None = None
    outputs: list[Path] = field(default_factory=list)
    _scratch: Path | None = None
    _texts: tuple[CalibrationText, ...] | None = None

    def __post_init__(self) -> None:
        if not self.request.choices:
            raise ValueError("a batch needs at least one choice")
        if not self._is_checkpoint():
            self.reference = Path(self.request.source)

    def _is_checkpoint(self) -> bool:
        source = Path(self.request.source)
        return source.is_dir() or source.suffix.lower() != ".gguf"

    def steps(self) -> list[BatchStep]:
        steps: list[BatchStep] = []
        reference: tuple[str, ...] = ()
        if self._is_checkpoint():
            steps.append(BatchStep("convert", "Convert to GGUF", self._convert))
            reference = ("convert",)
        matrix = self._needs_matrix()
        if matrix:
            steps.append(BatchStep("calibrate", "Importance matrix", self._calibrate, reference))
        for choice in self.request.choices:
            needs = reference + (("calibrate",) if matrix and choice.uses_imatrix else ())
            steps.append(BatchStep(choice.type_label, f"Quantize {choice.label}",
                                   lambda progress, cancel, choice=choice: self._quantize(choice, progress, cancel),
                                   needs))
        return steps

    def texts(self) -> tuple[CalibrationText, ...] | None:
        """The calibration text, read on first use (in the step that needs it): None for the built-in text."""
        if self._texts is None and self.request.text_files:
            self._texts = texts_from_files(self.request.text_files)
        return self._texts

    def _needs_matrix(self) -> bool:
        return self.request.use_imatrix and any(choice.uses_imatrix for choice in self.request.choices)

    # --- the steps ---

    def _convert(self, progress: ProgressFn, cancel: CancelToken) -> StepOutcome:
        source = Path(self.request.source)
        folder = self.request.output_folder
        if not self.request.keep_reference:
            self._scratch = temporary_folder(folder, "reference")
            folder = self._scratch
        outtype = reference_outtype(source if source.is_dir() else source.parent)
        result: ConversionResult = run_isolated(
            convert_checkpoint, {"source": source, "output": None, "outtype": outtype, "output_folder": folder},
            progress=progress, cancel=cancel, what="the conversion")
        self.reference = result.path
        if self.request.keep_reference:
            return StepOutcome(result, result.path, self._add_to_library(result.path))
        return StepOutcome(result)

    def _calibrate(self, progress: ProgressFn, cancel: CancelToken) -> StepOutcome:
        reference = self._require_reference()
        result: CalibrationResult = run_isolated(
            calibrate, {"model": reference, "output": None, "texts": self.texts(), "chunks": self.request.chunks,
                        "ctx": self.request.ctx, "gpu_layers": self.request.gpu_layers},
            progress=progress, cancel=cancel, what="the importance matrix")
        self.matrix = result.matrix
        return StepOutcome(result)

    def _quantize(self, choice: VariantChoice, progress: ProgressFn, cancel: CancelToken) -> StepOutcome:
        reference = self._require_reference()
        target = self.request.output_folder / variant_file_name(reference, choice.type_label)
        matrix = self.matrix if choice.uses_imatrix and self.matrix is not None else NONE
        encoder = "feedback" if choice.preset is not None and self.request.feedback_presets else None
        result: QuantizeResult = run_isolated(
            quantize, {"source": reference, "output": target, "plan_or_preset": choice.recipe, "imatrix": matrix,
                       "texts": self.texts(), "gpu_layers": self.request.gpu_layers, "threads": self.request.threads,
                       "encoder": encoder, "awq": self.request.awq and matrix is not NONE},
            progress=progress, cancel=cancel, what=f"quantizing to {choice.label}")
        self.outputs.append(result.path)
        return StepOutcome(result, result.path, self._add_to_library(result.path))

    def _require_reference(self) -> Path:
        if self.reference is None:
            raise RuntimeError("the reference GGUF is made by the convert step, which has not run")
        return self.reference

    def _add_to_library(self, path: Path) -> LibraryEntry | None:
        """Index a file written into the models folder (the library finds it there; nothing is copied)."""
        return self.library.import_model(path) if self.library is not None else None

    def close(self) -> None:
        """Remove the temporary reference, if any (the variants and a kept reference stay)."""
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


def run_batch(batch: VariantBatch, progress: Callable[[BatchStep, Progress], None] | None = None,
              cancel: CancelToken | None = None) -> list[StepOutcome]:
    """Run every step in order (what the CLI or a script would do); stops at the first failure."""
    cancel = cancel or CancelToken()
    outcomes = []
    try:
        for step in batch.steps():
            report = (lambda done, step=step: progress(step, done)) if progress is not None else (lambda _: None)
            outcomes.append(step.work(report, cancel))
    finally:
        batch.close()
    return outcomes


def texts_from_files(paths: Sequence[Path]) -> tuple[CalibrationText, ...] | None:
    """The user's calibration files (None for none: the built-in text)."""
    from converters.calibration.calibrate import read_text_file

    return tuple(read_text_file(path) for path in paths) if paths else None
