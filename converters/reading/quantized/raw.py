"""A checkpoint's tensors in the types they are stored in (packed integers, FP8, scales), read without conversion.

The float reader (`SourceTensor.read_rows`) widens everything to float32, which would corrupt packed 32-bit words;
quantized formats read their tensors here instead. Safetensors are memory-mapped, so a slice of a packed tensor
reads only the pages it touches; `.bin` files go through `torch.load(weights_only=True)` like everything else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters.core.errors import CheckpointError
from converters.reading.safetensors_file import SafetensorsFile, bf16_to_f32

_NUMPY_TYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "u1", "F8_E4M3": "u1", "F8_E5M2": "u1",
}
"""How each stored type is held here: BF16 and FP8 as their bit patterns, decoded by `to_float32`."""


@dataclass(frozen=True)
class RawTensor:
    """One stored tensor: its name, shape, safetensors dtype name and its values in that type."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    read: Callable[[], np.ndarray]
    """The whole tensor as a numpy array of the stored type (a memory map for safetensors)."""


def raw_tensors(weight_files: tuple[Path, ...]) -> dict[str, RawTensor]:
    """Every tensor of these weight files, by name, not yet read."""
    tensors: dict[str, RawTensor] = {}
    for path in weight_files:
        tensors.update(_safetensors_raw(path) if path.suffix == ".safetensors" else _torch_raw(path))
    return tensors


def _safetensors_raw(path: Path) -> dict[str, RawTensor]:
    file = SafetensorsFile(path)

    def reader(dtype: str, shape: tuple[int, ...], offset: int) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            if 0 in shape:
                return np.empty(shape, dtype=_NUMPY_TYPES[dtype])
            return np.memmap(path, dtype=_NUMPY_TYPES[dtype], mode="r", offset=offset, shape=shape)

        return read

    return {name: RawTensor(name, entry.shape, entry.dtype,
                            reader(entry.dtype, entry.shape, file.data_start + entry.begin))
            for name, entry in file.entries.items()}


_TORCH_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
                "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


def _torch_raw(path: Path) -> dict[str, RawTensor]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # the float reader has already opened this file and explained any failure
        raise CheckpointError(f"{path.name} cannot be read as a PyTorch checkpoint ({error}); download it again.") \
            from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]

    def reader(tensor: torch.Tensor, dtype: str) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            if dtype == "BF16":
                return tensor.view(torch.int16).numpy().view(np.uint16)
            if dtype.startswith("F8"):
                return tensor.view(torch.uint8).numpy()
            return tensor.numpy()

        return read

    tensors: dict[str, RawTensor] = {}
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor):
            dtype = _TORCH_NAMES.get(str(tensor.dtype).removeprefix("torch."), str(tensor.dtype))
            tensors[name] = RawTensor(name, tuple(tensor.shape), dtype, reader(tensor, dtype))
    return tensors


def _e4m3fn_table() -> np.ndarray:
    """The 256 values of FP8 E4M3FN (bias 7, no infinities, 0x7F/0xFF are NaN)."""
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exponent = (codes >> 3) & 0xF
    mantissa = codes & 0x7
    normal = (1.0 + mantissa / 8.0) * np.exp2(exponent - 7.0)
    subnormal = (mantissa / 8.0) * np.exp2(-6.0)
    values = sign * np.where(exponent == 0, subnormal, normal)
    values[(exponent == 0xF) & (mantissa == 0x7)] = np.nan
    return values.astype(np.float32)


_E4M3FN = _e4m3fn_table()
FLOAT_TYPES = ("F32", "F16", "BF16", "F64", "F8_E4M3", "F8_E5M2")


def to_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values of a float `dtype` (as `RawTensor.read` returns them) as float32."""
    if dtype == "F8_E4M3":
        return _E4M3FN[np.asarray(values, dtype=np.uint8)]
    if dtype == "F8_E5M2":  # the upper byte of an IEEE half
        return (np.asarray(values, dtype=np.uint8).astype(np.uint16) << 8).view(np.float16).astype(np.float32)
    if dtype == "BF16":
        return bf16_to_f32(np.asarray(values))
    if dtype in ("F32", "F16", "F64"):
        return np.asarray(values).astype(np.float32)
    raise CheckpointError(f"a tensor stored as {dtype} is not a float tensor; the checkpoint is damaged.")


def round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded (to nearest, ties to even) to F16 or BF16 and widened back; F32 as it is.

    Reference loaders compute a dequantized weight in the dtype of its scales, so the result is rounded there.
    """
    if dtype == "F16":
        return values.astype(np.float16).astype(np.float32)
    if dtype == "BF16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
        return np.where(np.isnan(values), values, rounded.view(np.float32))
    return np.asarray(values, dtype=np.float32)
