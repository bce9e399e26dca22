"""Error-feedback quantization: ggml's block formats written so that each weight's rounding error is compensated
by the weights of the same row not yet rounded, given how the model's inputs to the matrix are correlated.

A weight matrix W (rows × n_in) multiplies inputs x; what matters is the error of the product, the sum over
calibration inputs of ‖(W − Q) x‖², that is tr(E H Eᵀ) with E = W − Q and H = Σ x xᵀ, the inputs' second-moment
matrix. Rounding each weight to its nearest grid point minimises only the diagonal part of that. Here the columns
are rounded one at a time, in order, and after each the columns not yet rounded are adjusted by the least-squares
correction for the error just made (the optimal-brain-surgeon update, made cheap by one Cholesky factor of H⁻¹:
with H⁻¹ = UᵀU and U upper triangular, rounding column j with error e moves column k > j by −e·U[j,k]/U[j,j]).

The grid stays ggml's. When a block is reached (32 weights of a row for the legacy types, a 256-weight super-block
for the k-quants), ggml's own encoder, given the importance matrix, encodes the block's current values; its
scales (and minimums) are read back from those bytes and kept, and the block's weights are then rounded column
by column to that grid with the feedback above, and their integers packed into ggml's layout in place of
ggml's. llama.cpp reads the result like any other tensor of that type.

Types: q4_0, q4_1, q5_0, q5_1, q8_0 (rows that are a multiple of 32) and q4_K, q5_K, q6_K (multiple of 256).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from native.kernels import quantize_rows

__all__ = ["DEFAULT_DAMPING", "FEEDBACK_TYPES", "PreparedInputs", "prepare_inputs", "quantize_with_feedback",
           "supports_feedback"]

ROWS_PER_TASK = 4096
"""Rows are independent given H, so slices of rows are encoded in parallel threads."""
DEFAULT_DAMPING = 0.01
"""Added to H's diagonal, as a fraction of its mean diagonal value, so that H is safely invertible."""


def _half(raw: np.ndarray) -> np.ndarray:
    """float16 values stored in two-byte columns of a uint8 array (rows × 2) → float64 (rows,)."""
    return np.ascontiguousarray(raw).view(np.float16)[:, 0].astype(np.float64)


@dataclass(frozen=True)
class _Format:
    """A ggml block format: block geometry, where its grid is read from, and how its integers are packed."""

    block: int
    block_bytes: int
    low: int
    high: int
    offset: int
    """Stored integer = level + offset; the value is scale · level + minimum."""
    grid: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    """Encoded blocks (rows × block_bytes) → per row and column, the scale and the minimum (rows × block)."""
    pack: Callable[[np.ndarray, np.ndarray], None]
    """(stored integers rows × block, encoded blocks rows × block_bytes): write the integers into the bytes."""


def _nibbles_32(stored: np.ndarray) -> np.ndarray:
    """Legacy 4-bit packing: byte j holds weight j (low nibble) and weight j + 16 (high nibble)."""
    nibbles = (stored & 0xF).astype(np.uint8)
    return nibbles[:, :16] | (nibbles[:, 16:] << 4)


def _high_bit_word(stored: np.ndarray) -> np.ndarray:
    """Legacy 5-bit packing: bit j of a little-endian 32-bit word is bit 4 of weight j."""
    bits = ((stored >> 4) & 1).astype(np.uint32)
    word = (bits << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    return word.reshape(-1, 1).view(np.uint8).reshape(-1, 4)


def _legacy(block_bytes: int, *, has_min: bool, bits: int, symmetric: bool) -> _Format:
    quants_at = 4 if has_min else 2

    def grid(encoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scale = _half(encoded[:, 0:2])
        minimum = _half(encoded[:, 2:4]) if has_min else np.zeros_like(scale)
        return np.repeat(scale[:, None], 32, axis=1), np.repeat(minimum[:, None], 32, axis=1)

    def pack(stored: np.ndarray, encoded: np.ndarray) -> None:
        if bits == 8:
            encoded[:, quants_at:] = stored.astype(np.int8).view(np.uint8)
        elif bits == 4:
            encoded[:, quants_at:] = _nibbles_32(stored)
        else:
            encoded[:, quants_at : quants_at + 4] = _high_bit_word(stored)
            encoded[:, quants_at + 4 :] = _nibbles_32(stored)

    levels = 1 << bits
    low = -(levels // 2) if symmetric else 0
    offset = 0 if bits == 8 else -low
    return _Format(32, block_bytes, low, low + levels - 1, offset, grid, pack)


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and minimums of a q4_K/q5_K super-block (12 packed bytes per row) → rows × 8 each."""
    q = packed.astype(np.int64)
    scales = np.empty((q.shape[0], 8), dtype=np.int64)
    mins = np.empty_like(scales)
    scales[:, :4] = q[:, 0:4] & 63
    mins[:, :4] = q[:, 4:8] & 63
    scales[:, 4:] = (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)
    mins[:, 4:] = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return scales, mins


def _k_4_5(block_bytes: int, bits: int) -> _Format:
    """q4_K / q5_K: d, dmin (f16), 12 bytes of 6-bit scales and minimums for 8 sub-blocks of 32, [qh 32], qs 128.

    Weight c of the super-block: chunk j = c // 64 and half h = (c % 64) // 32 give sub-block 2j + h; qs byte
    32j + c % 32 holds it in its low (h = 0) or high (h = 1) nibble; for q5_K bit 2j + h of qh byte c % 32 is its
    fifth bit.
    """
    qs_at = 16 + (32 if bits == 5 else 0)
    column = np.arange(256)
    chunk, half, lane = column // 64, (column % 64) // 32, column % 32
    sub_block = 2 * chunk + half

    def grid(encoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d, dmin = _half(encoded[:, 0:2]), _half(encoded[:, 2:4])
        scales, mins = _k_scales_mins(encoded[:, 4:16])
        return d[:, None] * scales[:, sub_block], -dmin[:, None] * mins[:, sub_block]

    def pack(stored: np.ndarray, encoded: np.ndarray) -> None:
        rows = stored.shape[0]
        qs = np.zeros((rows, 128), dtype=np.uint8)
        np.bitwise_or.at(qs.T, chunk * 32 + lane, ((stored & 0xF) << (4 * half)).astype(np.uint8).T)
        encoded[:, qs_at : qs_at + 128] = qs
        if bits == 5:
            qh = np.zeros((rows, 32), dtype=np.uint8)
            np.bitwise_or.at(qh.T, lane, (((stored >> 4) & 1) << sub_block).astype(np.uint8).T)
            encoded[:, 16:48] = qh

    return _Format(256, block_bytes, 0, (1 << bits) - 1, 0, grid, pack)


def _k_6() -> _Format:
    """q6_K: ql 128, qh 64, 16 int8 scales (sub-blocks of 16), d (f16); value = d · scale · (q − 32).

    Weight c: half n = c // 128, r = c % 128, quarter g = r // 32, lane l = r % 32. Its low four bits sit in
    ql byte 64n + l + 32·(g odd), low nibble for g < 2 and high for g ≥ 2; its top two bits in qh byte 32n + l at
    bit 2g; its scale is scales[8n + l // 16 + 2g].
    """
    column = np.arange(256)
    half, rest = column // 128, column % 128
    quarter, lane = rest // 32, rest % 32
    ql_index = 64 * half + lane + 32 * (quarter % 2)
    ql_shift = 4 * (quarter // 2)
    qh_index = 32 * half + lane
    scale_index = 8 * half + lane // 16 + 2 * quarter

    def grid(encoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = _half(encoded[:, 208:210])
        scales = encoded[:, 192:208].view(np.int8).astype(np.float64)
        scale = d[:, None] * scales[:, scale_index]
        return scale, np.zeros_like(scale)

    def pack(stored: np.ndarray, encoded: np.ndarray) -> None:
        rows = stored.shape[0]
        ql = np.zeros((rows, 128), dtype=np.uint8)
        qh = np.zeros((rows, 64), dtype=np.uint8)
        np.bitwise_or.at(ql.T, ql_index, ((stored & 0xF) << ql_shift).astype(np.uint8).T)
        np.bitwise_or.at(qh.T, qh_index, (((stored >> 4) & 3) << (2 * quarter)).astype(np.uint8).T)
        encoded[:, 0:128] = ql
        encoded[:, 128:192] = qh

    return _Format(256, 210, -32, 31, 32, grid, pack)


_FORMATS = {
    "q4_0": _legacy(18, has_min=False, bits=4, symmetric=True),
    "q4_1": _legacy(20, has_min=True, bits=4, symmetric=False),
    "q5_0": _legacy(22, has_min=False, bits=5, symmetric=True),
    "q5_1": _legacy(24, has_min=True, bits=5, symmetric=False),
    "q8_0": _legacy(34, has_min=False, bits=8, symmetric=True),
    "q4_k": _k_4_5(144, 4),
    "q5_k": _k_4_5(176, 5),
    "q6_k": _k_6(),
}
FEEDBACK_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_K", "q5_K", "q6_K")


def supports_feedback(type_name: str, n_per_row: int) -> bool:
    """Whether `quantize_with_feedback` can write rows of `n_per_row` weights as `type_name`."""
    found = _FORMATS.get(type_name.lower())
    return found is not None and n_per_row > 0 and n_per_row % found.block == 0


@dataclass(frozen=True)
class PreparedInputs:
    """What the encoder needs of a matrix's input second moments H, computed once per matrix."""

    factor: np.ndarray
    """U with H⁻¹ = UᵀU (upper triangular), H damped."""
    dead: np.ndarray
    """Inputs that never carried a signal (their weights are stored as zero)."""

    @property
    def n_in(self) -> int:
        return self.factor.shape[0]


def prepare_inputs(hessian: np.ndarray, damping: float = DEFAULT_DAMPING) -> PreparedInputs:
    """Factor the inputs' second-moment matrix H (n_in × n_in) for `quantize_with_feedback`."""
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"the input matrix must be square, got shape {hessian.shape}")
    h = np.array(hessian, dtype=np.float64, copy=True)
    dead = np.diag(h) <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    diagonal = np.diag(h)
    h[np.diag_indices_from(h)] += damping * float(diagonal[~dead].mean() if (~dead).any() else 1.0)
    lower = np.linalg.cholesky(np.linalg.inv(h))
    return PreparedInputs(lower.T.copy(), dead)


def quantize_with_feedback(
    weights: np.ndarray,
    type_name: str,
    inputs: np.ndarray | PreparedInputs,
    importance: np.ndarray | None = None,
    *,
    threads: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Encode float rows (rows × n_in) as `type_name` with error feedback; returns uint8 rows × bytes per row.

    `inputs` is the inputs' second-moment matrix H (n_in × n_in, any positive scale), or `prepare_inputs(H)`
    when several encodings share it; `importance` is the
    importance-matrix vector handed to ggml's encoder when it picks each block's scales. `should_stop` is
    polled between slices of rows; when it returns True, `InterruptedError` is raised.
    """
    name = type_name.lower()
    rows, n_in = weights.shape
    if not supports_feedback(name, n_in):
        raise ValueError(f"error feedback writes {', '.join(FEEDBACK_TYPES)} in whole blocks; {type_name} does not "
                         f"fit rows of {n_in}.")
    prepared = inputs if isinstance(inputs, PreparedInputs) else prepare_inputs(inputs)
    if prepared.n_in != n_in:
        raise ValueError(f"the input matrix is {prepared.n_in}×{prepared.n_in}, rows have {n_in} weights")
    layout = _FORMATS[name]
    vector = None if importance is None else np.asarray(importance, dtype=np.float32).reshape(-1)
    out = np.empty((rows, n_in // layout.block * layout.block_bytes), dtype=np.uint8)
    parts = [slice(begin, min(rows, begin + ROWS_PER_TASK)) for begin in range(0, rows, ROWS_PER_TASK)]

    def encode(part: slice) -> None:
        if should_stop is not None and should_stop():
            raise InterruptedError("error-feedback quantization was stopped")
        out[part] = _encode_rows(weights[part], layout, name, prepared, vector)

    workers = max(1, threads if threads is not None else (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(encode, parts):
            pass
    return out


def _encode_rows(weights: np.ndarray, layout: _Format, name: str, prepared: PreparedInputs,
                 importance: np.ndarray | None) -> np.ndarray:
    rows, n_in = weights.shape
    size = layout.block
    factor = prepared.factor
    work = np.array(weights.T, dtype=np.float64, order="C")
    """Transposed (n_in × rows), so that the column being rounded and the ones it corrects are contiguous."""
    work[prepared.dead] = 0
    out = np.empty((rows, n_in // size * layout.block_bytes), dtype=np.uint8)
    errors = np.empty((size, rows))
    levels = np.empty((size, rows))
    for first in range(0, n_in, size):
        last = first + size
        encoded = quantize_rows(np.ascontiguousarray(work[first:last].T, dtype=np.float32), name,
                                None if importance is None else importance[first:last], threads=1)
        row_scale, row_minimum = layout.grid(encoded)
        scale, minimum = np.ascontiguousarray(row_scale.T), np.ascontiguousarray(row_minimum.T)
        empty = scale == 0
        safe_scale = np.where(empty, 1.0, scale)
        for at, column in enumerate(range(first, last)):
            values = work[column]
            level = levels[at]
            np.rint((values - minimum[at]) / safe_scale[at], out=level)
            np.clip(level, layout.low, layout.high, out=level)
            if layout.low < 0:
                level[empty[at]] = 0
            error = errors[at]
            np.subtract(values, scale[at] * level + minimum[at], out=error)
            error /= factor[column, column]
            if column + 1 < last:
                work[column + 1 : last] -= np.outer(factor[column, column + 1 : last], error)
        if last < n_in:
            work[last:] -= factor[first:last, last:].T @ errors
        layout.pack(levels.T.astype(np.int64) + layout.offset, encoded)
        out[:, first // size * layout.block_bytes : last // size * layout.block_bytes] = encoded
    return out
