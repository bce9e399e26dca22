"""GGUF output written one tensor (or slice of one) at a time, so memory does not grow with the model.

gguf-py's GGUFWriter writes the header, metadata and tensor table; the tensor data that follows is
streamed here in the declared order, each tensor padded to the file's alignment.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import gguf
import numpy as np

from converters.writing.tensor_types import QType, encoded_nbytes


@dataclass(frozen=True)
class DeclaredTensor:
    name: str
    shape: tuple[int, ...]
    qtype: QType

    @property
    def nbytes(self) -> int:
        return encoded_nbytes(self.shape, self.qtype)


class StreamingGGUFWriter:
    """Declare metadata and tensors, `begin_data()`, then `write()` each tensor's bytes in declared order."""

    def __init__(self, path: Path, arch: str) -> None:
        self.path = path
        self.metadata = gguf.GGUFWriter(path=None, arch=arch)
        self.declared: list[DeclaredTensor] = []
        self._file: BinaryIO | None = None

    def declare(self, name: str, shape: tuple[int, ...], qtype: QType) -> DeclaredTensor:
        tensor = DeclaredTensor(name, shape, qtype)
        self.metadata.add_tensor_info(name, shape, np.dtype(np.float32), tensor.nbytes, raw_dtype=qtype)
        self.declared.append(tensor)
        return tensor

    def begin_data(self) -> None:
        self.metadata.write_header_to_file(self.path)
        self.metadata.write_kv_data_to_file()
        self.metadata.write_ti_data_to_file()
        assert self.metadata.fout is not None
        self._file = self.metadata.fout[0]

    def write(self, tensor: DeclaredTensor, pieces: Iterator[np.ndarray]) -> int:
        """Write one declared tensor from its encoded pieces (in row order); returns bytes written."""
        assert self._file is not None, "begin_data() first"
        self.metadata.write_padding(self._file, self._file.tell())
        written = 0
        for piece in pieces:
            self._file.write(memoryview(np.ascontiguousarray(piece)).cast("B"))
            written += piece.nbytes
        if written != tensor.nbytes:
            raise RuntimeError(f"{tensor.name}: wrote {written} bytes, declared {tensor.nbytes}")
        self.metadata.write_padding(self._file, written)
        return written

    def skip_data(self) -> None:
        """Leave every declared tensor's bytes unwritten: extend the file to its full length without writing (a
        hole), for a file whose tensor table is all that will be read."""
        assert self._file is not None, "begin_data() first"
        end = self._file.tell()
        for tensor in self.declared:
            end += (-end) % self.metadata.data_alignment
            end += tensor.nbytes
        end += (-end) % self.metadata.data_alignment
        self._file.truncate(end)

    def close(self) -> None:
        self.metadata.close()
        self._file = None
