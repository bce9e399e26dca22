"""Error feedback for a quantized GGUF: its tensors re-encoded so that rounding errors cancel in the products.

llama.cpp's quantizer writes the file first, with every tensor at the type the plan asks; then, for every weight
matrix whose type `native.error_feedback` can write, the tensor's bytes are replaced in place by an encoding of
the reference's weights with the same type, the same size and ggml's own block scales, whose integers were
chosen with error feedback against the second moments of the matrix's inputs on calibration text
(`collect_input_covariances`). Only bytes inside the tensor data change; the header is llama.cpp's.

Covariances take n_in² numbers per distinct input of a matrix (a layer's q, k and v share one): about 0.8 GB of
float64 for a 135M model, and growing with the square of the hidden size, which is why error feedback is the
default only for models whose covariances fit `COVARIANCE_MEMORY_LIMIT`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from converters.calibration.calibrate import CalibrationText, builtin_texts, calibration_chunks
from converters.calibration.imatrix import ImportanceMatrix
from converters.core.errors import Cancelled, UserError
from converters.core.gguf_file import GGUFHeader, TensorHeader, check_gguf
from converters.core.isolation import isolated
from converters.core.jobs import CancelToken, Progress, ProgressFn, no_progress
from converters.mix.sensitivity import Sensitivity, TensorSensitivity
from converters.quantization.plan import type_name

if TYPE_CHECKING:
    from native.error_feedback import PreparedInputs

ENCODERS = ("ggml", "feedback")
"""ggml: llama.cpp's own rounding; feedback: ggml's block scales, integers chosen with error feedback."""
FEEDBACK_CHUNKS = 32
"""Chunks of calibration text whose inputs make the covariances (8192 tokens at the default context)."""
RATIO_SAMPLE_ROWS = 64
"""Rows per tensor on which what error feedback saves at each type is measured."""
COVARIANCE_MEMORY_LIMIT = 4 << 30
"""Bytes of float64 covariances above which error feedback is not the default (a 1B model needs about 1.5 GB)."""


_LAST_COVARIANCES: dict[tuple[object, ...], dict[str, np.ndarray]] = {}
"""The latest covariances collected in this process, so that several budgets of one model share the pass."""
_LAST_RATIOS: dict[tuple[object, ...], dict[str, dict[str, float]]] = {}
"""The latest feedback ratios (tensor → type → ratio), for the same reason."""


class FeedbackError(UserError):
    """Error feedback that cannot be applied as asked."""


def covariance_bytes(header: GGUFHeader) -> int:
    """Bytes of float64 covariances error feedback would hold for this model (an upper bound: one input per
    matrix, though a layer's q, k and v share theirs)."""
    from native.kernels import quantizable_weight

    return 8 * sum(tensor.shape[0] ** 2 for tensor in header.tensors
                   if len(tensor.shape) == 2 and quantizable_weight(tensor.name, 2))


def collect_input_covariances(
    reference: Path,
    texts: Sequence[CalibrationText] | None = None,
    *,
    chunks: int = FEEDBACK_CHUNKS,
    ctx: int = 512,
    gpu_layers: int = 0,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> dict[str, np.ndarray]:
    """Per dense weight of `reference`, the sum of x xᵀ over its input rows on the calibration text (built-in when
    None); matrices that share an input share the array. The output product's weight is included."""
    key = (str(reference.resolve()), reference.stat().st_mtime_ns, tuple(t.name for t in texts or ()), chunks, ctx)
    if key in _LAST_COVARIANCES:
        return _LAST_COVARIANCES[key]
    covariances = _measure_input_covariances(reference, texts, chunks=chunks, ctx=ctx, gpu_layers=gpu_layers,
                                             progress=progress, cancel=cancel)
    _LAST_COVARIANCES.clear()
    _LAST_COVARIANCES[key] = covariances
    return covariances


@isolated("the input-correlation measurement")
def _measure_input_covariances(reference: Path, texts: Sequence[CalibrationText] | None, *, chunks: int, ctx: int,
                               gpu_layers: int, progress: ProgressFn, cancel: CancelToken | None
                               ) -> dict[str, np.ndarray]:
    """`collect_input_covariances` without the memory of the last one, in a child process (llama.cpp can abort)."""
    from native.activations import ModelEvaluator
    from native.errors import NativeError, Stopped

    should_stop = (lambda: cancel.cancelled) if cancel is not None else None
    progress(Progress(0, chunks, "chunks", "measuring input correlations"))
    try:
        with ModelEvaluator(reference, n_ctx=ctx, n_gpu_layers=gpu_layers, covariance_chunks=chunks,
                            should_stop=should_stop) as evaluator:
            token_chunks = calibration_chunks(evaluator, list(texts) if texts else builtin_texts(), ctx, chunks)
            for index, chunk in enumerate(token_chunks):
                evaluator.evaluate_chunk(chunk)
                progress(Progress(index + 1, len(token_chunks), "chunks", "measuring input correlations"))
            covariances = evaluator.stats().covariances
    except Stopped:
        raise Cancelled("quantization was cancelled") from None
    except NativeError as error:
        raise FeedbackError(str(error)) from error
    return covariances


class _ReferenceWeights:
    """The reference's 2-D weights as float32 rows, read through a memory map at the offsets its header gives."""

    def __init__(self, reference: Path) -> None:
        header = check_gguf(reference)
        self._tensors = {tensor.name: tensor for tensor in header.tensors}
        self._data_offset = header.data_offset
        self._file = np.memmap(reference, dtype=np.uint8, mode="r")

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def rows(self, name: str, picked: np.ndarray | None = None) -> np.ndarray:
        from native.kernels import source_rows

        tensor = self._tensors[name]
        start = self._data_offset + tensor.offset
        stored = self._file[start : start + tensor.n_bytes].reshape(tensor.shape[1], -1)
        return source_rows(stored if picked is None else stored[picked], type_name(tensor.type), tensor.shape[0])


class _PreparedInputs:
    """Factored covariances, each computed once however many matrices share it (a layer's q, k and v), and once
    for both the ratio measurement and the re-encoding (see `_prepared_inputs`)."""

    def __init__(self, covariances: Mapping[str, np.ndarray]) -> None:
        self.covariances = covariances
        self._prepared: dict[int, PreparedInputs] = {}

    def __getitem__(self, name: str) -> PreparedInputs:
        from native.error_feedback import prepare_inputs

        inputs = self.covariances[name]
        found = self._prepared.get(id(inputs))
        if found is None:
            found = self._prepared[id(inputs)] = prepare_inputs(inputs)
        return found


_LAST_PREPARED: list[_PreparedInputs] = []
"""The factors of the latest covariances, from the ratio measurement until the re-encoding has used them (they
take as much memory as the covariances); holding them also keeps those covariances' identity unique."""


def _prepared_inputs(covariances: Mapping[str, np.ndarray]) -> _PreparedInputs:
    if not _LAST_PREPARED or _LAST_PREPARED[0].covariances is not covariances:
        _LAST_PREPARED[:] = [_PreparedInputs(covariances)]
    return _LAST_PREPARED[0]


def release_factors() -> None:
    """Free the factored covariances kept between `feedback_sensitivity` and `apply_feedback` (for a quantization
    that stopped between the two)."""
    _LAST_PREPARED.clear()


def _importance_vector(matrix: ImportanceMatrix | None, name: str) -> np.ndarray | None:
    entry = matrix.entries.get(name) if matrix is not None else None
    if entry is None or entry.sums.shape[0] != 1:
        return None
    return (entry.sums[0] / max(int(entry.counts[0]), 1)).astype(np.float32)


def apply_feedback(
    reference: Path,
    quantized: Path,
    covariances: Mapping[str, np.ndarray],
    matrix: ImportanceMatrix | None,
    *,
    threads: int | None = None,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> int:
    """Re-encode, in place in `quantized` (llama.cpp's output for `reference`), every tensor with a covariance and
    a type error feedback writes; returns how many were re-encoded."""
    from native.error_feedback import supports_feedback

    written = check_gguf(quantized)
    sources = _ReferenceWeights(reference)
    prepared = _prepared_inputs(covariances)
    chosen = [tensor for tensor in written.tensors
              if tensor.name in covariances and tensor.name in sources and len(tensor.shape) == 2
              and supports_feedback(type_name(tensor.type), tensor.shape[0])]
    started = time.monotonic()
    try:
        _re_encode(quantized, written, chosen, sources, prepared, matrix, threads, progress, cancel)
    finally:
        release_factors()
    progress(Progress(len(chosen), len(chosen), "tensors", f"error feedback ({time.monotonic() - started:.0f} s)"))
    return len(chosen)


def _re_encode(quantized: Path, written: GGUFHeader, chosen: Sequence[TensorHeader], sources: _ReferenceWeights,
               prepared: _PreparedInputs, matrix: ImportanceMatrix | None, threads: int | None,
               progress: ProgressFn, cancel: CancelToken | None) -> None:
    from native.error_feedback import quantize_with_feedback

    with quantized.open("r+b") as file:
        for index, tensor in enumerate(chosen):
            if cancel is not None:
                cancel.raise_if_cancelled()
            progress(Progress(index, len(chosen), "tensors", "error feedback"))
            rows = sources.rows(tensor.name)
            try:
                encoded = quantize_with_feedback(
                    rows, type_name(tensor.type), prepared[tensor.name], _importance_vector(matrix, tensor.name),
                    threads=threads, should_stop=(lambda: cancel.cancelled) if cancel is not None else None)
            except InterruptedError:
                raise Cancelled("quantization was cancelled") from None
            if encoded.nbytes != tensor.n_bytes:
                raise FeedbackError(f"error feedback encoded {tensor.name} in {encoded.nbytes} bytes where llama.cpp "
                                    f"wrote {tensor.n_bytes}; quantize with --encoder ggml.")
            file.seek(written.data_offset + tensor.offset)
            file.write(encoded.tobytes())



def _output_error(weights: np.ndarray, decoded: np.ndarray, inputs: np.ndarray) -> float:
    error = weights.astype(np.float64) - decoded
    return float(np.einsum("ij,jk,ik->", error, inputs, error, optimize=True))


def feedback_sensitivity(
    sensitivity: Sensitivity,
    reference: Path,
    covariances: Mapping[str, np.ndarray],
    matrix: ImportanceMatrix | None,
    *,
    sample_rows: int = RATIO_SAMPLE_ROWS,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> Sensitivity:
    """`sensitivity` with each damage scaled by the share of it error feedback leaves: for each tensor and type
    it writes, tr(E H Eᵀ) of the feedback encoding over that of ggml's, on `sample_rows` evenly spaced rows.

    The gains were probed with ggml's rounding; a damage is an importance-weighted squared error, the diagonal
    part of tr(E H Eᵀ), which is what ggml's nearly independent rounding errors amount to. Feedback errors are
    correlated so as to cancel in the product; scaling by the measured ratio values them by what they do there.
    """
    from native.error_feedback import quantize_with_feedback, supports_feedback
    from native.kernels import dequantize_rows, quantize_rows

    key = (str(reference.resolve()), reference.stat().st_mtime_ns, id(covariances), id(matrix), sample_rows)
    known = _LAST_RATIOS.get(key, {})
    sources = _ReferenceWeights(reference)
    prepared_inputs = _prepared_inputs(covariances)
    scaled = []
    for index, tensor in enumerate(sensitivity.tensors):
        if cancel is not None:
            cancel.raise_if_cancelled()
        progress(Progress(index, len(sensitivity.tensors), "tensors", "measuring what error feedback saves"))
        inputs = covariances.get(tensor.name)
        fed = [option for option in tensor.options
               if option.damage > 0 and supports_feedback(option.type, tensor.shape[0])]
        if inputs is None or len(tensor.shape) != 2 or not fed:
            scaled.append(tensor)
            continue
        ratios = known.setdefault(tensor.name, {})
        if all(option.type in ratios for option in fed):
            scaled.append(_scaled(tensor, ratios))
            continue
        picked = np.unique(np.linspace(0, tensor.shape[1] - 1, min(sample_rows, tensor.shape[1])).astype(np.int64))
        rows = sources.rows(tensor.name, picked)
        prepared = prepared_inputs[tensor.name]
        importance = _importance_vector(matrix, tensor.name)
        for option in fed:
            plain = dequantize_rows(quantize_rows(rows, option.type, importance, threads=1), option.type,
                                    rows.shape[0], rows.shape[1])
            fed_rows = quantize_with_feedback(rows, option.type, prepared, importance, threads=1)
            decoded = dequantize_rows(fed_rows, option.type, rows.shape[0], rows.shape[1])
            baseline = _output_error(rows, plain, inputs)
            ratios[option.type] = _output_error(rows, decoded, inputs) / baseline if baseline > 0 else 1.0
        scaled.append(_scaled(tensor, ratios))
    _LAST_RATIOS.clear()
    _LAST_RATIOS[key] = known
    progress(Progress(len(scaled), len(scaled), "tensors", "measured what error feedback saves"))
    return replace(sensitivity, tensors=tuple(scaled))


def _scaled(tensor: TensorSensitivity, ratios: Mapping[str, float]) -> TensorSensitivity:
    return replace(tensor, options=tuple(replace(option, damage=option.damage * ratios.get(option.type, 1.0))
                                         for option in tensor.options))
