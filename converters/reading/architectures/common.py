"""Metadata pieces several architecture tables share: head sizes, rope scaling, sliding windows."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from converters.core.errors import UnsupportedModelError
from converters.reading.architectures.base import ModelConfig


def rope_kind(block: Mapping[str, Any] | None) -> str:
    """The rope scaling type of a `rope_scaling` / `rope_parameters` block ("default" when it scales nothing)."""
    if block is None:
        return "default"
    return str(block.get("rope_type", block.get("type")) or "default")


def head_size_metadata(config: ModelConfig, arch: str) -> dict[str, int]:
    """`attention.key_length` / `value_length` when config.json names a head size of its own.

    llama.cpp otherwise takes embedding_length / head_count, which is wrong for models whose head_dim
    differs (Qwen3 0.6B, Mistral Nemo, Gemma 3).
    """
    if config.get("head_dim") is None:
        return {}
    return {
        f"{arch}.attention.key_length": config.head_dim,
        f"{arch}.attention.value_length": config.head_dim,
    }


def rope_scaling_metadata(block: Mapping[str, Any] | None, arch: str) -> dict[str, Any]:
    """`rope.scaling.*` for the rope scaling kinds llama.cpp applies from metadata alone (linear, YaRN).

    Other kinds either need tables (llama3, longrope: the architecture writes those) or are not ones
    llama.cpp implements; those are refused rather than converted into a model that answers differently.
    """
    kind = rope_kind(block)
    if kind == "default" or block is None:
        return {}
    if kind == "linear":
        return {
            f"{arch}.rope.scaling.type": "linear",
            f"{arch}.rope.scaling.factor": float(block["factor"]),
        }
    if kind == "yarn":
        values: dict[str, Any] = {
            f"{arch}.rope.scaling.type": "yarn",
            f"{arch}.rope.scaling.factor": float(block["factor"]),
        }
        original = block.get("original_max_position_embeddings")
        if original is not None:
            values[f"{arch}.rope.scaling.original_context_length"] = int(original)
        return values
    raise UnsupportedModelError(
        f"This checkpoint uses `{kind}` rope scaling, which qdesk cannot convert for {arch} models yet; "
        "use a release of the model without it."
    )


def sliding_window_metadata(config: ModelConfig, arch: str) -> dict[str, int]:
    """`attention.sliding_window` when the config sets one (and does not switch it off)."""
    if config.get("use_sliding_window") is False:
        return {}
    window = config.get("sliding_window")
    if window is None or int(window) <= 0:
        return {}
    return {f"{arch}.attention.sliding_window": int(window)}
