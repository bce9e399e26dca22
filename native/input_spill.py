"""The input rows of a model's weight matrices on calibration text, spilled to disk one file per distinct input.

Error feedback needs, for every weight matrix, H = Σ x xᵀ over the rows x its product reads. Held for every
matrix at once that is n_in² numbers per distinct input, tens of gigabytes for a 7B model; the rows themselves
take tokens × n_in. So the calibration pass writes each distinct input's rows to a file of its own
(`InputSpillWriter`, called from `native.activations`), and the encoding reads one input at a time and forms its
H (`SpilledInputs.covariance`, in torch on `native.compute_device`), so that only one input's covariance is in
memory at once.

A file is a 64-byte header (magic, the row length, the owner's tag: a digest the caller derives from the
model's fingerprint, so that a file of another model is never read as this one's) followed by records of
n_in + 1 two-byte words: an int16 exponent e, then the row divided by 2^e as float16. e is chosen per row so
that the row's largest value lands in [2^14, 2^15): no activation overflows float16 (65504), none underflows
into float16's subnormals unless it is 2^-28 times smaller than its row's largest, and every value keeps
float16's 11 significant bits. Scaling by a power of two is exact, so the reader recovers exactly the float16
rounding of each value.

`manifest.json`, written when the writer closes, lists the inputs: file, row length, rows, and the weights that
read each (a layer's q, k and v share one input; so do gate and up).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "HELD_OUT_EVERY",
    "MANIFEST",
    "InputSpillWriter",
    "Part",
    "SpillMismatch",
    "SpilledInput",
    "SpilledInputs",
    "spill_tag",
]

MANIFEST = "manifest.json"
SPILL_FORMAT = "qdesk.input-spill/1"
_MAGIC = b"QDSPILL1"
_HEADER_BYTES = 64
_TAG_BYTES = 32
_TOP_EXPONENT = 15
"""Rows are scaled so that their largest magnitude lies in [2^14, 2^15), well inside float16's range."""
_BLOCK_ROWS = 2048
"""Rows per float32 product when a covariance is formed; the products are accumulated in float64."""
HELD_OUT_EVERY = 4
"""Of each `HELD_OUT_EVERY` consecutive stretches of `HELD_OUT_ROWS` rows, the last is held out: the encoding
is fit to the others' covariance and what it saves is measured on the held-out rows (`Part`)."""
HELD_OUT_ROWS = 512
"""One calibration chunk at the default context; shorter where an input has too few rows for four rounds."""
_BAND_COLUMNS = 1024
"""x xᵀ is symmetric: only its upper triangle is computed, in bands of this many rows (about 40 % fewer products
than the whole square for the widest inputs)."""


class SpillMismatch(ValueError):
    """A spill file or manifest that does not belong to the model (or input) it is read for."""


Part = Literal["all", "fit", "held-out"]
"""Which of an input's rows: all of them, those an encoding is fit to, or those held out to test it on."""


def part_ranges(rows: int, part: Part) -> list[tuple[int, int]]:
    """The [start, stop) row ranges of `part` among `rows` rows (`HELD_OUT_EVERY`, `HELD_OUT_ROWS`)."""
    if part == "all":
        return [(0, rows)] if rows else []
    held_out = part == "held-out"
    stretch = max(1, min(HELD_OUT_ROWS, rows // (4 * HELD_OUT_EVERY)))
    return [(start, min(rows, start + stretch)) for start in range(0, rows, stretch)
            if ((start // stretch) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == held_out]


def part_rows(rows: int, part: Part) -> int:
    return sum(stop - start for start, stop in part_ranges(rows, part))


def spill_tag(fingerprint: str) -> bytes:
    """The 32-byte tag spill files of the model with this fingerprint carry."""
    return hashlib.sha256(f"{SPILL_FORMAT}\0{fingerprint}".encode()).digest()


def _header(n_in: int, tag: bytes) -> bytes:
    header = _MAGIC + int(n_in).to_bytes(4, "little") + tag
    return header + b"\0" * (_HEADER_BYTES - len(header))


def _encode_rows(rows: np.ndarray) -> np.ndarray:
    """float32 rows (count × n_in) → records (count × (n_in + 1)) of uint16: exponent, then scaled float16."""
    count, n_in = rows.shape
    records = np.empty((count, n_in + 1), dtype=np.uint16)
    if count == 0:
        return records
    largest = np.abs(rows).max(axis=1)
    _, exponent = np.frexp(np.where((largest > 0) & np.isfinite(largest), largest, 1.0))
    exponent = (exponent.astype(np.int32) - _TOP_EXPONENT).astype(np.int16)
    records[:, 0] = exponent.view(np.uint16)
    scaled = np.ldexp(rows, -exponent.astype(np.int32)[:, None])
    records[:, 1:] = scaled.astype(np.float16).view(np.uint16)
    return records


class InputSpillWriter:
    """Appends the rows of each distinct input to its file; a chunk's rows count only once it is committed.

    `add` writes at once (nothing is held in memory); `discard` cuts every file back to its last committed
    length, so a chunk that fails or is stopped leaves no trace; `close` writes the manifest.
    """

    def __init__(self, folder: Path, tag: bytes) -> None:
        if len(tag) != _TAG_BYTES:
            raise ValueError(f"a spill tag has {_TAG_BYTES} bytes (got {len(tag)})")
        self.folder = Path(folder)
        self._tag = tag
        self._files: dict[str, tuple[Path, int]] = {}
        self._handles: dict[str, BinaryIO] = {}
        self._committed: dict[str, int] = {}
        self._written: dict[str, int] = {}

    def add(self, name: str, rows: np.ndarray) -> None:
        """Append float32 rows (count × n_in) to input `name`'s file."""
        rows = rows.reshape(-1, rows.shape[-1])
        found = self._files.get(name)
        if found is None:
            path = self.folder / f"input-{len(self._files):04d}.rows"
            found = self._files[name] = (path, rows.shape[1])
            handle = path.open("wb")
            handle.write(_header(rows.shape[1], self._tag))
            self._handles[name] = handle
            self._committed[name] = self._written[name] = 0
        elif found[1] != rows.shape[1]:
            raise ValueError(f"input {name} had rows of {found[1]} and now of {rows.shape[1]}")
        self._handles[name].write(_encode_rows(np.asarray(rows, dtype=np.float32)).tobytes())
        self._written[name] += rows.shape[0]

    def commit(self) -> None:
        self._committed.update(self._written)

    def discard(self) -> None:
        for name, handle in self._handles.items():
            if self._written[name] != self._committed[name]:
                n_in = self._files[name][1]
                handle.flush()
                handle.truncate(_HEADER_BYTES + self._committed[name] * (n_in + 1) * 2)
                handle.seek(0, os.SEEK_END)
                self._written[name] = self._committed[name]

    def close(self, weights: dict[str, str], *, chunks: int, tokens: int) -> None:
        """Flush the files and write the manifest; `weights` maps each weight to the input (a name given to
        `add`) its product reads."""
        self.discard()
        for handle in self._handles.values():
            handle.close()
        self._handles = {}
        readers: dict[str, list[str]] = {}
        for weight, input_name in sorted(weights.items()):
            if input_name in self._files:
                readers.setdefault(input_name, []).append(weight)
        document = {
            "format": SPILL_FORMAT,
            "tag": self._tag.hex(),
            "chunks": chunks,
            "tokens": tokens,
            "inputs": [{"file": path.name, "n_in": n_in, "rows": self._committed[name], "weights": readers[name]}
                       for name, (path, n_in) in self._files.items() if name in readers],
        }
        temporary = self.folder / (MANIFEST + ".partial")
        temporary.write_text(json.dumps(document), encoding="utf-8")
        os.replace(temporary, self.folder / MANIFEST)

    def abandon(self) -> None:
        """Close the files without a manifest (the folder's owner removes them)."""
        for handle in self._handles.values():
            handle.close()
        self._handles = {}


@dataclass(frozen=True)
class SpilledInput:
    """One distinct input: its file, row length, row count and the weights whose products read it."""

    path: Path
    n_in: int
    rows: int
    weights: tuple[str, ...]

    @property
    def key(self) -> str:
        return self.path.name


class SpilledInputs:
    """A spill folder, checked against the model it is read for: every input, and each one's covariance."""

    def __init__(self, folder: Path, tag: bytes) -> None:
        self.folder = Path(folder)
        self._tag = tag
        try:
            document = json.loads((self.folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise SpillMismatch(f"the spilled inputs in {self.folder} have no readable manifest") from error
        if document.get("format") != SPILL_FORMAT or document.get("tag") != tag.hex():
            raise SpillMismatch(f"the spilled inputs in {self.folder} belong to another model")
        self.chunks = int(document["chunks"])
        self.tokens = int(document["tokens"])
        self.inputs = tuple(SpilledInput(self.folder / entry["file"], int(entry["n_in"]), int(entry["rows"]),
                                         tuple(entry["weights"])) for entry in document["inputs"])
        self._by_weight = {weight: spilled for spilled in self.inputs for weight in spilled.weights}

    def input_of(self, weight: str) -> SpilledInput | None:
        return self._by_weight.get(weight)

    def weights(self) -> Sequence[str]:
        return tuple(self._by_weight)

    def rows(self, spilled: SpilledInput) -> np.ndarray:
        """The input's records (rows × (n_in + 1) uint16) through a memory map, after checking the file is this
        model's and whole."""
        expected = _HEADER_BYTES + spilled.rows * (spilled.n_in + 1) * 2
        try:
            with spilled.path.open("rb") as file:
                header = file.read(_HEADER_BYTES)
            size = spilled.path.stat().st_size
        except OSError as error:
            raise SpillMismatch(f"the spilled input {spilled.path.name} cannot be read ({error.strerror})") from error
        if header != _header(spilled.n_in, self._tag):
            raise SpillMismatch(f"the spilled input {spilled.path.name} belongs to another model or input")
        if size != expected:
            raise SpillMismatch(f"the spilled input {spilled.path.name} holds {size} bytes where its manifest "
                                f"promises {expected}")
        if spilled.rows == 0:
            return np.zeros((0, spilled.n_in + 1), dtype=np.uint16)
        return np.memmap(spilled.path, dtype=np.uint16, mode="r", offset=_HEADER_BYTES,
                         shape=(spilled.rows, spilled.n_in + 1))

    def row_blocks(self, spilled: SpilledInput, device: torch.device | None = None,
                   block_rows: int = _BLOCK_ROWS, part: Part = "all") -> Iterator[torch.Tensor]:
        """The rows of `part` of the input as float32 torch tensors on `device`, `block_rows` at a time."""
        import torch

        records = self.rows(spilled)
        for first, last in part_ranges(records.shape[0], part):
            for start in range(first, last, block_rows):
                block = torch.from_numpy(np.array(records[start : min(last, start + block_rows)])).to(device)
                exponents = block[:, 0].view(torch.int16).to(torch.int32)
                values = block[:, 1:].contiguous().view(torch.float16).to(torch.float32)
                yield torch.ldexp(values, exponents[:, None].to(torch.float32))

    def part_rows(self, spilled: SpilledInput, part: Part) -> int:
        return part_rows(spilled.rows, part)

    def covariance(self, spilled: SpilledInput, device: torch.device | None = None,
                   part: Part = "all") -> np.ndarray:
        """Σ x xᵀ over the rows of `part` of the input (float64, n_in × n_in): float32 products of blocks of rows
        (the upper triangle, mirrored), summed in float64, on `device` (`native.compute_device.compute_device()`
        when None)."""
        import torch

        from native.compute_device import compute_device

        device = device or compute_device()
        summing_on = device if device.type != "mps" else torch.device("cpu")  # MPS has no float64
        n_in = spilled.n_in
        total = torch.zeros((n_in, n_in), dtype=torch.float64, device=summing_on)
        edges = [*range(0, n_in, _BAND_COLUMNS), n_in]
        for block in self.row_blocks(spilled, device, part=part):
            for first, last in itertools.pairwise(edges):  # the upper triangle, a band of rows at a time
                total[first:last, first:] += (block[:, first:last].T @ block[:, first:]).to(summing_on, torch.float64)
        for first, last in itertools.pairwise(edges):  # mirror each band below the diagonal, in place
            band = total[first:last, first:last]
            band.copy_(band.triu() + band.triu(1).T)
            total[last:, first:last] = total[first:last, last:].T
        return total.cpu().numpy()
