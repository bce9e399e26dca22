"""Phi-3 family: Phi3ForCausalLM (Phi-3 mini/medium, Phi-3.5 mini, Phi-4, Phi-4 mini).

q/k/v come fused as one `qkv_proj` (→ attn_qkv) and the MLP's gate and up projections as one `gate_up_proj`
(→ ffn_up, gate rows first, which is the order llama.cpp splits them in), so no tensor needs a transform.
Rotation is NeoX-style on the first `partial_rotary_factor` of each head.

LongRoPE (`rope_scaling.type` "longrope", formerly "su") becomes two per-frequency tables,
`rope_factors_long` and `rope_factors_short`, plus the pretraining context length that decides between them
and the attention factor applied to cos/sin.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import gguf
import numpy as np

from converters.core.errors import CheckpointError
from converters.reading.architectures.base import Architecture, ModelConfig, common_hparams, rope_freq_base
from converters.reading.architectures.common import rope_kind, rope_scaling_metadata, sliding_window_metadata

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.PHI3]
LONGROPE_KINDS = ("longrope", "su")
ROPE_FACTOR_TENSORS = {
    "long_factor": gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight",
    "short_factor": gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight",
}


def rotary_dimensions(config: ModelConfig) -> int:
    """How many dimensions of each head are rotated: head_dim × partial_rotary_factor."""
    parameters = config.get("rope_parameters")
    nested_factor = parameters.get("partial_rotary_factor") if isinstance(parameters, Mapping) else None
    factor = float(config.get("partial_rotary_factor", default=nested_factor or 1.0))
    return int(config.head_dim * factor)


def _longrope(config: ModelConfig) -> Mapping[str, Any] | None:
    scaling = config.rope_scaling
    return scaling if rope_kind(scaling) in LONGROPE_KINDS else None


def _original_context_length(config: ModelConfig, longrope: Mapping[str, Any]) -> int:
    return int(
        config.get("original_max_position_embeddings")
        or longrope.get("original_max_position_embeddings")
        or config.require("max_position_embeddings")
    )


def longrope_attention_factor(config: ModelConfig, longrope: Mapping[str, Any]) -> float:
    """The factor LongRoPE multiplies cos/sin by: given, or sqrt(1 + ln(s) / ln(original)) for stretch s."""
    if longrope.get("attention_factor") is not None:
        return float(longrope["attention_factor"])
    original = _original_context_length(config, longrope)
    stretch = float(longrope.get("factor") or int(config.require("max_position_embeddings")) / original)
    if stretch <= 1.0:
        return 1.0
    return math.sqrt(1.0 + math.log(stretch) / math.log(original))


def _metadata(config: ModelConfig) -> dict[str, Any]:
    values: dict[str, Any] = {
        **rope_freq_base(config, ARCH),
        f"{ARCH}.rope.dimension_count": rotary_dimensions(config),
        **sliding_window_metadata(config, ARCH),
    }
    longrope = _longrope(config)
    if longrope is None:
        values.update(rope_scaling_metadata(config.rope_scaling, ARCH))
    else:
        values[f"{ARCH}.rope.scaling.original_context_length"] = _original_context_length(config, longrope)
        values[f"{ARCH}.rope.scaling.attn_factor"] = longrope_attention_factor(config, longrope)
    return values


def _rope_factor_tensors(config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    longrope = _longrope(config)
    if longrope is None:
        return
    expected = rotary_dimensions(config) // 2
    for field_name, tensor_name in ROPE_FACTOR_TENSORS.items():
        factors = np.asarray(longrope.get(field_name, ()), dtype=np.float32)
        if factors.shape != (expected,):
            raise CheckpointError(
                f"config.json's rope_scaling.{field_name} has {factors.size} values where this model rotates "
                f"{expected} frequencies; the config is damaged, download it again."
            )
        yield tensor_name, factors


PHI3 = Architecture(
    hf_architectures=("Phi3ForCausalLM",),
    gguf_arch=gguf.MODEL_ARCH.PHI3,
    hparams=common_hparams(),
    derived_metadata=_metadata,
    extra_tensors=_rope_factor_tensors,
    ignored_tensors=(r".*rotary_emb\.inv_freq",),
)

__all__ = ["PHI3", "longrope_attention_factor", "rotary_dimensions"]
