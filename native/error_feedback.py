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
ggml's (`native.block_layouts`). llama.cpp reads the result like any other tensor of that type.

H⁻¹ itself is not needed: with H = R Rᵀ (R upper triangular, so U = R⁻¹), the whole sequence of updates adds up
to W − Q = S U for the scaled errors S, that is (W − Q) R = S, and the value column j is rounded from is
w_j + Σ_{i<j} (w_i − q_i)·R[i,j]/R[j,j]: the errors against the original weights, fed forward through H's own
Cholesky factor with its columns scaled to a unit diagonal (`PreparedInputs.feed`). That factor costs a quarter
of what H⁻¹'s does. Only the values ggml chooses a block's grid from, the updated weights as they stand when the
block is reached, need a little of the inverse: that of the block's own diagonal block of the factor
(`PreparedInputs.block_inverses`, 256 × 256 each).

The arithmetic runs in torch on `native.compute_device.compute_device()`: a CUDA or MPS GPU when torch sees one,
else every CPU core (`QDESK_DEVICE` or `device=` chooses). The factor is computed in float64 (on the CPU for MPS,
which has no float64) and the updates run in float32 (`WORKING_DTYPE`; `dtype=torch.float64` gives the
reference's bytes). The updates are nested as in GPTQ's lazy batches (`NESTED_COLUMNS`). ggml's encoder runs on
the host: a block's current values (rows × 256 floats) go there and its grid comes back. `backend="numpy"` runs
the float64 numpy reference (`native.error_feedback_reference`, which follows U as above) that the tests compare
this with.

Types: q4_0, q4_1, q5_0, q5_1, q8_0 (rows that are a multiple of 32) and q2_K, q3_K, q4_K, q5_K, q6_K (multiple of
256).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from native.block_layouts import LAYOUTS, BlockLayout
from native.compute_device import compute_device
from native.error_feedback_reference import reference_factor, reference_quantize
from native.kernels import quantize_rows

__all__ = ["DEFAULT_DAMPING", "FEEDBACK_TYPES", "WORKING_DTYPE", "PreparedInputs", "accumulate_inputs", "new_input_sum",
           "prepare_inputs", "quantize_with_feedback", "shrinkage_for", "supports_feedback"]

DEFAULT_DAMPING = 0.01
"""Added to H's diagonal, as a fraction of its mean diagonal value, so that H is safely invertible."""
SHRINKAGE_SCALE = 0.75
"""`shrinkage_for`'s factor on √(n_in / tokens), from held-out measurements on a real model
(`bench/feedback_generalization.py`: the held-out error was lowest near 0.25 for 1536-wide inputs and near 0.65
for 8960-wide ones, both fit on 12,288 tokens)."""
NESTED_COLUMNS = (4, 32, 256)
"""The blocking of the updates: each error moves the rest of its 4 columns at once (a rank-one update); after 4
columns one matrix product moves the rest of their 32, after 32 the rest of their 256, after 256 the rest of the
row (GPTQ's lazy batch, nested). Few, larger steps keep the per-column work small."""
BLOCK_INVERSE_SIZE = NESTED_COLUMNS[-1]
"""The outermost batch, which every grid block (32 or 256 weights) divides or equals."""
PARALLEL_PRODUCT = 1 << 24
"""On the CPU the column steps and the products of fewer multiply-adds than this run on one thread, the larger
products on every core: thousands of small multi-threaded steps cost more in waiting for each other than they save
(and very much more on a machine with more busy threads than cores)."""
PRODUCT_ROWS = 2048
"""Input rows per float32 product in `accumulate_inputs`; the products are summed in float64."""

FEEDBACK_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K")

Backend = Literal["torch", "numpy"]
DeviceLike = str | torch.device | None


def supports_feedback(type_name: str, n_per_row: int) -> bool:
    """Whether `quantize_with_feedback` can write rows of `n_per_row` weights as `type_name`."""
    found = LAYOUTS.get(type_name.lower())
    return found is not None and n_per_row > 0 and n_per_row % found.block == 0


def _device(device: DeviceLike) -> torch.device:
    return compute_device(None if device is None else str(device))


WORKING_DTYPE = torch.float32
"""The precision of the feedback updates on every device. float64 gives the numpy reference's bytes exactly; float32
gives as small an output error (within ±0.25 %, tests/test_error_feedback.py), is what GPUs do fast, is no slower
on the CPU (bench/README.md), and one precision everywhere means the CPU's tests cover the GPU's arithmetic."""


@dataclass(frozen=True)
class PreparedInputs:
    """What the encoder needs of a matrix's input second moments H, computed once per matrix."""

    feed: torch.Tensor
    """feed[k, i] = R[i, k] / R[k, k] for H = R Rᵀ, R upper triangular, H damped: how much the rounding error of
    input i < k moves the value input k's weight is rounded from (lower triangular, unit diagonal, contiguous so
    that the updates read it row by row); on the device the encoding runs on, in its precision."""
    block_inverses: torch.Tensor
    """The inverse of each diagonal 256 × 256 block of `feed` (the last one padded with the identity): what turns a
    block's corrections so far into those of the optimal-brain-surgeon state its grid is chosen from."""
    dead: torch.Tensor
    """Inputs that never carried a signal (their weights are stored as zero), a boolean vector on that device."""

    @property
    def n_in(self) -> int:
        return self.feed.shape[0]

    @property
    def device(self) -> torch.device:
        return self.feed.device


def shrinkage_for(n_in: int, tokens: int) -> float:
    """How far to shrink an H summed over `tokens` inputs of width `n_in` toward its diagonal (`prepare_inputs`).

    An H from fewer tokens than a few times its width has directions the text barely visited; feedback pushes
    the rounding error into them, which costs nothing on that text and much on any other (on a 1.5B model's
    8960-wide feed-forward input, fit on 12,288 tokens, the unshrunk encoding had 1.4× ggml's error on held-out
    text). The sampling error of H's entries falls as √(n_in / tokens), and so does the shrinkage."""
    if tokens <= 0:
        return 1.0
    return min(1.0, SHRINKAGE_SCALE * math.sqrt(n_in / tokens))


def prepare_inputs(hessian: np.ndarray | torch.Tensor, damping: float = DEFAULT_DAMPING, *, shrinkage: float = 0.0,
                   device: DeviceLike = None, dtype: torch.dtype | None = None) -> PreparedInputs:
    """Factor the inputs' second-moment matrix H (n_in × n_in) for `quantize_with_feedback`.

    `shrinkage` λ ∈ [0, 1] first takes H to (1 − λ) H + λ diag(H): off the diagonal, H is an estimate from a
    finite text (`shrinkage_for`); λ = 1 leaves no correlations to feed errors through. `device` defaults to
    `compute_device()`; `dtype`, the precision of the updates, to `WORKING_DTYPE` (the factor itself is computed
    in float64). Memory: two n_in² float64 matrices at the peak, besides H.
    """
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must lie in [0, 1], got {shrinkage}")
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"the input matrix must be square, got shape {tuple(hessian.shape)}")
    target = _device(device)
    factor_device = torch.device("cpu") if target.type == "mps" else target
    reversed_h = torch.as_tensor(hessian).to(factor_device, torch.float64).flip(0, 1)
    if shrinkage > 0:
        kept_diagonal = reversed_h.diagonal().clone()
        reversed_h *= 1.0 - shrinkage
        reversed_h.diagonal().copy_(kept_diagonal)
        del kept_diagonal
    dead = reversed_h.diagonal() <= 0
    reversed_h[dead, :] = 0
    reversed_h[:, dead] = 0
    diagonal = reversed_h.diagonal()
    diagonal[dead] = 1
    live = ~dead
    diagonal += damping * (float(diagonal[live].mean()) if bool(live.any()) else 1.0)
    return prepared_from_feed(_feed_matrix(reversed_h), dead.flip(0), device=target, dtype=dtype)


def prepared_from_feed(feed: np.ndarray | torch.Tensor, dead: np.ndarray | torch.Tensor, *,
                       device: DeviceLike = None, dtype: torch.dtype | None = None) -> PreparedInputs:
    """`PreparedInputs` again from a kept copy of its `feed` (any float precision) and `dead`: what a job keeps on
    disk between two uses of one input instead of factoring H twice."""
    target = _device(device)
    factor_device = torch.device("cpu") if target.type == "mps" else target
    exact = torch.as_tensor(feed).to(factor_device, torch.float64)
    inverses = _diagonal_block_inverses(exact)
    working = dtype or WORKING_DTYPE
    return PreparedInputs(exact.to(target, working), inverses.to(target, working),
                          torch.as_tensor(dead, dtype=torch.bool).to(target))


def _feed_matrix(reversed_h: torch.Tensor) -> torch.Tensor:
    """`PreparedInputs.feed` from J H J (J reverses the order; it is overwritten), contiguous, in float64.

    J H J = Mᵀ M (Cholesky, M upper) gives H = R Rᵀ with R = J Mᵀ J upper; feed = Rᵀ = J M J with each row k
    divided by its diagonal element R[k, k].
    """
    upper = torch.linalg.cholesky(reversed_h, upper=True, out=reversed_h)
    feed = upper.flip(0, 1)
    del upper, reversed_h
    feed /= feed.diagonal().clone()[:, None]
    return feed


def _diagonal_block_inverses(feed: torch.Tensor) -> torch.Tensor:
    """The inverses of `feed`'s diagonal blocks of `BLOCK_INVERSE_SIZE` (count × size × size, lower triangular)."""
    size = BLOCK_INVERSE_SIZE
    n_in = feed.shape[0]
    count = -(-n_in // size)
    blocks = torch.eye(size, dtype=feed.dtype, device=feed.device).repeat(count, 1, 1)
    for index in range(count):
        first, last = index * size, min(n_in, (index + 1) * size)
        blocks[index, : last - first, : last - first] = feed[first:last, first:last]
    identity = torch.eye(size, dtype=feed.dtype, device=feed.device).expand(count, size, size)
    return torch.linalg.solve_triangular(blocks, identity, upper=False)


def quantize_with_feedback(
    weights: np.ndarray,
    type_name: str,
    inputs: np.ndarray | torch.Tensor | PreparedInputs,
    importance: np.ndarray | None = None,
    *,
    threads: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: DeviceLike = None,
    backend: Backend = "torch",
) -> np.ndarray:
    """Encode float rows (rows × n_in) as `type_name` with error feedback; returns uint8 rows × bytes per row.

    `inputs` is the inputs' second-moment matrix H (n_in × n_in, any positive scale), or `prepare_inputs(H)`
    when several encodings share it (it then decides the device); `importance` is the importance-matrix vector
    handed to ggml's encoder when it picks each block's scales. `threads` is how many threads ggml's encoder uses
    (and the numpy reference's thread count); torch uses its own. `should_stop` is polled before every block;
    when it returns True, `InterruptedError` is raised. `device` is where the arithmetic runs when `inputs` is H
    (default `compute_device()`); `backend="numpy"` runs the float64 numpy reference instead (given H).
    """
    name = type_name.lower()
    n_in = weights.shape[1]
    if not supports_feedback(name, n_in):
        raise ValueError(f"error feedback writes {', '.join(FEEDBACK_TYPES)} in whole blocks; {type_name} does not "
                         f"fit rows of {n_in}.")
    layout = LAYOUTS[name]
    vector = None if importance is None else np.asarray(importance, dtype=np.float32).reshape(-1)
    if backend == "numpy":
        if isinstance(inputs, PreparedInputs):
            raise ValueError("the numpy reference factors H itself; pass H, not prepared inputs.")
        factor, dead = reference_factor(np.asarray(inputs), DEFAULT_DAMPING)
        _check_inputs(factor.shape[0], n_in)
        return reference_quantize(weights, layout, name, factor, dead, vector, threads=threads,
                                  should_stop=should_stop)
    if backend != "torch":
        raise ValueError(f"unknown backend {backend!r}; use 'torch' or 'numpy'.")
    prepared = inputs if isinstance(inputs, PreparedInputs) else prepare_inputs(inputs, device=device)
    _check_inputs(prepared.n_in, n_in)
    return _FeedbackEncoder(layout, name, prepared, vector, threads, should_stop).encode(weights)


def _check_inputs(inputs_n: int, n_in: int) -> None:
    if inputs_n != n_in:
        raise ValueError(f"the input matrix is {inputs_n}×{inputs_n}, rows have {n_in} weights")


def _unwritten_tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing `array`'s memory, which is only read (so a read-only array needs no copy)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class _FeedbackEncoder:
    """One matrix's encoding in torch. The work array is transposed (n_in × rows), so that the column being rounded
    and the columns it corrects are contiguous rows of it; it holds the original weights plus the corrections fed
    forward so far."""

    def __init__(self, layout: BlockLayout, name: str, prepared: PreparedInputs, importance: np.ndarray | None,
                 threads: int | None, should_stop: Callable[[], bool] | None) -> None:
        self.layout, self.name, self.importance = layout, name, importance
        self.threads, self.should_stop = threads, should_stop
        self.feed = prepared.feed
        self.block_inverses = prepared.block_inverses
        self.dead = prepared.dead
        self.device, self.dtype = self.feed.device, self.feed.dtype
        self.cores = torch.get_num_threads()

    @contextmanager
    def _threads(self, count: int) -> Iterator[None]:
        """On the CPU, run torch's kernels on `count` threads (restoring the count after)."""
        if self.device.type != "cpu" or count == torch.get_num_threads():
            yield
            return
        previous = torch.get_num_threads()
        torch.set_num_threads(count)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def encode(self, weights: np.ndarray) -> np.ndarray:
        layout = self.layout
        rows, n_in = weights.shape
        source = _unwritten_tensor(np.ascontiguousarray(weights, dtype=np.float32))
        work = source.to(self.device, self.dtype).T.contiguous()
        work.masked_fill_(self.dead[:, None], 0)
        out = np.empty((rows, n_in // layout.block * layout.block_bytes), dtype=np.uint8)
        step = NESTED_COLUMNS[0]
        batch = BLOCK_INVERSE_SIZE
        errors = torch.empty((batch, rows), device=self.device, dtype=self.dtype)
        levels = torch.empty((layout.block, rows), device=self.device, dtype=self.dtype)
        # Row views made once: in the column loop every torch call counts.
        columns, error_rows, level_rows = work.unbind(0), errors.unbind(0), levels.unbind(0)
        with self._threads(1):
            for column in range(n_in):
                at = column % layout.block
                if column % batch == 0:
                    batch_originals = self._originals(source, column, batch)
                    originals = batch_originals.unbind(0)
                if at == 0:
                    if self.should_stop is not None and self.should_stop():
                        raise InterruptedError("error-feedback quantization was stopped")
                    encoded, minimums, divisors, scales = self._grid(work, batch_originals, column)
                error, level = error_rows[column % batch], level_rows[at]
                torch.sub(columns[column], minimums[at], out=level)
                level.div_(divisors[at]).round_().clamp_(layout.low, layout.high)
                torch.sub(originals[column % batch], minimums[at], out=error)
                error.addcmul_(scales[at], level, value=-1)
                done = column + 1
                if done % step:
                    end = min(n_in, _round_up(done, step))
                    work[done:end].addr_(self.feed[done:end, column], error)
                else:
                    self._feed_finished(work, errors, done)
                if done % layout.block == 0:
                    self._pack(levels, encoded, out, done - layout.block)
        return out

    def _originals(self, source: torch.Tensor, first: int, batch: int) -> torch.Tensor:
        """The original weights of columns first .. first + batch, a row each (zero for dead inputs)."""
        part = source[:, first : first + batch].to(self.device, self.dtype).T.contiguous()
        return part.masked_fill_(self.dead[first : first + batch, None], 0)

    def _feed_finished(self, work: torch.Tensor, errors: torch.Tensor, done: int) -> None:
        """After column `done` − 1, each nested block that it completes moves the rest of its parent block (the
        rest of the row for the outermost) by its errors (`errors` holds the batch's), in one matrix product."""
        n_in = work.shape[0]
        for size, parent in zip(NESTED_COLUMNS, (*NESTED_COLUMNS[1:], n_in), strict=True):
            if done % size:
                break
            end = min(n_in, _round_up(done, parent))
            if done < end:
                first = (done - size) % errors.shape[0]
                with self._threads(self.cores if (end - done) * size * work.shape[1] >= PARALLEL_PRODUCT else 1):
                    work[done:end].addmm_(self.feed[done:end, done - size : done], errors[first : first + size])

    def _grid(self, work: torch.Tensor, batch_originals: torch.Tensor, first: int) -> tuple[
            np.ndarray, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """ggml's encoding of the block starting at column `first`, and its grid on the device, per column (a row
        each): the minimum, the divisor (the scale, infinite where the scale is zero, so that the level is 0) and
        the scale.

        ggml sees the block as the optimal-brain-surgeon updates have left it after the columns before it, the
        values GPTQ's order of updates holds there: the originals plus the corrections fed so far, turned by the
        inverse of the block's own part of `feed` (the rest of each correction reaches a column from the columns
        of its own block before it is rounded)."""
        size = self.layout.block
        within = first % BLOCK_INVERSE_SIZE
        originals = batch_originals[within : within + size]
        inverse = self.block_inverses[first // BLOCK_INVERSE_SIZE, within : within + size, within : within + size]
        state = torch.addmm(originals, inverse, work[first : first + size] - originals)
        values = state.T.to(torch.float32).contiguous().cpu().numpy()
        importance = None if self.importance is None else self.importance[first : first + self.layout.block]
        encoded = quantize_rows(values, self.name, importance, threads=self.threads)
        row_scale, row_minimum = self.layout.grid(encoded)
        divisor = np.where(row_scale == 0, np.inf, row_scale)
        return encoded, *(self._on_device(grid.T).unbind(0) for grid in (row_minimum, divisor, row_scale))

    def _on_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, self.dtype)

    def _pack(self, levels: torch.Tensor, encoded: np.ndarray, out: np.ndarray, block_start: int) -> None:
        layout = self.layout
        stored = levels.to(torch.int16).cpu().numpy().T.astype(np.int64) + layout.offset
        layout.pack(stored, encoded)
        at = block_start // layout.block * layout.block_bytes
        out[:, at : at + layout.block_bytes] = encoded


def new_input_sum(n_in: int, device: DeviceLike = None) -> torch.Tensor:
    """An n_in × n_in float64 zero matrix for `accumulate_inputs`, on `compute_device()` (on the CPU when that is
    MPS, which has no float64)."""
    target = _device(device)
    return torch.zeros((n_in, n_in), dtype=torch.float64, device="cpu" if target.type == "mps" else target)


def accumulate_inputs(total: torch.Tensor | np.ndarray, rows: np.ndarray | torch.Tensor) -> None:
    """total += rowsᵀ rows, in place: the second moments H of a matrix's inputs, summed over a chunk of input rows.

    `total` is n_in × n_in float64, a torch tensor (the products run on its device: `new_input_sum` makes one on
    the compute device) or a numpy array (they run on the CPU); `rows` is tokens × n_in (float32 values). Each
    product of up to `PRODUCT_ROWS` rows is formed in float32 and added in float64, so the sum stays as precise
    as float32 products of a few thousand terms however many chunks are added.
    """
    target = torch.from_numpy(total) if isinstance(total, np.ndarray) else total
    if target.dtype != torch.float64 or target.ndim != 2 or target.shape[0] != target.shape[1]:
        raise ValueError(f"the input sum must be a square float64 matrix, got {tuple(target.shape)} {target.dtype}")
    if rows.ndim != 2 or rows.shape[1] != target.shape[0]:
        raise ValueError(f"input rows of shape {tuple(rows.shape)} do not fit a {target.shape[0]}² input sum")
    values = torch.as_tensor(rows).to(target.device, torch.float32)
    for first in range(0, values.shape[0], PRODUCT_ROWS):
        piece = values[first : first + PRODUCT_ROWS]
        target += (piece.T @ piece).to(torch.float64)
