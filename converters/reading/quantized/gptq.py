"""GPTQ checkpoints as AutoGPTQ, optimum, transformers and GPTQModel write them.

Per linear layer `<m>`: `<m>.qweight` int32 [in·bits/32, out] (input channels packed along the first axis),
`<m>.qzeros` int32 [groups, out·bits/32] (packed along the second axis), `<m>.scales` [groups, out] (float16
usually), `<m>.g_idx` int32 [in] (each input channel's group; act-order checkpoints permute it, others hold
i // group_size), `<m>.bias` unchanged. Values are packed as a little-endian bit stream (see `bits.py`), 3-bit
values straddling words. The original GPTQ format ("gptq", v1) stores each zero point minus one; GPTQModel's
internal "gptq_v2" stores it as it is. The weight is `scales[g] · (q − zero[g])` with g = g_idx[i], computed in
the scales' type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from converters.reading.quantized.bits import packed_length, unpack_bits
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

BITS = (2, 3, 4, 8)
SCALE_TYPES = ("F16", "BF16", "F32")


def read_gptq(raw: Mapping[str, RawTensor], settings: Mapping[str, Any], model_dtype: str) -> Dequantized:
    del model_dtype  # the weights are computed in the type of their scales, not the model's
    bits = check_bits(settings.get("bits"), BITS, "GPTQ")
    checkpoint_format = str(settings.get("checkpoint_format") or settings.get("format") or "gptq").lower()
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise unsupported(f"This GPTQ checkpoint is stored in the {checkpoint_format} layout, which qdesk cannot "
                          "read (it reads the gptq and gptq_v2 layouts)")
    group_size = int(settings.get("group_size") or -1)
    act_order = bool(settings.get("desc_act"))
    symmetric = bool(settings.get("sym", True))
    described = (f"GPTQ {bits}-bit, {'per channel' if group_size <= 0 else f'group size {group_size}'}"
                 f"{', act-order' if act_order else ''}{'' if symmetric else ', asymmetric'}")
    result = Dequantized(described)
    for name in raw:
        if name.endswith(".qweight"):
            _add_layer(result, raw, name.removesuffix(".qweight"), bits, group_size,
                       zero_offset=1 if checkpoint_format == "gptq" else 0)
    if not result.tensors:
        raise damaged("of this GPTQ checkpoint", "config.json names GPTQ but no tensor is a qweight")
    return result


def _add_layer(result: Dequantized, raw: Mapping[str, RawTensor], module: str, bits: int, group_size: int,
               zero_offset: int) -> None:
    qweight = require(raw, f"{module}.qweight", ("I32", "U32"), 2)
    scales = require(raw, f"{module}.scales", SCALE_TYPES, 2)
    qzeros = require(raw, f"{module}.qzeros", ("I32", "U32"), 2)
    out_features = qweight.shape[1]
    groups = scales.shape[0]
    g_idx_tensor = raw.get(f"{module}.g_idx")
    if g_idx_tensor is not None:
        g_idx_tensor = require(raw, f"{module}.g_idx", ("I32", "I64"), 1)
        in_features = g_idx_tensor.shape[0]
    else:
        in_features = qweight.shape[0] * 32 // bits
    check_shape(qweight, (packed_length(in_features, bits), out_features))
    check_shape(scales, (groups, out_features))
    check_shape(qzeros, (groups, packed_length(out_features, bits)))
    if g_idx_tensor is None and groups != (1 if group_size <= 0 else -(-in_features // group_size)):
        raise damaged(scales.name, f"it has {groups} groups for {in_features} inputs in groups of {group_size}")
    stored = [qweight.name, scales.name, qzeros.name] + ([g_idx_tensor.name] if g_idx_tensor is not None else [])

    def group_of_inputs() -> np.ndarray:
        if g_idx_tensor is None:
            return np.arange(in_features) // (in_features if group_size <= 0 else group_size)
        indices = np.asarray(g_idx_tensor.read()).astype(np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= groups):
            raise damaged(g_idx_tensor.name, f"it names groups outside 0…{groups - 1}")
        return indices

    def read(start: int, stop: int) -> np.ndarray:
        group = group_of_inputs()
        codes = unpack_bits(qweight.read()[:, start:stop], bits, in_features, axis=0).astype(np.float32)
        zero_codes = unpack_bits(qzeros.read(), bits, out_features, axis=1)[:, start:stop]
        zeros = zero_codes.astype(np.float32) + zero_offset
        scale = to_float32(np.asarray(scales.read()[:, start:stop]), scales.dtype)
        check_finite(scales.name, scale)
        weight = scale[group] * (codes - zeros[group])
        return round_to(weight.T, scales.dtype)

    result.add(rows_reader((out_features, in_features), scales.dtype, f"{module}.weight", read), stored)
