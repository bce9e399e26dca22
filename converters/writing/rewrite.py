"""A GGUF copied tensor by tensor with some tensors' values changed: every key of the source kept, in order.

What an adapter merge (converters/writing/lora_merge.py) and activation-aware scaling
(converters/quantization/awq.py) write: the same model file with a few tensors replaced, streamed so that memory
holds one slice of one tensor. A changed tensor keeps its name, shape and type; the caller gives, per name, a
function from the source tensor to the new values (float32 rows, encoded here in the tensor's type).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from converters.core.jobs import CancelToken, Progress, ProgressFn
from converters.writing.gguf_stream import StreamingGGUFWriter
from converters.writing.tensor_types import encode

QType = gguf.GGMLQuantizationType
FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)
ROWS_PER_STEP = 4096

RowsFunction = Callable[[Any], Iterator[np.ndarray]]
"""From a source tensor (gguf-py's ReaderTensor) to its new values as float32 slices of rows, in order."""


def rewrite_gguf(reader: gguf.GGUFReader, output: Path, changed: Mapping[str, RowsFunction],
                 extra_metadata: Mapping[str, str], progress: ProgressFn, cancel: CancelToken) -> None:
    """Write `reader`'s file to `output` with the tensors in `changed` replaced and `extra_metadata` added."""
    writer = StreamingGGUFWriter(output, string_value(reader, "general.architecture") or "llama")
    try:
        copy_metadata(reader, writer.metadata, skip=tuple(extra_metadata))
        for key, value in extra_metadata.items():
            writer.metadata.add_string(key, value)
        declared = [writer.declare(t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type)
                    for t in reader.tensors]
        writer.begin_data()
        for index, (tensor, target) in enumerate(zip(reader.tensors, declared, strict=True)):
            cancel.raise_if_cancelled()
            progress(Progress(index, len(declared), "tensors", tensor.name))
            if tensor.name in changed:
                writer.write(target, (encode(rows.astype(np.float32), tensor.tensor_type)
                                      for rows in changed[tensor.name](tensor)))
            else:
                writer.write(target, iter([np.asarray(tensor.data)]))
        progress(Progress(len(declared), len(declared), "tensors", "done"))
    finally:
        writer.close()


def row_steps(tensor: Any) -> Iterator[tuple[int, int]]:
    """(start, stop) of the slices of rows a changed tensor is rewritten in."""
    rows = int(np.prod(tensor.shape[1:])) if len(tensor.shape) > 1 else 1
    for start in range(0, rows, ROWS_PER_STEP):
        yield start, min(rows, start + ROWS_PER_STEP)


def as_float(tensor: Any, start: int = 0, stop: int | None = None, *, rows: np.ndarray | None = None) -> np.ndarray:
    """Rows `start:stop` of a GGUF tensor, or the rows numbered `rows`, as float32 (a 1-D tensor is one row); only
    those rows are read from the file."""
    data = np.asarray(tensor.data)
    if data.ndim == 1:
        data = data.reshape(1, -1)
    data = data[rows] if rows is not None else data[start:stop]
    if tensor.tensor_type == QType.BF16:
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if tensor.tensor_type in (QType.F32, QType.F16):
        return data.astype(np.float32)
    return gguf.quants.dequantize(data, tensor.tensor_type)


def string_value(reader: gguf.GGUFReader, key: str) -> str | None:
    field = reader.fields.get(key)
    return None if field is None else str(field.contents())


_WRITER_OWNED = ("GGUF.", "general.architecture", "general.alignment")


def copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, skip: tuple[str, ...] = ()) -> None:
    """Every key of the source file, in order, with its type (the writer adds the architecture itself), but
    those in `skip` (the keys the caller writes anew)."""
    for name, field in reader.fields.items():
        if name.startswith(_WRITER_OWNED) or name in skip:
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(name, field.contents(), value_type, sub_type=sub_type)
