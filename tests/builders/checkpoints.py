"""Tiny random Hugging Face checkpoints, one per supported family, for converter tests.

Each is a real transformers model (2 layers, hidden size 64) with a fixed seed, weights rescaled so that the
logits spread over several units, norm weights and biases perturbed away from their 1/0 initial values (so a
missing transform or a misplaced bias shows in the logits), saved with `save_pretrained` beside tokenizer files
from `tests.builders.tokenizers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.builders.tokenizers import write_bpe_tokenizer, write_spm_tokenizer

SEED = 1234
HIDDEN_SIZE = 64
EMBEDDING_STD = 0.25
VECTOR_NOISE_STD = 0.1
"""Added to every 1-D parameter: norm weights (1 or 0 at init) and biases (0 at init)."""

DTYPES = ("float32", "float16", "bfloat16")
WEIGHTS_FORMATS = ("safetensors", "bin")

TokenizerWriter = Callable[[Path], int]


def _spm(style: str) -> TokenizerWriter:
    return lambda folder: write_spm_tokenizer(folder, style)


def _bpe(style: str) -> TokenizerWriter:
    return lambda folder: write_bpe_tokenizer(folder, style)


@dataclass(frozen=True)
class TinyFamily:
    """How to build one tiny checkpoint: its transformers config class, settings and tokenizer."""

    config_class: str
    write_tokenizer: TokenizerWriter
    settings: Mapping[str, Any]
    vocab_multiple: int = 1
    """Round the model's vocabulary up to a multiple of this, past the tokenizer's size, as Qwen releases do."""
    added_special_tokens: tuple[str, ...] = ()
    """Special tokens added on top of the tokenizer's own, as Phi-3 adds its chat markers to Llama's SentencePiece."""
    multimodal: Mapping[str, Any] | None = None
    """Settings of a multimodal wrapper config; the language model's settings then go into its text_config."""
    common: Mapping[str, Any] = field(
        default_factory=lambda: {
            "hidden_size": HIDDEN_SIZE,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 256,
            "bos_token_id": None,
            "eos_token_id": None,
            "pad_token_id": None,
        }
    )


TINY_FAMILIES: dict[str, TinyFamily] = {
    "llama": TinyFamily(
        "LlamaConfig",
        _spm("llama"),
        {"num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0},
    ),
    "llama-bpe": TinyFamily(
        "LlamaConfig",
        _bpe("llama-bpe"),
        {
            "num_key_value_heads": 1,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
        vocab_multiple=64,
    ),
    "mistral": TinyFamily(
        "MistralConfig",
        _spm("llama"),
        {
            "num_key_value_heads": 1,
            "head_dim": 32,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1000000.0,
            "sliding_window": None,
        },
    ),
    "qwen2": TinyFamily(
        "Qwen2Config",
        _bpe("qwen2"),
        {"num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0},
        vocab_multiple=64,
    ),
    "qwen3": TinyFamily(
        "Qwen3Config",
        _bpe("qwen2"),
        {"num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0},
        vocab_multiple=64,
    ),
    "gemma3": TinyFamily(
        "Gemma3TextConfig",
        _spm("gemma"),
        {
            "num_key_value_heads": 2,
            "head_dim": 32,
            "query_pre_attn_scalar": 32,
            "rms_norm_eps": 1e-6,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        },
    ),
    "phi3": TinyFamily(
        "Phi3Config",
        _spm("llama"),
        {
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5,
            "partial_rotary_factor": 0.75,
            "max_position_embeddings": 1024,
            "original_max_position_embeddings": 256,
            "sliding_window": None,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.75,
                "original_max_position_embeddings": 256,
                "long_factor": [1.0 + 0.5 * i for i in range(6)],
                "short_factor": [1.0 + 0.1 * i for i in range(6)],
            },
        },
        vocab_multiple=64,
        added_special_tokens=("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"),
    ),
    "gemma3-vision": TinyFamily(
        "Gemma3Config",
        _spm("gemma"),
        {
            "num_key_value_heads": 1,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "rms_norm_eps": 1e-6,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        multimodal={
            "vision_config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 28,
                "patch_size": 14,
            },
            "mm_tokens_per_image": 1,
        },
    ),
}
"""Family name → recipe.

phi3 carries Phi-3's added chat tokens: llama.cpp looks `<|endoftext|>` up in the vocabulary of any model whose
name contains "phi3" and fails to load without it. It rotates 12 of 16 head dimensions, so its LongRoPE tables
hold 6 factors. Its pretraining context (256) is llama.cpp's smallest context size: llama.cpp picks the long
factors when the context it was given exceeds that, transformers when the sequence does, so both use the short
ones for contexts of 256 or less.

gemma3-vision is a Gemma3ForConditionalGeneration (language model under `language_model.`, a one-layer vision
tower and projector the converter leaves out).
"""


def build_tiny_checkpoint(
    folder: Path,
    arch: str,
    *,
    dtype: str = "float32",
    tied: bool = True,
    shards: int = 1,
    weights_format: str = "safetensors",
    sizes: Mapping[str, Any] | None = None,
) -> Path:
    """Write a tiny random `arch` checkpoint (config, weights, tokenizer) into `folder`; returns `folder`.

    `shards` > 1 splits the safetensors weights into about that many files with an index;
    `weights_format="bin"` writes one `pytorch_model.bin` instead (transformers 5 no longer writes them).
    `sizes` overrides the family's dimensions, e.g. `{"hidden_size": 256}` for rows that k-quants accept.
    """
    import torch
    import transformers

    if arch not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_FAMILIES)}")
    if dtype not in DTYPES or weights_format not in WEIGHTS_FORMATS:
        raise ValueError(f"dtype must be one of {DTYPES} and weights_format one of {WEIGHTS_FORMATS}")
    if shards > 1 and weights_format != "safetensors":
        raise ValueError("only safetensors checkpoints are sharded")
    family = TINY_FAMILIES[arch]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    token_count = family.write_tokenizer(folder)
    if family.added_special_tokens:
        token_count = _add_special_tokens(folder, family.added_special_tokens)
    vocab_size = family.vocab_multiple * math.ceil(token_count / family.vocab_multiple)
    config_class = getattr(transformers, family.config_class)
    language = {**family.common, **family.settings, **(sizes or {})}
    language.update(vocab_size=vocab_size, tie_word_embeddings=tied)
    if family.multimodal is None:
        config = config_class(**language)
    else:
        config = config_class(**family.multimodal, text_config=language, tie_word_embeddings=tied)
    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _spread_weights(model)
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype

    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    shard_bytes = total_bytes // shards + 1 if shards > 1 else "50GB"
    model.save_pretrained(folder, max_shard_size=shard_bytes)
    if weights_format == "bin":
        _resave_as_bin(folder)
    return folder


def _spread_weights(model: Any) -> None:
    """Fan-in scaled matrices, wider embeddings and perturbed vectors, all from the seeded generator."""
    import torch

    embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(VECTOR_NOISE_STD * torch.randn_like(parameter))
            elif id(parameter) in embeddings:
                parameter.normal_(0.0, EMBEDDING_STD)
            else:
                parameter.normal_(0.0, 1.0 / math.sqrt(parameter.shape[1]))


def _add_special_tokens(folder: Path, tokens: tuple[str, ...]) -> int:
    """Add `tokens` as special tokens to the tokenizer saved in `folder`; returns the new token count."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)})
    tokenizer.save_pretrained(folder)
    return len(tokenizer)


def _resave_as_bin(folder: Path) -> None:
    """Replace the saved safetensors file with the same tensors in a `pytorch_model.bin`."""
    import safetensors.torch
    import torch

    single = folder / "model.safetensors"
    torch.save(safetensors.torch.load_file(single), folder / "pytorch_model.bin")
    single.unlink()


__all__ = ["TINY_FAMILIES", "TinyFamily", "build_tiny_checkpoint"]
