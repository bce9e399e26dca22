"""Where a dropped file goes: quantized GGUFs into the Library, checkpoints and float GGUFs to Quantize."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from converters.core.errors import GGUFFileError
from converters.core.gguf_file import check_gguf
from converters.quantization.quantize import already_quantized
from converters.reading.adapter import is_adapter_folder

CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class DropRoute:
    library_imports: list[Path] = field(default_factory=list)
    quantize_source: Path | None = None
    rejected: list[str] = field(default_factory=list)
    """One sentence per path that is neither a model nor a checkpoint."""


def is_float_gguf(path: Path) -> bool:
    """A GGUF whose weight matrices are all F32/F16/BF16: a reference to quantize, not a variant to run."""
    try:
        header = check_gguf(path)
    except GGUFFileError:
        return False
    return bool(header.tensors) and already_quantized(header) is None


def route_drop(paths: list[Path]) -> DropRoute:
    """Sort dropped paths: the first checkpoint (folder, weights file or float GGUF) goes to Quantize, and every
    GGUF goes into the Library (a float GGUF goes to both: it can be run, and quantized)."""
    route = DropRoute()
    for path in paths:
        if path.is_dir() and is_adapter_folder(path):
            route.rejected.append(f"{path.name} is a LoRA adapter, not a model; convert it with `qdesk convert "
                                  f"{path.name}`, import the .gguf and apply it from a Compare pane's Load… panel.")
            continue
        if path.is_dir() or (path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES):
            if route.quantize_source is None:
                route.quantize_source = path.parent if path.is_file() else path
            continue
        if path.is_file() and path.suffix.lower() == ".gguf":
            route.library_imports.append(path)
            if route.quantize_source is None and is_float_gguf(path):
                route.quantize_source = path
            continue
        route.rejected.append(f"{path.name} is not a GGUF file or a checkpoint folder; drop a .gguf file, a "
                              "Hugging Face checkpoint folder or a .safetensors file inside one.")
    return route
