"""Hugging Face checkpoint folder → GGUF file that stock llama.cpp loads, streamed one tensor at a time."""

from __future__ import annotations

import itertools
import math
import operator
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from converters.core.atomic import atomic_output, check_free_space
from converters.core.errors import CheckpointError, UnsupportedModelError, UserError
from converters.core.hyperparameters import hyperparameter_problems
from converters.core.jobs import CancelToken, Progress, ProgressFn, no_progress
from converters.core.outputs import check_output_folder, check_outputs
from converters.reading.architectures import Architecture, ModelConfig, architecture_for
from converters.reading.architectures.base import HParam
from converters.reading.checkpoint import (
    Checkpoint,
    SourceTensor,
    check_dtypes,
    checkpoint_files,
    open_checkpoint,
    read_config,
    resolve_checkpoint_folder,
)
from converters.reading.config_shapes import check_layers, check_shapes, layer_count, whole_number
from converters.reading.prefetch import prefetched
from converters.reading.quantized import dequantizing
from converters.reading.tokenizer import TokenizerSummary, export_tokenizer
from converters.writing.gguf_stream import DeclaredTensor, StreamingGGUFWriter
from converters.writing.tensor_types import OUTTYPES, OutType, encode, tensor_type

CHUNK_BYTES = 16 * 1024 * 1024
"""Largest float32 slice of one tensor held in memory at once while converting."""
SOURCE_QUANTIZATION_KEY = "general.source.quantization"
"""Where a GGUF converted from a quantized checkpoint (GPTQ, AWQ, ...) names the format it was dequantized from."""
_SOURCE_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
"""The layer index in a Hugging Face tensor name (model.layers.3.mlp…)."""


@dataclass(frozen=True)
class ConversionResult:
    path: Path
    architecture: str
    outtype: str
    tensor_count: int
    parameter_count: int
    bytes_written: int
    tokenizer: TokenizerSummary
    seconds: float
    source_quantization: str | None = None
    """The quantized format the checkpoint was dequantized from (GPTQ, AWQ, ...), None for a float one."""


@dataclass(frozen=True)
class _PlannedTensor:
    """One output tensor: where its values come from and how they are declared in the GGUF."""

    declared: DeclaredTensor
    kind: gguf.MODEL_TENSOR | None
    source: SourceTensor | None = None
    generated: np.ndarray | None = None

    @property
    def element_count(self) -> int:
        return int(np.prod(self.declared.shape))


def convert_checkpoint(
    source: Path,
    output: Path | None = None,
    *,
    outtype: str = "f16",
    output_folder: Path | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> ConversionResult:
    """Convert the checkpoint folder `source` to a GGUF at `output` (default: named by the GGUF naming
    convention, in `output_folder` or else in the checkpoint folder).

    The file appears only when complete: a failure or cancellation leaves no partial output behind.
    """
    started = time.monotonic()
    report = progress or no_progress
    cancel = cancel or CancelToken()
    if outtype.lower() not in OUTTYPES:
        raise UserError(f"Unknown output type {outtype!r}; choose one of {', '.join(OUTTYPES)}.")
    out = OUTTYPES[outtype.lower()]

    folder = resolve_checkpoint_folder(source)
    config = read_config(folder)
    arch = architecture_for(config)
    checkpoint, source_quantization = dequantizing(open_checkpoint(folder, config))
    check_dtypes(checkpoint)
    block_count = layer_count(checkpoint.config)
    plan = _plan_tensors(checkpoint, arch, out, block_count)
    _check_hparams(folder, arch, _hparam_values(arch, checkpoint.config), plan)
    parameter_count = sum(p.element_count for p in plan)
    metadata = _model_metadata(checkpoint.folder, parameter_count)
    target = Path(output) if output is not None else (output_folder or checkpoint.folder) / _default_file_name(
        metadata, out)
    check_output_folder(target)
    check_outputs([*checkpoint_files(checkpoint.folder), *checkpoint.weight_files], [target])
    check_free_space(target, sum(p.declared.nbytes for p in plan) + 64 * 1024 * 1024)

    cancel.raise_if_cancelled()
    with atomic_output(target) as temporary:
        writer = StreamingGGUFWriter(temporary, arch.name)
        try:
            tokenizer = _write_header(writer, checkpoint, arch, out, plan, metadata, source_quantization)
            _write_tensors(writer, plan, arch, checkpoint.config, report, cancel)
        finally:
            writer.close()
    return ConversionResult(
        path=target,
        architecture=arch.name,
        outtype=out.name,
        tensor_count=len(plan),
        parameter_count=parameter_count,
        bytes_written=target.stat().st_size,
        tokenizer=tokenizer,
        seconds=time.monotonic() - started,
        source_quantization=source_quantization,
    )


def _write_header(writer: StreamingGGUFWriter, checkpoint: Checkpoint, arch: Architecture, out: OutType,
                  plan: list[_PlannedTensor], metadata: gguf.Metadata,
                  source_quantization: str | None = None) -> TokenizerSummary:
    """Metadata, tokenizer and tensor table, up to where the tensor data begins."""
    metadata.set_gguf_meta_model(writer.metadata)
    if source_quantization is not None:
        writer.metadata.add_string(SOURCE_QUANTIZATION_KEY, source_quantization)
    for key, value in _hparam_values(arch, checkpoint.config).items():
        _add_value(writer.metadata, key, value)
    writer.metadata.add_file_type(out.file_type)
    writer.metadata.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokenizer = export_tokenizer(checkpoint.folder, writer.metadata, _vocab_rows(plan))
    writer.metadata.add_vocab_size(tokenizer.token_count)
    for planned in plan:
        writer.declare(planned.declared.name, planned.declared.shape, planned.declared.qtype)
    writer.begin_data()
    return tokenizer


def write_skeleton(source: Path, output: Path, *, outtype: str = "f16", progress: ProgressFn | None = None,
                   cancel: CancelToken | None = None) -> Path:
    """The GGUF `convert_checkpoint` would write, with its header, tokenizer and tensor table exactly as converted
    but no weight read: the tensor data is a hole (a sparse file where the file system allows it), so the file
    costs no time and next to no disk. What it is for: llama.cpp's quantizer can plan a checkpoint (a dry run of
    a preset reads the tensor table, never the data) before anything is converted."""
    del progress
    (cancel or CancelToken()).raise_if_cancelled()
    out = OUTTYPES[outtype.lower()]
    folder = resolve_checkpoint_folder(source)
    config = read_config(folder)
    arch = architecture_for(config)
    checkpoint, source_quantization = dequantizing(open_checkpoint(folder, config))
    block_count = layer_count(checkpoint.config)
    plan = _plan_tensors(checkpoint, arch, out, block_count)
    _check_hparams(folder, arch, _hparam_values(arch, checkpoint.config), plan)
    metadata = _model_metadata(checkpoint.folder, sum(p.element_count for p in plan))
    with atomic_output(Path(output)) as temporary:
        writer = StreamingGGUFWriter(temporary, arch.name)
        try:
            _write_header(writer, checkpoint, arch, out, plan, metadata, source_quantization)
            writer.skip_data()
        finally:
            writer.close()
    return Path(output)


def _plan_tensors(
    checkpoint: Checkpoint, arch: Architecture, out: OutType, block_count: int
) -> list[_PlannedTensor]:
    ignored = [re.compile(pattern) for pattern in arch.ignored_tensors]
    kept = [name for name in checkpoint.tensors if not any(pattern.fullmatch(name) for pattern in ignored)]
    layers = {int(found.group(1)) for name in kept if (found := _SOURCE_LAYER.search(name))}
    if max(layers, default=-1) >= block_count:
        check_layers(layers, block_count)  # a layer beyond the config's count: refused before the map is made
    # The map's size follows the layers the weights hold, not the config's count (which may be anything).
    name_map = gguf.get_tensor_name_map(arch.gguf_arch, min(block_count, max(layers, default=-1) + 1))
    tied = bool(checkpoint.config.get("tie_word_embeddings", default=False))
    planned: list[tuple[tuple[int, int], _PlannedTensor]] = []
    for order, (name, source) in enumerate(checkpoint.tensors.items()):
        if any(pattern.fullmatch(name) for pattern in ignored):
            continue
        mapped = name_map.get_type_and_name(_strip_prefix(name, arch), try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise UnsupportedModelError(
                f"Tensor {name} has no place in a llama.cpp {arch.name} model; this checkpoint is a variant "
                "qdesk does not support yet."
            )
        kind, gguf_name = mapped
        if kind == gguf.MODEL_TENSOR.OUTPUT and tied:
            continue
        declared = DeclaredTensor(gguf_name, source.shape, tensor_type(source.shape, out))
        planned.append(((_block_of(gguf_name), order), _PlannedTensor(declared, kind, source=source)))
    extras = arch.extra_tensors(checkpoint.config) if arch.extra_tensors else ()
    for offset, (gguf_name, values) in enumerate(extras):
        declared = DeclaredTensor(gguf_name, tuple(values.shape), tensor_type(tuple(values.shape), out))
        planned.append(((-1, -len(checkpoint.tensors) + offset), _PlannedTensor(declared, None, generated=values)))
    check_layers(layers, block_count)
    check_shapes(((p.source.name, p.kind, p.source.shape) for _, p in planned if p.source is not None),
                 checkpoint.config)
    planned.sort(key=lambda item: item[0])
    names = [p.declared.name for _, p in planned]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise CheckpointError(
            f"The checkpoint holds {sorted(duplicates)[0]} twice (under two names); download it again."
        )
    return [p for _, p in planned]


def _strip_prefix(name: str, arch: Architecture) -> str:
    for prefix in arch.source_prefixes:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _block_of(gguf_name: str) -> int:
    match = re.match(r"blk\.(\d+)\.", gguf_name)
    return int(match.group(1)) if match else -1


def _vocab_rows(plan: list[_PlannedTensor]) -> int | None:
    for planned in plan:
        if planned.kind == gguf.MODEL_TENSOR.TOKEN_EMBD:
            return planned.declared.shape[0]
    return None


def _hparam_values(arch: Architecture, config: ModelConfig) -> dict[str, Any]:
    """The architecture's GGUF hyperparameters (full key → value) from config.json."""
    values: dict[str, Any] = {}
    for hparam in arch.hparams:
        value = config.get(*hparam.config_keys)
        if value is None:
            if hparam.required and hparam.default is None:
                config.require(*hparam.config_keys)
            value = hparam.default
        if value is not None:
            values[f"{arch.name}.{hparam.key}"] = _config_value(hparam, value)
    if arch.derived_metadata is not None:
        try:
            values.update(arch.derived_metadata(config))
        except (TypeError, ValueError, ArithmeticError, KeyError) as error:
            raise CheckpointError(f"config.json holds a value qdesk cannot use ({type(error).__name__}: {error}); "
                                  "download the checkpoint again.") from error
    return values


def _check_hparams(folder: Path, arch: Architecture, hparams: dict[str, Any], plan: list[_PlannedTensor]) -> None:
    """Refuse a config.json that would make a GGUF llama.cpp cannot run (`converters.core.hyperparameters`)."""
    shapes = {planned.declared.name: tuple(reversed(planned.declared.shape)) for planned in plan}
    problems = hyperparameter_problems({"general.architecture": arch.name, **hparams}, shapes)
    if problems:
        raise CheckpointError(f"{folder / 'config.json'} gives impossible settings: {problems[0]}; correct "
                              "config.json or download the checkpoint again.")


_UINT32_LIMIT = 1 << 32


def _config_value(hparam: HParam, value: Any) -> Any:
    """A config.json value as its GGUF key stores it: a whole number a uint32 holds, a finite float, or a string;
    anything else is refused naming the field."""
    wanted, whole = hparam.value_type, whole_number(value)
    if wanted is int and whole is not None and 0 <= whole < _UINT32_LIMIT:
        return whole
    if wanted is float and whole is not None and abs(whole) < 1 << 64:
        return float(whole)
    if wanted is float and isinstance(value, float) and math.isfinite(value):
        return value
    if wanted not in (int, float) and isinstance(value, wanted):
        return value
    kind = {int: "a whole number from 0 to 4294967295", float: "a finite number"}.get(wanted, wanted.__name__)
    raise CheckpointError(f"config.json gives `{hparam.config_keys[0]}` as {value!r}, not {kind}; download the "
                          "checkpoint again.")


def _add_value(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list | tuple):
        writer.add_array(key, list(value))
    else:
        raise TypeError(f"no GGUF encoding for {key}={value!r}")


def _model_metadata(folder: Path, parameter_count: int) -> gguf.Metadata:
    name_hint = _hub_cache_repo_name(folder)
    metadata = gguf.Metadata.load(None, folder, name_hint, parameter_count)
    if name_hint and not metadata.basename:
        metadata.basename = name_hint
    if metadata.size_label is None:
        metadata.size_label = gguf.size_label(parameter_count, 0, 0, 0)
    if metadata.name is None:
        metadata.name = name_hint or folder.name
    return metadata


def _hub_cache_repo_name(folder: Path) -> str | None:
    """`SmolLM2-135M-Instruct` for `.../models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/<hash>`."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.split("--")[-1]
    return None


def _default_file_name(metadata: gguf.Metadata, out: OutType) -> str:
    stem = gguf.naming_convention(
        metadata.name, metadata.basename, metadata.finetune, metadata.version, metadata.size_label, out.name
    )
    return f"{stem}.gguf"


def _write_tensors(
    writer: StreamingGGUFWriter,
    plan: list[_PlannedTensor],
    arch: Architecture,
    config: ModelConfig,
    report: ProgressFn,
    cancel: CancelToken,
) -> None:
    """Encode in a worker thread while this one writes, so reading and writing overlap."""
    total = sum(p.element_count for p in plan)
    encoded = prefetched(
        (index, piece)
        for index, planned in enumerate(plan)
        for piece in _encoded_pieces(planned, arch, config, cancel)
    )
    done = 0
    for index, pieces in itertools.groupby(encoded, key=operator.itemgetter(0)):
        cancel.raise_if_cancelled()
        planned = plan[index]
        report(Progress(done, total, "parameters", planned.declared.name))
        writer.write(planned.declared, (piece for _, piece in pieces))
        done += planned.element_count
    report(Progress(total, total, "parameters", "done"))


def _encoded_pieces(
    planned: _PlannedTensor, arch: Architecture, config: ModelConfig, cancel: CancelToken
) -> Iterator[np.ndarray]:
    qtype = planned.declared.qtype
    if planned.generated is not None:
        yield encode(planned.generated, qtype)
        return
    source = planned.source
    assert source is not None
    transform = arch.transforms.get(planned.kind) if planned.kind is not None else None
    if transform is not None or len(source.shape) < 2:
        values = source.load()
        yield encode(transform(values, config) if transform else values, qtype)
        return
    row_bytes = 4 * source.element_count // source.rows
    rows_per_chunk = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, source.rows, rows_per_chunk):
        cancel.raise_if_cancelled()
        yield encode(source.read_rows(start, min(source.rows, start + rows_per_chunk)), qtype)
