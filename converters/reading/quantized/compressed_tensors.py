"""compressed-tensors checkpoints (llm-compressor's output, `quant_method: compressed-tensors`).

Formats read, per linear layer `<m>`:
- `float-quantized`: `<m>.weight` FP8 (E4M3 or E5M2), `<m>.weight_scale` per tensor [1], per channel [out, 1],
  per group [out, in/group] or per block [⌈out/bh⌉, ⌈in/bw⌉];
- `int-quantized` / `naive-quantized`: `<m>.weight` int8 with the same scales, `<m>.weight_zero_point` if
  asymmetric;
- `pack-quantized`: `<m>.weight_packed` int32 [out, ⌈in·bits/32⌉] (a bit stream along each row, see `bits.py`),
  values stored with 2^(bits−1) added; `<m>.weight_shape` [out, in]; `<m>.weight_zero_point` packed along the
  output axis when asymmetric; `<m>.weight_g_idx` [in] for act-order group quantization.
The weight is `(q − zero) · scale`, in the scale's type. Activation and KV-cache scales (`input_scale`,
`output_scale`, `k_scale`, `v_scale`) describe quantized activations, which llama.cpp does not apply: they are
left out. Rotations (`transform_config`) and FP4 formats are refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from converters.reading.quantized.bits import packed_length, unpack_bits
from converters.reading.quantized.common import (
    Dequantized,
    check_finite,
    check_shape,
    damaged,
    require,
    rows_reader,
    unsupported,
)
from converters.reading.quantized.raw import FLOAT_TYPES, RawTensor, round_to, to_float32

FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized")
SCALE_TYPES = ("F32", "F16", "BF16")
ACTIVATION_SUFFIXES = (".input_scale", ".input_zero_point", ".output_scale", ".output_zero_point", ".k_scale",
                       ".v_scale", ".input_global_scale")


@dataclass(frozen=True)
class WeightArgs:
    """The `weights` block of one config group."""

    num_bits: int
    kind: str
    strategy: str
    group_size: int | None
    block_structure: tuple[int, int] | None
    symmetric: bool
    format: str

    @property
    def described(self) -> str:
        kind = f"FP{self.num_bits}" if self.kind == "float" else f"int{self.num_bits}"
        grain = {"tensor": "per tensor", "channel": "per channel", "group": f"group size {self.group_size}",
                 "block": f"blocks of {self.block_structure}"}.get(self.strategy, self.strategy)
        return f"{kind} {grain}{'' if self.symmetric else ' asymmetric'}"


def read_compressed_tensors(raw: Mapping[str, RawTensor], settings: Mapping[str, Any], model_dtype: str) -> Dequantized:
    del model_dtype  # the weights are computed in the type of their scales, not the model's
    if settings.get("transform_config"):
        raise unsupported("This compressed-tensors checkpoint rotates its weights (transform_config), which qdesk "
                          "cannot undo")
    if settings.get("sparsity_config") and settings["sparsity_config"].get("format") not in (None, "dense"):
        raise unsupported("This compressed-tensors checkpoint is stored sparse, which qdesk cannot read")
    groups = _config_groups(settings)
    result = Dequantized("compressed-tensors " + ", ".join(sorted({args.described for _, args in groups})))
    for name in raw:
        module, _, leaf = name.rpartition(".")
        if leaf in ("weight_packed",) or (leaf == "weight" and f"{module}.weight_scale" in raw):
            _add_layer(result, raw, module, _args_for(module, groups))
    for name in raw:
        if name.endswith(ACTIVATION_SUFFIXES):
            result.replaces[name] = ""
    if not result.tensors:
        raise damaged("of this compressed-tensors checkpoint", "config.json names it but no weight has a scale")
    return result


def _config_groups(settings: Mapping[str, Any]) -> list[tuple[list[str], WeightArgs]]:
    default_format = str(settings.get("format") or "")
    found = []
    for group in (settings.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        if not weights:
            continue
        group_format = str(group.get("format") or default_format)
        if group_format not in FORMATS:
            raise unsupported(f"This compressed-tensors checkpoint is stored as {group_format or 'an unnamed format'}"
                              f" and qdesk reads {', '.join(FORMATS)}")
        kind = str(weights.get("type", "int"))
        bits = int(weights.get("num_bits", 8))
        readable = (kind == "float" and bits == 8) or (kind == "int" and 1 <= bits <= 8)
        if not readable:
            raise unsupported(f"This compressed-tensors checkpoint stores {kind}{bits} weights and qdesk reads FP8 "
                              "and 1- to 8-bit integer weights")
        block = weights.get("block_structure")
        found.append((list(group.get("targets") or []), WeightArgs(
            num_bits=bits, kind=kind, strategy=str(weights.get("strategy", "tensor")),
            group_size=weights.get("group_size"), block_structure=tuple(block) if block else None,
            symmetric=bool(weights.get("symmetric", True)), format=group_format)))
    if not found:
        raise damaged("of this compressed-tensors checkpoint", "its config names no quantized weights")
    return found


def _args_for(module: str, groups: list[tuple[list[str], WeightArgs]]) -> WeightArgs:
    """The config group whose targets name this module: a `re:` pattern, the module's name, or a layer class."""
    if len(groups) == 1:
        return groups[0][1]
    for targets, args in groups:
        for target in targets:
            if target.startswith("re:") and re.search(target[3:], module):
                return args
            if module == target or module.endswith("." + target):
                return args
    for targets, args in groups:
        if any(not target.startswith("re:") and target[:1].isupper() for target in targets):
            return args  # a class name such as "Linear": every linear layer not named by another group
    raise damaged(module, "no config group of the checkpoint names it")


def _add_layer(result: Dequantized, raw: Mapping[str, RawTensor], module: str, args: WeightArgs) -> None:
    scale = require(raw, f"{module}.weight_scale", SCALE_TYPES, len(raw[f"{module}.weight_scale"].shape))
    stored = [scale.name]
    if args.format == "pack-quantized":
        packed = require(raw, f"{module}.weight_packed", ("I32",), 2)
        shape_tensor = require(raw, f"{module}.weight_shape", ("I64", "I32"), 1)
        out_features, in_features = (int(v) for v in np.asarray(shape_tensor.read()))
        check_shape(packed, (out_features, packed_length(in_features, args.num_bits)))
        stored += [packed.name, shape_tensor.name]
        offset = 1 << (args.num_bits - 1)

        def codes(start: int, stop: int) -> np.ndarray:
            values = unpack_bits(np.asarray(packed.read()[start:stop]), args.num_bits, in_features, axis=1)
            return values.astype(np.float32) - offset
    else:
        weight = require(raw, f"{module}.weight", (*FLOAT_TYPES, "I8"), 2)
        if args.kind == "float" and not weight.dtype.startswith("F8"):
            raise damaged(weight.name, f"the config says FP8 but it is stored as {weight.dtype}")
        out_features, in_features = weight.shape
        stored.append(weight.name)

        def codes(start: int, stop: int) -> np.ndarray:
            values = np.asarray(weight.read()[start:stop])
            return values.astype(np.float32) if weight.dtype == "I8" else to_float32(values, weight.dtype)

    columns_of_group = _column_groups(raw, module, args, in_features, stored)
    scale_rows = _scale_rows(args, out_features, in_features, scale.shape, scale.name)
    zero = _zero_points(raw, module, args, scale.shape, out_features, stored)

    def spread(table: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a scale-shaped table, one value per weight (or per row, to broadcast)."""
        rows = table[scale_rows[start:stop]]
        return rows[:, columns_of_group] if rows.shape[1] > 1 else rows

    def read(start: int, stop: int) -> np.ndarray:
        scales = to_float32(np.asarray(scale.read()).reshape(scale.shape[0], -1), scale.dtype)
        check_finite(scale.name, scales)
        values = codes(start, stop)
        if zero is not None:
            values = values - spread(zero, start, stop)
        return round_to(values * spread(scales, start, stop), scale.dtype)

    result.add(rows_reader((out_features, in_features), scale.dtype, f"{module}.weight", read), stored)


def _column_groups(raw: Mapping[str, RawTensor], module: str, args: WeightArgs, in_features: int,
                   stored: list[str]) -> np.ndarray:
    """For each input column, the column of the scale (and zero point) that applies to it."""
    g_idx = raw.get(f"{module}.weight_g_idx")
    if g_idx is not None:
        stored.append(g_idx.name)
        return np.asarray(g_idx.read()).astype(np.int64)
    if args.strategy in ("group", "tensor_group") and args.group_size:
        return np.arange(in_features) // int(args.group_size)
    if args.strategy == "block" and args.block_structure:
        return np.arange(in_features) // int(args.block_structure[1])
    return np.zeros(in_features, dtype=np.int64)


def _scale_rows(args: WeightArgs, out_features: int, in_features: int, shape: tuple[int, ...],
                name: str) -> np.ndarray:
    """For each output row, the row of the scale that applies to it; checks the scale's shape on the way."""
    if args.strategy == "tensor":
        expected: tuple[int, ...] = (math.prod(shape),)
        if expected != (1,):
            raise damaged(name, f"a per-tensor scale holds {expected[0]} values")
        return np.zeros(out_features, dtype=np.int64)
    if args.strategy == "block" and args.block_structure:
        height, width = args.block_structure
        expected = (-(-out_features // height), -(-in_features // width))
        if tuple(shape) != expected:
            raise damaged(name, f"its shape is {list(shape)} where blocks of {height}×{width} need {list(expected)}")
        return np.arange(out_features) // height
    columns = 1 if args.strategy == "channel" else -(-in_features // int(args.group_size or in_features))
    if shape[0] != out_features or math.prod(shape) != out_features * columns:
        raise damaged(name, f"its shape is {list(shape)} for a weight of {out_features}×{in_features}")
    return np.arange(out_features)


def _zero_points(raw: Mapping[str, RawTensor], module: str, args: WeightArgs, scale_shape: tuple[int, ...],
                 out_features: int, stored: list[str]) -> np.ndarray | None:
    tensor = raw.get(f"{module}.weight_zero_point")
    if tensor is None or args.symmetric:
        if tensor is not None:
            stored.append(tensor.name)
        return None
    stored.append(tensor.name)
    columns = math.prod(scale_shape) // scale_shape[0] if scale_shape else 1
    if args.format == "pack-quantized" and args.strategy in ("group", "channel"):
        check_shape(tensor, (packed_length(out_features, args.num_bits), columns))
        values = unpack_bits(np.asarray(tensor.read()), args.num_bits, out_features, axis=0)
        return values.astype(np.float32) - (1 << (args.num_bits - 1))
    values = np.asarray(tensor.read()).astype(np.float32)
    if values.size != math.prod(scale_shape):
        raise damaged(tensor.name, f"it holds {values.size} zero points for {math.prod(scale_shape)} scales")
    return values.reshape(scale_shape[0] if scale_shape else 1, -1)
