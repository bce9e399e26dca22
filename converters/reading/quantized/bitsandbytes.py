"""bitsandbytes checkpoints as transformers serializes them (`quant_method: bitsandbytes`).

4-bit (NF4, FP4), per linear layer `<m>`: `<m>.weight` holds the [out, in] weight flattened row-major, two 4-bit
codes a byte (the first in the high nibble), in whatever storage type was chosen (uint8 by default);
`<m>.weight.quant_map` [16] the value of each code; `<m>.weight.absmax` one scale per block of `blocksize`
values; `<m>.weight.quant_state.bitsandbytes__nf4` (or `__fp4`) a JSON document as bytes with the shape,
blocksize, output dtype and, for double quantization, `nested_blocksize` and `nested_offset`: the absmax values
are then themselves 8-bit codes into `<m>.weight.nested_quant_map`, scaled per block of `nested_blocksize` by
`<m>.weight.nested_absmax`, plus the offset. The weight is `quant_map[code] · absmax[block]` in float32, cast
to the stored dtype.

LLM.int8: `<m>.weight` int8 [out, in], `<m>.SCB` float32 [out] (each row's absolute maximum), `<m>.weight_format`
(0 for the row-major layout). The weight is `w · SCB[row] · (1/127)` as bitsandbytes computes it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from converters.reading.quantized.common import Dequantized, check_finite, check_shape, damaged, require, rows_reader
from converters.reading.quantized.raw import RawTensor, round_to

QUANT_STATE = ".quant_state.bitsandbytes__"
INT8_INVERSE_MAX = np.float32(7.874015718698502e-3)
"""1/127 as bitsandbytes multiplies by it (not a division), so the rounding matches."""
_OUTPUT_TYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def read_bitsandbytes(raw: Mapping[str, RawTensor], settings: Mapping[str, Any], model_dtype: str) -> Dequantized:
    del model_dtype  # the weights are computed in the type of their scales, not the model's
    result = Dequantized(_describe(settings))
    for name in list(raw):
        if QUANT_STATE in name:
            _add_4bit(result, raw, name)
        elif name.endswith(".SCB"):
            _add_int8(result, raw, name.removesuffix(".SCB"))
    if not result.tensors:
        raise damaged("of this bitsandbytes checkpoint", "config.json names bitsandbytes but no weight is quantized")
    return result


def _describe(settings: Mapping[str, Any]) -> str:
    if settings.get("load_in_8bit"):
        return "bitsandbytes LLM.int8"
    kind = str(settings.get("bnb_4bit_quant_type", "fp4")).upper()
    return f"bitsandbytes {kind}{' double-quantized' if settings.get('bnb_4bit_use_double_quant') else ''}"


def _add_4bit(result: Dequantized, raw: Mapping[str, RawTensor], state_name: str) -> None:
    weight_name, _, kind = state_name.partition(QUANT_STATE)
    state_tensor = require(raw, state_name, ("U8",), 1)
    try:
        state = json.loads(bytes(np.asarray(state_tensor.read())).decode("utf-8"))
        shape = tuple(int(v) for v in state["shape"])
        blocksize = int(state["blocksize"])
        output_type = _OUTPUT_TYPES[str(state.get("dtype", "float32")).removeprefix("torch.")]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise damaged(state_name, f"its quantization state is not the JSON bitsandbytes writes ({error})") from error
    if kind not in ("nf4", "fp4") or len(shape) != 2 or blocksize <= 0:
        raise damaged(state_name, f"it describes a {kind} weight of shape {list(shape)} in blocks of {blocksize}")
    packed = raw.get(weight_name)
    if packed is None:
        raise damaged(weight_name, "the packed weight is missing")
    count = math.prod(shape)
    item = np.asarray(packed.read()).dtype.itemsize
    packed_bytes = math.prod(packed.shape) * item
    if not -(-count // 2) <= packed_bytes < -(-count // 2) + item:
        raise damaged(weight_name, f"it holds {packed_bytes} bytes for {count} 4-bit values")
    quant_map = require(raw, f"{weight_name}.quant_map", ("F32",), 1)
    check_shape(quant_map, (16,))
    absmax = require(raw, f"{weight_name}.absmax", ("F32", "U8"), 1)
    blocks = -(-count // blocksize)
    check_shape(absmax, (blocks,))
    stored = [weight_name, state_name, quant_map.name, absmax.name]
    nested = None
    if absmax.dtype == "U8":
        nested_map = require(raw, f"{weight_name}.nested_quant_map", ("F32",), 1)
        nested_absmax = require(raw, f"{weight_name}.nested_absmax", ("F32",), 1)
        check_shape(nested_map, (256,))
        try:
            nested_block, offset = int(state["nested_blocksize"]), float(state["nested_offset"])
        except (KeyError, TypeError, ValueError) as error:
            raise damaged(state_name, "its double quantization lacks a nested block size or offset") from error
        check_shape(nested_absmax, (-(-blocks // nested_block),))
        nested = (nested_map, nested_absmax, nested_block, np.float32(offset))
        stored += [nested_map.name, nested_absmax.name]
    row_length = shape[1]

    def block_scales() -> np.ndarray:
        if nested is None:
            return np.asarray(absmax.read(), dtype=np.float32)
        codes_map, scales, size, offset = nested
        values = np.asarray(codes_map.read())[np.asarray(absmax.read())]
        return values * np.repeat(np.asarray(scales.read()), size)[: values.size] + offset

    def read(start: int, stop: int) -> np.ndarray:
        first, last = start * row_length, stop * row_length
        data = np.asarray(packed.read()).reshape(-1).view(np.uint8)
        pairs = data[first // 2: -(-last // 2)]
        codes = np.stack([pairs >> 4, pairs & 0x0F], axis=1).reshape(-1)[first % 2: first % 2 + last - first]
        scales = block_scales()
        check_finite(absmax.name, scales)
        block = np.arange(first, last) // blocksize
        values = np.asarray(quant_map.read())[codes] * scales[block]
        return round_to(values.reshape(stop - start, row_length), output_type)

    result.add(rows_reader(shape, output_type, weight_name, read), stored)  # type: ignore[arg-type]


def _add_int8(result: Dequantized, raw: Mapping[str, RawTensor], module: str) -> None:
    weight = require(raw, f"{module}.weight", ("I8",), 2)
    row_scales = require(raw, f"{module}.SCB", ("F32",), 1)
    check_shape(row_scales, (weight.shape[0],))
    stored = [weight.name, row_scales.name]
    layout = raw.get(f"{module}.weight_format")
    if layout is not None:
        if int(np.asarray(layout.read()).reshape(-1)[0]) != 0:
            raise damaged(layout.name, "its weight is in a GPU tile layout rather than row-major; save it again "
                                       "with a current bitsandbytes")
        stored.append(layout.name)

    def read(start: int, stop: int) -> np.ndarray:
        scales = np.asarray(row_scales.read()[start:stop], dtype=np.float32)
        check_finite(row_scales.name, scales)
        values = np.asarray(weight.read()[start:stop]).astype(np.float32)
        return values * scales[:, None] * INT8_INVERSE_MAX

    result.add(rows_reader(weight.shape, "F32", weight.name, read), stored)  # type: ignore[arg-type]
