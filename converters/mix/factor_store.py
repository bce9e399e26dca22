"""Factored input covariances kept on disk between measuring the feedback ratios and re-encoding.

Planning a mix with error feedback goes through the inputs twice: once to measure what feedback saves (before the
allocation), once to re-encode the chosen types (after llama.cpp has written the file). Forming an input's
covariance and factoring it cost far more than either use (for a 8960-wide input, seconds to tens of seconds), so
the first pass keeps each factor in the job's spill folder and the second reads it back.

A factored input is kept as the encoder's feed coefficients (`native.error_feedback.PreparedInputs.feed`: how much
each input's rounding error moves each later one, unit diagonal) in float16 (11 significant bits; float32 for an
input whose coefficients leave float16's range), with the inputs that never carried a signal; the encoder's block
inverses are computed again from them. Every factor the encoder uses goes through that form, kept or not, so that
a tensor's bytes do not depend on whether its factor was read back or freshly computed. Measured on
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

_MAGIC = b"QDFACT02"
_FLOAT16_LIMIT = 60000.0
_HEADROOM = 256 << 20


@dataclass(frozen=True)
class CompactFactor:
    coefficients: np.ndarray
    """`PreparedInputs.feed` (float16, or float32 out of float16's range)."""
    dead: np.ndarray

    def expanded(self) -> PreparedInputs:
        from native.error_feedback import prepared_from_feed

        return prepared_from_feed(self.coefficients.astype(np.float32), self.dead)


def compact(prepared: PreparedInputs) -> CompactFactor:
    coefficients = prepared.feed.detach().to("cpu").numpy()
    narrow = np.isfinite(coefficients).all() and float(np.abs(coefficients).max()) < _FLOAT16_LIMIT
    return CompactFactor(coefficients.astype(np.float16 if narrow else np.float32),
                         prepared.dead.detach().to("cpu").numpy().astype(bool))


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
        n_in = factor.dead.size
        wide = factor.coefficients.dtype == np.float32
        header = _MAGIC + self._tag + n_in.to_bytes(4, "little") + bytes([4 if wide else 2])
        try:
            with self._path(key).open("wb") as file:
                file.write(header)
                file.write(np.ascontiguousarray(factor.coefficients).tobytes())
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
        sizes = (n_in * n_in * width, (n_in + 7) // 8)
        if width not in (2, 4) or len(raw) != header_size + sum(sizes):
            return None
        at = header_size
        coefficients = np.frombuffer(raw, np.float16 if width == 2 else np.float32, n_in * n_in, at)
        at += sizes[0]
        dead = np.unpackbits(np.frombuffer(raw, np.uint8, sizes[1], at))[:n_in].astype(bool)
        return CompactFactor(coefficients.reshape(n_in, n_in), dead)
