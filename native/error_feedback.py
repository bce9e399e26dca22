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

The arithmetic runs in torch on `native.compute_device.compute_device()`: a CUDA or MPS GPU when torch sees one,
else every CPU core (`QDESK_DEVICE` or `device=` chooses). U is computed in float64 (on the CPU for MPS, which has
no float64) and the updates run in `working_dtype`: float32 on a GPU, float64 on the CPU, where it gives the
reference's bytes exactly (float32 comes within a tested tolerance, tests/test_error_feedback.py). The updates are
nested as in GPTQ's lazy batches (`NESTED_COLUMNS`). ggml's encoder runs on the host: a block's current values
(rows × 256 floats) go there and its grid comes back. `backend="numpy"` runs the float64 numpy reference
(`native.error_feedback_reference`) that the tests compare this with.

Types: q4_0, q4_1, q5_0, q5_1, q8_0 (rows that are a multiple of 32) and q2_K, q3_K, q4_K, q5_K, q6_K (multiple of
256).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from native.block_layouts import LAYOUTS, BlockLayout
from native.compute_device import compute_device
from native.error_feedback_reference import reference_factor, reference_quantize
from native.kernels import quantize_rows

__all__ = ["DEFAULT_DAMPING", "FEEDBACK_TYPES", "PreparedInputs", "accumulate_inputs", "new_input_sum",
           "prepare_inputs", "quantize_with_feedback", "supports_feedback"]

DEFAULT_DAMPING = 0.01
"""Added to H's diagonal, as a fraction of its mean diagonal value, so that H is safely invertible."""
NESTED_COLUMNS = (4, 32, 256)
"""The blocking of the updates: each error moves the rest of its 4 columns at once (a rank-one update); after 4
columns one matrix product moves the rest of their 32, after 32 the rest of their 256, after 256 (or a larger
grid block) the rest of the row (GPTQ's lazy batch, nested). Few, larger steps keep the per-column work small."""
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


def working_dtype(device: torch.device) -> torch.dtype:
    """The precision of the feedback updates: float32 on a GPU, float64 on the CPU (bench/feedback_encoder.py)."""
    return torch.float64 if device.type == "cpu" else torch.float32


@dataclass(frozen=True)
class PreparedInputs:
    """What the encoder needs of a matrix's input second moments H, computed once per matrix."""

    factor: torch.Tensor
    """U with H⁻¹ = UᵀU (upper triangular), H damped; on the device the encoding runs on, in its precision."""
    dead: torch.Tensor
    """Inputs that never carried a signal (their weights are stored as zero), a boolean vector on that device."""

    @property
    def n_in(self) -> int:
        return self.factor.shape[0]

    @property
    def device(self) -> torch.device:
        return self.factor.device


def prepare_inputs(hessian: np.ndarray | torch.Tensor, damping: float = DEFAULT_DAMPING, *,
                   device: DeviceLike = None, dtype: torch.dtype | None = None) -> PreparedInputs:
    """Factor the inputs' second-moment matrix H (n_in × n_in) for `quantize_with_feedback`.

    `device` defaults to `compute_device()`; `dtype` (the precision of the factor and of the updates) to
    float32 on a GPU and float64 on the CPU. Memory: two n_in² float64 matrices at the peak, besides H.
    """
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"the input matrix must be square, got shape {tuple(hessian.shape)}")
    target = _device(device)
    factor_device = torch.device("cpu") if target.type == "mps" else target
    reversed_h = torch.as_tensor(hessian).to(factor_device, torch.float64).flip(0, 1)
    dead = reversed_h.diagonal() <= 0
    reversed_h[dead, :] = 0
    reversed_h[:, dead] = 0
    diagonal = reversed_h.diagonal()
    diagonal[dead] = 1
    live = ~dead
    diagonal += damping * (float(diagonal[live].mean()) if bool(live.any()) else 1.0)
    factor = _inverse_factor(reversed_h).to(target, dtype or working_dtype(target))
    return PreparedInputs(factor, dead.flip(0).to(target))


def _inverse_factor(reversed_h: torch.Tensor) -> torch.Tensor:
    """U upper triangular with H⁻¹ = UᵀU, from J H J (J reverses the order; the matrix is overwritten).

    J H J = M Mᵀ (Cholesky, M lower) gives H = R Rᵀ with R = J M J upper, so U = R⁻¹ = J M⁻¹ J: one Cholesky
    factor and one triangular solve, with two n_in² matrices alive at once.
    """
    lower = torch.linalg.cholesky(reversed_h, out=reversed_h)
    inverse = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
    torch.linalg.solve_triangular(lower, inverse, upper=False, out=inverse)
    del lower, reversed_h
    return inverse.flip(0, 1)


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
    (default `compute_device()`); `backend="numpy"` runs the float64 numpy reference instead.
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
            factor, dead = inputs.factor.to("cpu", torch.float64).numpy(), inputs.dead.cpu().numpy()
        else:
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


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class _FeedbackEncoder:
    """One matrix's encoding in torch: the work array is transposed (n_in × rows), so that the column being
    rounded and the columns it corrects are contiguous rows of it."""

    def __init__(self, layout: BlockLayout, name: str, prepared: PreparedInputs, importance: np.ndarray | None,
                 threads: int | None, should_stop: Callable[[], bool] | None) -> None:
        self.layout, self.name, self.importance = layout, name, importance
        self.threads, self.should_stop = threads, should_stop
        self.factor = prepared.factor
        self.dead = prepared.dead
        self.device, self.dtype = self.factor.device, self.factor.dtype

    def encode(self, weights: np.ndarray) -> np.ndarray:
        layout = self.layout
        rows, n_in = weights.shape
        source = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
        work = source.to(self.device, self.dtype).T.contiguous()
        work[self.dead] = 0
        out = np.empty((rows, n_in // layout.block * layout.block_bytes), dtype=np.uint8)
        nested = (*NESTED_COLUMNS, max(NESTED_COLUMNS[-1], layout.block))
        batch = nested[-1]
        errors = torch.empty((batch, rows), device=self.device, dtype=self.dtype)
        levels = torch.empty((layout.block, rows), device=self.device, dtype=self.dtype)
        diagonal = self.factor.diagonal()
        for column in range(n_in):
            at = column % layout.block
            if at == 0:
                if self.should_stop is not None and self.should_stop():
                    raise InterruptedError("error-feedback quantization was stopped")
                encoded, scale, minimum, safe_scale, live = self._grid(work, column)
            values, level, error = work[column], levels[at], errors[column % batch]
            torch.sub(values, minimum[at], out=level)
            level.div_(safe_scale[at]).round_().clamp_(layout.low, layout.high)
            if live is not None:
                level.mul_(live[at])
            torch.addcmul(minimum[at], scale[at], level, out=error)
            torch.sub(values, error, out=error)
            error.div_(diagonal[column])
            done = column + 1
            step_end = min(n_in, _round_up(done, nested[0]))
            if done < step_end:
                work[done:step_end].addr_(self.factor[column, done:step_end], error, alpha=-1)
            for size, parent in zip(nested, (*nested[1:], n_in), strict=True):
                if done % size:
                    break
                self._feed(work, errors, done - size, done, min(n_in, _round_up(done, parent)))
            if done % layout.block == 0:
                self._pack(levels, encoded, out, done - layout.block)
        return out

    def _feed(self, work: torch.Tensor, errors: torch.Tensor, first: int, done: int, end: int) -> None:
        """Move columns done..end by the errors of columns first..done (one matrix product)."""
        if done < end:
            at = first % errors.shape[0]
            work[done:end].addmm_(self.factor[first:done, done:end].T, errors[at : at + done - first], alpha=-1)

    def _grid(self, work: torch.Tensor, first: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor,
                                                             torch.Tensor | None]:
        """ggml's encoding of the current values of the block starting at column `first` and its grid on the
        device: per column and row the scale, the minimum, the scale safe to divide by, and for symmetric types 1
        where the scale is not zero (a zero scale stores level 0)."""
        values = work[first : first + self.layout.block].T.to(torch.float32).contiguous().cpu().numpy()
        importance = None if self.importance is None else self.importance[first : first + self.layout.block]
        encoded = quantize_rows(values, self.name, importance, threads=self.threads)
        row_scale, row_minimum = self.layout.grid(encoded)
        scale = self._on_device(row_scale.T)
        minimum = self._on_device(row_minimum.T)
        empty = scale == 0
        safe_scale = torch.where(empty, torch.ones_like(scale), scale)
        live = (~empty).to(self.dtype) if self.layout.symmetric else None
        return encoded, scale, minimum, safe_scale, live

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
