"""The reference error-feedback encoder: plain numpy in float64, slices of rows in threads.

It is the method of `native.error_feedback` written as directly as possible, kept so that the torch encoder (every
core, the GPU) can be checked against it: `quantize_with_feedback(..., backend="numpy")` runs it. The H⁻¹ factor
is computed here in float64 with numpy; the columns of a block are rounded one at a time and each error is fed to
every later column of the block at once, the rest of the row after the block (one matrix product per block).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from native.block_layouts import BlockLayout
from native.kernels import quantize_rows

__all__ = ["reference_factor", "reference_quantize"]

ROWS_PER_TASK = 4096
"""Rows are independent given H, so slices of rows are encoded in parallel threads."""


def reference_factor(hessian: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray]:
    """(U, dead): U upper triangular with H⁻¹ = UᵀU for H damped, and the inputs that never carried a signal."""
    h = np.array(hessian, dtype=np.float64, copy=True)
    dead = np.diag(h) <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    diagonal = np.diag(h)
    h[np.diag_indices_from(h)] += damping * float(diagonal[~dead].mean() if (~dead).any() else 1.0)
    lower = np.linalg.cholesky(np.linalg.inv(h))
    return lower.T.copy(), dead


def reference_quantize(weights: np.ndarray, layout: BlockLayout, name: str, factor: np.ndarray, dead: np.ndarray,
                       importance: np.ndarray | None, *, threads: int | None,
                       should_stop: Callable[[], bool] | None) -> np.ndarray:
    """Encode float rows as `name` (whose layout is `layout`) with feedback through `factor`; uint8 rows × bytes."""
    rows, n_in = weights.shape
    out = np.empty((rows, n_in // layout.block * layout.block_bytes), dtype=np.uint8)
    parts = [slice(begin, min(rows, begin + ROWS_PER_TASK)) for begin in range(0, rows, ROWS_PER_TASK)]

    def encode(part: slice) -> None:
        if should_stop is not None and should_stop():
            raise InterruptedError("error-feedback quantization was stopped")
        out[part] = _encode_rows(weights[part], layout, name, factor, dead, importance)

    workers = max(1, threads if threads is not None else (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(encode, parts):
            pass
    return out


def _encode_rows(weights: np.ndarray, layout: BlockLayout, name: str, factor: np.ndarray, dead: np.ndarray,
                 importance: np.ndarray | None) -> np.ndarray:
    rows, n_in = weights.shape
    size = layout.block
    work = np.array(weights.T, dtype=np.float64, order="C")
    """Transposed (n_in × rows), so that the column being rounded and the ones it corrects are contiguous."""
    work[dead] = 0
    out = np.empty((rows, n_in // size * layout.block_bytes), dtype=np.uint8)
    errors = np.empty((size, rows))
    levels = np.empty((size, rows))
    for first in range(0, n_in, size):
        last = first + size
        encoded = quantize_rows(np.ascontiguousarray(work[first:last].T, dtype=np.float32), name,
                                None if importance is None else importance[first:last], threads=1)
        row_scale, row_minimum = layout.grid(encoded)
        scale, minimum = np.ascontiguousarray(row_scale.T), np.ascontiguousarray(row_minimum.T)
        divisor = np.where(scale == 0, np.inf, scale)
        """A zero scale stores level 0."""
        for at, column in enumerate(range(first, last)):
            error, level = errors[at], levels[at]
            np.subtract(work[column], minimum[at], out=error)
            np.rint(error / divisor[at], out=level)
            np.clip(level, layout.low, layout.high, out=level)
            error -= scale[at] * level
            error /= factor[column, column]
            if column + 1 < last:
                work[column + 1 : last] -= np.outer(factor[column, column + 1 : last], error)
        if last < n_in:
            work[last:] -= factor[first:last, last:].T @ errors
        layout.pack(levels.T.astype(np.int64) + layout.offset, encoded)
        out[:, first // size * layout.block_bytes : last // size * layout.block_bytes] = encoded
    return out
