"""LoRA adapters merged into a float GGUF: W ← W + Σ scale · (alpha / r) · B·A, before quantizing.

llama.cpp applies an adapter at run time with that same scale (alpha / r taken from the adapter file and its
tensors' rank, times the scale the user chose; without alpha, the chosen scale alone). Merging bakes it into the
weights, so the quantizer sees the adapted model and the result needs no adapter to run. Only float tensors
(F32, F16, BF16) can take a merge: quantized ones would be rounded twice, so such a base is refused.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from converters.core.atomic import atomic_output, check_free_space
from converters.core.errors import UserError
from converters.core.gguf_file import check_gguf, open_gguf
from converters.core.jobs import CancelToken, ProgressFn, no_progress
from converters.writing.lora import adapter_mismatch
from converters.writing.rewrite import as_float, rewrite_gguf, row_steps, string_value

QType = gguf.GGMLQuantizationType
MERGEABLE = (QType.F32, QType.F16, QType.BF16)
MERGED_KEY = "general.source.lora"
"""Names the adapters merged into a GGUF, with their scales."""


class MergeError(UserError):
    """An adapter cannot be merged into this base file."""


@dataclass(frozen=True)
class AdapterDelta:
    """One adapter's pair for one base tensor: B [out, r] and A [r, in] as stored, and its factor."""

    a: Any
    b: Any
    factor: float


@dataclass(frozen=True)
class MergeResult:
    path: Path
    merged_tensors: int
    adapters: tuple[str, ...]
    bytes_written: int
    seconds: float


def merge_adapters(base: Path, adapters: Sequence[tuple[Path, float]], output: Path, *,
                   progress: ProgressFn | None = None, cancel: CancelToken | None = None) -> MergeResult:
    """Write `base` (a float GGUF) with every adapter in `adapters` (path, scale) merged into it, to `output`."""
    started = time.monotonic()
    report = progress or no_progress
    cancel = cancel or CancelToken()
    base, output = Path(base), Path(output)
    if base.resolve() == output.resolve():
        raise MergeError(f"The merged model would overwrite its base {base.name}; choose another output file.")
    reader = open_gguf(base)
    if string_value(reader, "general.type") == "adapter":
        raise MergeError(f"{base.name} is an adapter, not a model; give the base model's GGUF.")
    header = check_gguf(base)
    for path, _ in adapters:
        problem = adapter_mismatch(Path(path), header, base.name)
        if problem:
            raise MergeError(problem)
    deltas: dict[str, list[AdapterDelta]] = {}
    base_tensors = {tensor.name: tensor for tensor in reader.tensors}
    for path, scale in adapters:
        for name, delta in _adapter_deltas(Path(path), scale).items():
            tensor = base_tensors[name]
            if tensor.tensor_type not in MERGEABLE:
                raise MergeError(f"{base.name} stores {name} as {tensor.tensor_type.name}, and an adapter can be "
                                 "merged only into a float GGUF (F32, F16, BF16); merge first, then quantize.")
            deltas.setdefault(name, []).append(delta)
    labels = tuple(Path(path).name if scale == 1.0 else f"{Path(path).name}×{scale:g}" for path, scale in adapters)
    check_free_space(output, base.stat().st_size + 1024 * 1024)
    cancel.raise_if_cancelled()
    changed = {name: (lambda tensor, pairs=pairs: _merged_rows(tensor, pairs)) for name, pairs in deltas.items()}
    with atomic_output(output) as temporary:
        rewrite_gguf(reader, temporary, changed, {MERGED_KEY: ", ".join(labels)}, report, cancel)
    return MergeResult(output, len(deltas), labels, output.stat().st_size, time.monotonic() - started)


def _adapter_deltas(path: Path, scale: float) -> dict[str, AdapterDelta]:
    """The pairs of an adapter `adapter_mismatch` has passed, with the factor llama.cpp applies them at."""
    reader = open_gguf(path)
    alpha_field = reader.fields.get(gguf.Keys.Adapter.LORA_ALPHA)
    alpha = float(alpha_field.contents()) if alpha_field is not None else 0.0
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    deltas = {}
    for name, tensor in tensors.items():
        if name.endswith(".lora_a"):
            a, b = as_float(tensor), as_float(tensors[name.removesuffix(".lora_a") + ".lora_b"])
            deltas[name.removesuffix(".lora_a")] = AdapterDelta(a, b, scale * alpha / a.shape[0] if alpha else scale)
    return deltas


def _merged_rows(tensor: Any, deltas: list[AdapterDelta]) -> Iterator[np.ndarray]:
    for start, stop in row_steps(tensor):
        weight = as_float(tensor, start, stop)
        for delta in deltas:
            weight = weight + np.float32(delta.factor) * (delta.b[start:stop] @ delta.a)
        yield weight


def convert_with_adapters(source: Path, adapters: Sequence[tuple[Path, float]], output: Path, *,
                          outtype: str = "f16", progress: ProgressFn | None = None,
                          cancel: CancelToken | None = None) -> MergeResult:
    """A float GGUF of `source` (a float GGUF, or a checkpoint folder converted at `outtype` first) with the
    adapters merged in, at `output`; the intermediate conversion is removed whatever happens."""
    from converters.writing.convert import convert_checkpoint

    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".gguf":
        return merge_adapters(source, adapters, output, progress=progress, cancel=cancel)
    import os
    import tempfile

    handle, name = tempfile.mkstemp(prefix=f".{Path(output).stem}.", suffix=".unmerged.gguf", dir=Path(output).parent)
    os.close(handle)
    converted = Path(name)
    try:
        convert_checkpoint(source, converted, outtype=outtype, progress=progress, cancel=cancel)
        return merge_adapters(converted, adapters, output, progress=progress, cancel=cancel)
    finally:
        converted.unlink(missing_ok=True)
