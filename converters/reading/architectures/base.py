"""The shape of an architecture table: what a Hugging Face model needs to become a llama.cpp GGUF.

Each supported architecture is one `Architecture` value in its own module: which hyperparameters go to
which GGUF keys, which tensors need a transform on the way, which extra tensors llama.cpp expects and
which source tensors it does not. The converter reads these tables; it has no per-model branches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np

from converters.core.errors import CheckpointError


class ModelConfig:
    """A model's `config.json`, with lookups that name the missing field when one is required."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        text_config = values.get("text_config")
        merged = dict(values)
        if isinstance(text_config, Mapping):
            merged = {**values, **text_config}
        self.values: dict[str, Any] = merged

    def get(self, *keys: str, default: Any = None) -> Any:
        """The first of `keys` present (and not null), else `default`."""
        for key in keys:
            value = self.values.get(key)
            if value is not None:
                return value
        return default

    def require(self, *keys: str) -> Any:
        value = self.get(*keys)
        if value is None:
            raise CheckpointError(
                f"config.json has no `{keys[0]}`; the checkpoint folder is incomplete, download it again."
            )
        return value

    @property
    def head_count(self) -> int:
        return int(self.require("num_attention_heads"))

    @property
    def head_count_kv(self) -> int:
        return int(self.get("num_key_value_heads", default=self.head_count))

    @property
    def head_dim(self) -> int:
        explicit = self.get("head_dim")
        if explicit is not None:
            return int(explicit)
        return int(self.require("hidden_size")) // self.head_count

    @property
    def rope_theta(self) -> float | None:
        """rope_theta from either its classic place or transformers 5's `rope_parameters`."""
        parameters = self.get("rope_parameters")
        if isinstance(parameters, Mapping) and parameters.get("rope_theta") is not None:
            return float(parameters["rope_theta"])
        theta = self.get("rope_theta")
        return None if theta is None else float(theta)

    @property
    def rope_scaling(self) -> Mapping[str, Any] | None:
        """The rope scaling block (`rope_scaling`, or `rope_parameters` when it scales), if any."""
        for key in ("rope_scaling", "rope_parameters"):
            block = self.get(key)
            if isinstance(block, Mapping):
                kind = block.get("rope_type", block.get("type"))
                if kind not in (None, "default"):
                    return block
        return None


@dataclass(frozen=True)
class HParam:
    """One GGUF hyperparameter key (`{arch}.{key}`) and the config.json fields it comes from."""

    key: str
    config_keys: tuple[str, ...]
    value_type: type = int
    required: bool = True
    default: Any = None


TensorTransform = Callable[[np.ndarray, ModelConfig], np.ndarray]
"""Turns a source tensor (float32, Hugging Face layout) into the layout llama.cpp expects."""

DerivedMetadata = Callable[[ModelConfig], Mapping[str, Any]]
"""Computes GGUF keys (full names, e.g. "llama.rope.dimension_count") that no single field holds."""

ExtraTensors = Callable[[ModelConfig], Iterable[tuple[str, np.ndarray]]]
"""Tensors llama.cpp expects that the checkpoint does not hold (GGUF name, float32 data)."""


@dataclass(frozen=True)
class Architecture:
    """Everything the converter needs to know about one family of Hugging Face models."""

    hf_architectures: tuple[str, ...]
    gguf_arch: gguf.MODEL_ARCH
    hparams: tuple[HParam, ...]
    transforms: Mapping[gguf.MODEL_TENSOR, TensorTransform] = field(default_factory=dict)
    derived_metadata: DerivedMetadata | None = None
    extra_tensors: ExtraTensors | None = None
    ignored_tensors: tuple[str, ...] = ()
    """Regular expressions (re.fullmatch) of source tensor names to leave out."""
    source_prefixes: tuple[str, ...] = ()
    """Prefixes stripped from source tensor names before mapping (e.g. "language_model.")."""

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


def common_hparams(*, context_keys: tuple[str, ...] = ("max_position_embeddings",)) -> tuple[HParam, ...]:
    """The hyperparameters every decoder-only transformer here shares."""
    return (
        HParam("context_length", context_keys),
        HParam("embedding_length", ("hidden_size",)),
        HParam("block_count", ("num_hidden_layers",)),
        HParam("feed_forward_length", ("intermediate_size",)),
        HParam("attention.head_count", ("num_attention_heads",)),
        HParam("attention.head_count_kv", ("num_key_value_heads", "num_attention_heads")),
        HParam("attention.layer_norm_rms_epsilon", ("rms_norm_eps",), float),
    )


def rope_freq_base(config: ModelConfig, arch: str, default: float | None = None) -> dict[str, Any]:
    """`{arch}.rope.freq_base` from whichever place this config keeps rope_theta."""
    theta = config.rope_theta
    if theta is None:
        theta = default
    return {} if theta is None else {f"{arch}.rope.freq_base": float(theta)}
