"""AWQ checkpoints in the GEMM layout (AutoAWQ's default, and what transformers reads as `version: gemm`).

Per linear layer `<m>`: `<m>.qweight` int32 [in, out/8] (output channels packed along the second axis),
`<m>.qzeros` int32 [in/group_size, out/8] packed the same way, `<m>.scales` float16 [in/group_size, out]. Each word
holds eight 4-bit values, but not in column order: the value at bits 4k…4k+3 of word j belongs to output column
8j + ORDER[k]. The weight is `(q − zero[i // group_size]) · scale[i // group_size]`, in the scales' type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from converters.reading.quantized.bits import unpack_bits
from converters.reading.quantized.common import (
    Dequantized,
    check_bits,
    check_finite,
    check_shape,
    damaged,
    require,
    rows_reader,
    unsupported,
)
from converters.reading.quantized.raw import RawTensor, round_to, to_float32

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""Nibble k of a GEMM word holds output column ORDER[k] of its eight."""
_COLUMN_OF_NIBBLE = np.argsort(ORDER)
"""Column c of a word's eight sits in nibble _COLUMN_OF_NIBBLE[c]."""
PACK = 8
SCALE_TYPES = ("F16", "BF16", "F32")


def read_awq(raw: Mapping[str, RawTensor], settings: Mapping[str, Any], model_dtype: str) -> Dequantized:
    del model_dtype  # the weights are computed in the type of their scales, not the model's
    bits = check_bits(settings.get("bits", settings.get("w_bit")), (4,), "AWQ")
    version = str(settings.get("version", "gemm")).lower()
    if version != "gemm":
        raise unsupported(f"This AWQ checkpoint is packed for the {version} kernel and qdesk reads the GEMM layout")
    if settings.get("zero_point") is False:
        raise unsupported("This AWQ checkpoint has no zero points, a variant qdesk cannot read yet")
    group_size = int(settings.get("group_size", settings.get("q_group_size", 128)))
    result = Dequantized(f"AWQ {bits}-bit GEMM, group size {group_size}")
    for name in raw:
        if name.endswith(".qweight"):
            _add_layer(result, raw, name.removesuffix(".qweight"), group_size)
    if not result.tensors:
        raise damaged("of this AWQ checkpoint", "config.json names AWQ but no tensor is a qweight")
    return result


def unpack_gemm(words: np.ndarray) -> np.ndarray:
    """[rows, n] GEMM words → [rows, 8n] 4-bit values in column order."""
    nibbles = unpack_bits(words, 4, words.shape[1] * PACK, axis=1)
    return nibbles.reshape(words.shape[0], -1, PACK)[:, :, _COLUMN_OF_NIBBLE].reshape(words.shape[0], -1)


def _add_layer(result: Dequantized, raw: Mapping[str, RawTensor], module: str, group_size: int) -> None:
    qweight = require(raw, f"{module}.qweight", ("I32", "U32"), 2)
    qzeros = require(raw, f"{module}.qzeros", ("I32", "U32"), 2)
    scales = require(raw, f"{module}.scales", SCALE_TYPES, 2)
    in_features, out_features = qweight.shape[0], qweight.shape[1] * PACK
    if group_size <= 0 or in_features % group_size:
        raise damaged(qweight.name, f"its {in_features} inputs do not split into groups of {group_size}")
    groups = in_features // group_size
    check_shape(scales, (groups, out_features))
    check_shape(qzeros, (groups, out_features // PACK))

    def read(start: int, stop: int) -> np.ndarray:
        first, last = start // PACK, -(-stop // PACK)
        skip = start - first * PACK
        columns = slice(skip, skip + stop - start)
        codes = unpack_gemm(np.asarray(qweight.read()[:, first:last]))[:, columns].astype(np.float32)
        zeros = unpack_gemm(np.asarray(qzeros.read()[:, first:last]))[:, columns].astype(np.float32)
        scale = to_float32(np.asarray(scales.read()[:, start:stop]), scales.dtype)
        check_finite(scales.name, scale)
        group = np.arange(in_features) // group_size
        weight = (codes - zeros[group]) * scale[group]
        return round_to(weight.T, scales.dtype)

    result.add(rows_reader((out_features, in_features), scales.dtype, f"{module}.weight", read),
               [qweight.name, qzeros.name, scales.name])
