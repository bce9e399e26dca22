"""GGUF files whose header is well formed but whose hyperparameters llama.cpp asserts on: a real model with some
metadata values replaced (or removed), written with gguf-py, tensors unchanged."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np

REMOVE = object()
"""A value in `changes` that drops the key."""

IMPOSSIBLE_HYPERPARAMETERS: dict[str, dict[str, object]] = {
    "no-layers": {"llama.block_count": 0},
    "too-many-layers": {"llama.block_count": 1000},
    "eps-nan": {"llama.attention.layer_norm_rms_epsilon": math.nan},
    "eps-negative": {"llama.attention.layer_norm_rms_epsilon": -1.0},
    "no-heads": {"llama.attention.head_count": 0},
    "no-kv-heads": {"llama.attention.head_count_kv": 0},
    "kv-heads-not-dividing": {"llama.attention.head_count_kv": 3},
    "embedding-mismatch": {"llama.embedding_length": 320},
    "no-context": {"llama.context_length": 0},
}
"""Cases of issue 21 item 1, as metadata changes to the tiny Llama (`kquant_f16`: 8 layers, 256 wide, 4 heads, 2 KV
heads)."""


def rewrite_metadata(source: Path, target: Path, changes: Mapping[str, object]) -> Path:
    """`source` with each key of `changes` set to its value (keeping the key's stored type when it has one) or
    removed (`REMOVE`)."""
    reader = gguf.GGUFReader(source)
    architecture = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(target, architecture)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = changes.get(name, field.contents())
        if value is REMOVE:
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub_type)
    for name, value in changes.items():
        if name not in reader.fields and value is not REMOVE:
            writer.add_key_value(name, value, gguf.GGUFValueType.get_type(value))
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.asarray(tensor.data))  # F32 and F16 sources: the dtype says the type
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target
