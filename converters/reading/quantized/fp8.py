"""Block-scaled FP8 checkpoints (`quant_method: fp8`: DeepSeek V3, Qwen3 and Llama FP8 releases, as transformers'
fine-grained FP8 support reads them).

Per linear layer `<m>`: `<m>.weight` FP8 E4M3 [out, in] and `<m>.weight_scale_inv` [⌈out/bh⌉, ⌈in/bw⌉], one scale
per block of `weight_block_size` = [bh, bw] (float32, or 8-bit E8M0 exponents meaning 2^(e−127)); without a block
size, one scale for the tensor. Despite its name the scale multiplies: the weight is `w · scale[i // bh, j // bw]`,
in float32, cast to the model's dtype. Activation scales (`activation_scale`, for static activation schemes) are
left out, as llama.cpp computes with full-precision activations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from converters.reading.quantized.common import Dequantized, check_finite, damaged, require, rows_reader, unsupported
from converters.reading.quantized.raw import RawTensor, round_to, to_float32

SCALE_TYPES = ("F32", "BF16", "F16", "U8")
E8M0_BIAS = 127


def read_fp8(raw: Mapping[str, RawTensor], settings: Mapping[str, Any], model_dtype: str) -> Dequantized:
    block = settings.get("weight_block_size")
    if block is not None and (len(block) != 2 or not all(isinstance(v, int) and v > 0 for v in block)):
        raise unsupported(f"This FP8 checkpoint names weight_block_size {block}, which is not two block sides")
    fmt = str(settings.get("fmt", "e4m3")).lower()
    if fmt != "e4m3":
        raise unsupported(f"This FP8 checkpoint stores {fmt} weights and qdesk reads e4m3 ones")
    grain = f"blocks of {block[0]}×{block[1]}" if block else "per tensor"
    result = Dequantized(f"FP8 E4M3, {grain}")
    for name in raw:
        if name.endswith(".weight_scale_inv"):
            _add_layer(result, raw, name.removesuffix(".weight_scale_inv"), tuple(block) if block else None,
                       model_dtype)
        elif name.endswith((".activation_scale", ".input_scale")):
            result.replaces[name] = ""
    if not result.tensors:
        raise damaged("of this FP8 checkpoint", "config.json names FP8 but no weight has a weight_scale_inv")
    return result


def _add_layer(result: Dequantized, raw: Mapping[str, RawTensor], module: str, block: tuple[int, int] | None,
               model_dtype: str) -> None:
    weight = require(raw, f"{module}.weight", ("F8_E4M3",), 2)
    scale = raw[f"{module}.weight_scale_inv"]
    if scale.dtype not in SCALE_TYPES:
        raise damaged(scale.name, f"it is stored as {scale.dtype}")
    out_features, in_features = weight.shape
    height, width = block if block is not None else (out_features, in_features)
    expected = (-(-out_features // height), -(-in_features // width))
    if math.prod(scale.shape) != math.prod(expected) or (len(scale.shape) == 2 and tuple(scale.shape) != expected):
        raise damaged(scale.name, f"its shape is {list(scale.shape)} where blocks of {height}×{width} need "
                                  f"{list(expected)}")
    column_block = np.arange(in_features) // width

    def read(start: int, stop: int) -> np.ndarray:
        stored = np.asarray(scale.read()).reshape(expected)
        if scale.dtype == "U8":
            scales = np.exp2(stored.astype(np.float32) - E8M0_BIAS)
        else:
            scales = to_float32(stored, scale.dtype)
        check_finite(scale.name, scales)
        values = to_float32(np.asarray(weight.read()[start:stop]), weight.dtype)
        per_weight = scales[np.arange(start, stop) // height][:, column_block]
        return round_to(values * per_weight, model_dtype)

    result.add(rows_reader((out_features, in_features), model_dtype, weight.name, read),
               [weight.name, scale.name])
