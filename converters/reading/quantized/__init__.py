"""Quantized checkpoints as conversion sources: GPTQ, AWQ, compressed-tensors and bitsandbytes.

`dequantizing(checkpoint)` returns the checkpoint with each quantized layer's stored tensors (packed codes,
scales, zero points, group indices) replaced by one float tensor, `<module>.weight`, whose rows are dequantized
as the converter reads them, a slice at a time, exactly as the format's reference loader computes them. The
converter then treats the checkpoint like any float one. The format is read from `quantization_config` in
config.json (or an AutoGPTQ `quantize_config.json`); anything else quantized is refused in one sentence.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from converters.core.errors import CheckpointError, UnsupportedModelError
from converters.reading.checkpoint import Checkpoint, SourceTensor
from converters.reading.quantized.awq import read_awq
from converters.reading.quantized.bitsandbytes import read_bitsandbytes
from converters.reading.quantized.common import Dequantized
from converters.reading.quantized.compressed_tensors import read_compressed_tensors
from converters.reading.quantized.fp8 import read_fp8
from converters.reading.quantized.gptq import read_gptq
from converters.reading.quantized.raw import RawTensor, raw_tensors

FormatReader = Callable[[Mapping[str, RawTensor], Mapping[str, Any], str], Dequantized]
"""(stored tensors, quantization_config, the model's dtype as a safetensors type name) → what they stand for."""

READERS: dict[str, FormatReader] = {
    "gptq": read_gptq,
    "awq": read_awq,
    "compressed-tensors": read_compressed_tensors,
    "bitsandbytes": read_bitsandbytes,
    "fp8": read_fp8,
}
READABLE = ("GPTQ, AWQ (GEMM), compressed-tensors (FP8, packed int4/int8), block-scaled FP8 and bitsandbytes (NF4, "
            "FP4, LLM.int8)")
_MODEL_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def quantization_settings(checkpoint: Checkpoint) -> Mapping[str, Any] | None:
    """The checkpoint's `quantization_config` (or AutoGPTQ's `quantize_config.json`), None for a float one."""
    settings = checkpoint.config.get("quantization_config")
    if settings is None:
        legacy = checkpoint.folder / "quantize_config.json"
        if legacy.is_file():
            try:
                settings = {"quant_method": "gptq", **json.loads(legacy.read_text(encoding="utf-8"))}
            except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as error:
                raise CheckpointError(f"{legacy} is not valid JSON ({error}); download the checkpoint again.") \
                    from error
    if settings is None:
        return None
    if not isinstance(settings, Mapping):
        raise CheckpointError("config.json's quantization_config is not a JSON object; download the checkpoint again.")
    return settings


def dequantizing(checkpoint: Checkpoint) -> tuple[Checkpoint, str | None]:
    """The checkpoint with its quantized layers read as float tensors, and the source format's description
    (None when the checkpoint is not quantized). Shapes and types are checked here, before anything is written."""
    settings = quantization_settings(checkpoint)
    if settings is None:
        return checkpoint, None
    method = str(settings.get("quant_method", "")).lower().replace("_", "-")
    reader = READERS.get(method)
    if reader is None:
        raise UnsupportedModelError(
            f"This checkpoint is quantized with {method or 'an unnamed method'}, which qdesk cannot read; it reads "
            f"{READABLE} checkpoints, so use one of those or the unquantized release."
        )
    model_dtype = _MODEL_DTYPES.get(str(checkpoint.config.get("dtype", "torch_dtype", default="")), "F32")
    found = reader(raw_tensors(checkpoint.weight_files), settings, model_dtype)
    return replace(checkpoint, tensors=_merged(checkpoint.tensors, found)), found.description


def _merged(stored: Mapping[str, SourceTensor], found: Dequantized) -> dict[str, SourceTensor]:
    """The stored tensors in their order, each group of quantized ones replaced (where its first stood) by the
    float tensor that stands for it; activation scales, which have no float counterpart, are left out."""
    merged: dict[str, SourceTensor] = {}
    for name, tensor in stored.items():
        standing_for = found.replaces.get(name)
        if standing_for is None:
            merged[name] = tensor
        elif standing_for and standing_for not in merged:
            merged[standing_for] = found.tensors[standing_for]
    return merged
