"""Llama family: LlamaForCausalLM (SmolLM2, Llama 2/3), MistralForCausalLM."""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np

from converters.reading.architectures.base import (
    Architecture,
    HParam,
    ModelConfig,
    common_hparams,
    rope_freq_base,
)
from converters.reading.architectures.common import head_size_metadata, rope_kind, rope_scaling_metadata
from converters.reading.architectures.rope import llama3_rope_frequencies


def interleave_rotary_halves(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder q/k projection rows from Hugging Face's half-split rotary layout to llama.cpp's interleaved one.

    Within each head, HF rotates dimension i with i + head_dim/2; llama.cpp's Llama rotates 2i with 2i+1.
    """
    rows = weight.shape[0]
    head_rows = rows // heads
    return (
        weight.reshape(heads, 2, head_rows // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _permute_q(weight: np.ndarray, config: ModelConfig) -> np.ndarray:
    return interleave_rotary_halves(weight, config.head_count)


def _permute_k(weight: np.ndarray, config: ModelConfig) -> np.ndarray:
    return interleave_rotary_halves(weight, config.head_count_kv)


def _metadata(config: ModelConfig) -> dict[str, Any]:
    arch = "llama"
    scaling = config.rope_scaling
    return {
        **rope_freq_base(config, arch),
        f"{arch}.rope.dimension_count": config.head_dim,
        **head_size_metadata(config, arch),
        # Llama 3.1-style scaling is carried by the rope_freqs tensor, not by metadata.
        **({} if rope_kind(scaling) == "llama3" else rope_scaling_metadata(scaling, arch)),
    }


def _extra_tensors(config: ModelConfig):
    scaling = config.rope_scaling
    if scaling is not None and rope_kind(scaling) == "llama3":
        theta = config.rope_theta or 10000.0
        yield "rope_freqs.weight", llama3_rope_frequencies(config.head_dim, theta, scaling)


LLAMA = Architecture(
    hf_architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    gguf_arch=gguf.MODEL_ARCH.LLAMA,
    hparams=common_hparams(),
    transforms={
        gguf.MODEL_TENSOR.ATTN_Q: _permute_q,
        gguf.MODEL_TENSOR.ATTN_K: _permute_k,
    },
    derived_metadata=_metadata,
    extra_tensors=_extra_tensors,
    ignored_tensors=(r".*rotary_emb\.inv_freq",),
)

__all__ = ["LLAMA", "HParam", "interleave_rotary_halves"]
