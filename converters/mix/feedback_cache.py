"""Error feedback's results kept between jobs: the measured ratios and the re-encoded tensors' bytes.

Both depend on the reference (its fingerprint), the importance matrix (its contents), the calibration text and
how much of it the covariances saw, the encoder (`encoder_version`) and, for the bytes, the tensor and its type. A
key over all of them names a folder `$QDESK_CACHE_DIR/feedback/<key>/` (the user cache folder by default) holding
`ratios.json`, `readers.json` (the weights that have an input) and one `.bin` file per re-encoded tensor and type.
Applying a saved plan then copies bytes instead of collecting inputs and re-encoding, and a second budget of the
same model re-encodes only the tensors whose type is new.

Every entry repeats the key and what it holds in its own header, with a CRC of its bytes: an entry that was
copied from another model's folder, cut short or altered is not used (it is recomputed and replaced). Entries
are written to a temporary name and renamed. The folders of the `KEEP_MODELS` most recently used keys are
kept; older ones are removed when a new one is made.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import BinaryIO

import numpy as np

from converters.calibration.imatrix import ImportanceMatrix

CACHE_FORMAT = "qdesk.feedback-cache/1"
KEEP_MODELS = 3
_MAGIC = b"QDFBC001"
_ENTRY_HEADER = struct.Struct("<8s32sIQI")
"""magic, key (32 bytes), CRC-32 of the payload, payload bytes, bytes of the JSON description that follows."""
_RATIOS = "ratios.json"
_READERS = "readers.json"
_COPY_BYTES = 16 << 20


def feedback_cache_root() -> Path:
    """`$QDESK_CACHE_DIR/feedback`, else the user cache folder's."""
    override = os.environ.get("QDESK_CACHE_DIR")
    if override:
        return Path(override) / "feedback"
    import platformdirs

    return Path(platformdirs.user_cache_dir("qdesk")) / "feedback"


@cache
def encoder_version() -> str:
    """A digest of what decides the bytes besides the data: the encoder's source, the spill's and the compact
    factor's (both round what the encoder sees), and llama.cpp's version (its encoder picks the block scales). A
    changed encoder never reuses old bytes."""
    import llama_cpp

    import converters.mix.factor_store
    import native.error_feedback
    import native.input_spill

    digest = hashlib.sha256(llama_cpp.__version__.encode())
    for module in (native.error_feedback, native.input_spill, converters.mix.factor_store):
        digest.update(Path(module.__file__ or "").read_bytes())
    return digest.hexdigest()[:16]


def matrix_digest(matrix: ImportanceMatrix | None) -> str:
    if matrix is None:
        return "none"
    digest = hashlib.sha256()
    for name, entry in sorted(matrix.entries.items()):
        digest.update(name.encode() + b"\0" + np.ascontiguousarray(entry.sums).tobytes()
                      + np.ascontiguousarray(entry.counts).tobytes())
    return digest.hexdigest()


class FeedbackCache:
    """The cached ratios and bytes of one reference, importance matrix, text and encoder."""

    def __init__(self, fingerprint: str, matrix: ImportanceMatrix | None, provenance: tuple[str, ...],
                 root: Path | None = None) -> None:
        parts = (CACHE_FORMAT, fingerprint, matrix_digest(matrix), *provenance, encoder_version())
        self.key = hashlib.sha256("\0".join(parts).encode()).digest()
        self.folder = (root or feedback_cache_root()) / self.key.hex()[:32]

    def _ready(self) -> bool:
        try:
            fresh = not self.folder.is_dir()
            self.folder.mkdir(parents=True, exist_ok=True)
            os.utime(self.folder)
        except OSError:
            return False
        if fresh:
            self._prune()
        return True

    def _prune(self) -> None:
        with contextlib.suppress(OSError):
            folders = sorted((entry for entry in self.folder.parent.iterdir() if entry.is_dir()),
                             key=lambda entry: entry.stat().st_mtime, reverse=True)
            for old in folders[KEEP_MODELS:]:
                if old != self.folder:
                    shutil.rmtree(old, ignore_errors=True)

    def ratios(self, sample_rows: int) -> dict[str, dict[str, float]]:
        """Tensor → type → measured ratio, as far as measured before with `sample_rows` rows."""
        try:
            document = json.loads((self.folder / _RATIOS).read_text(encoding="utf-8"))
            if document.get("key") != self.key.hex() or document.get("sample_rows") != sample_rows:
                return {}
            return {name: {type_: float(ratio) for type_, ratio in types.items()}
                    for name, types in document["ratios"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def save_ratios(self, sample_rows: int, ratios: Mapping[str, Mapping[str, float]]) -> None:
        if not self._ready():
            return
        document = {"key": self.key.hex(), "sample_rows": sample_rows,
                    "ratios": {name: dict(types) for name, types in ratios.items()}}
        self._write(self.folder / _RATIOS, json.dumps(document).encode())

    def readers(self) -> frozenset[str] | None:
        """The weights whose products have an input (those error feedback can re-encode), once known."""
        try:
            document = json.loads((self.folder / _READERS).read_text(encoding="utf-8"))
            if document.get("key") != self.key.hex():
                return None
            return frozenset(str(name) for name in document["weights"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def save_readers(self, weights: frozenset[str]) -> None:
        if self._ready():
            document = {"key": self.key.hex(), "weights": sorted(weights)}
            self._write(self.folder / _READERS, json.dumps(document).encode())

    def _entry_path(self, name: str, type_name: str) -> Path:
        return self.folder / f"{hashlib.sha256(name.encode()).hexdigest()[:24]}.{type_name.lower()}.bin"

    def _description(self, name: str, type_name: str, shape: tuple[int, ...]) -> bytes:
        return json.dumps({"tensor": name, "type": type_name.lower(), "shape": list(shape)}).encode()

    def copy_into(self, name: str, type_name: str, shape: tuple[int, ...], n_bytes: int, file: BinaryIO,
                  offset: int) -> bool:
        """Write the cached bytes of `name` (of `shape`) encoded as `type_name` into `file` at `offset`, if an
        intact entry of this key holds them. False when none does; bytes written before a damaged payload was
        noticed are then left for the caller to overwrite."""
        try:
            with self._entry_path(name, type_name).open("rb") as entry:
                magic, key, crc, size, described = _ENTRY_HEADER.unpack(entry.read(_ENTRY_HEADER.size))
                if magic != _MAGIC or key != self.key or size != n_bytes:
                    return False
                if entry.read(described) != self._description(name, type_name, shape):
                    return False
                file.seek(offset)
                running, copied = 0, 0
                while piece := entry.read(_COPY_BYTES):
                    copied += len(piece)
                    if copied > n_bytes:
                        return False
                    running = zlib.crc32(piece, running)
                    file.write(piece)
        except (OSError, struct.error):
            return False
        return copied == n_bytes and running == crc

    @contextlib.contextmanager
    def entry_writer(self, name: str, type_name: str, shape: tuple[int, ...], n_bytes: int
                     ) -> Iterator[Callable[[bytes], None]]:
        """A function that appends the next piece of the tensor's bytes to a new entry; the entry is kept only if
        exactly `n_bytes` came and the block ended without an error."""
        if not self._ready():
            yield lambda _piece: None
            return
        path = self._entry_path(name, type_name)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
        described = self._description(name, type_name, shape)
        state = {"crc": 0, "size": 0}
        try:
            with temporary.open("wb") as entry:
                entry.write(_ENTRY_HEADER.pack(_MAGIC, self.key, 0, n_bytes, len(described)) + described)

                def append(piece: bytes) -> None:
                    entry.write(piece)
                    state["crc"] = zlib.crc32(piece, state["crc"])
                    state["size"] += len(piece)

                yield append
                if state["size"] != n_bytes:
                    return
                entry.seek(0)
                entry.write(_ENTRY_HEADER.pack(_MAGIC, self.key, state["crc"], n_bytes, len(described)))
            os.replace(temporary, path)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                temporary.unlink()

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            temporary.write_bytes(data)
            os.replace(temporary, path)
        except OSError:
            with contextlib.suppress(OSError):
                temporary.unlink()
