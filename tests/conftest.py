"""Shared fixtures: the real starter model and its Hugging Face checkpoint, built once and cached."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.builders.starter import smollm2_checkpoint, starter_gguf_path

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_CACHE = Path(os.environ.get("QDESK_TEST_CACHE", REPO_ROOT / ".cache" / "tests"))


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
