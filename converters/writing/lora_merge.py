"""LoRA adapters merged into a float GGUF: W ← W + Σ scale · (alpha / r) · B·A, before quantizing.

llama.cpp applies an adapter at run time with that same scale (alpha / r taken from the adapter file and its
tensors' rank, times the scale the user chose; without alpha, the chosen scale alone). Merging bakes it into the
weights, so the quantizer sees the adapted model and the result needs no adapter to run. Only float tensors
(F32, F16, BF16) can take a merge: quantized ones would be rounded twice, so such a base is refused.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from converters.core.atomic import atomic_output, check_free_space
from converters.core.errors import UserError
from converters.core.gguf_file import check_gguf, open_gguf
from converters.core.jobs import CancelToken, Progress, ProgressFn, no_progress
from converters.writing.gguf_stream import StreamingGGUFWriter
from converters.writing.lora import adapter_mismatch
from converters.writing.tensor_types import encode

QType = gguf.GGMLQuantizationType
MERGEABLE = (QType.F32, QType.F16, QType.BF16)
MERGED_KEY = "general.source.lora"
"""Names the adapters merged into a GGUF, with their scales."""
ROWS_PER_STEP = 4096


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
    architecture = _string(reader, "general.architecture")
    if _string(reader, "general.type") == "adapter":
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
    with atomic_output(output) as temporary:
        writer = StreamingGGUFWriter(temporary, architecture or "llama")
        try:
            _copy_metadata(reader, writer.metadata)
            writer.metadata.add_string(MERGED_KEY, ", ".join(labels))
            declared = [writer.declare(t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type)
                        for t in reader.tensors]
            writer.begin_data()
            for index, (tensor, target) in enumerate(zip(reader.tensors, declared, strict=True)):
                cancel.raise_if_cancelled()
                report(Progress(index, len(declared), "tensors", tensor.name))
                if tensor.name in deltas:
                    writer.write(target, _merged_rows(tensor, deltas[tensor.name], cancel))
                else:
                    writer.write(target, iter([np.asarray(tensor.data)]))
            report(Progress(len(declared), len(declared), "tensors", "done"))
        finally:
            writer.close()
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
            a, b = _as_float(tensor), _as_float(tensors[name.removesuffix(".lora_a") + ".lora_b"])
            deltas[name.removesuffix(".lora_a")] = AdapterDelta(a, b, scale * alpha / a.shape[0] if alpha else scale)
    return deltas


def _merged_rows(tensor: Any, deltas: list[AdapterDelta], cancel: CancelToken):
    rows = int(tensor.shape[1])
    for start in range(0, rows, ROWS_PER_STEP):
        cancel.raise_if_cancelled()
        stop = min(rows, start + ROWS_PER_STEP)
        weight = _as_float(tensor, start, stop)
        for delta in deltas:
            weight = weight + np.float32(delta.factor) * (delta.b[start:stop] @ delta.a)
        yield encode(weight.astype(np.float32), tensor.tensor_type)


def _as_float(tensor: Any, start: int = 0, stop: int | None = None) -> np.ndarray:
    data = np.asarray(tensor.data)[start:stop]
    if tensor.tensor_type == QType.BF16:
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if tensor.tensor_type in (QType.F32, QType.F16):
        return data.astype(np.float32)
    return gguf.quants.dequantize(data, tensor.tensor_type)


def _string(reader: gguf.GGUFReader, key: str) -> str | None:
    field = reader.fields.get(key)
    return None if field is None else str(field.contents())


_WRITER_OWNED = ("GGUF.", "general.architecture", "general.alignment", MERGED_KEY)


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    """Every key of the base file, in order, with its type (the writer adds the architecture itself)."""
    for name, field in reader.fields.items():
        if name.startswith(_WRITER_OWNED):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(name, field.contents(), value_type, sub_type=sub_type)


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
