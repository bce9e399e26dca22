"""Every architecture table, end to end: tiny random checkpoint → GGUF → llama.cpp logits == transformers logits.

Both sides compute in float32 (llama.cpp with an F32 KV cache, transformers with eager attention), so at f32
the logits agree to rounding: max |Δ| ≤ 1e-3 × max |logit|. Summation order alone gives ~1e-6 relative; the
largest legitimate difference is Gemma 3's GELU, which ggml's CPU backend reads from an fp16 lookup table
(~1e-4 relative at the logits). A wrong transform, permutation, norm offset or rope setting shows as an
error of order 1e-1 to 1.

At f16 the weights are rounded (observed max |Δ| ≈ 2e-3 × max |logit|), so the logits are held to 1e-2 and
the argmax to ≥ 99% agreement over a 256-token prompt: positions whose top two logits are closer than the
rounding (a few in a thousand with these random models) may flip.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest

from converters.core.errors import UnsupportedModelError
from converters.reading.architectures import ModelConfig, architecture_for
from converters.writing.convert import convert_checkpoint
from tests.builders.checkpoints import build_tiny_checkpoint

PROMPT_LENGTH = 32
CONTEXT = 64
RELATIVE_TOLERANCE = 1e-3
F16_RELATIVE_TOLERANCE = 1e-2
F16_ARGMAX_AGREEMENT = 0.99
F16_PROMPT_LENGTH = 256
GGML_TYPE_F32 = 0


@dataclass(frozen=True)
class Case:
    """One tiny checkpoint: a family and the way its weights are stored."""

    family: str
    dtype: str = "float32"
    tied: bool = True
    shards: int = 1
    weights_format: str = "safetensors"

    @property
    def id(self) -> str:
        parts = [self.family, self.dtype, "tied" if self.tied else "untied"]
        if self.shards > 1:
            parts.append(f"{self.shards}shards")
        if self.weights_format != "safetensors":
            parts.append(self.weights_format)
        return "-".join(parts)


ONE_PER_FAMILY = (
    Case("llama"),
    Case("llama-bpe", tied=False),
    Case("mistral", tied=False),
    Case("qwen2"),
    Case("qwen3"),
    Case("gemma3"),
    Case("gemma3-vision"),
    Case("phi3", tied=False),
)
STORAGE_VARIANTS = (
    Case("llama", tied=False, weights_format="bin"),
    Case("qwen2", shards=3),
    Case("qwen3", dtype="bfloat16", tied=False),
    Case("gemma3", dtype="bfloat16"),
    Case("phi3", dtype="float16"),
)


def _ids(cases: tuple[Case, ...]) -> list[str]:
    return [case.id for case in cases]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Case], Path]:
    """Builds each case's checkpoint once per session."""
    built: dict[Case, Path] = {}

    def get(case: Case) -> Path:
        if case not in built:
            folder = tmp_path_factory.mktemp(case.id)
            built[case] = build_tiny_checkpoint(
                folder,
                case.family,
                dtype=case.dtype,
                tied=case.tied,
                shards=case.shards,
                weights_format=case.weights_format,
            )
        return built[case]

    return get


@pytest.fixture(scope="session")
def converted(
    tiny_checkpoint: Callable[[Case], Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[Case, str], Path]:
    """Converts each (case, outtype) once per session."""
    done: dict[tuple[Case, str], Path] = {}

    def get(case: Case, outtype: str) -> Path:
        if (case, outtype) not in done:
            output = tmp_path_factory.mktemp("gguf") / f"{case.id}-{outtype}.gguf"
            done[case, outtype] = convert_checkpoint(tiny_checkpoint(case), output, outtype=outtype).path
        return done[case, outtype]

    return get


def prompt(length: int = PROMPT_LENGTH, vocab: int = 256) -> list[int]:
    return np.random.default_rng(7).integers(0, vocab, length).tolist()


def transformers_logits(folder: Path, ids: list[int], **config_overrides: object) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager", **config_overrides
    )
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def llama_cpp_logits(path: Path, ids: list[int], context: int = CONTEXT) -> np.ndarray:
    import llama_cpp

    model = llama_cpp.Llama(
        str(path),
        n_ctx=context,
        n_batch=context,
        logits_all=True,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        n_threads=1,
        verbose=False,
    )
    try:
        model.eval(ids)
        return np.array(model.scores[: len(ids)], dtype=np.float32)
    finally:
        model.close()


def assert_logits_match(ours: np.ndarray, reference: np.ndarray) -> None:
    assert ours.shape == reference.shape, "the GGUF's vocabulary differs from the model's output size"
    worst = float(np.abs(ours - reference).max())
    scale = float(np.abs(reference).max())
    assert worst <= RELATIVE_TOLERANCE * scale, f"max |Δlogit| {worst:.3g} against max |logit| {scale:.3g}"
    mismatched = np.flatnonzero(ours.argmax(axis=1) != reference.argmax(axis=1))
    assert mismatched.size == 0, f"argmax differs at positions {mismatched.tolist()}"


@pytest.mark.parametrize("case", ONE_PER_FAMILY + STORAGE_VARIANTS, ids=_ids(ONE_PER_FAMILY + STORAGE_VARIANTS))
def test_f32_logits_match_transformers(case: Case, tiny_checkpoint, converted) -> None:
    ids = prompt()
    reference = transformers_logits(tiny_checkpoint(case), ids)
    assert_logits_match(llama_cpp_logits(converted(case, "f32"), ids), reference)


@pytest.mark.parametrize("case", ONE_PER_FAMILY, ids=_ids(ONE_PER_FAMILY))
def test_f16_argmax_agrees_with_transformers(case: Case, tiny_checkpoint, converted) -> None:
    ids = prompt(F16_PROMPT_LENGTH)
    reference = transformers_logits(tiny_checkpoint(case), ids)
    ours = llama_cpp_logits(converted(case, "f16"), ids, context=F16_PROMPT_LENGTH)
    worst = float(np.abs(ours - reference).max())
    assert worst <= F16_RELATIVE_TOLERANCE * float(np.abs(reference).max())
    agreement = float((ours.argmax(axis=1) == reference.argmax(axis=1)).mean())
    assert agreement >= F16_ARGMAX_AGREEMENT


def test_gemma3_prompt_crosses_the_sliding_window(tiny_checkpoint, converted) -> None:
    """The f32 match above covers the window only if the window changes the answer: check that it does."""
    case = Case("gemma3")
    folder = tiny_checkpoint(case)
    window = json.loads((folder / "config.json").read_text())["sliding_window"]
    assert window < PROMPT_LENGTH
    ids = prompt()
    ours = llama_cpp_logits(converted(case, "f32"), ids)
    without_window = transformers_logits(folder, ids, sliding_window=PROMPT_LENGTH * 4)
    assert np.abs(ours[window:] - without_window[window:]).max() > 100 * RELATIVE_TOLERANCE


def test_phi3_long_rope_factors_beyond_the_original_context(tiny_checkpoint, converted) -> None:
    """Past the pretraining context (256) both sides switch to the long factors.

    transformers switches when the sequence is longer, llama.cpp when the context is: a 300-token prompt
    in a 512-token context meets both conditions.
    """
    case = Case("phi3", tied=False)
    ids = prompt(300)
    reference = transformers_logits(tiny_checkpoint(case), ids)
    assert_logits_match(llama_cpp_logits(converted(case, "f32"), ids, context=512), reference)


def _tensor_names(path: Path) -> set[str]:
    return {tensor.name for tensor in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("tied", [True, False])
def test_output_tensor_only_when_untied(tied: bool, converted) -> None:
    names = _tensor_names(converted(Case("llama", tied=tied), "f32"))
    assert ("output.weight" in names) is not tied


def test_generated_rope_tables_are_written(converted) -> None:
    assert {"rope_factors_long.weight", "rope_factors_short.weight"} <= _tensor_names(
        converted(Case("phi3", tied=False), "f32")
    )
    assert "rope_freqs.weight" in _tensor_names(converted(Case("llama-bpe", tied=False), "f32"))


def test_vision_tower_is_left_out(converted) -> None:
    names = _tensor_names(converted(Case("gemma3-vision"), "f32"))
    assert not [name for name in names if "vision" in name or "mm_" in name]


# Table-level checks on config.json variants no tiny checkpoint above uses.


def _metadata(config: dict[str, object]) -> dict[str, object]:
    model_config = ModelConfig(config)
    arch = architecture_for(model_config)
    assert arch.derived_metadata is not None
    return dict(arch.derived_metadata(model_config))


GEMMA3_CLASSIC = {
    "architectures": ["Gemma3ForCausalLM"],
    "hidden_size": 2560,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    "sliding_window": 1024,
    "sliding_window_pattern": 6,
}


def test_gemma3_classic_config_layout() -> None:
    values = _metadata(GEMMA3_CLASSIC)
    assert values["gemma3.rope.freq_base"] == 1000000.0
    assert values["gemma3.rope.freq_base_swa"] == 10000.0
    assert values["gemma3.rope.scaling.type"] == "linear"
    assert values["gemma3.rope.scaling.factor"] == 8.0
    assert values["gemma3.attention.sliding_window"] == 1024
    assert values["gemma3.attention.sliding_window_pattern"] == [True] * 5 + [False] + [True] * 5 + [False]
    assert values["gemma3.attention.key_length"] == 256


def test_gemma3_refuses_an_attention_scale_llama_cpp_ignores() -> None:
    with pytest.raises(UnsupportedModelError, match="query_pre_attn_scalar"):
        _metadata({**GEMMA3_CLASSIC, "query_pre_attn_scalar": 320})


def test_gemma3_27b_is_accepted_with_its_width_per_head_scale() -> None:
    config = {
        **GEMMA3_CLASSIC,
        "hidden_size": 5376,
        "num_attention_heads": 32,
        "head_dim": 128,
        "num_hidden_layers": 62,
        "query_pre_attn_scalar": 168,
    }
    assert _metadata(config)["gemma3.attention.key_length"] == 128


PHI3_MINI_128K = {
    "architectures": ["Phi3ForCausalLM"],
    "hidden_size": 3072,
    "num_attention_heads": 32,
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "sliding_window": 262144,
    "rope_scaling": {"type": "su", "long_factor": [2.0] * 48, "short_factor": [1.0] * 48},
}


def test_phi3_classic_longrope_config() -> None:
    values = _metadata(PHI3_MINI_128K)
    assert values["phi3.rope.dimension_count"] == 96
    assert values["phi3.rope.scaling.original_context_length"] == 4096
    assert values["phi3.rope.scaling.attn_factor"] == pytest.approx((1 + np.log(32) / np.log(4096)) ** 0.5)
    assert values["phi3.attention.sliding_window"] == 262144
    config = ModelConfig(PHI3_MINI_128K)
    extra = architecture_for(config).extra_tensors
    assert extra is not None
    assert {name: table.shape for name, table in extra(config)} == {
        "rope_factors_long.weight": (48,),
        "rope_factors_short.weight": (48,),
    }


def test_unknown_rope_scaling_is_refused() -> None:
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 4,
        "rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
    }
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        _metadata(config)

