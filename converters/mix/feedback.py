"""Error feedback for a quantized GGUF: its tensors re-encoded so that rounding errors cancel in the products.

llama.cpp's quantizer writes the file first, with every tensor at the type the plan asks; then, for every weight
matrix whose type `native.error_feedback` can write, the tensor's bytes are replaced in place by an encoding of
the reference's weights with the same type, the same size and ggml's own block scales, whose integers were
chosen with error feedback against the second moments H = Σ x xᵀ of the matrix's inputs on calibration text.
Only bytes inside the tensor data change; the header is llama.cpp's.

Memory stays bounded whatever the model's size: the inputs' rows are spilled to disk during the calibration pass
(`converters.mix.feedback_inputs`), and both the ratio measurement (`feedback_sensitivity`) and the re-encoding
(`apply_feedback`) go through the distinct inputs one at a time in the model's order (a layer's q, k and v share
one; so do gate and up): form that input's H, factor it, measure or re-encode the matrices that read it, free
it, go on. The peak is one input's covariance and its factor (n_in² float64 each), and one slice of rows of the
tensor being encoded. Results are cached (`converters.mix.feedback_cache`): a ratio or a re-encoded tensor is
computed once per reference, importance matrix, text and encoder.

Held out: every input's spilled rows are split (`native.input_spill.HELD_OUT_EVERY`): the encoding is fit to
three stretches of text in four, with H shrunk toward its diagonal by how few tokens it has for its width
(`native.error_feedback.shrinkage_for`), and what it saves is measured on the fourth, text it never saw. Measured
in-sample, feedback's gain is promised, not kept: on a 1.5B model's 8960-wide feed-forward input it cut the fitted
text's error to a third and raised the held-out text's by 40 % (`bench/feedback_generalization.py`). A tensor
whose held-out ratio is not below 1 keeps llama.cpp's bytes, and the mix values it at ggml's damage.

Small callers (tests, benchmarks) may instead hand covariances already in memory: a mapping of each weight to its
H, matrices that share an input sharing the array. Nothing is cached or held out then: H is used as given and the
ratios are in-sample.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from converters.calibration.calibrate import CalibrationText
from converters.calibration.imatrix import ImportanceMatrix
from converters.core.errors import Cancelled
from converters.core.gguf_file import TensorHeader, check_gguf
from converters.core.jobs import CancelToken, Progress, ProgressFn, no_progress
from converters.mix.factor_store import FactorStore, compact
from converters.mix.feedback_cache import FeedbackCache
from converters.mix.feedback_inputs import CalibrationInputs, FeedbackError
from converters.mix.sensitivity import Sensitivity, TensorSensitivity
from converters.quantization.plan import type_name

if TYPE_CHECKING:
    from native.error_feedback import PreparedInputs
    from native.input_spill import SpilledInputs

__all__ = [
    "ENCODERS",
    "FEEDBACK_CHUNKS",
    "RATIO_SAMPLE_ROWS",
    "CalibrationInputs",
    "FeedbackError",
    "FeedbackInputs",
    "apply_feedback",
    "collect_input_covariances",
    "feedback_sensitivity",
]

ENCODERS = ("ggml", "feedback")
"""ggml: llama.cpp's own rounding; feedback: ggml's block scales, integers chosen with error feedback."""
FEEDBACK_CHUNKS = 32
"""Chunks of calibration text whose inputs make the covariances (8192 tokens at the default context)."""
RATIO_SAMPLE_ROWS = 32
"""Rows per tensor on which what error feedback saves at each type is measured. On the 1.5B, ratios on 32 rows are
within 1.6 % of those on 128 (median; 5 % at the 90th percentile), and the mixes they choose predict within 0.1 % of
the 128-row ratios' best, as do those of 64 rows, at half the encodings (bench/ratio_rows.py)."""
LOOKUP_RATIO = ":lookup"
"""Key suffix of a tied embedding's plain squared-error ratio among a tensor's feedback ratios."""
SLICE_ELEMENTS = 1 << 25
"""Weights re-encoded at once: rows are independent given H, so a large matrix (the output, 150k rows) is encoded
in slices of rows and its float64 work array stays near 256 MB."""

FEEDBACK_METHOD = "held-out/1"
"""How the encodings are fit and their ratios measured (part of the cache key): fit to the spill's fit part, H
shrunk by `shrinkage_for`; ratios on the held-out part; ggml's bytes kept where feedback does not pay there."""

FeedbackInputs = Mapping[str, np.ndarray] | CalibrationInputs
"""Per weight its input covariance (in memory), or the spilled inputs of calibration text (any size)."""


def collect_input_covariances(
    reference: Path,
    texts: Sequence[CalibrationText] | None = None,
    *,
    chunks: int = FEEDBACK_CHUNKS,
    ctx: int = 512,
    gpu_layers: int = 0,
    scratch: Path | None = None,
) -> CalibrationInputs:
    """The inputs of `reference`'s weight matrices on the calibration text (built-in when None), for
    `feedback_sensitivity` and `apply_feedback`: spilled to a folder under `scratch` (the reference's folder by
    default) when first needed, and removed when the result is closed or collected."""
    return CalibrationInputs(reference, texts, chunks=chunks, ctx=ctx, gpu_layers=gpu_layers, scratch=scratch)


@dataclass(frozen=True)
class _Input:
    """One distinct input: the weights whose products read it."""

    key: object
    weights: tuple[str, ...]


class _InputSource:
    """The distinct inputs in the model's order and each one's covariance, from memory or from the spill."""

    def __init__(self, inputs: FeedbackInputs, progress: ProgressFn, cancel: CancelToken | None) -> None:
        self._memory = inputs if not isinstance(inputs, CalibrationInputs) else None
        self._calibration = inputs if isinstance(inputs, CalibrationInputs) else None
        self._progress = progress
        self._cancel = cancel

    def readers(self, cache: FeedbackCache | None) -> frozenset[str]:
        """The weights that have an input; known from the cache without collecting anything when it can be."""
        if self._memory is not None:
            return frozenset(self._memory)
        known = cache.readers() if cache is not None else None
        if known is not None and not (self._calibration is not None and self._calibration.collected):
            return known
        found = frozenset(self._spilled().weights())
        if cache is not None:
            cache.save_readers(found)
        return found

    def _spilled(self) -> SpilledInputs:
        assert self._calibration is not None
        return self._calibration.spilled(self._progress, self._cancel)

    def inputs(self, weights: frozenset[str]) -> list[_Input]:
        """The distinct inputs read by any of `weights`, in the model's order, each with those of its readers."""
        if not weights:
            return []
        if self._memory is not None:
            shared: dict[int, list[str]] = {}
            for name, matrix in self._memory.items():
                if name in weights:
                    shared.setdefault(id(matrix), []).append(name)
            found = [_Input(names[0], tuple(names)) for names in shared.values()]
        else:
            found = [_Input(spilled, tuple(name for name in spilled.weights if name in weights))
                     for spilled in self._spilled().inputs]
            found = [entry for entry in found if entry.weights]
        return sorted(found, key=lambda entry: _model_order(entry.weights[0]))

    @property
    def in_memory(self) -> bool:
        return self._memory is not None

    def width(self, entry: _Input) -> int:
        if self._memory is not None:
            return int(self._memory[str(entry.key)].shape[0])
        return int(entry.key.n_in)  # type: ignore[attr-defined]

    def factor_store(self) -> FactorStore | None:
        return self._calibration.factor_store() if self._calibration is not None else None

    def fit_covariance(self, entry: _Input) -> tuple[np.ndarray, int | None]:
        """H of the rows an encoding is fit to, with their count (None for a covariance given in memory)."""
        from native.input_spill import SpillMismatch

        if self._memory is not None:
            return self._memory[str(entry.key)], None
        spilled = self._spilled()
        try:
            return spilled.covariance(entry.key, part="fit"), spilled.part_rows(entry.key, "fit")
        except SpillMismatch as error:
            raise FeedbackError(f"{error}; it was changed while qdesk worked, quantize again.") from error

    def held_out(self, entry: _Input) -> _HeldOut:
        """What an encoding's output error is measured on: the held-out rows, or in memory H itself."""
        import torch

        from native.input_spill import SpillMismatch

        if self._memory is not None:
            return _HeldOut(covariance=self._memory[str(entry.key)])
        try:
            blocks = list(self._spilled().row_blocks(entry.key, torch.device("cpu"), part="held-out"))
        except SpillMismatch as error:
            raise FeedbackError(f"{error}; it was changed while qdesk worked, quantize again.") from error
        if not blocks:
            return _HeldOut(covariance=self.fit_covariance(entry)[0])
        return _HeldOut(rows=torch.cat(blocks).numpy())


@dataclass(frozen=True)
class _HeldOut:
    """Where a ratio's output errors Σ ‖(W − Q) x‖² are summed: over held-out input rows x (rows × n_in), or as
    tr(E H Eᵀ) over a given H."""

    rows: np.ndarray | None = None
    covariance: np.ndarray | None = None

    @property
    def in_sample(self) -> bool:
        return self.rows is None

    def error(self, weights: np.ndarray, decoded: np.ndarray) -> float:
        difference = weights.astype(np.float64) - decoded
        if self.rows is not None:
            products = self.rows @ difference.T.astype(np.float32)
            return float(np.square(products, dtype=np.float64).sum())
        assert self.covariance is not None
        return float(np.einsum("ij,jk,ik->", difference, self.covariance, difference, optimize=True))


def _model_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) > 1 and parts[1].isdigit():
        return int(parts[1]), name
    return 1 << 30, name


def _cache_for(reference: Path, inputs: FeedbackInputs, matrix: ImportanceMatrix | None) -> FeedbackCache | None:
    if not isinstance(inputs, CalibrationInputs):
        return None
    if Path(inputs.reference).resolve() != Path(reference).resolve():
        raise FeedbackError(f"the calibration inputs were collected for {inputs.reference.name}, not for "
                            f"{reference.name}; collect them for this model.")
    return FeedbackCache(inputs.fingerprint, matrix, (*inputs.provenance, FEEDBACK_METHOD))


class _ReferenceWeights:
    """The reference's 2-D weights as float32 rows, read from the file at the offsets its header gives (read, not
    mapped, so that what was read is freed with the rows)."""

    def __init__(self, reference: Path) -> None:
        header = check_gguf(reference)
        self._tensors = {tensor.name: tensor for tensor in header.tensors}
        self._data_offset = header.data_offset
        self._path = reference

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name].shape

    def rows(self, name: str, picked: np.ndarray | slice) -> np.ndarray:
        """Rows `picked` (indices, or a slice of consecutive rows) of weight `name` as float32."""
        from native.kernels import source_rows

        tensor = self._tensors[name]
        n_rows = tensor.shape[1]
        row_bytes = tensor.n_bytes // n_rows
        start = self._data_offset + tensor.offset
        with self._path.open("rb") as file:
            if isinstance(picked, slice):
                first, stop, _ = picked.indices(n_rows)
                raw = os.pread(file.fileno(), (stop - first) * row_bytes, start + first * row_bytes)
            else:
                raw = b"".join(os.pread(file.fileno(), row_bytes, start + int(row) * row_bytes) for row in picked)
        stored = np.frombuffer(raw, dtype=np.uint8).reshape(-1, row_bytes)
        return np.array(source_rows(stored, type_name(tensor.type), tensor.shape[0]), dtype=np.float32)


def _importance_vector(matrix: ImportanceMatrix | None, name: str) -> np.ndarray | None:
    entry = matrix.entries.get(name) if matrix is not None else None
    if entry is None or entry.sums.shape[0] != 1:
        return None
    return (entry.sums[0] / max(int(entry.counts[0]), 1)).astype(np.float32)


def _prepared(covariance: np.ndarray, tokens: int | None) -> PreparedInputs:
    """H factored for the encoder; an H of `tokens` spilled rows shrunk by how well so few determine it."""
    from native.error_feedback import prepare_inputs, shrinkage_for

    return prepare_inputs(covariance, shrinkage=shrinkage_for(covariance.shape[0], tokens) if tokens else 0.0)


def _stopper(cancel: CancelToken | None) -> Callable[[], bool] | None:
    return (lambda: cancel.cancelled) if cancel is not None else None


def _check(cancel: CancelToken | None) -> None:
    if cancel is not None and cancel.cancelled:
        raise Cancelled("quantization was cancelled")


def _factored(source: _InputSource, entry: _Input, progress: ProgressFn, step: Progress,
              cancel: CancelToken | None) -> PreparedInputs:
    """The factor of the input's fit part (read back when an earlier pass of the job kept it), always in the
    compact form `converters.mix.factor_store` keeps."""
    store = source.factor_store()
    key = str(getattr(entry.key, "key", entry.key))
    if store is not None:
        kept = store.load(key, source.width(entry))
        if kept is not None:
            return kept.expanded()
    progress(Progress(step.done, step.total, step.unit, "forming input covariances"))
    covariance, tokens = source.fit_covariance(entry)
    _check(cancel)
    progress(Progress(step.done, step.total, step.unit, "factoring input covariances"))
    factor = compact(_prepared(covariance, tokens))
    del covariance
    _check(cancel)
    if store is not None:
        store.save(key, factor)
    return factor.expanded()


def apply_feedback(
    reference: Path,
    quantized: Path,
    inputs: FeedbackInputs,
    matrix: ImportanceMatrix | None,
    *,
    threads: int | None = None,
    progress: ProgressFn = no_progress,
    cancel: CancelToken | None = None,
) -> int:
    """Re-encode, in place in `quantized` (llama.cpp's output for `reference`), every tensor with an input and a
    type error feedback writes, where feedback lowers the held-out output error (its ratio, measured here for a
    type the ratio pass did not measure); returns how many were re-encoded. The others keep llama.cpp's bytes.
    Cached encodings are copied; the rest are encoded input by input (and cached)."""
    from native.error_feedback import supports_feedback

    reference = Path(reference)
    written = check_gguf(quantized)
    sources = _ReferenceWeights(reference)
    cache = _cache_for(reference, inputs, matrix)
    known = cache.ratios(RATIO_SAMPLE_ROWS) if cache is not None else {}
    measured_here = False
    source = _InputSource(inputs, progress, cancel)
    candidates = [tensor for tensor in written.tensors
                  if len(tensor.shape) == 2 and tensor.name in sources
                  and supports_feedback(type_name(tensor.type), tensor.shape[0])]
    started = time.monotonic()
    counter = _Counter(progress, len(candidates), "error feedback")
    encoded = 0
    with quantized.open("r+b") as file:
        missing = []
        for tensor in candidates:
            _check(cancel)
            if not _pays(known, tensor.name, type_name(tensor.type)):
                counter.step()
            elif cache is not None and cache.copy_into(tensor.name, type_name(tensor.type), tensor.shape,
                                                       tensor.n_bytes, file, written.data_offset + tensor.offset):
                counter.step_before()
                counter.step()
                encoded += 1
            else:
                missing.append(tensor)
        readers = source.readers(cache) if missing else frozenset()
        missing = [tensor for tensor in missing if tensor.name in readers]
        by_name = {tensor.name: tensor for tensor in missing}
        counter.total = counter.done + len(missing)
        for entry in source.inputs(frozenset(by_name)):
            _check(cancel)
            prepared = _factored(source, entry, progress, counter.report(), cancel)
            held_out: _HeldOut | None = None
            for name in entry.weights:
                counter.step_before()
                tensor = by_name[name]
                stored_type = type_name(tensor.type)
                if not source.in_memory and stored_type not in known.get(name, {}):
                    held_out = held_out or source.held_out(entry)
                    rows = _sample_rows(sources, name, RATIO_SAMPLE_ROWS)
                    plain, fed = _both_encodings(rows, stored_type, prepared, _importance_vector(matrix, name),
                                                 cancel)
                    known.setdefault(name, {})[stored_type] = _ratio(held_out, rows, plain, fed)
                    measured_here = True
                if _pays(known, name, stored_type):
                    _re_encode(file, written.data_offset, tensor, sources, prepared, matrix, threads, cache, cancel)
                    encoded += 1
                counter.step()
            del prepared, held_out
    if measured_here and cache is not None:
        cache.save_ratios(RATIO_SAMPLE_ROWS, known)
    progress(Progress(counter.total, counter.total, "tensors",
                      f"error feedback ({time.monotonic() - started:.0f} s)"))
    return encoded


def _pays(known: Mapping[str, Mapping[str, float]], name: str, stored_type: str) -> bool:
    """Whether feedback is worth writing for `name` as `stored_type`: unmeasured, or measured below ggml's error."""
    return known.get(name, {}).get(stored_type, 0.0) < 1.0


class _Counter:
    """Progress over tensors: `step_before` reports the tensor about to be worked on, `step` counts it done."""

    def __init__(self, progress: ProgressFn, total: int, message: str) -> None:
        self._progress = progress
        self.total = total
        self.done = 0
        self._message = message

    def report(self) -> Progress:
        return Progress(self.done, self.total, "tensors", self._message)

    def step_before(self) -> None:
        self._progress(self.report())

    def step(self) -> None:
        self.done += 1


def _row_slices(n_rows: int, n_in: int) -> Iterator[slice]:
    step = max(1, SLICE_ELEMENTS // max(n_in, 1))
    for first in range(0, n_rows, step):
        yield slice(first, min(n_rows, first + step))


def _re_encode(file: BinaryIO, data_offset: int, tensor: TensorHeader, sources: _ReferenceWeights,
               prepared: PreparedInputs, matrix: ImportanceMatrix | None, threads: int | None,
               cache: FeedbackCache | None, cancel: CancelToken | None) -> None:
    from contextlib import nullcontext

    from native.error_feedback import quantize_with_feedback

    stored_type = type_name(tensor.type)
    n_in, n_rows = tensor.shape[0], tensor.shape[1]
    row_bytes = tensor.n_bytes // n_rows
    importance = _importance_vector(matrix, tensor.name)
    entry = (cache.entry_writer(tensor.name, stored_type, tensor.shape, tensor.n_bytes) if cache is not None
             else nullcontext(None))
    with entry as keep:
        for part in _row_slices(n_rows, n_in):
            _check(cancel)
            try:
                encoded = quantize_with_feedback(sources.rows(tensor.name, part), stored_type, prepared, importance,
                                                 threads=threads, should_stop=_stopper(cancel))
            except InterruptedError:
                raise Cancelled("quantization was cancelled") from None
            if encoded.nbytes != (part.stop - part.start) * row_bytes:
                raise FeedbackError(f"error feedback encoded {tensor.name} in rows of {encoded.shape[1]} bytes where "
                                    f"llama.cpp wrote {row_bytes}; quantize with --encoder ggml.")
            payload = encoded.tobytes()
            file.seek(data_offset + tensor.offset + part.start * row_bytes)
            file.write(payload)
            if keep is not None:
                keep(payload)


def _sample_rows(sources: _ReferenceWeights, name: str, sample_rows: int) -> np.ndarray:
    n_rows = sources.shape(name)[1]
    return sources.rows(name, np.unique(np.linspace(0, n_rows - 1, min(sample_rows, n_rows)).astype(np.int64)))


def _both_encodings(rows: np.ndarray, type_: str, prepared: PreparedInputs, importance: np.ndarray | None,
                    cancel: CancelToken | None) -> tuple[np.ndarray, np.ndarray]:
    """`rows` decoded after ggml's rounding and after error feedback's, as `type_`."""
    from native.error_feedback import quantize_with_feedback
    from native.kernels import dequantize_rows, quantize_rows

    plain = dequantize_rows(quantize_rows(rows, type_, importance, threads=1), type_, rows.shape[0], rows.shape[1])
    try:
        fed = quantize_with_feedback(rows, type_, prepared, importance, threads=1, should_stop=_stopper(cancel))
    except InterruptedError:
        raise Cancelled("quantization was cancelled") from None
    return plain, dequantize_rows(fed, type_, rows.shape[0], rows.shape[1])


def _ratio(held_out: _HeldOut, rows: np.ndarray, plain: np.ndarray, fed: np.ndarray) -> float:
    baseline = held_out.error(rows, plain)
    return held_out.error(rows, fed) / baseline if baseline > 0 else 1.0


def feedback_sensitivity(
    sensitivity: Sensitivity,
    reference: Path,
    inputs: FeedbackInputs,
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
    Measured input by input (one covariance in memory at a time); cached ratios are not measured again.
    """
    from native.error_feedback import supports_feedback

    reference = Path(reference)
    cache = _cache_for(reference, inputs, matrix)
    known = cache.ratios(sample_rows) if cache is not None else {}
    wanted: dict[str, list[str]] = {}
    for tensor in sensitivity.tensors:
        fed = [option.type for option in tensor.options
               if option.damage > 0 and supports_feedback(option.type, tensor.shape[0])]
        have = known.get(tensor.name, {})
        missing = [type_ for type_ in fed
                   if type_ not in have or (tensor.lookup_gain > 0 and type_ + LOOKUP_RATIO not in have)]
        if len(tensor.shape) == 2 and missing:
            wanted[tensor.name] = missing
    if wanted:
        source = _InputSource(inputs, progress, cancel)
        readers = source.readers(cache)
        for name in set(wanted) - readers:  # no product reads an input of it (an untied embedding): nothing saved
            known.setdefault(name, {}).update(dict.fromkeys(wanted.pop(name), 1.0))
        lookups = frozenset(tensor.name for tensor in sensitivity.tensors if tensor.lookup_gain > 0)
        _measure_ratios(source, wanted, known, reference, matrix, sample_rows, progress, cancel, lookups)
        if cache is not None:
            cache.save_ratios(sample_rows, known)
    progress(Progress(len(sensitivity.tensors), len(sensitivity.tensors), "tensors",
                      "measured what error feedback saves"))
    return replace(sensitivity, tensors=tuple(_scaled(tensor, known.get(tensor.name, {}))
                                              for tensor in sensitivity.tensors))


def _measure_ratios(source: _InputSource, wanted: Mapping[str, Sequence[str]], known: dict[str, dict[str, float]],
                    reference: Path, matrix: ImportanceMatrix | None, sample_rows: int, progress: ProgressFn,
                    cancel: CancelToken | None, lookups: frozenset[str]) -> None:
    """The ratios of `wanted` (weight → types) into `known`, on each input's held-out rows; for the tied
    embeddings in `lookups` also the plain squared error's ratio (`LOOKUP_RATIO`), which is what feedback does to
    their lookup."""
    sources = _ReferenceWeights(reference)
    counter = _Counter(progress, len(wanted), "measuring what error feedback saves")
    for entry in source.inputs(frozenset(wanted)):
        _check(cancel)
        prepared = _factored(source, entry, progress, counter.report(), cancel)
        held_out = source.held_out(entry)
        for name in entry.weights:
            _check(cancel)
            counter.step_before()
            rows = _sample_rows(sources, name, sample_rows)
            importance = _importance_vector(matrix, name)
            ratios = known.setdefault(name, {})
            for type_ in wanted[name]:
                plain, decoded = _both_encodings(rows, type_, prepared, importance, cancel)
                ratios[type_] = _ratio(held_out, rows, plain, decoded)
                if name in lookups:
                    plain_error = float(np.square(rows - plain).sum())
                    ratios[type_ + LOOKUP_RATIO] = (float(np.square(rows - decoded).sum()) / plain_error
                                                    if plain_error > 0 else 1.0)
            counter.step()
        del prepared, held_out


def _scaled(tensor: TensorSensitivity, ratios: Mapping[str, float]) -> TensorSensitivity:
    """The damages scaled by what feedback leaves of them: the product's by its held-out ratio (at most 1: where
    feedback does not pay, `apply_feedback` keeps ggml's bytes), a tied embedding's lookup by the plain squared
    error's (feedback trades the latter for the former)."""
    return replace(tensor, options=tuple(
        replace(option, damage=option.damage * min(ratios.get(option.type, 1.0), 1.0),
                lookup_damage=option.lookup_damage * ratios.get(option.type + LOOKUP_RATIO, 1.0))
        for option in tensor.options))
