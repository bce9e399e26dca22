"""Reading safetensors files one tensor (or one slice of rows) at a time, validating the header first.

Layout: an 8-byte little-endian header length N, N bytes of JSON mapping tensor names to
`{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the end of the header), then data.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters.core.errors import CheckpointError, UnsupportedModelError

_ITEM_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
FLOAT_DTYPES = ("F32", "F16", "BF16")
_MAX_HEADER_BYTES = 100_000_000


def unsupported_dtype(tensor_name: str, dtype: str) -> UnsupportedModelError:
    """The error for a tensor stored in a type the converter does not read (quantized, integer, FP8)."""
    return UnsupportedModelError(
        f"Tensor {tensor_name} is stored as {dtype}; qdesk converts F32, F16 and BF16 checkpoints, "
        "so use the unquantized release of this model."
    )


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (as uint16) to float32: they are float32's upper halves."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def decode_floats(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw little-endian bytes of a float tensor of `dtype` as a float32 array."""
    if dtype == "F32":
        return raw.view("<f4").astype(np.float32, copy=False)
    if dtype == "F16":
        return raw.view("<f2").astype(np.float32)
    return bf16_to_f32(raw.view("<u2"))


@dataclass(frozen=True)
class SafetensorsEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """One .safetensors file: its validated table of contents and row-range reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries, self.data_start = _read_header(path)

    def read_rows(self, entry: SafetensorsEntry, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor's first axis, as float32."""
        if entry.dtype not in FLOAT_DTYPES:
            raise unsupported_dtype(entry.name, entry.dtype)
        item = _ITEM_SIZES[entry.dtype]
        row_elements = math.prod(entry.shape[1:]) if len(entry.shape) > 1 else 1
        rows = max(0, stop - start)
        raw = np.empty(rows * row_elements * item, dtype=np.uint8)
        with open(self.path, "rb") as handle:
            handle.seek(self.data_start + entry.begin + start * row_elements * item)
            got = handle.readinto(memoryview(raw))
        if got != raw.nbytes:
            raise CheckpointError(f"{self.path.name} ended while reading {entry.name}; download it again.")
        out_shape = (rows, *entry.shape[1:]) if entry.shape else ()
        return decode_floats(raw, entry.dtype).reshape(out_shape)


def _read_header(path: Path) -> tuple[dict[str, SafetensorsEntry], int]:
    def damaged(reason: str) -> CheckpointError:
        return CheckpointError(f"{path.name} is not a valid safetensors file ({reason}); download it again.")

    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise damaged("it is shorter than its 8-byte header length")
            (header_length,) = struct.unpack("<Q", prefix)
            if header_length > min(size - 8, _MAX_HEADER_BYTES):
                raise damaged(f"its header claims {header_length} bytes but the file has {size}")
            header_bytes = handle.read(header_length)
    except OSError as error:
        raise CheckpointError(f"Cannot read {path}: {error.strerror or error}.") from error
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise damaged("its header is not JSON") from error
    if not isinstance(header, dict):
        raise damaged("its header is not a JSON object")

    data_start = 8 + header_length
    data_size = size - data_start
    entries: dict[str, SafetensorsEntry] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(spec["dtype"])
            shape = tuple(_count(d) for d in spec["shape"])
            begin, end = (_count(o) for o in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as error:
            raise damaged(f"the entry for {name} is malformed (its shape and offsets must be counts, 0 or more)") \
                from error
        item = _ITEM_SIZES.get(dtype)
        if item is None:
            raise damaged(f"tensor {name} has unknown dtype {dtype}")
        if not begin <= end <= data_size:
            raise damaged(f"tensor {name} lies past the end of the file (truncated download?)")
        if end - begin != math.prod(shape) * item:
            raise damaged(f"tensor {name} has {end - begin} bytes but its shape needs {math.prod(shape) * item}")
        entries[name] = SafetensorsEntry(name, dtype, shape, begin, end)
    _check_layout(entries, data_size, damaged)
    return entries, data_start


def _count(value: object) -> int:
    """A shape dimension or an offset: a JSON integer, 0 or more (true, 2.5, -1 and "3" are not)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value


def _check_layout(entries: dict[str, SafetensorsEntry], data_size: int,
                  damaged: Callable[[str], CheckpointError]) -> None:
    """The tensors' data must tile the data section exactly, as the safetensors library requires: each starting
    where the previous one ends, the first at 0 and the last at the end of the file; no overlap, no gap."""
    position, previous = 0, None
    for entry in sorted(entries.values(), key=lambda entry: (entry.begin, entry.end)):
        if entry.begin < position:
            raise damaged(f"the data of tensors {previous} and {entry.name} overlap")
        if entry.begin > position:
            after = f"after tensor {previous}" if previous is not None else "before the first tensor"
            raise damaged(f"it leaves {entry.begin - position} bytes unused {after}")
        position, previous = entry.end, entry.name
    if position != data_size:
        raise damaged(f"{data_size - position} bytes follow the last tensor's data")
