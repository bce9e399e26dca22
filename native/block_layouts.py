"""ggml's block formats as the error-feedback encoder sees them: the grid a block's bytes define, and where each
weight's integer goes in them.

A block of `block` weights (32 for the legacy types, a 256-weight super-block for the k-quants) is stored as
`block_bytes` bytes. Each weight's value is scale · level + minimum, with level an integer in [low, high] stored as
level + offset; scale and minimum come from the block's header bytes (per weight, since a k-quant super-block has
one scale per 16- or 32-weight sub-block). `grid` reads them from bytes ggml's encoder wrote; `pack` writes a block's
stored integers into those bytes, leaving the header as ggml chose it. The facts of each layout are taken from
ggml's decoders (the docstrings say where every bit lives); with the integers ggml itself chose, `pack` rewrites the
same bytes, which tests/test_error_feedback.py checks for every k-quant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["LAYOUTS", "BlockLayout"]


@dataclass(frozen=True)
class BlockLayout:
    """A ggml block format: block geometry, where its grid is read from, and how its integers are packed."""

    block: int
    block_bytes: int
    low: int
    high: int
    offset: int
    """Stored integer = level + offset; the value is scale · level + minimum."""
    grid: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    """Encoded blocks (rows × block_bytes) → per row and weight, the scale and the minimum (rows × block, float64,
    both exact: products of a float16 and a small integer)."""
    pack: Callable[[np.ndarray, np.ndarray], None]
    """(stored integers rows × block, encoded blocks rows × block_bytes): write the integers into the bytes."""

    @property
    def symmetric(self) -> bool:
        """Whether level 0 is the value 0 (the grid has no minimum of its own)."""
        return self.low < 0


def _half(raw: np.ndarray) -> np.ndarray:
    """float16 values stored in two-byte columns of a uint8 array (rows × 2) → float64 (rows,)."""
    return np.ascontiguousarray(raw).view(np.float16)[:, 0].astype(np.float64)


def _bits_little(bits: np.ndarray) -> np.ndarray:
    """0/1 integers (rows × groups × lanes) → bytes (rows × lanes) whose bit g is the bit of group g."""
    return np.packbits(bits.astype(np.uint8), axis=1, bitorder="little")[:, 0, :]


def _shifted_sum(fields: np.ndarray, width: int) -> np.ndarray:
    """Integers (rows × groups × lanes) of `width` bits → bytes (rows × lanes) holding group g at bit g · width."""
    packed = np.zeros((fields.shape[0], fields.shape[2]), dtype=np.uint8)
    for group in range(fields.shape[1]):
        packed |= (fields[:, group, :].astype(np.uint8) & ((1 << width) - 1)) << (width * group)
    return packed


def _legacy(block_bytes: int, *, has_min: bool, bits: int, symmetric: bool) -> BlockLayout:
    """q4_0, q4_1, q5_0, q5_1, q8_0: d (f16) [, m (f16)], [qh: 32 bits, bit j the fifth bit of weight j], qs.

    4-bit qs: byte j holds weight j (low nibble) and weight j + 16 (high nibble); 8-bit qs: one signed byte each.
    """
    quants_at = 4 if has_min else 2

    def grid(encoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scale = _half(encoded[:, 0:2])
        minimum = _half(encoded[:, 2:4]) if has_min else np.zeros_like(scale)
        return np.repeat(scale[:, None], 32, axis=1), np.repeat(minimum[:, None], 32, axis=1)

    def nibbles(stored: np.ndarray) -> np.ndarray:
        low = (stored & 0xF).astype(np.uint8)
        return low[:, :16] | (low[:, 16:] << 4)

    def pack(stored: np.ndarray, encoded: np.ndarray) -> None:
        if bits == 8:
            encoded[:, quants_at:] = stored.astype(np.int8).view(np.uint8)
        elif bits == 4:
            encoded[:, quants_at:] = nibbles(stored)
        else:
            fifth_bits = ((stored >> 4) & 1).reshape(-1, 4, 8).transpose(0, 2, 1)
            encoded[:, quants_at : quants_at + 4] = _bits_little(fifth_bits)
            encoded[:, quants_at + 4 :] = nibbles(stored)

    levels = 1 << bits
    low = -(levels // 2) if symmetric else 0
    offset = 0 if bits == 8 else -low
    return BlockLayout(32, block_bytes, low, low + levels - 1, offset, grid, pack)


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


def _q2_k() -> BlockLayout:
    """q2_K: scales 16 (low nibble the scale, high nibble the minimum of each 16 weights), qs 64, d, dmin (f16).

    Value = d · scale · q − dmin · min, q in 0..3. Weight c = 128n + 32j + r (r < 32) sits in qs byte 32n + r at
    bits 2j; its scale byte is c // 16.
    """
    sub_block = np.arange(256) // 16

    def grid(encoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d, dmin = _half(encoded[:, 80:82]), _half(encoded[:, 82:84])
        packed = encoded[:, 0:16].astype(np.int64)[:, sub_block]
        return d[:, None] * (packed & 0xF), -dmin[:, None] * (packed >> 4)

    def pack(stored: np.ndarray, encoded: np.ndarray) -> None:
        encoded[:, 16:80] = _shifted_sum(stored.reshape(-1, 2, 4, 32).transpose(0, 2, 1, 3).reshape(-1, 4, 64), 2)

    return BlockLayout(256, 84, 0, 3, 0, grid, pack)


def _q3_k() -> BlockLayout:
    """q3_K: hmask 32, qs 64, scales 12 (sixteen 6-bit values, 32 added), d (f16); value = d · (s − 32) · level,
    level in −4..3 stored as level + 4.

    Weight c = 128n + 32j + r (r < 32): the stored integer's low two bits sit in qs byte 32n + r at bits 2j, its
    third bit in hmask byte r at bit 4n + j. Scale i = c // 16 has its low four bits in scales byte i % 8 (low
    nibble for i < 8, high nibble after) and its top two bits in byte 8 + i % 4 at bits 2 · (i // 4).
    """
    index = np.arange(16)
    low_byte, low_shift = index % 8, 4 * (index // 8)
    high_byte, high_shift = 8 + index % 4, 2 * (index // 4)
    sub_block = np.arange(256) // 16

    def grid(encoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = _half(encoded[:, 108:110])
        packed = encoded[:, 96:108].astype(np.int64)
        scales = ((packed[:, low_byte] >> low_shift) & 0xF) | (((packed[:, high_byte] >> high_shift) & 3) << 4)
        scale = d[:, None] * (scales[:, sub_block] - 32)
        return scale, np.zeros_like(scale)

    def pack(stored: np.ndarray, encoded: np.ndarray) -> None:
        encoded[:, 0:32] = _bits_little((stored >> 2).reshape(-1, 8, 32) & 1)
        encoded[:, 32:96] = _shifted_sum(stored.reshape(-1, 2, 4, 32).transpose(0, 2, 1, 3).reshape(-1, 4, 64), 2)

    return BlockLayout(256, 110, -4, 3, 4, grid, pack)


def _k_4_5(block_bytes: int, bits: int) -> BlockLayout:
    """q4_K / q5_K: d, dmin (f16), 12 bytes of 6-bit scales and minimums for 8 sub-blocks of 32, [qh 32], qs 128.

    Weight c of the super-block: chunk j = c // 64 and half h = (c % 64) // 32 give sub-block 2j + h; qs byte
    32j + c % 32 holds it in its low (h = 0) or high (h = 1) nibble; for q5_K bit 2j + h of qh byte c % 32 is its
    fifth bit.
    """
    qs_at = 16 + (32 if bits == 5 else 0)
    sub_block = np.arange(256) // 32

    def grid(encoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d, dmin = _half(encoded[:, 0:2]), _half(encoded[:, 2:4])
        scales, mins = _k_scales_mins(encoded[:, 4:16])
        return d[:, None] * scales[:, sub_block], -dmin[:, None] * mins[:, sub_block]

    def pack(stored: np.ndarray, encoded: np.ndarray) -> None:
        halves = stored.reshape(-1, 4, 2, 32).transpose(0, 2, 1, 3).reshape(-1, 2, 128)
        encoded[:, qs_at : qs_at + 128] = _shifted_sum(halves, 4)
        if bits == 5:
            encoded[:, 16:48] = _bits_little((stored >> 4).reshape(-1, 8, 32) & 1)

    return BlockLayout(256, block_bytes, 0, (1 << bits) - 1, 0, grid, pack)


def _q6_k() -> BlockLayout:
    """q6_K: ql 128, qh 64, 16 int8 scales (sub-blocks of 16), d (f16); value = d · scale · (q − 32).

    Weight c: half n = c // 128, r = c % 128, quarter g = r // 32, lane l = r % 32. Its low four bits sit in
    ql byte 64n + l + 32·(g odd), low nibble for g < 2 and high for g ≥ 2; its top two bits in qh byte 32n + l at
    bit 2g; its scale is scales[c // 16].
    """
    sub_block = np.arange(256) // 16

    def grid(encoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = _half(encoded[:, 208:210])
        scales = np.ascontiguousarray(encoded[:, 192:208]).view(np.int8).astype(np.float64)
        scale = d[:, None] * scales[:, sub_block]
        return scale, np.zeros_like(scale)

    def pack(stored: np.ndarray, encoded: np.ndarray) -> None:
        quarters = stored.reshape(-1, 2, 4, 32)
        low = quarters & 0xF
        encoded[:, 0:128] = (low[:, :, 0:2] | (low[:, :, 2:4] << 4)).astype(np.uint8).reshape(-1, 128)
        top = (quarters >> 4).transpose(0, 2, 1, 3).reshape(-1, 4, 64)
        encoded[:, 128:192] = _shifted_sum(top, 2)

    return BlockLayout(256, 210, -32, 31, 32, grid, pack)


LAYOUTS: dict[str, BlockLayout] = {
    "q4_0": _legacy(18, has_min=False, bits=4, symmetric=True),
    "q4_1": _legacy(20, has_min=True, bits=4, symmetric=False),
    "q5_0": _legacy(22, has_min=False, bits=5, symmetric=True),
    "q5_1": _legacy(24, has_min=True, bits=5, symmetric=False),
    "q8_0": _legacy(34, has_min=False, bits=8, symmetric=True),
    "q2_k": _q2_k(),
    "q3_k": _q3_k(),
    "q4_k": _k_4_5(144, 4),
    "q5_k": _k_4_5(176, 5),
    "q6_k": _q6_k(),
}
"""By lower-case ggml type name."""
