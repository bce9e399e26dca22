"""Checking that a file is a complete GGUF file before anything reads it.

`open_gguf(path)` checks that a file is a complete GGUF file that gguf-py can read, then
returns a `gguf.GGUFReader` (tensor data stays memory-mapped, never read). `check_gguf(path)`
does the checks alone, reading only the header. Any problem is raised as `GGUFFileError` with
one sentence saying what is wrong and what to do: a missing file, a folder, an empty file,
another format (JSON, safetensors, Git LFS pointer, web page, pre-GGUF GGML), an unsupported
GGUF version, a header that runs past the end of the file, tensor data that ends beyond it, or
a damaged header. llama.cpp aborts the whole process on some of these, so every path that hands
a file to llama.cpp checks it here first.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from converters.core.errors import GGUFFileError

__all__ = ["GGUFHeader", "TensorHeader", "check_gguf", "open_gguf"]

_MAGIC = b"GGUF"
try:
    from gguf.gguf_reader import READER_SUPPORTED_VERSIONS as _READER_VERSIONS

    _SUPPORTED_VERSIONS: tuple[int, ...] = tuple(int(v) for v in _READER_VERSIONS)
except ImportError:  # pragma: no cover - older or newer gguf-py layouts
    _SUPPORTED_VERSIONS = (2, 3)

_MAX_DIMS = 4  # ggml tensors have at most four dimensions
_MAX_ARRAY_DEPTH = 8  # arrays of arrays deeper than this are taken as damage
_DEFAULT_ALIGNMENT = 32

_KEPT_ARRAY_ITEMS = 1024  # longer arrays (the vocabulary, per-token scores) are kept as their length only
_SCALAR_FORMATS: dict[int, str] = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}
_SCALAR_SIZES: dict[int, int] = {
    GGUFValueType.UINT8: 1,
    GGUFValueType.INT8: 1,
    GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2,
    GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4,
    GGUFValueType.INT32: 4,
    GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8,
    GGUFValueType.INT64: 8,
    GGUFValueType.FLOAT64: 8,
}


# --- what a file that is not GGUF looks like -------------------------------------------------

def _sniff_other_format(head: bytes) -> str | None:
    """Name the format of a file that lacks the GGUF magic, with advice, when recognisable."""
    stripped = head.lstrip()
    if head.startswith(b"version https://git-lfs"):
        return ("is a Git LFS pointer, not the model itself; fetch the real file "
                "(`git lfs pull`) or download it again")
    if len(head) >= 10 and head[8:10] in (b'{"', b"{'") and struct.unpack_from("<Q", head)[0] < 1 << 30:
        return ("is a safetensors file, not GGUF; convert its checkpoint folder "
                "with `qdesk convert` first")
    if stripped[:1] in (b"{", b"["):
        return "is a JSON file, not GGUF; give a .gguf model file"
    if stripped[:1] == b"<":
        return ("is a web page or XML file, not GGUF; download the model file itself "
                "(on the Hugging Face Hub, the 'resolve' link rather than the 'blob' page)")
    if head[:4] in (b"lmgg", b"fmgg", b"tjgg", b"ggml", b"ggmf", b"ggjt"):
        return ("is in the old GGML format that predates GGUF; convert the original checkpoint "
                "again to get a .gguf file")
    if head.startswith(b"PK\x03\x04"):
        return ("is a zip archive (perhaps a PyTorch checkpoint), not GGUF; convert the "
                "checkpoint folder with `qdesk convert` first")
    return None


# --- a bounds-checked walk over the header ---------------------------------------------------

class _Truncated(Exception):
    """The header needs bytes past the end of the file."""


class _Damaged(Exception):
    """The header holds something no valid GGUF file holds; the message says what."""


class _HeaderWalk:
    """Walks a GGUF header (metadata and tensor infos) checking every length against the file size.

    It reads only the header, never tensor data, and never loops more often than the bytes left
    could justify, so a damaged count cannot make it run away.
    """

    def __init__(self, buf: mmap.mmap, order: str) -> None:
        self.buf = buf
        self.size = len(buf)
        self.order = order
        self.pos = 0

    def _take(self, n: int) -> int:
        start = self.pos
        if n < 0 or n > self.size - start:
            raise _Truncated
        self.pos = start + n
        return start

    def u32(self) -> int:
        return int(struct.unpack_from(self.order + "I", self.buf, self._take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack_from(self.order + "Q", self.buf, self._take(8))[0])

    def string(self, what: str) -> str:
        n = self.u64()
        start = self._take(n)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise _Damaged(f"{what} at byte {start} is not valid UTF-8") from None

    def skip_string(self) -> None:
        self._take(self.u64())

    def skip_strings(self, count: int) -> None:
        """Skip `count` length-prefixed strings: the tokenizer's vocabulary, so this loop is kept tight."""
        length_at = struct.Struct(self.order + "Q").unpack_from
        buf, end, pos = self.buf, self.size, self.pos
        for _ in range(count):
            if pos + 8 > end:
                raise _Truncated
            pos += 8 + length_at(buf, pos)[0]
        if pos > end:
            raise _Truncated
        self.pos = pos

    def _need(self, count: int, min_size: int) -> None:
        """Refuse `count` items of at least `min_size` bytes when fewer bytes are left."""
        if count * min_size > self.size - self.pos:
            raise _Truncated

    def value(self, vtype: int, key: str, array_lengths: dict[str, int]) -> Any:
        """The value as plain Python; an array longer than `_KEPT_ARRAY_ITEMS` or of arrays is skipped (None), and
        every array's length goes into `array_lengths`."""
        if vtype in _SCALAR_FORMATS:
            scalar_at = self._take(_SCALAR_SIZES[vtype])
            return struct.unpack_from(self.order + _SCALAR_FORMATS[vtype], self.buf, scalar_at)[0]
        if vtype == GGUFValueType.STRING:
            return self.string(f"the metadata key {key!r}")
        if vtype != GGUFValueType.ARRAY:
            raise _Damaged(f"the metadata key {key!r} has unknown value type {vtype}")
        start = self.pos
        item_type = self.u32()
        count = self.u64()
        array_lengths[key] = count
        if count > _KEPT_ARRAY_ITEMS or item_type not in (*_SCALAR_FORMATS, GGUFValueType.STRING):
            self.pos = start
            self.skip_value(vtype, key)
            return None
        if item_type == GGUFValueType.STRING:
            return [self.string(f"an item of the metadata key {key!r}") for _ in range(count)]
        items_at = self._take(count * _SCALAR_SIZES[item_type])
        return list(struct.unpack_from(f"{self.order}{count}{_SCALAR_FORMATS[item_type]}", self.buf, items_at))

    def skip_value(self, vtype: int, key: str, depth: int = 0) -> None:
        if vtype in _SCALAR_SIZES:
            self._take(_SCALAR_SIZES[vtype])
        elif vtype == GGUFValueType.STRING:
            self.skip_string()
        elif vtype == GGUFValueType.ARRAY:
            if depth >= _MAX_ARRAY_DEPTH:
                raise _Damaged(f"the metadata key {key!r} nests arrays {depth} deep")
            item_type = self.u32()
            count = self.u64()
            if item_type in _SCALAR_SIZES:
                self._take(count * _SCALAR_SIZES[item_type])
            elif item_type == GGUFValueType.STRING:
                self._need(count, 8)
                self.skip_strings(count)
            elif item_type == GGUFValueType.ARRAY:
                self._need(count, 12)
                for _ in range(count):
                    self.skip_value(item_type, key, depth + 1)
            else:
                raise _Damaged(f"the metadata key {key!r} holds an array of unknown type {item_type}")
        else:
            raise _Damaged(f"the metadata key {key!r} has unknown value type {vtype}")


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as the header describes it: ggml shape (`shape[0]` is the row length), type, data size."""

    name: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType
    n_bytes: int
    offset: int = 0
    """Where its data starts, from the start of the tensor data section."""


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    data_offset: int
    data_end: int  # one past the last byte of tensor data the header describes
    tensors: tuple[TensorHeader, ...]
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)
    """Every key's value as plain Python; None for an array of more than 1,024 items (see `array_lengths`)."""
    array_lengths: dict[str, int] = field(default_factory=dict, hash=False)


def _walk_header(buf: mmap.mmap, order: str, version: int) -> GGUFHeader:
    walk = _HeaderWalk(buf, order)
    walk.pos = 8
    tensor_count = walk.u64()
    kv_count = walk.u64()
    walk._need(kv_count, 8 + 4 + 1)  # key length, value type, smallest value
    alignment = _DEFAULT_ALIGNMENT
    metadata: dict[str, Any] = {}
    array_lengths: dict[str, int] = {}
    for _ in range(kv_count):
        key = walk.string("a metadata key")
        if key in metadata:
            raise _Damaged(f"the metadata key {key!r} appears twice")
        vtype = walk.u32()
        if key == "general.alignment":
            if vtype != GGUFValueType.UINT32:
                raise _Damaged("general.alignment is not a 32-bit unsigned integer")
            alignment = walk.u32()
            if alignment == 0 or alignment & (alignment - 1):
                raise _Damaged(f"general.alignment is {alignment}, not a power of two")
            metadata[key] = alignment
        else:
            metadata[key] = walk.value(vtype, key, array_lengths)

    walk._need(tensor_count, 8 + 4 + 4 + 8)  # name length, dimension count, type, offset
    tensors: list[tuple[TensorHeader, int]] = []
    names: set[str] = set()
    for _ in range(tensor_count):
        name = walk.string("a tensor name")
        if name in names:
            raise _Damaged(f"the tensor {name!r} appears twice")
        names.add(name)
        n_dims = walk.u32()
        if n_dims > _MAX_DIMS:
            raise _Damaged(f"the tensor {name!r} has {n_dims} dimensions (at most {_MAX_DIMS} are allowed)")
        dims = [walk.u64() for _ in range(n_dims)]
        n_elements = 1
        for dim in dims:
            n_elements *= dim
        raw_type = walk.u32()
        offset = walk.u64()
        try:
            block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
        except (ValueError, KeyError):
            raise _Damaged(f"the tensor {name!r} has tensor type {raw_type}, which this version does not "
                           "know") from None
        row_length = dims[0] if dims else 1
        if row_length % block_size:
            raise _Damaged(f"the tensor {name!r} has rows of {row_length} elements, not a whole number "
                           f"of the {block_size}-element blocks of its type")
        if offset % alignment:
            raise _Damaged(f"the tensor {name!r} starts at offset {offset}, not a multiple of "
                           f"the alignment {alignment}")
        header = TensorHeader(name, tuple(dims), GGMLQuantizationType(raw_type), n_elements * type_size // block_size,
                              offset)
        tensors.append((header, offset))

    _check_no_overlap([header for header, _ in tensors])
    data_offset = walk.pos + (-walk.pos % alignment)
    data_end = max((data_offset + offset + header.n_bytes for header, offset in tensors), default=walk.pos)
    return GGUFHeader(version, data_offset, data_end, tuple(header for header, _ in tensors), metadata, array_lengths)


def _check_no_overlap(tensors: list[TensorHeader]) -> None:
    """Two tensors whose data share bytes: llama.cpp would read one tensor's values as another's."""
    end, last = 0, ""
    for tensor in sorted((t for t in tensors if t.n_bytes), key=lambda t: t.offset):
        if tensor.offset < end:
            raise _Damaged(f"the data of the tensors {last!r} and {tensor.name!r} overlap")
        if tensor.offset + tensor.n_bytes > end:
            end, last = tensor.offset + tensor.n_bytes, tensor.name


def header_from_prefix(prefix: bytes, label: str) -> GGUFHeader | None:
    """The header of a GGUF file from its first bytes only (fetched with HTTP Range requests, say); None while
    those bytes end inside the header. Raises GGUFFileError (naming `label`) for bytes that are no GGUF header."""
    if len(prefix) < 8:
        if _MAGIC.startswith(prefix[:4]):
            return None
        raise GGUFFileError(f"{label} is not a GGUF file (it does not start with the GGUF magic).")
    if not prefix.startswith(_MAGIC):
        raise GGUFFileError(f"{label} is not a GGUF file (it does not start with the GGUF magic).")
    order = "<"
    version = int(struct.unpack_from("<I", prefix, 4)[0])
    if version & 0xFFFF == 0:
        order, version = ">", int(struct.unpack_from(">I", prefix, 4)[0])
    if version not in _SUPPORTED_VERSIONS:
        raise GGUFFileError(f"{label} is a GGUF version {version} file, which this qdesk cannot read.")
    try:
        return _walk_header(prefix, order, version)  # type: ignore[arg-type]  # bytes serve as well as an mmap
    except _Truncated:
        return None
    except _Damaged as damage:
        raise GGUFFileError(f"{label} is damaged: {damage}.") from None


def check_gguf(path: Path) -> GGUFHeader:
    """Raise GGUFFileError unless `path` is a complete GGUF file gguf-py can read."""
    if not path.exists():
        raise GGUFFileError(f"{path} does not exist; check the path.")
    if path.is_dir():
        raise GGUFFileError(f"{path} is a folder, not a GGUF file; give the path of a .gguf file "
                            "(a checkpoint folder is converted with `qdesk convert`).")
    try:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size == 0:
                raise GGUFFileError(f"{path} is empty (0 bytes); download or convert it again.")
            buf = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as error:
        raise GGUFFileError(f"{path} cannot be read ({error.strerror or error}); check that it is a "
                            "file you have permission to read.") from error
    with buf:
        head = bytes(buf[:64])
        if not head.startswith(_MAGIC):
            if _MAGIC.startswith(head):
                raise GGUFFileError(f"{path} is truncated: it ends after {size} bytes, inside the GGUF "
                                    "magic; download or convert it again.")
            other = _sniff_other_format(head)
            if other is not None:
                raise GGUFFileError(f"{path} {other}.")
            raise GGUFFileError(f"{path} is not a GGUF file (it does not start with the GGUF magic); "
                                "give a .gguf model file.")
        if size < 8:
            raise GGUFFileError(f"{path} is truncated: it ends after {size} bytes, before the GGUF "
                                "version; download or convert it again.")
        order = "<"
        version = int(struct.unpack_from("<I", buf, 4)[0])
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            order = ">"
            version = int(struct.unpack_from(">I", buf, 4)[0])
        if version not in _SUPPORTED_VERSIONS:
            known = " and ".join(str(v) for v in _SUPPORTED_VERSIONS)
            if version == 1:
                raise GGUFFileError(f"{path} is a GGUF version 1 file, an early format qdesk cannot read "
                                    f"(it reads versions {known}); convert the model again with a "
                                    "current converter.")
            if max(_SUPPORTED_VERSIONS) < version < 100:
                raise GGUFFileError(f"{path} is a GGUF version {version} file, newer than this qdesk can "
                                    f"read (it reads versions {known}); update qdesk.")
            raise GGUFFileError(f"{path} has an invalid GGUF version number ({version}), so it is damaged; "
                                "download or convert it again.")
        try:
            facts = _walk_header(buf, order, version)
        except _Truncated:
            raise GGUFFileError(f"{path} is truncated: its header runs past the end of the file "
                                f"({size} bytes); download or convert it again.") from None
        except _Damaged as damage:
            raise GGUFFileError(f"{path} is damaged: {damage}; download or convert it again.") from None
    if facts.data_end > size:
        raise GGUFFileError(f"{path} is truncated: its tensor data ends at byte {facts.data_end:,} but "
                            f"the file has {size:,} bytes; download or convert it again.")
    return facts


def open_gguf(path: str | os.PathLike[str]) -> gguf.GGUFReader:
    """Open a GGUF file for reading after checking it is complete; raises GGUFFileError if not.

    Tensor data is memory-mapped by the reader, not read.
    """
    path = Path(path)
    check_gguf(path)
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as error:  # the checks above should leave nothing, but never a traceback
        raise GGUFFileError(f"{path} cannot be read as GGUF ({type(error).__name__}: {error}); "
                            "download or convert it again.") from error


_FINGERPRINT_HEAD = 1 << 20
_FINGERPRINT_BLOCKS = 16
_FINGERPRINT_BLOCK = 1 << 16


def file_fingerprint(path: Path) -> str:
    """A digest of a file's size, its first MiB and 16 sampled blocks: changes when the model does, costs ~2 MB."""
    import hashlib

    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(size.to_bytes(8, "little"))
    with path.open("rb") as file:
        digest.update(file.read(_FINGERPRINT_HEAD))
        for index in range(_FINGERPRINT_BLOCKS):
            file.seek(size * index // _FINGERPRINT_BLOCKS)
            digest.update(file.read(_FINGERPRINT_BLOCK))
    return digest.hexdigest()
