"""Output types of the converter and how each tensor is encoded at them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import gguf
import numpy as np

QType = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class OutType:
    """A `--outtype` choice: the type of weight matrices and the file type it declares."""

    name: str
    matrix_type: QType
    file_type: gguf.LlamaFileType


OUTTYPES: dict[str, OutType] = {
    "f32": OutType("F32", QType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": OutType("F16", QType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": OutType("BF16", QType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": OutType("Q8_0", QType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


def tensor_type(shape: tuple[int, ...], outtype: OutType) -> QType:
    """Vectors stay F32; matrices take the outtype, or F16 when their rows do not fill whole blocks."""
    if len(shape) < 2:
        return QType.F32
    block_size, _ = gguf.GGML_QUANT_SIZES[outtype.matrix_type]
    if shape[-1] % block_size:
        return QType.F16
    return outtype.matrix_type


def encoded_nbytes(shape: tuple[int, ...], qtype: QType) -> int:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block_size * type_size


def encode(values: np.ndarray, qtype: QType) -> np.ndarray:
    """float32 values as the bytes (or plain array) that GGUF stores for `qtype`."""
    if qtype == QType.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype == QType.F16:
        return np.ascontiguousarray(values, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), qtype)
