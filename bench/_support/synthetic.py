"""A synthetic Llama-architecture Hugging Face checkpoint of a chosen size, written in bounded memory.

Shapes follow a 7B Llama (hidden 4096, intermediate 11008, 32 query heads, 8 KV heads, untied lm_head);
the layer count is whatever reaches the requested size. Weights are BF16 normal×0.02 values cut from one
random pool (a few tens of MB), so writing costs little more than the disk. The tokenizer is SmolLM2's,
taken from the test checkpoint, which llama.cpp's converter recognises ("smollm", vocab 49152).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
FORMAT_VERSION = "1"

HIDDEN = 4096
INTERMEDIATE = 11008
HEADS = 32
KV_HEADS = 8
HEAD_DIM = HIDDEN // HEADS
VOCAB = 49152
SHARD_BYTES = 2 * 10**9
BF16_BYTES = 2
POOL_ELEMENTS = 16 * 1024 * 1024 + 12_345  # odd length, so tensors do not all repeat on the same boundary
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
GIB = 1024**3


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    is_norm: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * BF16_BYTES


def layer_tensors(i: int) -> list[TensorSpec]:
    p = f"model.layers.{i}."
    kv = KV_HEADS * HEAD_DIM
    return [
        TensorSpec(p + "input_layernorm.weight", (HIDDEN,), is_norm=True),
        TensorSpec(p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
        TensorSpec(p + "self_attn.k_proj.weight", (kv, HIDDEN)),
        TensorSpec(p + "self_attn.v_proj.weight", (kv, HIDDEN)),
        TensorSpec(p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
        TensorSpec(p + "post_attention_layernorm.weight", (HIDDEN,), is_norm=True),
        TensorSpec(p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
        TensorSpec(p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
        TensorSpec(p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
    ]


def model_tensors(layers: int) -> list[TensorSpec]:
    specs = [TensorSpec("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        specs += layer_tensors(i)
    specs += [TensorSpec("model.norm.weight", (HIDDEN,), is_norm=True), TensorSpec("lm_head.weight", (VOCAB, HIDDEN))]
    return specs


def layers_for(size_gib: float) -> int:
    """The fewest layers (at least one) whose weights reach `size_gib` GiB."""
    fixed = sum(t.nbytes for t in model_tensors(0))
    per_layer = sum(t.nbytes for t in layer_tensors(0))
    return max(1, math.ceil((size_gib * GIB - fixed) / per_layer))


def weight_bytes(layers: int) -> int:
    return sum(t.nbytes for t in model_tensors(layers))


def _shards(specs: list[TensorSpec]) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _random_pool(seed: int) -> np.ndarray:
    """BF16 bit patterns (uint16) of normal×0.02 values, rounded to nearest even from float32."""
    values = np.random.default_rng(seed).standard_normal(POOL_ELEMENTS, dtype=np.float32)
    values *= np.float32(0.02)
    bits = values.view(np.uint32)
    bits += np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
    return (bits >> 16).astype(np.uint16)


def _tensor_bytes(spec: TensorSpec, pool: np.ndarray, offset: int) -> Iterator[memoryview]:
    """The tensor's data as slices of the pool, starting at `offset` and wrapping around."""
    remaining = math.prod(spec.shape)
    if spec.is_norm:
        yield memoryview(np.full(remaining, 0x3F80, dtype=np.uint16))  # bf16 1.0
        return
    start = offset % len(pool)
    while remaining:
        take = min(remaining, len(pool) - start)
        yield memoryview(pool[start : start + take])
        remaining -= take
        start = 0


def _write_shard(path: Path, specs: list[TensorSpec], pool: np.ndarray, rng: np.random.Generator) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": "BF16", "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for spec in specs:
            for chunk in _tensor_bytes(spec, pool, int(rng.integers(len(pool)))):
                f.write(chunk)


def _config(layers: int, tokenizer_folder: Path) -> dict[str, object]:
    source = json.loads((tokenizer_folder / "config.json").read_text(encoding="utf-8"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "dtype": "bfloat16",
        "torch_dtype": "bfloat16",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": source.get("bos_token_id", 1),
        "eos_token_id": source.get("eos_token_id", 2),
        "pad_token_id": source.get("pad_token_id"),
    }


def tokenizer_source() -> Path:
    """SmolLM2's HF checkpoint folder, built by the test builders on first use."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from tests.builders.starter import smollm2_checkpoint

    return smollm2_checkpoint(REPO_ROOT / ".cache" / "tests")


def synthetic_llama(cache: Path, size_gib: float, log: Callable[[str], None] = print) -> Path:
    """The checkpoint folder for `size_gib` GiB of weights under `cache`, written on first use and reused after."""
    layers = layers_for(size_gib)
    folder = cache / f"synthetic-llama-h{HIDDEN}-{layers}L-v{FORMAT_VERSION}"
    if (folder / "config.json").is_file():
        return folder
    tokenizer_folder = tokenizer_source()
    specs = model_tensors(layers)
    shards = _shards(specs)
    total = sum(t.nbytes for t in specs)
    cache.mkdir(parents=True, exist_ok=True)
    for stale in cache.glob("synthetic-llama-*"):  # one size cached at a time: they are large
        log(f"removing cached checkpoint of another size: {stale}")
        shutil.rmtree(stale)
    free = shutil.disk_usage(cache).free
    if free < total * 1.05:
        raise SystemExit(f"not enough disk for the synthetic checkpoint: {total / GIB:.1f} GiB, {free / GIB:.1f} free")
    log(f"writing synthetic checkpoint: {layers} layers, {total / GIB:.2f} GiB in {len(shards)} shards -> {folder}")

    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".building-"))
    try:
        pool = _random_pool(seed=0)
        rng = np.random.default_rng(1)
        weight_map = {}
        for n, shard in enumerate(shards, start=1):
            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            _write_shard(staging / name, shard, pool, rng)
            weight_map.update({spec.name: name for spec in shard})
            log(f"  {name}: {sum(t.nbytes for t in shard) / GIB:.2f} GiB")
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for name in TOKENIZER_FILES:
            if (tokenizer_folder / name).is_file():
                shutil.copy2(tokenizer_folder / name, staging / name)
        (staging / "config.json").write_text(json.dumps(_config(layers, tokenizer_folder), indent=2))
        for path in staging.iterdir():  # settle to disk so the first measured run does not pay for the write-back
            with path.open("rb") as f:
                os.fsync(f.fileno())
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
