"""PEFT LoRA adapter folder → llama.cpp's GGUF LoRA adapter.

The file llama.cpp loads with `llama_adapter_lora_init`: `general.type = adapter`, `adapter.type = lora`,
`adapter.lora.alpha`, and per adapted matrix `<gguf name>.lora_a` [r, in] and `<gguf name>.lora_b` [out, r]
(numpy order; ggml's ne is reversed), named as the base model's GGUF names them. llama.cpp scales each pair by
alpha / r with r read from the tensor, so a layer whose own scale differs (rsLoRA, rank or alpha patterns) has the
difference folded into its B. The architecture table's row reordering (Llama's q/k rotary layout) applies to B,
whose rows are the layer's outputs.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from converters.core.atomic import atomic_output, check_free_space
from converters.core.errors import GGUFFileError, UnsupportedModelError, UserError
from converters.core.gguf_file import GGUFHeader, TensorHeader, check_gguf
from converters.core.jobs import CancelToken, Progress, ProgressFn, no_progress
from converters.reading.adapter import PeftAdapter, as_float32, read_adapter, resolve_base_folder
from converters.reading.architectures import Architecture, ModelConfig, architecture_for
from converters.reading.checkpoint import read_config
from converters.writing.gguf_stream import StreamingGGUFWriter
from converters.writing.tensor_types import OUTTYPES, encode

ROW_PERMUTING_TENSORS = (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K)
"""Tensors whose architecture transform only reorders rows, so it carries over to B; a layer whose transform
changes values (Gemma's norm offset) is no linear layer, and no adapter reaches it."""
ADAPTER_OUTTYPES = ("f32", "f16", "bf16")


@dataclass(frozen=True)
class AdapterResult:
    path: Path
    architecture: str
    pair_count: int
    rank: int
    alpha: float
    base: Path
    bytes_written: int
    seconds: float


@dataclass(frozen=True)
class _Pair:
    gguf_name: str
    a: np.ndarray
    b: np.ndarray


def convert_adapter(source: Path, output: Path | None = None, *, base: Path | None = None, outtype: str = "f16",
                    progress: ProgressFn | None = None, cancel: CancelToken | None = None) -> AdapterResult:
    """Convert the PEFT LoRA adapter in folder `source` for the base checkpoint `base` (default: the adapter's
    base_model_name_or_path, when that is a folder here) to a GGUF adapter at `output` (default: inside the
    adapter folder, `<folder>-<Type>-LoRA.gguf`). Nothing is written unless the whole file is."""
    started = time.monotonic()
    report = progress or no_progress
    cancel = cancel or CancelToken()
    if outtype.lower() not in ADAPTER_OUTTYPES:
        raise UserError(f"Unknown adapter type {outtype!r}; choose one of {', '.join(ADAPTER_OUTTYPES)}.")
    out = OUTTYPES[outtype.lower()]
    adapter = read_adapter(Path(source))
    base_folder = resolve_base_folder(adapter, base)
    config = read_config(base_folder)
    arch = architecture_for(config)
    pairs = _gguf_pairs(adapter, arch, config)
    target = Path(output) if output is not None else adapter.folder / f"{adapter.folder.name}-{out.name}-LoRA.gguf"
    check_free_space(target, sum(p.a.size + p.b.size for p in pairs) * 4 + 1024 * 1024)
    cancel.raise_if_cancelled()
    with atomic_output(target) as temporary:
        writer = StreamingGGUFWriter(temporary, arch.name)
        try:
            _write_metadata(writer.metadata, adapter, base_folder, target)
            writer.metadata.add_file_type(out.file_type)
            declared = []
            for pair in pairs:
                for suffix, values in (("lora_a", pair.a), ("lora_b", pair.b)):
                    declared.append((writer.declare(f"{pair.gguf_name}.{suffix}", values.shape, out.matrix_type),
                                     values))
            writer.begin_data()
            for index, (tensor, values) in enumerate(declared):
                cancel.raise_if_cancelled()
                report(Progress(index, len(declared), "tensors", tensor.name))
                writer.write(tensor, iter([encode(values, tensor.qtype)]))
            report(Progress(len(declared), len(declared), "tensors", "done"))
        finally:
            writer.close()
    return AdapterResult(path=target, architecture=arch.name, pair_count=len(pairs),
                         rank=max(p.a.shape[0] for p in pairs), alpha=adapter.alpha, base=base_folder,
                         bytes_written=target.stat().st_size, seconds=time.monotonic() - started)


def _gguf_pairs(adapter: PeftAdapter, arch: Architecture, config: ModelConfig) -> list[_Pair]:
    block_count = int(config.require("num_hidden_layers"))
    name_map = gguf.get_tensor_name_map(arch.gguf_arch, block_count)
    tied = bool(config.get("tie_word_embeddings", default=False))
    pairs = []
    for pair in adapter.pairs:
        module = pair.module
        for prefix in arch.source_prefixes:
            module = module.removeprefix(prefix)
        mapped = name_map.get_type_and_name(f"{module}.weight", try_suffixes=(".weight",))
        if mapped is None:
            raise UnsupportedModelError(f"The adapter adapts {pair.module}, which has no place in a llama.cpp "
                                        f"{arch.name} model; is it an adapter for this base model?")
        kind, gguf_name = mapped
        if kind == gguf.MODEL_TENSOR.OUTPUT and tied:
            raise UnsupportedModelError("The adapter adapts the output layer of a model whose output shares the "
                                        "embedding, which llama.cpp cannot adapt separately; merge it with PEFT.")
        a, b = as_float32(pair.a), as_float32(pair.b)
        b = b * np.float32(pair.scale * pair.rank / adapter.alpha) if pair.scale * pair.rank != adapter.alpha else b
        transform = arch.transforms.get(kind)
        if transform is not None:
            if kind not in ROW_PERMUTING_TENSORS:
                raise UnsupportedModelError(f"The adapter adapts {pair.module}, whose conversion is not a row "
                                            "reordering, so qdesk cannot carry the adapter over; merge it with PEFT.")
            b = transform(b, config)
        pairs.append(_Pair(gguf_name, np.ascontiguousarray(a), np.ascontiguousarray(b)))
    pairs.sort(key=lambda p: (_block_of(p.gguf_name), p.gguf_name))
    return pairs


def _block_of(name: str) -> int:
    match = re.match(r"blk\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def _write_metadata(writer: gguf.GGUFWriter, adapter: PeftAdapter, base: Path, target: Path) -> None:
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.alpha))
    writer.add_name(adapter.folder.name if adapter.folder.name else target.stem)
    writer.add_base_model_count(1)
    writer.add_base_model_name(0, Path(adapter.base_name or base.name).name)
    if adapter.base_name and not Path(adapter.base_name).is_absolute() and adapter.base_name.count("/") == 1:
        writer.add_base_model_repo_url(0, f"https://huggingface.co/{adapter.base_name}")


def adapter_mismatch(adapter: Path, model: GGUFHeader, model_name: str) -> str | None:
    """Why the file `adapter` cannot be applied to (or merged into) the model whose header is `model`, as one
    sentence; None when it fits. Read from the headers alone: the file is a LoRA adapter GGUF for the model's
    architecture, every A has its B, and each pair multiplies into the shape of a weight the model has. llama.cpp's
    loader does not always check the shapes itself (a wrong one crashed the generation), so they are checked here
    first."""
    adapter = Path(adapter)
    try:
        header = check_gguf(adapter)
    except GGUFFileError as error:
        return f"The adapter {adapter}: {str(error).rstrip('.')}."
    metadata = header.metadata
    if metadata.get("general.type") != "adapter" or metadata.get("adapter.type") != "lora":
        return (f"{adapter.name} is not a LoRA adapter GGUF; convert the PEFT adapter folder with "
                "`qdesk convert ADAPTER_DIR` first.")
    architecture = model.metadata.get("general.architecture")
    if metadata.get("general.architecture") != architecture:
        return (f"{adapter.name} adapts a {metadata.get('general.architecture')} model but {model_name} is a "
                f"{architecture} model; choose the adapter made for this base.")
    problem = _shape_problem(header.tensors, {tensor.name: tensor.shape for tensor in model.tensors}, model_name)
    if problem:
        return f"{adapter.name} does not fit {model_name}: {problem}; choose the adapter made for this base."
    return None


def _shape_problem(adapter_tensors: Sequence[TensorHeader], shapes: Mapping[str, tuple[int, ...]],
                   model_name: str) -> str | None:
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
