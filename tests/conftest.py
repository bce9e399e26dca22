"""Shared fixtures: the real starter model and its Hugging Face checkpoint, built once and cached."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.builders.starter import smollm2_checkpoint, starter_gguf_path
from tests.gui_support import gui_context, gui_folders, main_window  # noqa: F401 (fixtures for the GUI tests)

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_CACHE = Path(os.environ.get("QDESK_TEST_CACHE", REPO_ROOT / ".cache" / "tests"))
os.environ["QDESK_CACHE_DIR"] = str(TEST_CACHE / "qdesk-cache")
"""Measurements the tests cache (reference logits, sensitivity) stay out of the user's own cache, and tests (and the
CLI processes they start) share them; a test that needs a cold cache sets its own."""


@pytest.fixture(scope="session")
def test_cache() -> Path:
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    return TEST_CACHE


@pytest.fixture(scope="session")
def starter_gguf() -> Path:
    return starter_gguf_path()


@pytest.fixture(scope="session")
def smollm2_hf(test_cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face checkpoint folder (BF16 safetensors), read-only for tests."""
    return smollm2_checkpoint(test_cache)


def _cached_gguf(cache: Path, name: str, build: Callable[[Path], None]) -> Path:
    """Build a GGUF once under the test cache (atomically, so an interrupted build is redone) and reuse it."""
    target = cache / name
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(dir=cache, prefix=".building-") as staging:
        built = Path(staging) / target.name
        build(built)
        built.replace(target)
    return target


@pytest.fixture(scope="session")
def smollm2_f16(test_cache: Path, smollm2_hf: Path) -> Path:
    """SmolLM2-135M-Instruct converted by qdesk to an F16 GGUF: the reference model for quantization tests."""
    from converters.writing.convert import convert_checkpoint

    return _cached_gguf(test_cache, "smollm2-135m-f16.gguf",
                        lambda out: convert_checkpoint(smollm2_hf, out, outtype="f16"))


@pytest.fixture(scope="session")
def tiny_llama_hf(test_cache: Path) -> Path:
    """A tiny random Llama checkpoint folder (2 layers of 64, float32 safetensors, a SentencePiece tokenizer):
    converts in a fraction of a second. Built once under the test cache; read-only for tests."""
    from tests.builders.checkpoints import build_tiny_checkpoint

    target = test_cache / "tiny-llama-hf-v1"
    if not (target / "config.json").is_file():
        with tempfile.TemporaryDirectory(dir=test_cache, prefix=".building-") as staging:
            build_tiny_checkpoint(Path(staging) / "hf", "llama")
            (Path(staging) / "hf").replace(target)
    return target


@pytest.fixture(scope="session")
def smollm2_lora(test_cache: Path, smollm2_hf: Path) -> Path:
    """A GGUF LoRA adapter (F32) for SmolLM2-135M-Instruct, made by PEFT with random A and B: rank 4 on q, v and
    down, alpha small enough that the adapted model still speaks (its perplexity moves, it does not explode)."""
    from converters.writing.lora import convert_adapter
    from tests.builders.adapters import build_lora_adapter

    def build(out: Path) -> None:
        folder = build_lora_adapter(smollm2_hf, out.parent / "peft", r=4, lora_alpha=0.5,
                                    target_modules=("q_proj", "v_proj", "down_proj"))
        convert_adapter(folder, out, base=smollm2_hf, outtype="f32")

    return _cached_gguf(test_cache, "smollm2-135m-lora-v1.gguf", build)


@pytest.fixture(scope="session")
def tiny_llama_lora(test_cache: Path, tiny_llama_hf: Path) -> Path:
    """A GGUF LoRA adapter for the tiny Llama (`tiny_llama_hf`): a llama adapter of the wrong shape for any real
    model, such as the starter model."""
    from converters.writing.lora import convert_adapter
    from tests.builders.adapters import build_lora_adapter

    def build(out: Path) -> None:
        convert_adapter(build_lora_adapter(tiny_llama_hf, out.parent / "peft"), out, base=tiny_llama_hf)

    return _cached_gguf(test_cache, "tiny-llama-lora-v1.gguf", build)


KQUANT_SIZES = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 8, "num_attention_heads": 4}


@pytest.fixture(scope="session")
def kquant_f16(test_cache: Path) -> Path:
    """A tiny random Llama (8 layers, rows of 256 and 512) as F16 GGUF, so every k-quant applies to every matrix."""
    from converters.writing.convert import convert_checkpoint
    from tests.builders.checkpoints import build_tiny_checkpoint

    def build(out: Path) -> None:
        checkpoint = build_tiny_checkpoint(out.parent / "hf", "llama", tied=False, sizes=KQUANT_SIZES)
        convert_checkpoint(checkpoint, out, outtype="f16")

    return _cached_gguf(test_cache, "kquant-tiny-llama-f16-v1.gguf", build)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How many cases the fault and fuzz suite tried (tests/test_fuzz.py), when it ran."""
    import sys

    support = sys.modules.get("tests.fuzz_support")
    for line in support.summary() if support is not None else []:
        terminalreporter.write_line(line)
