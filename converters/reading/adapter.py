"""A PEFT LoRA adapter folder: `adapter_config.json` and `adapter_model.safetensors` (or `.bin`).

Each adapted linear layer `<m>` holds `<m>.lora_A.weight` [r, in] and `<m>.lora_B.weight` [out, r], stored under
PEFT's `base_model.model.` prefix; the layer computes W·x + scale · B·A·x with scale = lora_alpha / r, or
lora_alpha / √r with rsLoRA, where `rank_pattern` and `alpha_pattern` may give a layer its own r and alpha.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.core.errors import CheckpointError, UnsupportedModelError
from converters.reading.quantized.raw import RawTensor, raw_tensors, to_float32

ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_PAIR = re.compile(r"(?P<module>.+)\.lora_(?P<side>A|B)(?:\.[^.]+)?\.weight")


def is_adapter_folder(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LoraPair:
    """One adapted layer: its module name in the base checkpoint, its A and B, and its scale."""

    module: str
    a: RawTensor
    b: RawTensor
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class PeftAdapter:
    folder: Path
    settings: Mapping[str, Any]
    pairs: tuple[LoraPair, ...]
    alpha: float
    """The adapter-wide alpha as llama.cpp reads it: its scale is alpha / r, so rsLoRA's alpha is lora_alpha · √r."""

    @property
    def base_name(self) -> str | None:
        value = self.settings.get("base_model_name_or_path")
        return str(value) if value else None


def read_adapter(folder: Path) -> PeftAdapter:
    folder = Path(folder)
    settings = _settings(folder)
    tensors = _weights(folder)
    rank = int(settings.get("r", 8))
    lora_alpha = float(settings.get("lora_alpha", rank))
    rslora = bool(settings.get("use_rslora"))
    sides: dict[str, dict[str, RawTensor]] = {}
    for name, tensor in tensors.items():
        if "lora_embedding_" in name:
            raise UnsupportedModelError(f"The adapter adapts an embedding ({name}), which llama.cpp's LoRA support "
                                        "cannot apply; use an adapter of linear layers only.")
        match = _PAIR.fullmatch(name)
        if match is None:
            raise UnsupportedModelError(f"The adapter holds {name}, which is not a LoRA A or B matrix; qdesk converts "
                                        "plain LoRA adapters (no bias, no fully trained modules).")
        if tensor.dtype not in ("F32", "F16", "BF16") or len(tensor.shape) != 2:
            raise CheckpointError(f"The adapter tensor {name} is not a float matrix; download the adapter again.")
        sides.setdefault(match["module"].removeprefix(PEFT_PREFIX), {})[match["side"]] = tensor
    pairs = []
    for module, pair in sides.items():
        if set(pair) != {"A", "B"}:
            present, missing = ("A", "B") if "A" in pair else ("B", "A")
            raise CheckpointError(f"The adapter has lora_{present} but not lora_{missing} for {module}; download the "
                                  "adapter again.")
        a, b = pair["A"], pair["B"]
        if a.shape[0] != b.shape[1]:
            raise CheckpointError(f"The adapter's lora_A and lora_B for {module} have ranks {a.shape[0]} and "
                                  f"{b.shape[1]}; download the adapter again.")
        layer_rank = _pattern_value(settings.get("rank_pattern"), module, rank)
        layer_alpha = float(_pattern_value(settings.get("alpha_pattern"), module, lora_alpha))
        scale = layer_alpha / (math.sqrt(layer_rank) if rslora else layer_rank)
        pairs.append(LoraPair(module, a, b, scale))
    if not pairs:
        raise CheckpointError(f"The adapter in {folder} holds no LoRA matrices; download it again.")
    return PeftAdapter(folder, settings, tuple(pairs), lora_alpha * math.sqrt(rank) if rslora else lora_alpha)


def _settings(folder: Path) -> Mapping[str, Any]:
    path = folder / ADAPTER_CONFIG
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} cannot be read as JSON ({error}); download the adapter again.") from error
    if not isinstance(settings, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; download the adapter again.")
    kind = str(settings.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise UnsupportedModelError(f"The adapter is a {kind} adapter; qdesk converts LoRA adapters only.")
    refusals = {
        "use_dora": "is a DoRA adapter, which llama.cpp cannot apply",
        "fan_in_fan_out": "stores its matrices transposed (fan_in_fan_out), for architectures qdesk does not convert",
        "modules_to_save": "replaces whole modules (modules_to_save), which a llama.cpp adapter cannot carry",
    }
    for key, reason in refusals.items():
        if settings.get(key):
            raise UnsupportedModelError(f"The adapter {reason}; merge it into the model with PEFT and convert that.")
    if str(settings.get("bias", "none")) != "none":
        raise UnsupportedModelError("The adapter trains biases, which a llama.cpp adapter cannot carry; merge it "
                                    "into the model with PEFT and convert that.")
    return settings


def _weights(folder: Path) -> dict[str, RawTensor]:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).is_file():
            return raw_tensors((folder / name,))
    raise CheckpointError(f"{folder} has adapter_config.json but no adapter_model.safetensors; download the "
                          "complete adapter.")


def _pattern_value(pattern: Any, module: str, default: float) -> float:
    """A per-layer rank or alpha: PEFT matches each key as a regular expression against the module's name."""
    if isinstance(pattern, Mapping):
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?{key}$", module):
                return value
    return default


def resolve_base_folder(adapter: PeftAdapter, base: Path | None) -> Path:
    """The base model's checkpoint folder: `base` when given, else base_model_name_or_path when it is a folder
    here (absolute, or beside the adapter)."""
    if base is not None:
        return Path(base)
    name = adapter.base_name
    for candidate in ([Path(name), adapter.folder / name] if name else []):
        if (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(
        f"The adapter's base model ({name or 'unnamed'}) is not a folder on this machine; give its checkpoint "
        "folder (the one holding config.json) as the base."
    )


def as_float32(tensor: RawTensor) -> np.ndarray:
    return to_float32(np.asarray(tensor.read()), tensor.dtype)
