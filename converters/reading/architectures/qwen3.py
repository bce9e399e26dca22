"""Qwen3 family: Qwen3ForCausalLM (dense Qwen3 models).

Each head's queries and keys pass through an RMSNorm (q_norm/k_norm, plain weights) before rotation, and the
head size is set explicitly (128 even where hidden_size / heads is 64), so key/value lengths are written.
Rotation is NeoX-style in both Hugging Face and llama.cpp: no permutation.
"""

from __future__ import annotations

from typing import Any

import gguf

from converters.reading.architectures.base import Architecture, ModelConfig, common_hparams, rope_freq_base
from converters.reading.architectures.common import rope_scaling_metadata

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3]


def _metadata(config: ModelConfig) -> dict[str, Any]:
    return {
        **rope_freq_base(config, ARCH),
        f"{ARCH}.attention.key_length": config.head_dim,
        f"{ARCH}.attention.value_length": config.head_dim,
        **rope_scaling_metadata(config.rope_scaling, ARCH),
    }


QWEN3 = Architecture(
    hf_architectures=("Qwen3ForCausalLM",),
    gguf_arch=gguf.MODEL_ARCH.QWEN3,
    hparams=common_hparams(),
    derived_metadata=_metadata,
    ignored_tensors=(r".*rotary_emb\.inv_freq",),
)

__all__ = ["QWEN3"]
