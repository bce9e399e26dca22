"""The hyperparameters llama.cpp asserts on, checked against the tensors before anything loads a model.

A GGUF can be complete and well formed (`check_gguf`) and still describe a model llama.cpp cannot run: no layers,
more layers than it has tensors for, a norm epsilon that is NaN or negative, no attention heads, KV heads that do
not divide the heads. Some of these make llama.cpp abort the whole process (`GGML_ASSERT`), others hang it or
fail with an opaque message. `check_model_gguf(path)` refuses them with one sentence; every path that hands a model
to llama.cpp calls it (calibration, quantization, evaluation, chat, `info`, imports into the library), and the
converter checks the same rules on what it is about to write (`hyperparameter_problems`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from converters.core.errors import GGUFFileError
from converters.core.gguf_file import GGUFHeader, check_gguf

__all__ = ["check_hyperparameters", "check_model_gguf", "hyperparameter_problems"]

NOT_MODELS = frozenset({"imatrix", "adapter"})
"""`general.type` values of GGUF files that hold no model to load (importance matrices, LoRA adapters)."""
_LAYER = re.compile(r"^blk\.(\d+)\.")
_ATTENTION = re.compile(r"^blk\.\d+\.attn_(q|qkv|k|v|q_a|kv_a_mqa)\.weight$")
_EPSILONS = ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon")
_POSITIVE_COUNTS = ("context_length", "embedding_length", "attention.key_length", "attention.value_length")


def check_model_gguf(path: Path) -> GGUFHeader:
    """`check_gguf(path)`, and then the hyperparameters llama.cpp asserts on (`check_hyperparameters`)."""
    path = Path(path)
    header = check_gguf(path)
    check_hyperparameters(header, str(path))
    return header


def check_hyperparameters(header: GGUFHeader, label: str) -> None:
    """Raise GGUFFileError, naming `label`, when the model's hyperparameters contradict each other or its tensors
    in a way llama.cpp cannot run."""
    problems = hyperparameter_problems(header.metadata, {tensor.name: tensor.shape for tensor in header.tensors})
    if problems:
        raise GGUFFileError(f"{label} has impossible settings: {problems[0]}; llama.cpp cannot run it, so convert or "
                            "download the model again.")


def hyperparameter_problems(metadata: Mapping[str, Any], tensor_shapes: Mapping[str, Sequence[int]]) -> list[str]:
    """What is wrong with a model's hyperparameters (GGUF keys and values) given its tensors' shapes (ggml order:
    row length first); empty for a file that is no model (no architecture or tensors, an importance matrix)."""
    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str) or not tensor_shapes or metadata.get("general.type") in NOT_MODELS:
        return []
    values = _Values(metadata, architecture)
    problems = [*_layer_problems(values, tensor_shapes), *_epsilon_problems(values), *_count_problems(values)]
    if any(_ATTENTION.match(name) for name in tensor_shapes):
        problems += _head_problems(values)
    problems += _embedding_problems(values, tensor_shapes)
    problems += _rope_problems(values)
    problems += _expert_problems(values)
    return problems


class _Values:
    """The architecture's keys (`{arch}.…`), read as numbers where they are numbers."""

    def __init__(self, metadata: Mapping[str, Any], architecture: str) -> None:
        self.metadata = metadata
        self.architecture = architecture

    def key(self, name: str) -> str:
        return f"{self.architecture}.{name}"

    def raw(self, name: str) -> Any:
        return self.metadata.get(self.key(name))

    def number(self, name: str) -> float | int | None:
        value = self.raw(name)
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None

    def per_layer(self, name: str, layers: int) -> list[int] | None:
        """A count given once for every layer or as one value per layer; None when absent or not numbers."""
        value = self.raw(name)
        if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [int(v) for v in value]
        if isinstance(value, int) and not isinstance(value, bool):
            return [value] * max(layers, 1)
        return None


def _tensor_layers(tensor_shapes: Mapping[str, Sequence[int]]) -> int:
    layers = [int(match[1]) for name in tensor_shapes if (match := _LAYER.match(name))]
    return max(layers) + 1 if layers else 0


def _layer_problems(values: _Values, tensor_shapes: Mapping[str, Sequence[int]]) -> list[str]:
    blocks = values.number("block_count")
    if blocks is None:
        return []
    key = values.key("block_count")
    if blocks < 1:
        return [f"{key} is {blocks}, but a model needs at least one layer"]
    held = _tensor_layers(tensor_shapes)
    if held and blocks > held:
        return [f"{key} is {blocks}, but its tensors hold {held} layers"]
    return []


def _epsilon_problems(values: _Values) -> list[str]:
    problems = []
    for name in _EPSILONS:
        epsilon = values.number(name)
        if epsilon is not None and not (math.isfinite(epsilon) and epsilon > 0):
            problems.append(f"{values.key(name)} is {epsilon}, but it must be a small positive number")
    return problems


def _count_problems(values: _Values) -> list[str]:
    problems = []
    for name in _POSITIVE_COUNTS:
        count = values.number(name)
        if count is not None and count < 1:
            problems.append(f"{values.key(name)} is {count}, but it must be at least 1")
    return problems


def _head_problems(values: _Values) -> list[str]:
    layers = int(values.number("block_count") or 1)
    heads = values.per_layer("attention.head_count", layers)
    if heads is None:
        return []
    head_key, kv_key = values.key("attention.head_count"), values.key("attention.head_count_kv")
    if any(count < 0 for count in heads) or not any(heads):
        return [f"{head_key} is {values.raw('attention.head_count')}, but the attention needs at least one head"]
    kv_heads = values.per_layer("attention.head_count_kv", layers) or heads
    for layer, (count, kv_count) in enumerate(zip(heads, kv_heads, strict=False)):
        if count == 0:
            continue
        if kv_count < 1:
            return [f"{kv_key} is {kv_count} for layer {layer}, but a layer with attention needs at least one KV "
                    "head"]
        if count % kv_count:
            return [f"{kv_key} is {kv_count} for layer {layer}, which does not divide {head_key} ({count})"]
    embedding = values.number("embedding_length")
    if values.raw("attention.key_length") is None and isinstance(embedding, int) and embedding >= 1:
        for count in set(heads) - {0}:
            if embedding % count:
                return [f"{values.key('embedding_length')} is {embedding}, which {head_key} ({count}) does not "
                        "divide into heads of equal size"]
    return []


def _embedding_problems(values: _Values, tensor_shapes: Mapping[str, Sequence[int]]) -> list[str]:
    embedding = values.number("embedding_length")
    shape = tensor_shapes.get("token_embd.weight")
    if embedding is None or not shape or embedding < 1 or int(shape[0]) == embedding:
        return []
    return [f"{values.key('embedding_length')} is {embedding}, but token_embd.weight has rows of {shape[0]}"]


def _rope_problems(values: _Values) -> list[str]:
    base = values.number("rope.freq_base")
    if base is not None and not (math.isfinite(base) and base > 0):
        return [f"{values.key('rope.freq_base')} is {base}, but it must be a positive number"]
    return []


def _expert_problems(values: _Values) -> list[str]:
    experts = values.number("expert_count") or 0
    used = values.number("expert_used_count") or 0
    count_key, used_key = values.key("expert_count"), values.key("expert_used_count")
    if experts < 0 or used < 0:
        return [f"{count_key} is {experts} and {used_key} is {used}, but neither can be negative"]
    if experts == 0 and used > 0:
        return [f"{used_key} is {used}, but the model has no experts ({count_key} is missing or 0)"]
    if experts > 0 and not 1 <= used <= experts:
        return [f"{used_key} is {used}, but it must be between 1 and {count_key} ({experts})"]
    return []
