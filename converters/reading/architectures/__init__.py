"""The supported architectures, one declarative table each, looked up by Hugging Face class name."""

from __future__ import annotations

from converters.core.errors import UnsupportedModelError
from converters.reading.architectures.base import Architecture, ModelConfig
from converters.reading.architectures.gemma3 import GEMMA3
from converters.reading.architectures.llama import LLAMA
from converters.reading.architectures.phi3 import PHI3
from converters.reading.architectures.qwen2 import QWEN2
from converters.reading.architectures.qwen3 import QWEN3

ARCHITECTURES: tuple[Architecture, ...] = (LLAMA, QWEN2, QWEN3, GEMMA3, PHI3)

_BY_HF_NAME = {hf_name: arch for arch in ARCHITECTURES for hf_name in arch.hf_architectures}


def supported_names() -> list[str]:
    return sorted(_BY_HF_NAME)


def architecture_for(config: ModelConfig) -> Architecture:
    """The table for this config's `architectures[0]`, or a clear error listing what is supported."""
    names = config.get("architectures") or []
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise UnsupportedModelError(
            f"config.json's `architectures` is {names!r}, not a list of model class names; download the checkpoint "
            "again."
        )
    if not names:
        raise UnsupportedModelError(
            "config.json does not name the model's architecture (`architectures`); "
            f"qdesk converts {', '.join(supported_names())}."
        )
    for name in names:
        if name in _BY_HF_NAME:
            return _BY_HF_NAME[name]
    raise UnsupportedModelError(
        f"qdesk cannot convert {names[0]} models yet; it converts {', '.join(supported_names())}."
    )


__all__ = ["ARCHITECTURES", "Architecture", "ModelConfig", "architecture_for", "supported_names"]
