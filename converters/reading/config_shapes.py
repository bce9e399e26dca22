"""The tensor shapes a model's config.json implies, checked against the weights before anything is written.

A config that contradicts its weights (another model's config.json, an edited dimension, a truncated layer list)
would convert into a GGUF whose hyperparameters disagree with its tensors, which llama.cpp then refuses to load
or, worse, loads wrongly. The table below gives, for each kind of tensor llama.cpp's dense decoder models hold, its
Hugging Face shape `(out, in)` from the config's sizes; a bias has the first dimension only. Kinds the table lacks
(architecture extras, rope factors) are not checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import gguf

from converters.core.errors import CheckpointError
from converters.reading.architectures.base import ModelConfig

T = gguf.MODEL_TENSOR


@dataclass(frozen=True)
class Sizes:
    """The sizes config.json declares, as the shapes use them."""

    hidden: int
    feed_forward: int | None
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int | None

    @classmethod
    def of(cls, config: ModelConfig) -> Sizes:
        def optional(key: str) -> int | None:
            value = config.get(key)
            return None if value is None else _size(key, value)

        heads = _size("num_attention_heads", config.require("num_attention_heads"))
        hidden = _size("hidden_size", config.require("hidden_size"))
        return cls(
            hidden=hidden,
            feed_forward=optional("intermediate_size"),
            heads=heads,
            kv_heads=_size("num_key_value_heads", config.get("num_key_value_heads", default=heads)),
            head_dim=optional("head_dim") or max(1, hidden // heads),
            vocab=optional("vocab_size"),
        )


def whole_number(value: object) -> int | None:
    """A JSON value as a whole number (3 and 3.0, not true, 2.5, inf or "3"); None when it is none."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _size(key: str, value: object) -> int:
    number = whole_number(value)
    if number is None or number < 1:
        raise CheckpointError(f"config.json gives `{key}` as {value!r}, not a positive whole number; download the "
                              "checkpoint again.")
    return number


Shape = tuple[int | None, ...]
_SHAPES: Mapping[gguf.MODEL_TENSOR, Callable[[Sizes], tuple[Shape, ...]]] = {
    T.TOKEN_EMBD: lambda s: ((s.vocab, s.hidden),),
    T.OUTPUT: lambda s: ((s.vocab, s.hidden),),
    T.OUTPUT_NORM: lambda s: ((s.hidden,),),
    T.ATTN_NORM: lambda s: ((s.hidden,),),
    T.ATTN_POST_NORM: lambda s: ((s.hidden,),),
    T.FFN_NORM: lambda s: ((s.hidden,),),
    T.FFN_PRE_NORM: lambda s: ((s.hidden,),),
    T.FFN_POST_NORM: lambda s: ((s.hidden,),),
    T.ATTN_Q_NORM: lambda s: ((s.head_dim,),),
    T.ATTN_K_NORM: lambda s: ((s.head_dim,),),
    T.ATTN_Q: lambda s: ((s.heads * s.head_dim, s.hidden),),
    T.ATTN_K: lambda s: ((s.kv_heads * s.head_dim, s.hidden),),
    T.ATTN_V: lambda s: ((s.kv_heads * s.head_dim, s.hidden),),
    T.ATTN_QKV: lambda s: (((s.heads + 2 * s.kv_heads) * s.head_dim, s.hidden),),
    T.ATTN_OUT: lambda s: ((s.hidden, s.heads * s.head_dim),),
    T.FFN_GATE: lambda s: ((s.feed_forward, s.hidden),),
    T.FFN_UP: lambda s: ((s.feed_forward, s.hidden),  # fused gate and up (Phi-3): twice as many rows
                         (None if s.feed_forward is None else 2 * s.feed_forward, s.hidden)),
    T.FFN_DOWN: lambda s: ((s.hidden, s.feed_forward),),
}
_CAUSES = {"hidden": "hidden_size", "feed_forward": "intermediate_size", "heads": "num_attention_heads",
           "kv_heads": "num_key_value_heads", "head_dim": "head_dim", "vocab": "vocab_size"}


def _matches(shape: tuple[int, ...], expected: Shape) -> bool:
    return len(shape) == len(expected) and all(want is None or got == want for got, want in zip(shape, expected,
                                                                                                 strict=True))


def check_shapes(tensors: Iterable[tuple[str, gguf.MODEL_TENSOR | None, tuple[int, ...]]], config: ModelConfig) -> None:
    """Raise CheckpointError for the first (source name, kind, shape) whose shape is not the one config.json
    implies for its kind."""
    sizes = Sizes.of(config)
    for name, kind, shape in tensors:
        shapes = _SHAPES.get(kind) if kind is not None else None
        if shapes is None:
            continue
        expected = shapes(sizes)
        if name.endswith(".bias"):
            expected = tuple((want[0],) for want in expected)
        if any(_matches(tuple(shape), want) for want in expected):
            continue
        wanted = " or ".join(str(list("?" if d is None else d for d in want)) for want in expected)
        raise CheckpointError(f"Tensor {name} has shape {list(shape)} but config.json implies {wanted}; the config "
                              "does not belong to these weights, so download the checkpoint again.")


def check_layers(layers: Iterable[int], block_count: int) -> None:
    """Raise CheckpointError unless the weights hold exactly the layers 0 … block_count - 1 that config.json
    declares (its `num_hidden_layers`)."""
    present = set(layers)
    extra = sorted(layer for layer in present if layer >= block_count)
    if extra or len(present) < block_count:
        missing = next(layer for layer in range(block_count) if layer not in present) if not extra else None
        which = f"hold a layer {extra[0]}" if extra else f"lack layer {missing}"
        raise CheckpointError(f"config.json declares {block_count} layers (num_hidden_layers) but the weights "
                              f"{which}; the config does not belong to these weights, so download the checkpoint "
                              "again.")

def layer_count(config: ModelConfig) -> int:
    """config.json's `num_hidden_layers`, checked to be a positive whole number."""
    return _size("num_hidden_layers", config.require("num_hidden_layers"))
