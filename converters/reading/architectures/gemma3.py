"""Gemma 3 text models: Gemma3ForCausalLM (model_type gemma3_text), and the language half of
Gemma3ForConditionalGeneration checkpoints (vision tower and projector left out).

Facts about llama.cpp's gemma3 that shape this table:
- RMSNorm weights are stored as w but applied as (1 + w) in Hugging Face; llama.cpp multiplies by the
  stored weight, so every norm weight gets 1 added on the way.
- Layers alternate sliding-window (local) and global attention. llama.cpp reads the per-layer pattern
  (`attention.sliding_window_pattern`, one bool per layer), the window size, and the local layers' rope
  base (`rope.freq_base_swa`); local layers are never rope-scaled, global ones take `rope.scaling.*`.
- The attention scale is not read from the file: llama.cpp uses 1/sqrt(head_dim), or
  1/sqrt(hidden_size / heads) for the 62-layer (27B) model. Checkpoints whose query_pre_attn_scalar
  disagrees would convert into a different model, so they are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gguf
import numpy as np

from converters.core.errors import UnsupportedModelError
from converters.reading.architectures.base import Architecture, ModelConfig, common_hparams
from converters.reading.architectures.common import rope_kind, rope_scaling_metadata

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GEMMA3]
GLOBAL_ROPE_THETA = 1_000_000.0
LOCAL_ROPE_THETA = 10_000.0
SLIDING_WINDOW_PATTERN = 6
"""Every sixth layer is global, the rest sliding: the default when config.json lists no layer types."""
LAYER_COUNT_WITH_WIDTH_SCALE = 62
"""The block count at which llama.cpp scales attention by hidden_size / heads instead of head_dim (27B)."""

NORM_TENSORS = (
    gguf.MODEL_TENSOR.ATTN_NORM,
    gguf.MODEL_TENSOR.ATTN_POST_NORM,
    gguf.MODEL_TENSOR.FFN_PRE_NORM,
    gguf.MODEL_TENSOR.FFN_POST_NORM,
    gguf.MODEL_TENSOR.OUTPUT_NORM,
    gguf.MODEL_TENSOR.ATTN_Q_NORM,
    gguf.MODEL_TENSOR.ATTN_K_NORM,
)


def add_one(weight: np.ndarray, _: ModelConfig) -> np.ndarray:
    """Gemma's RMSNorm scale (1 + w) as the plain multiplier llama.cpp applies."""
    return weight + np.float32(1.0)


def _layer_rope(config: ModelConfig, layer_type: str) -> Mapping[str, Any] | None:
    """The rope block of one layer type in transformers 5's nested `rope_parameters`, if the config has one."""
    parameters = config.get("rope_parameters")
    if isinstance(parameters, Mapping) and isinstance(parameters.get(layer_type), Mapping):
        return parameters[layer_type]
    return None


def _global_rope(config: ModelConfig) -> tuple[float, Mapping[str, Any] | None]:
    """Global layers' rope base and scaling block, from the nested or the classic config layout."""
    block = _layer_rope(config, "full_attention")
    if block is not None:
        theta = block.get("rope_theta", config.rope_theta or GLOBAL_ROPE_THETA)
        return float(theta), block if rope_kind(block) != "default" else None
    return float(config.rope_theta or GLOBAL_ROPE_THETA), config.rope_scaling


def _local_rope(config: ModelConfig) -> tuple[float, Mapping[str, Any] | None]:
    block = _layer_rope(config, "sliding_attention")
    if block is not None:
        return float(block.get("rope_theta", LOCAL_ROPE_THETA)), block if rope_kind(block) != "default" else None
    return float(config.get("rope_local_base_freq", default=LOCAL_ROPE_THETA)), None


def sliding_layers(config: ModelConfig) -> list[bool]:
    """Which layers use sliding-window attention, from `layer_types` or the older period setting."""
    block_count = int(config.require("num_hidden_layers"))
    layer_types = config.get("layer_types")
    if layer_types is not None:
        return [layer_type == "sliding_attention" for layer_type in layer_types]
    period = int(config.get("sliding_window_pattern", "_sliding_window_pattern", default=SLIDING_WINDOW_PATTERN))
    return [(layer + 1) % period != 0 for layer in range(block_count)]


def _refuse_what_llama_cpp_cannot_honour(config: ModelConfig) -> None:
    block_count = int(config.require("num_hidden_layers"))
    width_per_head = int(config.require("hidden_size")) // config.head_count
    llama_cpp_scalar = width_per_head if block_count == LAYER_COUNT_WITH_WIDTH_SCALE else config.head_dim
    query_scalar = config.get("query_pre_attn_scalar", default=llama_cpp_scalar)
    if float(query_scalar) != float(llama_cpp_scalar):
        raise UnsupportedModelError(
            f"This Gemma 3 checkpoint scales attention by query_pre_attn_scalar={query_scalar}, but llama.cpp "
            f"always uses {llama_cpp_scalar} for a {block_count}-layer model, so the converted file would "
            "answer differently; qdesk cannot convert it."
        )
    if config.get("attn_logit_softcapping") is not None:
        raise UnsupportedModelError(
            "This Gemma 3 checkpoint caps attention logits (attn_logit_softcapping), which llama.cpp's Gemma 3 "
            "does not do; qdesk cannot convert it."
        )
    _, local_scaling = _local_rope(config)
    if local_scaling is not None:
        raise UnsupportedModelError(
            "This Gemma 3 checkpoint scales the rope of its sliding-window layers, which llama.cpp does not "
            "read; qdesk cannot convert it."
        )


def _metadata(config: ModelConfig) -> dict[str, Any]:
    _refuse_what_llama_cpp_cannot_honour(config)
    global_theta, global_scaling = _global_rope(config)
    local_theta, _ = _local_rope(config)
    values: dict[str, Any] = {
        f"{ARCH}.attention.key_length": config.head_dim,
        f"{ARCH}.attention.value_length": config.head_dim,
        f"{ARCH}.rope.freq_base": global_theta,
        f"{ARCH}.rope.freq_base_swa": local_theta,
        **rope_scaling_metadata(global_scaling, ARCH),
    }
    window = config.get("sliding_window")
    if window is not None and int(window) > 0:
        values[f"{ARCH}.attention.sliding_window"] = int(window)
        values[f"{ARCH}.attention.sliding_window_pattern"] = sliding_layers(config)
    softcap = config.get("final_logit_softcapping")
    if softcap is not None:
        values[f"{ARCH}.final_logit_softcapping"] = float(softcap)
    return values


GEMMA3 = Architecture(
    hf_architectures=("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
    gguf_arch=gguf.MODEL_ARCH.GEMMA3,
    hparams=common_hparams(),
    transforms=dict.fromkeys(NORM_TENSORS, add_one),
    derived_metadata=_metadata,
    ignored_tensors=(
        r".*rotary_emb\.inv_freq",
        r"(model\.)?(vision_tower|multi_modal_projector)\..*",
    ),
    source_prefixes=("model.language_model.", "language_model."),
)

__all__ = ["GEMMA3", "add_one", "sliding_layers"]
