"""What llama.cpp's CPU kernels add to a quantized product: the rounding of its inputs to 8 bits.

A product y = W x with W stored in a quantized type is computed on the CPU as a dot product of W's blocks with x
rounded to 8 bits, one scale per block of inputs: blocks of 32 for the legacy types (q4_0 … q8_0, whose kernels
take q8_0 or q8_1 inputs) and of 256 for the k-quants (q8_K inputs). With δ the rounding error of x, the product's
output moves by W δ, whose expected square is Σ_j ‖W_:,j‖² E[δ_j²]: a second damage, besides the weights' own, that
depends on the type's input block and on how heavy the input's tails are (one large value in a block coarsens the
whole block's step). `InputRounding` gathers E[δ_j²] per input column while a model is evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INPUT_BLOCKS = (32, 256)
"""Inputs rounded per block of 32 (q8_0, q8_1) or 256 (q8_K)."""
INPUT_BLOCK_OF_TYPE = {
    "q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32, "q8_0": 32,
    "q2_K": 256, "q3_K": 256, "q4_K": 256, "q5_K": 256, "q6_K": 256,
    "iq1_s": 256, "iq1_m": 256, "iq2_xxs": 256, "iq2_xs": 256, "iq2_s": 256, "iq3_xxs": 256, "iq3_s": 256,
    "iq4_xs": 256, "iq4_nl": 32,
}
"""The input block of each type's CPU kernel; other types (f16, f32, bf16) multiply unrounded 16- or 32-bit inputs."""
_LEVELS = 127.0
_HALF_SCALE_BLOCKS = (32,)
"""q8_0 and q8_1 keep their block scale as a 16-bit float (q8_K as a 32-bit one)."""


def rounded_rows(rows: np.ndarray, block: int) -> np.ndarray:
    """`rows` (… × n_in) as a CPU kernel reads them: rounded to 8 bits with one scale per `block` values (the
    largest magnitude maps to ±127), float32; `block` must divide n_in."""
    values = np.asarray(rows, dtype=np.float32)
    n_in = values.shape[-1]
    if n_in % block:
        raise ValueError(f"blocks of {block} do not divide rows of {n_in}")
    blocks = values.reshape(-1, n_in // block, block)
    step = np.abs(blocks).max(axis=2, keepdims=True) / np.float32(_LEVELS)
    safe = np.where(step > 0, step, np.float32(1))
    stored = step.astype(np.float16).astype(np.float32) if block in _HALF_SCALE_BLOCKS else step
    return (np.rint(blocks / safe) * stored).reshape(values.shape)


def rounding_square_sums(rows: np.ndarray, block: int) -> np.ndarray:
    """Σ over `rows` (tokens × n_in) of the squared error of rounding each row as `rounded_rows` does, per
    column; zeros when `block` does not divide n_in."""
    values = np.asarray(rows, dtype=np.float32)
    n_in = values.shape[-1]
    if n_in % block:
        return np.zeros(n_in, dtype=np.float64)
    error = values.reshape(-1, n_in) - rounded_rows(values, block).reshape(-1, n_in)
    return np.square(error, dtype=np.float64).sum(axis=0)


@dataclass
class RoundingStats:
    """Per input column of one weight: the mean squared rounding error at each block size of `INPUT_BLOCKS`."""

    mean_squares: np.ndarray
    """float64 (len(INPUT_BLOCKS), n_in)."""
    rows: int

    def of_block(self, block: int) -> np.ndarray:
        return self.mean_squares[INPUT_BLOCKS.index(block)]


class InputRounding:
    """An input observer for `native.activations.ModelEvaluator`: sums each weight's input rounding errors."""

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._rows: dict[str, int] = {}
        self._last: tuple[tuple[int, tuple[int, ...]], np.ndarray] | None = None
        """The previous call's input (address, shape) and sums: q, k and v read one input one after another."""

    def __call__(self, name: str, rows: np.ndarray) -> None:
        flat = rows.reshape(-1, rows.shape[-1])
        seen = (rows.__array_interface__["data"][0], rows.shape)
        if self._last is not None and self._last[0] == seen:
            sums = self._last[1]
        else:
            sums = np.stack([rounding_square_sums(flat, block) for block in INPUT_BLOCKS])
            self._last = (seen, sums)
        if name in self._sums:
            self._sums[name] = self._sums[name] + sums
            self._rows[name] += flat.shape[0]
        else:
            self._sums[name] = sums
            self._rows[name] = flat.shape[0]

    def stats(self, renamed: dict[str, str] | None = None) -> dict[str, RoundingStats]:
        """The mean squares so far, by weight name (`renamed` maps observed names to weight names)."""
        names = renamed or {}
        return {names.get(name, name): RoundingStats(sums / max(self._rows[name], 1), self._rows[name])
                for name, sums in self._sums.items()}
