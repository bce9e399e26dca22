"""Factored input covariances kept on disk between measuring the feedback ratios and re-encoding.

Planning a mix with error feedback goes through the inputs twice: once to measure what feedback saves (before the
allocation), once to re-encode the chosen types (after llama.cpp has written the file). Forming an input's
covariance and factoring it cost far more than either use (for a 8960-wide input, seconds to tens of seconds), so
the first pass keeps each factor in the job's spill folder and the second reads it back.

A factor U (upper triangular, H⁻¹ = UᵀU) is kept as its rows divided by their diagonal entries, in float16 (the
feedback coefficients U[j,k]/U[j,j], to 11 significant bits; float32 for an input whose coefficients leave
float16's range), with the diagonal in float64. Every factor the encoder uses goes through that form, kept or
not, so that a tensor's bytes do not depend on whether its factor was read back or freshly computed. Measured on
starter-model matrices, the form moves tr(E H Eᵀ) by under 0.2 % either way. Kept factors take n_in² × 2 bytes per
input; they are kept only when the disk has room for all of them, otherwise the second pass factors again.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from native.error_feedback import PreparedInputs

_MAGIC = b"QDFACT01"
_FLOAT16_LIMIT = 60000.0
_HEADROOM = 256 << 20


@dataclass(frozen=True)
class CompactFactor:
    coefficients: np.ndarray
    """U's rows divided by their diagonal entries (float16, or float32 out of float16's range)."""
    diagonal: np.ndarray
    dead: np.ndarray

    def expanded(self) -> PreparedInputs:
        from native.error_feedback import PreparedInputs

        return PreparedInputs(self.coefficients.astype(np.float64) * self.diagonal[:, None], self.dead)


def compact(prepared: PreparedInputs) -> CompactFactor:
    factor = np.asarray(prepared.factor, dtype=np.float64)
    diagonal = np.diag(factor).copy()
    coefficients = factor / diagonal[:, None]
    narrow = np.isfinite(coefficients).all() and float(np.abs(coefficients).max()) < _FLOAT16_LIMIT
    return CompactFactor(coefficients.astype(np.float16 if narrow else np.float32), diagonal,
                         np.asarray(prepared.dead, dtype=bool))


class FactorStore:
    """Compact factors of one job's inputs, in a folder of its own, if the disk has room for `needed` bytes."""

    def __init__(self, folder: Path, tag: bytes, needed: int) -> None:
        self.folder = folder
        self._tag = tag
        try:
            folder.mkdir(exist_ok=True)
            self.enabled = shutil.disk_usage(folder).free >= needed + _HEADROOM
        except OSError:
            self.enabled = False

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.factor"

    def save(self, key: str, factor: CompactFactor) -> None:
        if not self.enabled:
            return
        n_in = factor.diagonal.size
        wide = factor.coefficients.dtype == np.float32
        header = _MAGIC + self._tag + n_in.to_bytes(4, "little") + bytes([4 if wide else 2])
        try:
            with self._path(key).open("wb") as file:
                file.write(header)
                file.write(np.ascontiguousarray(factor.coefficients).tobytes())
                file.write(factor.diagonal.astype("<f8").tobytes())
                file.write(np.packbits(factor.dead).tobytes())
        except OSError:
            self.enabled = False
            self._path(key).unlink(missing_ok=True)

    def load(self, key: str, n_in: int) -> CompactFactor | None:
        """The kept factor of input `key`, or None when none was kept (or it is not this job's, or damaged)."""
        try:
            raw = self._path(key).read_bytes()
        except OSError:
            return None
        header_size = len(_MAGIC) + len(self._tag) + 5
        head = raw[:header_size]
        if len(head) != header_size or head[: len(_MAGIC) + len(self._tag)] != _MAGIC + self._tag \
                or int.from_bytes(head[-5:-1], "little") != n_in:
            return None
        width = head[-1]
        sizes = (n_in * n_in * width, n_in * 8, (n_in + 7) // 8)
        if width not in (2, 4) or len(raw) != header_size + sum(sizes):
            return None
        at = header_size
        coefficients = np.frombuffer(raw, np.float16 if width == 2 else np.float32, n_in * n_in, at)
        at += sizes[0]
        diagonal = np.frombuffer(raw, "<f8", n_in, at).astype(np.float64)
        at += sizes[1]
        dead = np.unpackbits(np.frombuffer(raw, np.uint8, sizes[2], at))[:n_in].astype(bool)
        return CompactFactor(coefficients.reshape(n_in, n_in), diagonal, dead)
