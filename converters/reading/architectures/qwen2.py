"""Qwen2 family: Qwen2ForCausalLM (Qwen2, Qwen2.5, their Coder and Math variants).

Attention q/k/v carry biases, which the tensor-name map already places. llama.cpp rotates Qwen2 in the
NeoX (half-split) layout that Hugging Face uses, so q/k are written as they are.
"""

from __future__ import annotations

from typing import Any

import gguf

from converters.reading.architectures.base import Architecture, ModelConfig, common_hparams, rope_freq_base
from converters.reading.architectures.common import head_size_metadata, rope_scaling_metadata

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2]


def _metadata(config: ModelConfig) -> dict[str, Any]:
    return {
        **rope_freq_base(config, ARCH),
        **head_size_metadata(config, ARCH),
        **rope_scaling_metadata(config.rope_scaling, ARCH),
    }


QWEN2 = Architecture(
    hf_architectures=("Qwen2ForCausalLM",),
    gguf_arch=gguf.MODEL_ARCH.QWEN2,
    hparams=common_hparams(),
    derived_metadata=_metadata,
    ignored_tensors=(r".*rotary_emb\.inv_freq",),
)

__all__ = ["QWEN2"]
