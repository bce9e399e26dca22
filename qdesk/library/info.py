"""What a GGUF file holds: `qdesk info FILE.gguf [--json]`.

Only the header is read (`converters.core.gguf_file.check_gguf`), so any problem with the file is one
`GGUFFileError` sentence and a large vocabulary costs no time.

`read_model_info(path)` returns a `ModelInfo`; `render_text(info)` is the aligned table the
CLI prints, and `ModelInfo.to_json()` the document `--json` prints. Its keys are stable:

    {
      "path": str,                    # absolute path of the file
      "name": str,                    # general.name, else general.basename, else the file stem
      "architecture": str | null,     # general.architecture, e.g. "llama"
      "gguf_version": int,            # 2 or 3
      "file_type": str | null,        # general.file_type as a name, e.g. "Q4_1", "F16", "Q4_K_M"
      "dominant_type": str | null,    # the tensor type holding the most weights, e.g. "Q4_1"
      "parameters": int,              # sum of the element counts of all tensors
      "bytes": int,                   # file size
      "tensor_bytes": int,            # bytes of tensor data (without header and padding)
      "bpw": float | null,            # tensor_bytes * 8 / parameters (null without tensors)
      "context_length": int | null,   # {arch}.context_length
      "block_count": int | null,      # {arch}.block_count
      "embedding_length": int | null, # {arch}.embedding_length
      "vocab_size": int | null,       # number of tokenizer.ggml.tokens, else {arch}.vocab_size
      "has_chat_template": bool,      # tokenizer.chat_template is present
      "tensor_count": int,
      "tensor_types": {str: int},     # tensors per type, most frequent first, e.g. {"Q4_1": 210}
      "general": {str: value},        # every general.* key without the prefix, e.g. "license"
      "memory": {...} | null          # `qdesk info` only: `MemoryEstimate.to_json()` plus "fit":
                                      # `FitVerdict.to_json()` (see qdesk/memory/__init__.py); null when the file's
                                      # metadata does not allow an estimate
    }

`memory_report(path, ...)` is the memory part: what llama.cpp will allocate at a context (weights, KV cache,
compute buffers, in RAM and VRAM) and whether it fits this machine; `render_text(info, memory)` adds its table.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import LlamaFileType

from converters.core.errors import GGUFFileError
from converters.core.gguf_file import GGUFHeader, check_gguf, open_gguf
from converters.core.hyperparameters import check_model_gguf
from converters.core.units import format_count, format_size
from converters.mix.report import PlanHeatmap, plan_heatmap
from converters.quantization.plan import PlannedTensor, QuantPlan, type_name
from qdesk.display.tables import text_table
from qdesk.memory import (
    DEFAULT_N_CTX,
    FitVerdict,
    MemoryEstimate,
    check_fit,
    estimate_memory,
    render_memory_text,
)

__all__ = ["MemoryReport", "ModelInfo", "memory_report", "model_info_from_header", "open_gguf", "read_model_info",
           "render_text", "tensor_type_heatmap"]

# --- the model's facts ------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelInfo:
    """What `qdesk info` reports about one GGUF file (see the module docstring for the JSON)."""

    path: Path
    name: str
    architecture: str | None
    gguf_version: int
    file_type: str | None
    dominant_type: str | None
    parameters: int
    file_bytes: int
    tensor_bytes: int
    context_length: int | None
    block_count: int | None
    embedding_length: int | None
    vocab_size: int | None
    has_chat_template: bool
    tensor_count: int
    tensor_types: dict[str, int] = field(hash=False)
    general: dict[str, Any] = field(hash=False)

    @property
    def bits_per_weight(self) -> float | None:
        """Tensor data bits per parameter; None for a file without tensors."""
        return self.tensor_bytes * 8 / self.parameters if self.parameters else None

    def to_json(self) -> dict[str, Any]:
        """The `--json` document: plain JSON types, keys as in the module docstring."""
        bpw = self.bits_per_weight
        return {
            "path": str(self.path),
            "name": self.name,
            "architecture": self.architecture,
            "gguf_version": self.gguf_version,
            "file_type": self.file_type,
            "dominant_type": self.dominant_type,
            "parameters": self.parameters,
            "bytes": self.file_bytes,
            "tensor_bytes": self.tensor_bytes,
            "bpw": None if bpw is None else round(bpw, 4),
            "context_length": self.context_length,
            "block_count": self.block_count,
            "embedding_length": self.embedding_length,
            "vocab_size": self.vocab_size,
            "has_chat_template": self.has_chat_template,
            "tensor_count": self.tensor_count,
            "tensor_types": dict(self.tensor_types),
            "general": dict(self.general),
        }


def _int(metadata: dict[str, Any], key: str) -> int | None:
    value = metadata.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(metadata: dict[str, Any], key: str) -> str | None:
    value = metadata.get(key)
    return value if isinstance(value, str) and value else None


def _file_type_name(value: int) -> str:
    try:
        name = LlamaFileType(value).name
    except ValueError:
        return f"unknown ({value})"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def read_model_info(path: str | os.PathLike[str]) -> ModelInfo:
    """Describe the GGUF file at `path` from its header alone; raises GGUFFileError if it is not a complete GGUF
    file or describes a model llama.cpp cannot run (`check_model_gguf`)."""
    path = Path(path)
    return model_info_from_header(path, check_model_gguf(path))


def model_info_from_header(path: Path, header: GGUFHeader) -> ModelInfo:
    """`read_model_info` for a file whose header was already read."""
    metadata = header.metadata
    architecture = _str(metadata, "general.architecture")
    prefix = f"{architecture}." if architecture else "\0"  # no architecture: no such keys

    type_counts: Counter[str] = Counter()
    type_weights: Counter[str] = Counter()
    parameters = tensor_bytes = 0
    for tensor in header.tensors:
        n_elements = math.prod(tensor.shape)
        type_counts[tensor.type.name] += 1
        type_weights[tensor.type.name] += n_elements
        parameters += n_elements
        tensor_bytes += tensor.n_bytes
    tensor_types = dict(sorted(type_counts.items(), key=lambda item: (-item[1], item[0])))
    dominant_type = max(type_weights, key=lambda t: (type_weights[t], t)) if type_weights else None
    raw_file_type = _int(metadata, "general.file_type")
    vocab_size = header.array_lengths.get("tokenizer.ggml.tokens", _int(metadata, prefix + "vocab_size"))
    general = {key.removeprefix("general."): value for key, value in metadata.items() if key.startswith("general.")}
    return ModelInfo(
        path=path.resolve(),
        name=_str(metadata, "general.name") or _str(metadata, "general.basename") or path.stem,
        architecture=architecture,
        gguf_version=header.version,
        file_type=None if raw_file_type is None else _file_type_name(raw_file_type),
        dominant_type=dominant_type,
        parameters=parameters,
        file_bytes=path.stat().st_size,
        tensor_bytes=tensor_bytes,
        context_length=_int(metadata, prefix + "context_length"),
        block_count=_int(metadata, prefix + "block_count"),
        embedding_length=_int(metadata, prefix + "embedding_length"),
        vocab_size=vocab_size,
        has_chat_template="tokenizer.chat_template" in metadata,
        tensor_count=len(header.tensors),
        tensor_types=tensor_types,
        general=general,
    )


def tensor_type_heatmap(path: str | os.PathLike[str]) -> PlanHeatmap:
    """The types in the file as a tensor class × layer grid of bits per weight (`converters.mix.report`), from its
    header alone: what a preset or a mix did to each matrix."""
    path = Path(path)
    header = check_gguf(path)
    info = model_info_from_header(path, header)
    tensors = tuple(PlannedTensor(t.name, t.shape, type_name(t.type), type_name(t.type)) for t in header.tensors)
    return plan_heatmap(QuantPlan(tensors, info.file_type or "", info.name))


# --- the memory it takes -----------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryReport:
    """The memory estimate at one setting and the fit verdict for this machine (or the sizes given)."""

    estimate: MemoryEstimate
    fit: FitVerdict

    def to_json(self) -> dict[str, Any]:
        return {**self.estimate.to_json(), "fit": self.fit.to_json()}


def memory_report(
    path: str | os.PathLike[str],
    *,
    n_ctx: int = DEFAULT_N_CTX,
    n_gpu_layers: int = 0,
    kv_type: str = "f16",
    ram_bytes: int | None = None,
    vram_bytes: int | None = None,
) -> MemoryReport | None:
    """The memory part of `qdesk info`; None for a GGUF whose metadata does not describe a runnable model."""
    try:
        estimate = estimate_memory(path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, kv_type=kv_type)
        fit = check_fit(path, ram_bytes=ram_bytes, vram_bytes=vram_bytes, n_ctx=n_ctx, kv_type=kv_type)
    except GGUFFileError:
        return None
    return MemoryReport(estimate, fit)


# --- the text table -----------------------------------------------------------------------------

def _with_exact(rounded: str, exact: int, unit: str = "") -> str:
    """"135M (134,515,008)"; the exact figure alone when rounding changed nothing."""
    return f"{exact:,}{unit}" if exact < 1000 else f"{rounded} ({exact:,}{unit})"


def _optional(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _metadata_text(value: Any, limit: int = 80) -> str:
    text = ", ".join(str(v) for v in value) if isinstance(value, list) else str(value)
    text = " ".join(text.split())  # one line, whatever the value holds
    return text if len(text) <= limit else text[: limit - 1] + "…"


# general.* keys shown in the main rows, so not repeated among the metadata rows
_SHOWN_GENERAL = {"name", "architecture", "file_type", "alignment", "source.quantization", "source.lora"}
_ORIGIN_ROWS = (("source.quantization", "dequantized from"), ("source.lora", "LoRA adapters merged"))
"""general.* keys qdesk writes about where the weights came from (converters/reading/quantized, lora_merge)."""


def render_text(info: ModelInfo, memory: MemoryReport | None = None) -> str:
    """A readable two-column table of `info`, one fact per line, then the memory table when given."""
    bpw = info.bits_per_weight
    file_type = info.file_type or "-"
    if info.dominant_type and info.dominant_type != info.file_type:
        file_type += f" (most weights: {info.dominant_type})"
    rows: list[tuple[str, str]] = [
        ("file", str(info.path)),
        ("name", info.name),
        ("architecture", info.architecture or "-"),
        ("file type", file_type),
        ("parameters", _with_exact(format_count(info.parameters), info.parameters)),
        ("size", _with_exact(format_size(info.file_bytes), info.file_bytes, " bytes")),
        ("bits per weight", "-" if bpw is None else f"{bpw:.2f}"),
        ("context length", _optional(info.context_length)),
        ("layers", _optional(info.block_count)),
        ("embedding length", _optional(info.embedding_length)),
        ("vocabulary", "-" if info.vocab_size is None else f"{info.vocab_size:,} tokens"),
        ("chat template", "yes" if info.has_chat_template else "no"),
        ("gguf version", str(info.gguf_version)),
        ("tensors", f"{info.tensor_count:,}"
                    + (": " + ", ".join(f"{n} {t}" for t, n in info.tensor_types.items())
                       if info.tensor_types else "")),
    ]
    rows += [(label, str(info.general[key])) for key, label in _ORIGIN_ROWS if info.general.get(key)]
    if info.general.get("type") == "adapter":
        rows.append(("LoRA adapter for", str(info.general.get("base_model.0.name") or "-")))
    rows += [(f"general.{key}", _metadata_text(value))
             for key, value in info.general.items() if key not in _SHOWN_GENERAL]
    text = "\n".join(text_table(None, rows))
    if memory is not None:
        text += "\n\n" + render_memory_text(memory.estimate, memory.fit)
    return text
