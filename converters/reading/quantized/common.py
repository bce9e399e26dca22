"""What every quantized format's reader shares: the result it hands back, and the checks and errors it uses."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from converters.core.errors import CheckpointError, UnsupportedModelError
from converters.reading.checkpoint import SourceTensor
from converters.reading.quantized.raw import RawTensor


@dataclass
class Dequantized:
    """A format reader's answer: float tensors that stand for groups of stored ones, and the source format."""

    description: str
    """The source format for people and for `general.source.quantization`, e.g. "GPTQ 4-bit, group size 128"."""
    tensors: dict[str, SourceTensor] = field(default_factory=dict)
    """Name (`<module>.weight`) → a tensor whose rows are dequantized when read."""
    replaces: dict[str, str] = field(default_factory=dict)
    """Stored tensor name → the name of the dequantized tensor that takes its place (left out of the output)."""

    def add(self, tensor: SourceTensor, stored: list[str]) -> None:
        self.tensors[tensor.name] = tensor
        for name in stored:
            self.replaces[name] = tensor.name


def damaged(tensor: str, reason: str) -> CheckpointError:
    """A packed tensor that does not fit its format (wrong shape, bad values): one sentence."""
    return CheckpointError(f"The quantized tensor {tensor} is damaged ({reason}); download the checkpoint again.")


def unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{what}; use the unquantized release of this model, or one in a format qdesk reads.")


def require(raw: Mapping[str, RawTensor], name: str, dtypes: tuple[str, ...], dims: int) -> RawTensor:
    """The stored tensor `name`, checked for its type and number of dimensions."""
    tensor = raw.get(name)
    if tensor is None:
        raise damaged(name.rsplit(".", 1)[0], f"{name.rsplit('.', 1)[1]} is missing")
    if tensor.dtype not in dtypes:
        raise damaged(name, f"it is stored as {tensor.dtype}, not {' or '.join(dtypes)}")
    if len(tensor.shape) != dims:
        raise damaged(name, f"it has {len(tensor.shape)} dimensions, not {dims}")
    return tensor


def check_shape(tensor: RawTensor, expected: tuple[int, ...]) -> None:
    if tensor.shape != expected:
        raise damaged(tensor.name, f"its shape is {list(tensor.shape)} where the format needs {list(expected)}")


def check_bits(bits: Any, allowed: tuple[int, ...], method: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
        raise unsupported(f"This {method} checkpoint stores {bits}-bit weights and qdesk reads "
                          f"{', '.join(str(b) for b in allowed)}-bit {method} weights")
    return bits


def check_finite(tensor_name: str, values: np.ndarray) -> None:
    if not np.isfinite(values).all():
        raise damaged(tensor_name, "its scales hold infinities or NaNs")


def rows_reader(shape: tuple[int, int], dtype: str, name: str,
                read: Callable[[int, int], np.ndarray]) -> SourceTensor:
    """A dequantized [out, in] weight whose rows [start, stop) come from `read` as float32."""
    return SourceTensor(name, shape, dtype, read)
