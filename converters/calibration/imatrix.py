"""Importance matrices in llama.cpp's two file formats, and the vectors its quantizer takes from them.

An importance matrix holds, for each weight tensor a model multiplies activations by, the sum of the
squared input activations per input column (`sums`, one row per matrix: experts of a MoE tensor are
separate matrices) and how many activation rows each matrix saw (`counts`). The quantizer weighs
rounding errors by the mean squares `sums / counts`.

Formats:

* GGUF (llama.cpp's current one): `general.type` = "imatrix", `imatrix.datasets` (strings),
  `imatrix.chunk_count` and `imatrix.chunk_size` (u32); per weight NAME two F32 tensors,
  `NAME.in_sum2` (ne = [n_in, n_mat]) and `NAME.counts` (ne = [1, n_mat]), in sorted name order.
* Legacy `.dat`: a count of entries, then per entry its name, the number of chunks it saw (ncall)
  and its values stored as mean square × ncall; then, optionally, the chunk count and one dataset name.
  A legacy file keeps no token counts, so one read here has `chunk_size` 0 and counts in chunks;
  merging it into a matrix that has a chunk size converts its counts to tokens, as llama.cpp does.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from converters.core.atomic import atomic_output
from converters.core.errors import ImatrixError

GGUF_MAGIC = b"GGUF"
TYPE_KEY = "general.type"
IMATRIX_TYPE = "imatrix"
DATASETS_KEY = "imatrix.datasets"
CHUNK_COUNT_KEY = "imatrix.chunk_count"
CHUNK_SIZE_KEY = "imatrix.chunk_size"
SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"
METADATA_KEYS = (DATASETS_KEY, CHUNK_COUNT_KEY, CHUNK_SIZE_KEY)

UINT32_MAX = 2**32 - 1
INT32_MAX = 2**31 - 1
LARGEST_COUNT = 2**53  # counts are stored as float32/float64; anything larger is a damaged file
LONGEST_LEGACY_NAME = 4096  # bytes; tensor names are at most 64 in GGUF
SMALLEST_LEGACY_ENTRY = 4 + 1 + 4 + 4 + 4  # name length, one name byte, ncall, nval, one value

USE_CALIBRATE = "pass the file `qdesk calibrate` wrote"
RECALIBRATE = "calibrate this model with `qdesk calibrate`"


@dataclass(eq=False)
class ImatrixEntry:
    """Statistics of one weight tensor: `sums` float64 (n_mat, n_in), `counts` int64 (n_mat,)."""

    sums: np.ndarray
    counts: np.ndarray

    def __post_init__(self) -> None:
        self.sums = np.asarray(self.sums, dtype=np.float64)
        self.counts = np.asarray(self.counts, dtype=np.int64)
        if self.sums.ndim != 2 or min(self.sums.shape) < 1:
            raise ValueError(f"sums must be a non-empty (n_mat, n_in) array, got shape {self.sums.shape}")
        if self.counts.shape != (self.sums.shape[0],):
            raise ValueError(f"counts must have shape ({self.sums.shape[0]},), got {self.counts.shape}")

    @property
    def n_mat(self) -> int:
        """Number of matrices: 1 for an ordinary weight, the expert count for a MoE expert tensor."""
        return int(self.sums.shape[0])

    @property
    def n_in(self) -> int:
        """Input columns of each matrix (the weight's ne[0])."""
        return int(self.sums.shape[1])

    def mean_squares(self) -> np.ndarray:
        """float32 (n_mat * n_in,): sums / count per matrix, 1.0 for a matrix that saw nothing."""
        counts = self.counts[:, np.newaxis]
        seen = counts > 0
        means = np.where(seen, self.sums / np.where(seen, counts, 1), 1.0)
        return np.ascontiguousarray(means.astype(np.float32).reshape(-1))


@dataclass(eq=False)
class ImportanceMatrix:
    """Per-tensor activation statistics plus what they were computed on.

    `chunk_size` is tokens per chunk; 0 means unknown (a legacy file), and then counts are in chunks.
    """

    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    @property
    def token_count(self) -> int:
        """The most activation rows any matrix saw (0 when there are no entries)."""
        return max((int(entry.counts.max()) for entry in self.entries.values()), default=0)

    def quantizer_data(self) -> dict[str, np.ndarray]:
        """Tensor name → contiguous float32 mean squares, the vector llama.cpp's quantizer takes."""
        return {name: entry.mean_squares() for name, entry in self.entries.items()}

    def merged(self, other: ImportanceMatrix) -> ImportanceMatrix:
        """Both matrices' statistics added together: sums and counts per name, datasets and chunks combined."""
        own_scale, other_scale = _merge_scales(self.chunk_size, other.chunk_size)
        entries = {name: _scaled(entry, own_scale) for name, entry in self.entries.items()}
        for name, entry in other.entries.items():
            addition = _scaled(entry, other_scale)
            entries[name] = _added(name, entries[name], addition) if name in entries else addition
        return ImportanceMatrix(
            entries=dict(sorted(entries.items())),
            datasets=[*self.datasets, *other.datasets],
            chunk_count=self.chunk_count + other.chunk_count,
            chunk_size=self.chunk_size or other.chunk_size,
        )


def _merge_scales(own_chunk_size: int, other_chunk_size: int) -> tuple[int, int]:
    """Factors that put both matrices' counts in tokens when only one of them knows its chunk size."""
    if own_chunk_size == 0 and other_chunk_size > 0:
        return other_chunk_size, 1
    if other_chunk_size == 0 and own_chunk_size > 0:
        return 1, own_chunk_size
    return 1, 1


def _scaled(entry: ImatrixEntry, factor: int) -> ImatrixEntry:
    return ImatrixEntry(entry.sums * factor, entry.counts * factor)


def _added(name: str, first: ImatrixEntry, second: ImatrixEntry) -> ImatrixEntry:
    if first.sums.shape != second.sums.shape and first.sums.size == second.sums.size:
        # A legacy file flattens a MoE tensor's experts into one row: spread it over the other's experts.
        if first.n_mat == 1:
            first = _split_into_matrices(first, second.n_mat)
        elif second.n_mat == 1:
            second = _split_into_matrices(second, first.n_mat)
    if first.sums.shape != second.sums.shape:
        raise ImatrixError(
            f"Cannot merge these importance matrices: {name} has {first.n_mat} × {first.n_in} values in one and "
            f"{second.n_mat} × {second.n_in} in the other, so they come from different models; "
            "merge only matrices made for the same model."
        )
    return ImatrixEntry(first.sums + second.sums, first.counts + second.counts)


def _split_into_matrices(entry: ImatrixEntry, n_mat: int) -> ImatrixEntry:
    return ImatrixEntry(entry.sums.reshape(n_mat, -1), np.repeat(entry.counts, n_mat))


# --- checking values -----------------------------------------------------------------------------


def _problem_with_values(entry: ImatrixEntry) -> str | None:
    """What is wrong with an entry's numbers, as a phrase, or None when they are usable."""
    if not np.isfinite(entry.sums).all():
        return "holds values that are not finite numbers (NaN or infinity)"
    if (entry.sums < 0).any():
        return "holds negative sums of squares"
    if (entry.counts < 0).any():
        return "holds negative counts"
    return None


# --- reading -------------------------------------------------------------------------------------


def read_imatrix(path: str | os.PathLike[str]) -> ImportanceMatrix:
    """Read an importance matrix in llama.cpp's GGUF or legacy `.dat` format (told apart by the magic bytes)."""
    path = Path(path)
    try:
        size = _checked_size(path)
        with path.open("rb") as stream:
            magic = stream.read(len(GGUF_MAGIC))
            if magic == GGUF_MAGIC:
                return _read_gguf(path, size)
            stream.seek(0)
            return _read_legacy(path, stream, size)
    except OSError as error:
        reason = error.strerror or error
        raise ImatrixError(f"Cannot read {path}: {reason}; check the file and its permissions.") from error


def _checked_size(path: Path) -> int:
    if path.is_dir():
        raise ImatrixError(f"{path} is a folder, not an importance matrix; {USE_CALIBRATE}.")
    if not path.exists():
        raise ImatrixError(f"{path} does not exist; check the path, or make one with `qdesk calibrate`.")
    size = path.stat().st_size
    if size == 0:
        raise ImatrixError(f"{path} is empty (0 bytes); {USE_CALIBRATE}, or run it again if it was interrupted.")
    return size


def _damaged(path: Path, problem: str) -> ImatrixError:
    return ImatrixError(f"{path} is a damaged importance matrix: {problem}; {USE_CALIBRATE}, or calibrate again.")


def _read_gguf(path: Path, size: int) -> ImportanceMatrix:
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as error:  # gguf-py reports damage as assorted exception types; the cause keeps its words
        raise ImatrixError(
            f"{path} starts like a GGUF file but cannot be read as one, so it is truncated or damaged; "
            f"{USE_CALIBRATE}, or calibrate again."
        ) from error
    for tensor in reader.tensors:
        if int(tensor.data_offset) + int(tensor.n_bytes) > size:
            raise ImatrixError(
                f"{path} is truncated: the data of {tensor.name} runs past the end of the file ({size:,} bytes); "
                f"{USE_CALIBRATE}, or calibrate again."
            )
    pairs = _tensor_pairs(reader)
    file_type = _string_field(reader, TYPE_KEY)
    if not any(sums is not None for sums, _ in pairs.values()):
        if file_type == IMATRIX_TYPE and not pairs:
            raise ImatrixError(f"{path} is an importance matrix with no entries; calibrate again with more text.")
        if file_type != IMATRIX_TYPE:
            raise ImatrixError(f"{path} is a model, not an importance matrix; {USE_CALIBRATE}.")
    missing = [key for key in METADATA_KEYS if reader.get_field(key) is None]
    if missing:
        raise ImatrixError(
            f"{path} is missing importance-matrix metadata ({', '.join(missing)}), which llama.cpp requires; "
            f"{USE_CALIBRATE}, or calibrate again."
        )
    entries = {name: _entry_from_tensors(path, name, sums, counts) for name, (sums, counts) in sorted(pairs.items())}
    return ImportanceMatrix(
        entries=entries,
        datasets=_datasets(path, reader),
        chunk_count=_u32_field(path, reader, CHUNK_COUNT_KEY),
        chunk_size=_u32_field(path, reader, CHUNK_SIZE_KEY),
    )


_TensorPair = tuple[gguf.ReaderTensor | None, gguf.ReaderTensor | None]


def _tensor_pairs(reader: gguf.GGUFReader) -> dict[str, _TensorPair]:
    """Weight name → (its sums tensor, its counts tensor); either may be missing. Other tensors are ignored."""
    pairs: dict[str, _TensorPair] = {}
    for tensor in reader.tensors:
        if tensor.name.endswith(SUMS_SUFFIX):
            name = tensor.name.removesuffix(SUMS_SUFFIX)
            pairs[name] = (tensor, pairs.get(name, (None, None))[1])
        elif tensor.name.endswith(COUNTS_SUFFIX):
            name = tensor.name.removesuffix(COUNTS_SUFFIX)
            pairs[name] = (pairs.get(name, (None, None))[0], tensor)
    return pairs


def _entry_from_tensors(
    path: Path, name: str, sums: gguf.ReaderTensor | None, counts: gguf.ReaderTensor | None
) -> ImatrixEntry:
    if sums is None or counts is None:
        present, absent = (SUMS_SUFFIX, COUNTS_SUFFIX) if counts is None else (COUNTS_SUFFIX, SUMS_SUFFIX)
        raise _damaged(path, f"it has {name}{present} but no {name}{absent}")
    for tensor in (sums, counts):
        if tensor.tensor_type != GGMLQuantizationType.F32:
            raise _damaged(path, f"{tensor.name} is {tensor.tensor_type.name}, but importance data must be F32")
    sums_ne = [int(n) for n in sums.shape]
    counts_ne = [int(n) for n in counts.shape]
    n_mat = math.prod(counts_ne)
    n_in = sums_ne[0]
    if counts_ne[0] != 1 or n_mat < 1 or n_in < 1 or math.prod(sums_ne[1:]) != n_mat:
        raise _damaged(
            path, f"{name}{SUMS_SUFFIX} has shape {sums_ne} but {name}{COUNTS_SUFFIX} has shape {counts_ne} "
            f"(expected [n_in, n_mat] and [1, n_mat])"
        )
    raw_counts = np.array(counts.data, dtype=np.float64).reshape(n_mat)
    if not np.isfinite(raw_counts).all() or (np.abs(raw_counts) > LARGEST_COUNT).any():
        raise _damaged(path, f"{name}{COUNTS_SUFFIX} holds counts that are not finite or absurdly large")
    entry = ImatrixEntry(np.array(sums.data, dtype=np.float64).reshape(n_mat, n_in), np.rint(raw_counts))
    problem = _problem_with_values(entry)
    if problem is not None:
        raise _damaged(path, f"{name} {problem}")
    return entry


def _string_field(reader: gguf.GGUFReader, key: str) -> str | None:
    found = reader.get_field(key)
    if found is None or found.types != [GGUFValueType.STRING]:
        return None
    return _decoded(found.parts[-1])


def _decoded(part: Any) -> str:
    return bytes(part).decode("utf-8", errors="replace")


def _u32_field(path: Path, reader: gguf.GGUFReader, key: str) -> int:
    found = reader.get_field(key)
    assert found is not None  # checked with the other metadata keys
    if found.types != [GGUFValueType.UINT32]:
        kind = found.types[0].name if found.types else "nothing"
        raise _damaged(path, f"{key} is stored as {kind}, but llama.cpp reads it as UINT32")
    return int(found.parts[-1][0])


def _datasets(path: Path, reader: gguf.GGUFReader) -> list[str]:
    found = reader.get_field(DATASETS_KEY)
    assert found is not None  # checked with the other metadata keys
    if found.types[:1] != [GGUFValueType.ARRAY] or found.types[1:] not in ([], [GGUFValueType.STRING]):
        raise _damaged(path, f"{DATASETS_KEY} is not an array of strings")
    return [_decoded(found.parts[index]) for index in found.data]


class _LegacyCursor:
    """Reads a legacy file front to back, refusing any length that runs past its end before allocating."""

    def __init__(self, path: Path, stream: BinaryIO, size: int) -> None:
        self.path = path
        self.stream = stream
        self.size = size

    @property
    def remaining(self) -> int:
        return self.size - self.stream.tell()

    def take(self, count: int, what: str) -> bytes:
        if count > self.remaining:
            raise ImatrixError(
                f"{self.path} is not a complete importance matrix: {what} runs past the end of the file "
                f"({self.size:,} bytes), so it is truncated or is neither GGUF nor llama.cpp's legacy .dat format; "
                f"{USE_CALIBRATE}."
            )
        return self.stream.read(count)

    def int32(self, what: str) -> int:
        (value,) = struct.unpack("<i", self.take(4, what))
        return int(value)

    def refuse(self, problem: str) -> ImatrixError:
        return ImatrixError(
            f"{self.path} is not a readable importance matrix: {problem}, so it is damaged or is neither GGUF nor "
            f"llama.cpp's legacy .dat format; {USE_CALIBRATE}."
        )


def _read_legacy(path: Path, stream: BinaryIO, size: int) -> ImportanceMatrix:
    cursor = _LegacyCursor(path, stream, size)
    n_entries = cursor.int32("the entry count")
    if n_entries < 1:
        raise cursor.refuse(f"it says it holds {n_entries} entries")
    if n_entries > cursor.remaining // SMALLEST_LEGACY_ENTRY:
        raise cursor.refuse(f"it claims {n_entries:,} entries, more than its {size:,} bytes can hold")
    entries: dict[str, ImatrixEntry] = {}
    for number in range(1, n_entries + 1):
        name, entry = _legacy_entry(cursor, number)
        if name in entries:
            raise cursor.refuse(f"it lists {name} twice")
        entries[name] = entry
    chunk_count, datasets = 0, []
    if cursor.remaining > 0:
        chunk_count = cursor.int32("the chunk count after the entries")
        name_length = cursor.int32("the dataset name's length")
        if name_length < 0 or name_length > LONGEST_LEGACY_NAME:
            raise cursor.refuse(f"its dataset name is said to be {name_length:,} bytes long")
        if name_length > 0:
            datasets.append(cursor.take(name_length, "the dataset name").decode("utf-8", errors="replace"))
    return ImportanceMatrix(entries=entries, datasets=datasets, chunk_count=max(chunk_count, 0), chunk_size=0)


def _legacy_entry(cursor: _LegacyCursor, number: int) -> tuple[str, ImatrixEntry]:
    name_length = cursor.int32(f"entry {number}'s name length")
    if name_length < 1 or name_length > LONGEST_LEGACY_NAME:
        raise cursor.refuse(f"entry {number}'s name is said to be {name_length:,} bytes long")
    try:
        name = cursor.take(name_length, f"entry {number}'s name").decode("utf-8")
    except UnicodeDecodeError:
        raise cursor.refuse(f"entry {number}'s name is not text") from None
    ncall = cursor.int32(f"{name}'s call count")
    n_values = cursor.int32(f"{name}'s value count")
    if n_values < 1:
        raise cursor.refuse(f"{name} is said to hold {n_values} values")
    if ncall < 0:
        raise cursor.refuse(f"{name} is said to be computed on {ncall} chunks")
    raw = cursor.take(4 * n_values, f"{name}'s {n_values:,} values")
    values = np.frombuffer(raw, dtype="<f4").astype(np.float64).reshape(1, n_values)
    # Stored values are mean square × ncall; llama.cpp uses them as they are when ncall is 0.
    entry = ImatrixEntry(values, np.array([ncall if ncall > 0 else 1]))
    problem = _problem_with_values(entry)
    if problem is not None:
        raise cursor.refuse(f"{name} {problem}")
    return name, entry


# --- writing -------------------------------------------------------------------------------------


class _ImatrixGGUFWriter(gguf.GGUFWriter):
    """gguf-py's writer, also able to write an empty typed array (a matrix whose datasets are unknown)."""

    def _pack_val(
        self, val: Any, vtype: GGUFValueType, add_vtype: bool, sub_type: GGUFValueType | None = None
    ) -> bytes:
        if vtype == GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            prefix = self._pack("I", vtype) if add_vtype else b""
            return prefix + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _check_writable(matrix: ImportanceMatrix, path: Path) -> None:
    if not matrix.entries:
        raise ImatrixError(f"Not writing {path}: the importance matrix has no entries; calibrate with more text.")
    for name, entry in matrix.entries.items():
        problem = _problem_with_values(entry)
        if problem is not None:
            raise ImatrixError(
                f"Not writing {path}: the importance matrix's {name} {problem}; calibrate again "
                "(a model that overflows in F16 calibrates cleanly from an F32 or BF16 GGUF)."
            )
    for label, value in (("chunk count", matrix.chunk_count), ("chunk size", matrix.chunk_size)):
        if not 0 <= value <= UINT32_MAX:
            raise ValueError(f"{label} {value} does not fit the format's unsigned 32-bit field")


def write_imatrix(matrix: ImportanceMatrix, path: str | os.PathLike[str]) -> None:
    """Write `matrix` in llama.cpp's imatrix GGUF format, atomically (complete file or none)."""
    path = Path(path)
    _check_writable(matrix, path)
    writer = _ImatrixGGUFWriter(path=None, arch="")  # an empty arch writes no general.architecture
    writer.add_type(IMATRIX_TYPE)
    writer.add_key_value(DATASETS_KEY, list(matrix.datasets), GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    writer.add_uint32(CHUNK_COUNT_KEY, matrix.chunk_count)
    writer.add_uint32(CHUNK_SIZE_KEY, matrix.chunk_size)
    for name in sorted(matrix.entries):
        entry = matrix.entries[name]
        writer.add_tensor(name + SUMS_SUFFIX, entry.sums.astype(np.float32))
        writer.add_tensor(name + COUNTS_SUFFIX, entry.counts.astype(np.float32).reshape(entry.n_mat, 1))
    with atomic_output(path) as temporary:
        try:
            writer.write_header_to_file(temporary)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()


def legacy_call_count(entry: ImatrixEntry, chunk_size: int) -> int:
    """Chunks an entry saw, as the legacy format stores it: counts / chunk_size rounded up (counts when unknown)."""
    most = int(entry.counts.max())
    return most if chunk_size <= 0 else -(-most // chunk_size)


def legacy_values(entry: ImatrixEntry, ncall: int) -> np.ndarray:
    """float32 values as the legacy format stores them: mean square × ncall (1.0 × ncall for unseen matrices)."""
    return (entry.mean_squares().astype(np.float64) * ncall).astype("<f4")


def write_legacy_imatrix(matrix: ImportanceMatrix, path: str | os.PathLike[str]) -> None:
    """Write `matrix` in llama.cpp's legacy `.dat` format for older tools, atomically.

    Entries that saw no tokens at all are left out, as llama.cpp does; one dataset name fits (the last).
    """
    path = Path(path)
    _check_writable(matrix, path)
    stored = [(name, entry) for name, entry in sorted(matrix.entries.items()) if entry.counts.max() > 0]
    if not stored:
        raise ImatrixError(f"Not writing {path}: no tensor in the importance matrix saw any tokens; calibrate again.")
    chunks: list[bytes] = [struct.pack("<i", len(stored))]
    for name, entry in stored:
        ncall = legacy_call_count(entry, matrix.chunk_size)
        if ncall > INT32_MAX or entry.sums.size > INT32_MAX:
            raise ValueError(f"{name} is too large for the legacy format's 32-bit fields")
        encoded_name = name.encode("utf-8")
        chunks += [struct.pack("<i", len(encoded_name)), encoded_name, struct.pack("<ii", ncall, entry.sums.size)]
        chunks.append(legacy_values(entry, ncall).tobytes())
    dataset = matrix.datasets[-1].encode("utf-8") if matrix.datasets else b""
    chunks += [struct.pack("<ii", min(matrix.chunk_count, INT32_MAX), len(dataset)), dataset]
    with atomic_output(path) as temporary:
        temporary.write_bytes(b"".join(chunks))


# --- matching a model ----------------------------------------------------------------------------


def check_matches_model(
    matrix: ImportanceMatrix,
    weight_shapes: Mapping[str, Sequence[int]],
    *,
    model: str = "the model",
    matrix_label: str = "The importance matrix",
) -> None:
    """Raise ImatrixError unless `matrix` fits the model whose tensor names map to ggml `ne` shapes.

    ne[0] is a weight's input columns and ne[2], for a 3-D tensor, its experts. Entries for names the
    model lacks are ignored as long as some names match; a legacy file's experts flattened into one row
    fit when the total size is the model's, as llama.cpp's quantizer accepts them.
    """
    shared = sorted(name for name in matrix.entries if name in weight_shapes)
    if not shared:
        raise ImatrixError(
            f"{matrix_label} was made for another model: none of its {len(matrix.entries)} tensors are in "
            f"{model}; {RECALIBRATE}."
        )
    for name in shared:
        entry = matrix.entries[name]
        ne = [int(n) for n in weight_shapes[name]]
        n_in, n_mat = ne[0], ne[2] if len(ne) >= 3 else 1
        fits = (entry.n_in, entry.n_mat) == (n_in, n_mat)
        flattened_experts = entry.n_mat == 1 and n_mat > 1 and entry.n_in == n_in * n_mat
        if not (fits or flattened_experts):
            raise ImatrixError(
                f"{matrix_label} was made for another model: {name} has {entry.n_in} input columns × "
                f"{entry.n_mat} matrices in it but {n_in} × {n_mat} in {model}; {RECALIBRATE}."
            )
