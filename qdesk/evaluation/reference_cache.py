"""On-disk cache of a reference model's next-token distributions, chunk by chunk, reused across candidates.

An entry is a folder named by a key made of the reference model's fingerprint (size, header and sampled data),
the token ids of the evaluation text, the chunk layout, the llama.cpp version and the LoRA adapters applied
(each one's fingerprint and scale). Each chunk is one file,
written whole or not at all, holding the `ReferenceRows` of that chunk, the big array compressed (zlib over
the high and low bytes of the 16-bit roots stored apart, about 3.5× smaller). An interrupted evaluation keeps
the chunks it finished; the next one with the same key picks them up.

The cache lives in `$QDESK_CACHE_DIR/reference-logits` (default: the platform's user cache folder) and is
trimmed to `$QDESK_EVAL_CACHE_BYTES` (default 8 GiB), least recently used entries first.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import time
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters.calibration.divergence import ReferenceRows
from converters.core.gguf_file import file_fingerprint
from converters.core.leftovers import temporary_file, temporary_folder
from converters.core.paths import cache_dir

FORMAT = "qdesk.reference-logits/1"
DEFAULT_LIMIT_BYTES = 8 << 30
_COMPRESSION_LEVEL = 1
_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zlib.error, zipfile.BadZipFile)


def cache_root() -> Path:
    return cache_dir() / "reference-logits"


def cache_limit_bytes() -> int:
    value = os.environ.get("QDESK_EVAL_CACHE_BYTES")
    return int(value) if value and value.isdigit() else DEFAULT_LIMIT_BYTES


def entry_key(model: Path, chunks: np.ndarray, first_scored: int, device: str,
              loras: Sequence[tuple[Path, float]] = ()) -> str:
    """The entry of `model` evaluated on `chunks`, with LoRA adapters (path, scale) applied in that order when given:
    an adapted reference never shares an entry with the plain one, nor with the same adapters at other scales."""
    import llama_cpp

    digest = hashlib.sha256()
    adapters = [f"lora {file_fingerprint(path)} {float(scale)!r}" for path, scale in loras]
    for part in (FORMAT, file_fingerprint(model), llama_cpp.__version__, device, str(first_scored), str(chunks.shape),
                 *adapters):
        digest.update(part.encode() + b"\0")
    digest.update(np.ascontiguousarray(chunks, dtype=np.int32).tobytes())
    return digest.hexdigest()[:32]


def _pack_roots(roots: np.ndarray) -> bytes:
    as_bytes = roots.astype("<u2").view(np.uint8).reshape(-1, 2)
    return zlib.compress(np.ascontiguousarray(as_bytes.T).tobytes(), _COMPRESSION_LEVEL)


def _unpack_roots(blob: bytes, shape: tuple[int, int]) -> np.ndarray:
    planes = np.frombuffer(zlib.decompress(blob), dtype=np.uint8).reshape(2, -1)
    return np.ascontiguousarray(planes.T).view("<u2").reshape(shape).astype(np.uint16, copy=False)


@dataclass
class CacheEntry:
    """One reference on one text: chunk files in a folder."""

    folder: Path
    persistent: bool

    def _chunk_path(self, index: int) -> Path:
        return self.folder / f"chunk-{index:05d}.npz"

    def load(self, index: int) -> ReferenceRows | None:
        """The chunk's reference rows, or None when not cached (or unreadable, which counts as not cached)."""
        path = self._chunk_path(index)
        try:
            with np.load(path) as stored:
                shape = tuple(int(n) for n in stored["shape"])
                return ReferenceRows(
                    roots=_unpack_roots(stored["roots"].tobytes(), (shape[0], shape[1])),
                    neg_entropy=stored["neg_entropy"],
                    root_norm=stored["root_norm"],
                    top=stored["top"],
                    logp_correct=stored["logp_correct"],
                )
        except _UNREADABLE:
            return None

    def logp_correct(self, index: int, rows: int) -> np.ndarray | None:
        """Only the stored log-probabilities of the correct tokens (no decompression), if the chunk is whole."""
        try:
            with np.load(self._chunk_path(index)) as stored:
                values = stored["logp_correct"]
        except _UNREADABLE:
            return None
        return values if values.shape == (rows,) else None

    def store(self, index: int, rows: ReferenceRows) -> None:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            shape=np.array(rows.roots.shape, dtype=np.int64),
            roots=np.frombuffer(_pack_roots(rows.roots), dtype=np.uint8),
            neg_entropy=rows.neg_entropy,
            root_norm=rows.root_norm,
            top=rows.top,
            logp_correct=rows.logp_correct,
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        temporary = temporary_file(self.folder, "chunk")
        try:
            temporary.write_bytes(buffer.getbuffer())
            os.replace(temporary, self._chunk_path(index))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)

    def touch(self, description: dict[str, object]) -> None:
        """Record the entry's description and mark it as just used (for the least-recently-used trim)."""
        manifest = self.folder / "manifest.json"
        temporary = temporary_file(self.folder, manifest.name)
        try:
            temporary.write_text(json.dumps({"format": FORMAT, "used": time.time(), **description}, indent=1))
            os.replace(temporary, manifest)
        finally:
            temporary.unlink(missing_ok=True)

    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.folder.glob("*") if path.is_file())

    def discard(self) -> None:
        """Remove a temporary entry (persistent ones stay)."""
        if not self.persistent:
            shutil.rmtree(self.folder, ignore_errors=True)


def open_entry(key: str, *, persistent: bool = True) -> CacheEntry:
    """The cache entry for `key`: in the user's cache when persistent, else in a temporary folder."""
    if persistent:
        root = cache_root()
        try:
            root.mkdir(parents=True, exist_ok=True)
            return CacheEntry(root / key, persistent=True)
        except OSError:
            pass
    return CacheEntry(temporary_folder(None, "reference"), persistent=False)


def trim(keep: str | None = None, limit_bytes: int | None = None) -> int:
    """Remove least recently used entries until the cache fits its limit; returns the bytes removed."""
    root = cache_root()
    if not root.is_dir():
        return 0
    limit = cache_limit_bytes() if limit_bytes is None else limit_bytes
    entries = []
    for folder in root.iterdir():
        if folder.is_dir():
            manifest = folder / "manifest.json"
            used = manifest.stat().st_mtime if manifest.exists() else folder.stat().st_mtime
            entries.append((used, folder, CacheEntry(folder, True).size_bytes()))
    total = sum(size for _, _, size in entries)
    removed = 0
    for _, folder, size in sorted(entries, key=lambda entry: entry[0]):
        if total <= limit:
            break
        if folder.name == keep:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        total -= size
        removed += size
    return removed
