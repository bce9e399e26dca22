"""LoRA adapters applied at load time: `--lora FILE.gguf[:SCALE]` and the `BASE.gguf+ADAPTER.gguf[:SCALE]` spelling.

An adapter is a GGUF with `general.type = adapter` (see converters/writing/lora.py); the engine's worker hands it
to llama.cpp after loading the model (`LoadOptions.loras`). The checks here run before any worker starts, so a
wrong file is one sentence rather than a llama.cpp log.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from converters.core.errors import GGUFFileError, UserError
from converters.core.gguf_file import check_gguf
from converters.writing.lora import adapter_mismatch

DEFAULT_SCALE = 1.0


class AdapterError(UserError):
    """An adapter file is missing, is no LoRA adapter, or was made for another kind of model."""


@dataclass(frozen=True)
class LoraChoice:
    """One adapter to apply and the scale to apply it at (1.0: as trained; 0 switches it off)."""

    path: Path
    scale: float = DEFAULT_SCALE

    @property
    def label(self) -> str:
        return self.path.name if self.scale == DEFAULT_SCALE else f"{self.path.name}×{self.scale:g}"


def parse_lora(text: str) -> LoraChoice:
    """`FILE.gguf` or `FILE.gguf:SCALE` (a path that itself ends in `:<number>` is taken as a scale)."""
    path, separator, scale = text.rpartition(":")
    if separator and path:
        try:
            return LoraChoice(Path(path), float(scale))
        except ValueError:
            pass
    return LoraChoice(Path(text))


def parse_model_spec(text: str) -> tuple[Path, tuple[LoraChoice, ...]]:
    """`MODEL.gguf`, or `MODEL.gguf+ADAPTER.gguf[:SCALE][+ADAPTER2.gguf…]` for a model with adapters applied."""
    if Path(text).exists() or "+" not in text:
        return Path(text), ()
    model, *adapters = text.split("+")
    return Path(model), tuple(parse_lora(adapter) for adapter in adapters)


def check_adapters(model: Path, loras: tuple[LoraChoice, ...]) -> None:
    """Each adapter is a readable LoRA adapter GGUF that fits the model (`adapter_mismatch`)."""
    if not loras:
        return
    try:
        header = check_gguf(model)
    except GGUFFileError:
        return  # the engine explains a bad model file itself
    for lora in loras:
        problem = adapter_mismatch(lora.path, header, model.name)
        if problem:
            raise AdapterError(problem)


def described(path: Path, loras: tuple[LoraChoice, ...]) -> str:
    """`base.gguf`, or `base.gguf + style.gguf×0.5` for a model with adapters."""
    return " + ".join([path.name, *(lora.label for lora in loras)])
