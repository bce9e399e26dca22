"""Unpacking integers of 1 to 8 bits from 32-bit words.

Every format read here packs the same way: consecutive values along one axis form a little-endian bit stream
(value i occupies bits i·b … i·b+b−1 of the stream, word k holds stream bits 32k … 32k+31), so a 3-bit value may
straddle two words. AWQ then permutes the values within each word (see `awq.py`).
"""

from __future__ import annotations

import numpy as np


def unpack_bits(words: np.ndarray, bits: int, count: int, axis: int) -> np.ndarray:
    """The first `count` `bits`-wide unsigned values packed along `axis` of the 32-bit `words`, as uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot unpack {bits}-bit values")
    moved = np.moveaxis(np.asarray(words), axis, -1)
    stream = np.ascontiguousarray(moved).astype("<u4", copy=False)
    if 32 % bits == 0:
        shifts = np.arange(0, 32, bits, dtype=np.uint32)
        values = (stream[..., None] >> shifts) & np.uint32((1 << bits) - 1)
        values = values.reshape(*stream.shape[:-1], -1)[..., :count].astype(np.uint8)
    else:
        stream_bits = np.unpackbits(np.ascontiguousarray(stream).view(np.uint8), axis=-1, bitorder="little")
        per_value = stream_bits[..., : count * bits].reshape(*stream.shape[:-1], count, bits)
        values = np.zeros(per_value.shape[:-1], dtype=np.uint8)
        for bit in range(bits):
            values |= per_value[..., bit] << np.uint8(bit)
    return np.moveaxis(values, -1, axis)


def packed_length(count: int, bits: int) -> int:
    """How many 32-bit words hold `count` values of `bits` bits."""
    return -(-count * bits // 32)
