"""LoRA adapters applied at load time: `--lora FILE.gguf[:SCALE]` and the `BASE.gguf+ADAPTER.gguf[:SCALE]` spelling.

An adapter is a GGUF with `general.type = adapter` (see converters/writing/lora.py); the engine's worker hands it
to llama.cpp after loading the model (`LoadOptions.loras`). The checks here run before any worker starts, so a
wrong file is one sentence rather than a llama.cpp log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from converters.core.errors import GGUFFileError, UserError
from converters.core.gguf_file import TensorHeader, check_gguf

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
    """Each adapter is a readable LoRA adapter GGUF for the model's architecture."""
    if not loras:
        return
    try:
        header = check_gguf(model)
    except GGUFFileError:
        return  # the engine explains a bad model file itself
    architecture = header.metadata.get("general.architecture")
    shapes = {tensor.name: tensor.shape for tensor in header.tensors}
    for lora in loras:
        try:
            adapter = check_gguf(lora.path)
        except GGUFFileError as error:
            raise AdapterError(f"The adapter {lora.path}: {error}") from error
        metadata = adapter.metadata
        if metadata.get("general.type") != "adapter" or metadata.get("adapter.type") != "lora":
            raise AdapterError(f"{lora.path.name} is not a LoRA adapter GGUF; convert the PEFT adapter folder with "
                               "`qdesk convert ADAPTER_DIR` first.")
        if metadata.get("general.architecture") != architecture:
            raise AdapterError(f"{lora.path.name} adapts a {metadata.get('general.architecture')} model but "
                               f"{model.name} is a {architecture} model; choose the adapter made for this base.")
        problem = _shape_problem(adapter.tensors, shapes, model.name)
        if problem:
            raise AdapterError(f"{lora.path.name} does not fit {model.name}: {problem}; choose the adapter made for "
                               "this base.")


def _shape_problem(adapter_tensors: Sequence[TensorHeader], shapes: Mapping[str, tuple[int, ...]],
                   model_name: str) -> str | None:
    """Why the adapter's A and B matrices cannot apply to the model's weights, or None. llama.cpp's loader does
    not always check this itself (a wrong shape crashed the generation), so it is checked here first."""
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for tensor in adapter_tensors:
        for suffix in (".lora_a", ".lora_b"):
            if tensor.name.endswith(suffix):
                pairs.setdefault(tensor.name.removesuffix(suffix), {})[suffix] = tensor.shape
    for name, pair in pairs.items():
        a, b = pair.get(".lora_a"), pair.get(".lora_b")
        if a is None or b is None:
            return f"it holds only one of {name}'s two LoRA matrices"
        base = shapes.get(name)
        if base is None:
            return f"it adapts {name}, which {model_name} does not have"
        if len(a) < 2 or len(b) < 2 or a[1] != b[0]:
            return f"its matrices for {name} have shapes {a} and {b}, which do not multiply"
        if (a[0], b[1]) != tuple(base[:2]):
            return (f"it adapts {name} with the shape {a[0]}×{b[1]} but {model_name} holds it with the shape "
                    f"{base[0]}×{base[1]}")
    return None


def described(path: Path, loras: tuple[LoraChoice, ...]) -> str:
    """`base.gguf`, or `base.gguf + style.gguf×0.5` for a model with adapters."""
    return " + ".join([path.name, *(lora.label for lora in loras)])
