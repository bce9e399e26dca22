"""Fast quantization-error kernels for the sensitivity analysis, running ggml's own encoders and decoders.

A row of weights is quantized with `ggml_quantize_chunk` (the same encoder llama.cpp's quantizer uses, with the
same importance weighting), decoded with the type's `to_float`, and compared with the original row. The
squared error is summed plainly and weighted per input column by an importance vector (the mean squared
activation of each column, as an imatrix stores it), next to the reference's own sums of squares so that
relative errors can be formed.

Every ggml quantizer works row by row, so measuring an evenly spaced subset of rows gives exactly those rows'
errors; `sample_rows` uses that to estimate a whole tensor at a fraction of the cost. Work is cut into slices of
rows and run on a small thread pool: ctypes releases the GIL inside the C calls, so the threads run in parallel.

`measure_gguf` applies this to every quantizable weight of a GGUF at each candidate type and returns the table
the sensitivity stage builds its costs from.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from native.errors import Stopped
from native.ggml import ToFloat, ggml

DEFAULT_SAMPLE_ROWS = 256
"""Rows measured per tensor by `measure_gguf` unless told otherwise (tensors with fewer rows are measured whole)."""

SLICE_ELEMENTS = 1 << 17
"""Weights per unit of threaded work: 512 KiB of float32, small enough to stay in cache while it is measured."""

QUANTIZABLE_TYPES = frozenset({
    "f32", "f16", "bf16",
    "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q1_0", "q2_0", "mxfp4", "nvfp4",
    "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "tq1_0", "tq2_0",
    "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_nl", "iq4_xs",
})
"""The types `ggml_quantize_chunk` of the pinned ggml can encode (any other type makes ggml abort)."""

NEVER_QUANTIZED_FRAGMENTS = (
    "_norm.weight", "ffn_gate_inp.weight", "pos_embd.weight", "token_types.weight", "ssm_conv1d",
    "shortconv.conv.weight", "altup", "laurel", "per_layer_model_proj",
)
"""Name fragments of weights that llama.cpp's quantizer always keeps as they are, whatever the requested type."""

_c_float_p = ctypes.POINTER(ctypes.c_float)

if TYPE_CHECKING:
    from gguf import GGUFReader


@dataclass(frozen=True)
class QuantError:
    """The error of one type on (a sample of the rows of) one weight matrix.

    `squared_error` and its weighted twin are for the whole tensor: measured exactly when every row was measured,
    estimated from the measured rows otherwise. The reference sums of squares are always exact. Without an
    importance vector the weighted sums equal the plain ones.
    """

    type_name: str
    n_per_row: int
    rows: int
    total_rows: int
    bytes_per_row: int
    squared_error: float
    weighted_squared_error: float
    reference_squares: float
    weighted_reference_squares: float
    weighted: bool

    @property
    def relative_error(self) -> float:
        return self.squared_error / self.reference_squares if self.reference_squares > 0 else 0.0

    @property
    def weighted_relative_error(self) -> float:
        if self.weighted_reference_squares > 0:
            return self.weighted_squared_error / self.weighted_reference_squares
        return 0.0

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes_per_row / self.n_per_row

    @property
    def sampled(self) -> bool:
        return self.rows < self.total_rows

    @property
    def tensor_bytes(self) -> int:
        return self.bytes_per_row * self.total_rows

    def combined(self, other: QuantError) -> QuantError:
        """The measurement of both parts together (e.g. the experts of one 3-D tensor), for the same type."""
        if (other.type_name, other.n_per_row) != (self.type_name, self.n_per_row):
            raise ValueError("only measurements of the same type and row length can be combined")
        return QuantError(
            type_name=self.type_name,
            n_per_row=self.n_per_row,
            rows=self.rows + other.rows,
            total_rows=self.total_rows + other.total_rows,
            bytes_per_row=self.bytes_per_row,
            squared_error=self.squared_error + other.squared_error,
            weighted_squared_error=self.weighted_squared_error + other.weighted_squared_error,
            reference_squares=self.reference_squares + other.reference_squares,
            weighted_reference_squares=self.weighted_reference_squares + other.weighted_reference_squares,
            weighted=self.weighted or other.weighted,
        )

    def to_json(self) -> dict[str, object]:
        return {
            "type": self.type_name,
            "n_per_row": self.n_per_row,
            "rows": self.rows,
            "total_rows": self.total_rows,
            "bytes_per_row": self.bytes_per_row,
            "squared_error": self.squared_error,
            "weighted_squared_error": self.weighted_squared_error,
            "reference_squares": self.reference_squares,
            "weighted_reference_squares": self.weighted_reference_squares,
            "weighted": self.weighted,
            "relative_error": self.relative_error,
            "weighted_relative_error": self.weighted_relative_error,
        }


@dataclass(frozen=True)
class _Target:
    """A ggml type resolved once: its id, block geometry and decoder."""

    name: str
    type_id: int
    block_size: int
    block_bytes: int
    requires_importance: bool
    to_float: Callable[..., None] | None

    def fits(self, n_per_row: int) -> bool:
        return n_per_row > 0 and n_per_row % self.block_size == 0

    def row_bytes(self, n_per_row: int) -> int:
        return n_per_row // self.block_size * self.block_bytes

    def check_fits(self, n_per_row: int) -> None:
        if not self.fits(n_per_row):
            raise ValueError(
                f"{self.name} packs blocks of {self.block_size} weights, which do not divide rows of {n_per_row}; "
                f"choose a type whose block size divides {n_per_row}."
            )


@functools.cache
def _target(type_name: str) -> _Target:
    name = type_name.lower()
    lib = ggml()
    known = lib.type_names()
    if name not in known:
        raise ValueError(f"unknown ggml type {type_name!r}; known types: {', '.join(sorted(known))}.")
    if name not in QUANTIZABLE_TYPES:
        raise ValueError(
            f"ggml cannot encode weights as {name}; choose one of {', '.join(sorted(QUANTIZABLE_TYPES))}."
        )
    type_id = known[name]
    traits = lib.traits(type_id)
    decoder = ToFloat(traits.to_float) if traits.to_float else None
    if decoder is None and name != "f32":
        raise ValueError(f"ggml has no decoder for {name}, so its error cannot be measured.")
    return _Target(
        name=name,
        type_id=type_id,
        block_size=int(traits.blck_size),
        block_bytes=int(traits.type_size),
        requires_importance=bool(lib.ggml_quantize_requires_imatrix(type_id)),
        to_float=decoder,
    )


def fits(type_name: str, n_per_row: int) -> bool:
    """Whether rows of `n_per_row` weights can be stored as `type_name` (its block size divides the row)."""
    return _target(type_name).fits(n_per_row)


def bytes_per_row(type_name: str, n_per_row: int) -> int:
    target = _target(type_name)
    target.check_fits(n_per_row)
    return target.row_bytes(n_per_row)


def _float_rows(weights: np.ndarray) -> np.ndarray:
    if weights.ndim != 2:
        raise ValueError(f"expected a 2-D array of rows, got shape {weights.shape}")
    return np.ascontiguousarray(weights, dtype=np.float32)


def _importance_vector(importance: np.ndarray | None, n_per_row: int) -> np.ndarray | None:
    if importance is None:
        return None
    vector = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
    if vector.size != n_per_row:
        raise ValueError(f"the importance vector has {vector.size} values but rows have {n_per_row} columns")
    if not np.all(np.isfinite(vector)) or np.any(vector < 0):
        raise ValueError("importance values must be finite and non-negative (mean squared activations)")
    return vector


def _row_slices(rows: int, n_per_row: int) -> list[slice]:
    step = max(1, SLICE_ELEMENTS // max(1, n_per_row))
    return [slice(start, min(rows, start + step)) for start in range(0, rows, step)]


def _thread_count(threads: int | None) -> int:
    return max(1, threads if threads is not None else (os.cpu_count() or 1))


def _encode(target: _Target, rows: np.ndarray, out: np.ndarray, importance: np.ndarray | None) -> None:
    """Quantize C-contiguous float32 `rows` into `out` (uint8, rows × row bytes) with ggml's encoder."""
    imatrix = importance.ctypes.data_as(_c_float_p) if importance is not None else None
    ggml().ggml_quantize_chunk(
        target.type_id, rows.ctypes.data_as(_c_float_p), out.ctypes.data, 0, rows.shape[0], rows.shape[1], imatrix,
    )


def _decode(target: _Target, data: np.ndarray, out: np.ndarray) -> None:
    """Decode `data` (uint8, rows × row bytes) into `out` (float32, rows × n_per_row) with ggml's decoder."""
    if target.to_float is None:
        out.reshape(-1)[:] = data.reshape(-1).view(np.float32)
        return
    target.to_float(data.ctypes.data, out.ctypes.data_as(_c_float_p), out.size)


def _encode_check(target: _Target, n_per_row: int, importance: np.ndarray | None) -> None:
    """Refuse what would make ggml abort, then build the type's tables (once) before threads use them."""
    target.check_fits(n_per_row)
    if target.requires_importance and importance is None:
        raise ValueError(f"ggml quantizes {target.name} only with an importance matrix; pass `importance`.")
    ggml().ggml_quantize_init(target.type_id)


def _run_slices(work: Callable[[slice], None], slices: list[slice], threads: int | None) -> None:
    count = min(_thread_count(threads), len(slices))
    if count <= 1:
        for part in slices:
            work(part)
        return
    with ThreadPoolExecutor(count, thread_name_prefix="qdesk-kernels") as pool:
        for done in [pool.submit(work, part) for part in slices]:
            done.result()


def quantize_rows(
    weights: np.ndarray, type_name: str, importance: np.ndarray | None = None, threads: int | None = None,
) -> np.ndarray:
    """Encode float32 rows (rows × n_per_row) as `type_name` with ggml; returns uint8 rows × bytes per row."""
    target = _target(type_name)
    rows = _float_rows(weights)
    vector = _importance_vector(importance, rows.shape[1])
    _encode_check(target, rows.shape[1], vector)
    out = np.empty((rows.shape[0], target.row_bytes(rows.shape[1])), dtype=np.uint8)

    def encode(part: slice) -> None:
        _encode(target, rows[part], out[part], vector)

    _run_slices(encode, _row_slices(rows.shape[0], rows.shape[1]), threads)
    return out


def dequantize_rows(
    data: bytes | bytearray | memoryview | np.ndarray, type_name: str, rows: int, n_per_row: int,
    threads: int | None = None,
) -> np.ndarray:
    """Decode `rows` rows of `n_per_row` weights stored as `type_name` with ggml; returns float32 rows."""
    target = _target(type_name)
    target.check_fits(n_per_row)
    row_bytes = target.row_bytes(n_per_row)
    raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8)
    if raw.size != rows * row_bytes:
        raise ValueError(f"{rows} rows of {n_per_row} {target.name} weights take {rows * row_bytes} bytes, "
                         f"got {raw.size}")
    packed = np.ascontiguousarray(raw).reshape(rows, row_bytes)
    out = np.empty((rows, n_per_row), dtype=np.float32)

    def decode(part: slice) -> None:
        _decode(target, packed[part], out[part])

    _run_slices(decode, _row_slices(rows, n_per_row), threads)
    return out


# --- measuring a matrix ----------------------------------------------------------------------------------------
#
# With `sample_rows` below the row count, a first pass reads every row once (cheap next to encoding) for the exact
# reference sums and a per-row error proxy: the sum over 32-weight blocks of the block's largest magnitude squared,
# which is what a block quantizer's step size, and so its error, follows. The rows with the largest proxy (a quarter
# of the budget) are measured for certain, so outlier rows are never missed; the rest of the budget is spread
# evenly over the remaining rows in proxy order (a stratified sample) and scaled up by the ratio of the remaining
# rows' proxy to the sampled rows' proxy.

PROXY_BLOCK = 32
CERTAIN_SHARE = 4
"""One in this many sampled rows is taken from the rows with the largest error proxy."""

FIRST_PASS_ELEMENTS = 1 << 22
"""Weights read per step of the first pass (16 MiB of float32), so large tensors never widen at once."""


@dataclass(frozen=True)
class _Reference:
    """The rows to be measured (float32, in tensor order) and what is needed to turn their errors into totals.

    `groups` splits the measured rows into runs that share one importance vector (one run for a matrix, one per
    expert of a 3-D stack); ggml takes one importance vector per call, so slices never cross runs. `plain_weights`
    and `weighted_weights` say how many rows' worth of error each measured row stands for (None: one each).
    The reference sums cover every row of the tensor, exactly.
    """

    rows: np.ndarray
    total_rows: int
    groups: tuple[tuple[int, int, np.ndarray | None], ...]
    plain_weights: np.ndarray | None
    weighted_weights: np.ndarray | None
    squares: float
    weighted_squares: float

    @property
    def weighted(self) -> bool:
        return any(vector is not None for _, _, vector in self.groups)

    def work(self) -> list[tuple[slice, np.ndarray | None]]:
        units: list[tuple[slice, np.ndarray | None]] = []
        for start, stop, vector in self.groups:
            units.extend((slice(start + part.start, start + part.stop), vector)
                         for part in _row_slices(stop - start, self.rows.shape[1]))
        return units


@dataclass(frozen=True)
class _Rows:
    """A matrix to measure, however it is stored: `read(selection)` gives float32 rows, `vectors[e]` the importance
    of the rows of expert `e` (rows `e * rows_per_vector` onwards)."""

    total_rows: int
    n_per_row: int
    read: Callable[[slice | np.ndarray], np.ndarray]
    vectors: tuple[np.ndarray | None, ...]
    rows_per_vector: int

    def groups(self, row_indices: np.ndarray) -> tuple[tuple[int, int, np.ndarray | None], ...]:
        owners = row_indices // self.rows_per_vector
        found: list[tuple[int, int, np.ndarray | None]] = []
        for owner, vector in enumerate(self.vectors):
            start, stop = (int(bound) for bound in np.searchsorted(owners, [owner, owner + 1]))
            if stop > start:
                found.append((start, stop, vector))
        return tuple(found)


def _weighted_row_sums(values: np.ndarray, source: _Rows, first_row: int) -> np.ndarray:
    """Per-row `values @ vector` with each row's own importance vector (its expert's); plain sums where none."""
    sums = np.empty(values.shape[0], dtype=np.float64)
    owners = (np.arange(values.shape[0]) + first_row) // source.rows_per_vector
    for owner in np.unique(owners):
        part = owners == owner
        vector = source.vectors[owner]
        sums[part] = values[part] @ vector if vector is not None else values[part].sum(axis=1)
    return sums


def _error_proxy(rows: np.ndarray) -> np.ndarray:
    """Per row, the sum of squared block maxima of |w| times the block length: what a block quantizer's error
    scales with (`rows` × blocks of PROXY_BLOCK, or one block per row when the length does not divide)."""
    block = PROXY_BLOCK if rows.shape[1] % PROXY_BLOCK == 0 else rows.shape[1]
    maxima = np.abs(rows).reshape(rows.shape[0], -1, block).max(axis=2)
    np.square(maxima, out=maxima)
    return maxima * np.float32(block)


def _block_importance(vector: np.ndarray | None, n_per_row: int) -> np.ndarray | None:
    if vector is None:
        return None
    block = PROXY_BLOCK if n_per_row % PROXY_BLOCK == 0 else n_per_row
    return vector.reshape(-1, block).mean(axis=1)


def _stratified_sample(proxy: np.ndarray, sample_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted row indices to measure, and which rows are certain: the `sample_rows // CERTAIN_SHARE` rows of
    largest proxy are, the rest of the budget is spread evenly over the other rows in proxy order."""
    total = proxy.shape[0]
    certain_count = sample_rows // CERTAIN_SHARE
    by_proxy = np.argsort(proxy, kind="stable")
    certain = np.zeros(total, dtype=bool)
    certain[by_proxy[total - certain_count:]] = True
    rest = by_proxy[: total - certain_count]
    spread = sample_rows - certain_count
    picks = ((np.arange(spread, dtype=np.int64) * 2 + 1) * rest.shape[0]) // (2 * spread)
    return np.sort(np.concatenate([by_proxy[total - certain_count:], rest[picks]])), certain


def _row_weights(proxy: np.ndarray, chosen: np.ndarray, certain: np.ndarray) -> np.ndarray:
    """How many rows' worth of error each chosen row stands for: one for the certain rows, and for the spread rows
    the remaining rows' proxy over the spread rows' proxy (a ratio estimate)."""
    weights = np.ones(chosen.shape[0], dtype=np.float64)
    spread = ~certain[chosen]
    spread_count = int(spread.sum())
    if spread_count == 0:
        return weights
    remaining_proxy = float(proxy[~certain].sum(dtype=np.float64))
    spread_proxy = float(proxy[chosen[spread]].sum(dtype=np.float64))
    remaining_rows = int((~certain).sum())
    weights[spread] = remaining_proxy / spread_proxy if spread_proxy > 0 else remaining_rows / spread_count
    return weights


def _reference(source: _Rows, sample_rows: int | None) -> _Reference:
    if sample_rows is None or sample_rows >= source.total_rows:
        rows = source.read(slice(0, source.total_rows))
        squared = np.square(rows)
        squares = float(squared.sum(axis=1).sum(dtype=np.float64))
        weighted = float(_weighted_row_sums(squared, source, 0).sum())
        return _Reference(rows, source.total_rows, source.groups(np.arange(source.total_rows)), None, None,
                          squares, weighted)
    if sample_rows < 1:
        raise ValueError("sample_rows must be at least 1")
    plain_proxy = np.empty(source.total_rows, dtype=np.float64)
    weighted_proxy = np.empty(source.total_rows, dtype=np.float64)
    squares = 0.0
    weighted = 0.0
    block_vectors = [_block_importance(vector, source.n_per_row) for vector in source.vectors]
    block_source = _Rows(source.total_rows, source.n_per_row, source.read, tuple(block_vectors),
                         source.rows_per_vector)
    step = max(1, FIRST_PASS_ELEMENTS // source.n_per_row)
    for start in range(0, source.total_rows, step):
        stop = min(source.total_rows, start + step)
        rows = source.read(slice(start, stop))
        squared = np.square(rows)
        squares += float(squared.sum(axis=1).sum(dtype=np.float64))
        weighted += float(_weighted_row_sums(squared, source, start).sum())
        proxy = _error_proxy(rows)
        plain_proxy[start:stop] = proxy.sum(axis=1)
        weighted_proxy[start:stop] = _weighted_row_sums(proxy, block_source, start)
    chosen, certain = _stratified_sample(plain_proxy, sample_rows)
    return _Reference(
        rows=source.read(chosen),
        total_rows=source.total_rows,
        groups=source.groups(chosen),
        plain_weights=_row_weights(plain_proxy, chosen, certain),
        weighted_weights=_row_weights(weighted_proxy, chosen, certain),
        squares=squares,
        weighted_squares=weighted,
    )


RowErrors = tuple[np.ndarray, np.ndarray]


def _slice_error(target: _Target, rows: np.ndarray, importance: np.ndarray | None) -> RowErrors:
    """Quantize, decode and compare one slice: per row, the plain and importance-weighted squared error."""
    packed = np.empty((rows.shape[0], target.row_bytes(rows.shape[1])), dtype=np.uint8)
    _encode(target, rows, packed, importance)
    decoded = np.empty(rows.shape, dtype=np.float32)
    _decode(target, packed, decoded)
    np.subtract(decoded, rows, out=decoded)
    np.square(decoded, out=decoded)
    plain = decoded.sum(axis=1, dtype=np.float64)
    weighted = (decoded @ importance).astype(np.float64) if importance is not None else plain
    return plain, weighted


def _submit(pool: ThreadPoolExecutor, reference: _Reference, target: _Target) -> list[Future[RowErrors]]:
    return [pool.submit(_slice_error, target, reference.rows[part], vector) for part, vector in reference.work()]


def _total(errors: np.ndarray, weights: np.ndarray | None) -> float:
    return float(errors.sum() if weights is None else errors @ weights)


def _collect(reference: _Reference, target: _Target, parts: list[Future[RowErrors]]) -> QuantError:
    results = [part.result() for part in parts]
    plain = np.concatenate([errors for errors, _ in results])
    weighted = np.concatenate([errors for _, errors in results])
    n_per_row = reference.rows.shape[1]
    return QuantError(
        type_name=target.name,
        n_per_row=n_per_row,
        rows=reference.rows.shape[0],
        total_rows=reference.total_rows,
        bytes_per_row=target.row_bytes(n_per_row),
        squared_error=_total(plain, reference.plain_weights),
        weighted_squared_error=_total(weighted, reference.weighted_weights),
        reference_squares=reference.squares,
        weighted_reference_squares=reference.weighted_squares,
        weighted=reference.weighted,
    )


def quantization_error(
    weights: np.ndarray,
    type_name: str,
    importance: np.ndarray | None = None,
    sample_rows: int | None = None,
    threads: int | None = None,
) -> QuantError:
    """The error of storing `weights` (rows × n_per_row) as `type_name`, quantized with `importance` if given.

    `importance` (n_per_row mean squared activations) both guides ggml's encoder, as in llama.cpp's quantizer,
    and weights the error per column. `sample_rows` measures that many rows (the largest-error rows and an even
    spread of the others) and estimates the whole matrix from them.
    """
    target = _target(type_name)
    if weights.ndim != 2 or weights.shape[0] == 0:
        raise ValueError(f"expected a 2-D array of at least one row, got shape {weights.shape}")
    n_per_row = weights.shape[1]
    vector = _importance_vector(importance, n_per_row)
    _encode_check(target, n_per_row, vector)
    source = _Rows(weights.shape[0], n_per_row, lambda selection: _float_rows(weights[selection]), (vector,),
                   max(1, weights.shape[0]))
    reference = _reference(source, sample_rows)
    with ThreadPoolExecutor(_thread_count(threads), thread_name_prefix="qdesk-kernels") as pool:
        return _collect(reference, target, _submit(pool, reference, target))


# --- whole GGUF files ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeasuredTensor:
    """A weight of the GGUF as the table sees it: `experts` matrices of `rows` rows of `n_per_row` weights."""

    name: str
    source_type: str
    n_per_row: int
    rows: int
    experts: int

    @property
    def total_rows(self) -> int:
        return self.rows * self.experts

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "source_type": self.source_type, "n_per_row": self.n_per_row,
                "rows": self.rows, "experts": self.experts}


@dataclass(frozen=True)
class ErrorTable:
    """QuantError per (tensor name, type) for every measured weight of a GGUF at every candidate type that fits."""

    path: str
    candidate_types: tuple[str, ...]
    tensors: tuple[MeasuredTensor, ...]
    errors: Mapping[tuple[str, str], QuantError]
    sample_rows: int | None

    def error(self, tensor: str, type_name: str) -> QuantError | None:
        return self.errors.get((tensor, type_name.lower()))

    def fitting_types(self, tensor: str) -> tuple[str, ...]:
        return tuple(type_name for type_name in self.candidate_types if (tensor, type_name) in self.errors)

    def skipped(self) -> tuple[tuple[str, str], ...]:
        """(tensor, type) pairs left out: the type's block size does not divide the tensor's rows, or the type
        needs an importance vector the tensor did not have."""
        return tuple((tensor.name, type_name) for tensor in self.tensors for type_name in self.candidate_types
                     if (tensor.name, type_name) not in self.errors)

    def to_json(self) -> dict[str, object]:
        return {
            "path": self.path,
            "candidate_types": list(self.candidate_types),
            "sample_rows": self.sample_rows,
            "tensors": [
                {**tensor.to_json(),
                 "errors": {type_name: self.errors[(tensor.name, type_name)].to_json()
                            for type_name in self.fitting_types(tensor.name)}}
                for tensor in self.tensors
            ],
        }


def quantizable_weight(name: str, dimensions: int) -> bool:
    """Whether llama.cpp's quantizer would change this tensor's type: 2-D or 3-D weights, minus those it keeps."""
    return (dimensions in (2, 3) and name.endswith("weight")
            and not any(fragment in name for fragment in NEVER_QUANTIZED_FRAGMENTS))


def source_rows(data: np.ndarray, source_type: str, n_per_row: int) -> np.ndarray:
    """Float32 rows from stored rows of a GGUF tensor (float types widened by numpy, the rest decoded by ggml)."""
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(data.shape[0], -1)
    if source_type == "f32":
        return raw.view(np.float32)
    if source_type == "f16":
        return raw.view(np.float16).astype(np.float32)
    if source_type == "bf16":
        widened = raw.view(np.uint16).astype(np.uint32)
        widened <<= 16
        return widened.view(np.float32)
    return dequantize_rows(raw, source_type, raw.shape[0], n_per_row, threads=1)


def _expert_importance(name: str, importance: np.ndarray, experts: int, n_per_row: int) -> list[np.ndarray]:
    vectors = np.asarray(importance, dtype=np.float32).reshape(-1)
    if vectors.size == n_per_row:
        shared = _importance_vector(vectors, n_per_row)
        return [shared] * experts
    if vectors.size == n_per_row * experts:
        return [_importance_vector(vector, n_per_row) for vector in vectors.reshape(experts, n_per_row)]
    raise ValueError(f"the importance of {name} has {vectors.size} values; expected {n_per_row} "
                     f"(one per column){f' or {n_per_row * experts} (per expert)' if experts > 1 else ''}")


def _tensor_rows(tensor: MeasuredTensor, stored: np.ndarray, vectors: tuple[np.ndarray | None, ...]) -> _Rows:
    flat = stored.reshape(tensor.total_rows, -1)
    return _Rows(tensor.total_rows, tensor.n_per_row,
                 lambda selection: source_rows(flat[selection], tensor.source_type, tensor.n_per_row),
                 vectors, tensor.rows)


def _weights_of(reader: GGUFReader, names: Iterable[str] | None) -> list[tuple[MeasuredTensor, np.ndarray]]:
    """The tensors to measure with their stored data: the named ones, or every weight llama.cpp would quantize."""
    wanted = set(names) if names is not None else None
    chosen: list[tuple[MeasuredTensor, np.ndarray]] = []
    for stored in reader.tensors:
        dimensions = len(stored.shape)
        if wanted is not None:
            if stored.name not in wanted:
                continue
            if dimensions not in (2, 3):
                raise ValueError(f"{stored.name} has {dimensions} dimensions; only matrices and expert stacks "
                                 "can be measured")
        elif not quantizable_weight(stored.name, dimensions):
            continue
        shape = [int(size) for size in stored.shape]
        tensor = MeasuredTensor(stored.name, stored.tensor_type.name.lower(), shape[0], shape[1],
                                shape[2] if dimensions == 3 else 1)
        if tensor.source_type not in {"f32", "f16", "bf16"}:
            _target(tensor.source_type).check_fits(tensor.n_per_row)  # a source ggml cannot decode fails here
        chosen.append((tensor, stored.data))
    if wanted is not None and (missing := wanted - {tensor.name for tensor, _ in chosen}):
        raise ValueError(f"the GGUF has no tensor named {', '.join(sorted(missing))}")
    return chosen


@dataclass(frozen=True)
class _Pending:
    """A tensor whose slices are queued on the pool, one list of futures per fitting type."""

    tensor: MeasuredTensor
    reference: _Reference
    submitted: tuple[tuple[_Target, list[Future[RowErrors]]], ...]


def measure_gguf(
    source: str | os.PathLike[str] | GGUFReader,
    candidate_types: Sequence[str],
    importance: Mapping[str, np.ndarray] | None = None,
    sample_rows: int | None = DEFAULT_SAMPLE_ROWS,
    tensors: Iterable[str] | None = None,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    skip_needing_importance: bool = False,
) -> ErrorTable:
    """Measure every quantizable weight of a GGUF (a path, or a reader already open on it) at every candidate
    type whose block size fits its rows.

    `importance` maps tensor names to importance vectors (n_per_row values, or n_experts × n_per_row for expert
    stacks); weights without one are measured unweighted. Types that ggml encodes only with an importance matrix
    (most i-quants) are refused for a weight without one, or with `skip_needing_importance` left out for that
    weight (`ErrorTable.skipped` lists them). `tensors` limits the measurement to those names
    (default: every weight llama.cpp's quantizer would change). `progress(done, total)` counts (tensor, type)
    measurements; when `should_stop()` returns true the work stops and `Stopped` is raised.
    """
    from gguf import GGUFReader  # only this file-level entry point needs gguf-py; the kernels do not

    targets = [_target(type_name) for type_name in candidate_types]
    if len({target.name for target in targets}) != len(targets):
        raise ValueError("candidate types must not repeat")
    reader = source if isinstance(source, GGUFReader) else GGUFReader(os.fspath(source))
    chosen = _weights_of(reader, tensors)
    plan: list[tuple[MeasuredTensor, np.ndarray, tuple[np.ndarray | None, ...], list[_Target]]] = []
    for tensor, data in chosen:
        fitting = [target for target in targets if target.fits(tensor.n_per_row)]
        given = importance.get(tensor.name) if importance is not None else None
        if given is None and skip_needing_importance:
            fitting = [target for target in fitting if not target.requires_importance]
        if given is None and (needy := [target.name for target in fitting if target.requires_importance]):
            raise ValueError(f"ggml quantizes {', '.join(needy)} only with an importance matrix, and {tensor.name} "
                             "has none; pass its importance or leave those types out.")
        vectors = (tuple(_expert_importance(tensor.name, given, tensor.experts, tensor.n_per_row))
                   if given is not None else (None,) * tensor.experts)
        plan.append((tensor, data, vectors, fitting))
    for target in targets:
        ggml().ggml_quantize_init(target.type_id)

    total = sum(len(fitting) for *_, fitting in plan)
    errors: dict[tuple[str, str], QuantError] = {}
    if progress is not None:
        progress(0, total)

    def check_stop() -> None:
        if should_stop is not None and should_stop():
            raise Stopped("the quantization-error measurement was stopped")

    def finish(pending: _Pending) -> None:
        for target, parts in pending.submitted:
            check_stop()
            errors[(pending.tensor.name, target.name)] = _collect(pending.reference, target, parts)
            if progress is not None:
                progress(len(errors), total)

    in_flight: deque[_Pending] = deque()
    with ThreadPoolExecutor(_thread_count(threads), thread_name_prefix="qdesk-kernels") as pool:
        try:
            for tensor, data, vectors, fitting in plan:
                check_stop()
                if not fitting:
                    continue
                reference = _reference(_tensor_rows(tensor, data, vectors), sample_rows)
                in_flight.append(_Pending(tensor, reference,
                                          tuple((target, _submit(pool, reference, target)) for target in fitting)))
                # The pool works on this tensor while the one before it is collected.
                if len(in_flight) > 1:
                    finish(in_flight.popleft())
            while in_flight:
                finish(in_flight.popleft())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    path = os.fspath(source) if not isinstance(source, GGUFReader) else str(getattr(reader.data, "filename", ""))
    return ErrorTable(
        path=path,
        candidate_types=tuple(target.name for target in targets),
        tensors=tuple(tensor for tensor, _ in chosen),
        errors=errors,
        sample_rows=sample_rows,
    )
