"""What each quantization choice will weigh, and whether it fits this machine, told before anything runs.

The preset sizes are llama.cpp's own: a dry run of its quantizer per preset (`preset_plan`, the dry run `quantize
--like` uses), so each preset's own type rules apply (Q4_K_M's Q6_K `output.weight` and half its `attn_v` and
`ffn_down` matrices, the fallbacks for rows that do not fill whole blocks), exact to the tensor. A Hugging Face
checkpoint cannot be read by llama.cpp, so it is planned through its skeleton: the GGUF qdesk's converter would
write, header, tokenizer and tensor table exactly, with the tensor data left a hole
(`converters.writing.convert.write_skeleton`, in a child process, into a temporary folder); no weight is read or
written.

The memory verdict is `qdesk.memory.check_fit_for_shape` for the model's shape with the variant's tensor bytes
(`qdesk.hub.fit.resized_shape`), against the RAM available now and the free VRAM of this machine's GPUs.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from converters.core.gguf_file import check_gguf
from converters.core.hyperparameters import check_model_gguf
from converters.core.isolation import run_isolated
from converters.core.jobs import CancelToken, Progress, ProgressFn, no_progress
from converters.core.leftovers import temporary_folder
from converters.core.units import format_size
from converters.mix.allocate import tensor_bytes_range
from converters.quantization.plan import tensor_bytes, type_name
from converters.quantization.quantize import preset_plan, reference_outtype
from converters.reading.architectures.base import ModelConfig
from converters.reading.checkpoint import open_checkpoint, read_config, resolve_checkpoint_folder
from converters.reading.quantized import dequantizing
from converters.writing.tensor_types import OUTTYPES, tensor_type
from qdesk.hub.fit import resized_shape
from qdesk.memory import DEFAULT_N_CTX, FitVerdict, ModelShape, available_ram, check_fit_for_shape, read_model_shape

__all__ = ["PRESET_CHOICES", "ChoiceSize", "Machine", "ReferenceTensor", "SizePreview", "SourceModel",
           "fit_for_size", "planning_gguf", "preset_file_bytes", "preview_sizes", "read_source", "this_machine"]

PRESET_CHOICES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")
"""The presets offered side by side (the ones `qdesk quantize --preset` lists first)."""

_LAYER = re.compile(r"\.layers\.(\d+)\.")
_OUTPUT_NAMES = re.compile(r"(^|\.)(lm_head\.weight|norm\.weight)$")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_BYTES_PER_TOKEN_IN_HEADER = 18
"""A GGUF's tokenizer costs about this much header per vocabulary entry (text, score, type, merges)."""


@dataclass(frozen=True)
class ReferenceTensor:
    """One tensor of the reference GGUF (the source itself, or the checkpoint as qdesk would convert it)."""

    name: str
    shape: tuple[int, ...]
    """ggml order: shape[0] is the row length."""
    type: str
    """ggml's spelling: f32, f16, bf16."""

    @property
    def n_bytes(self) -> int:
        return tensor_bytes(self.type, self.shape)


@dataclass(frozen=True)
class SourceModel:
    """A model to quantize, read from headers only: its tensors, its header's size and its memory shape."""

    path: Path
    is_checkpoint: bool
    """An HF checkpoint folder (sizes are estimates) rather than a GGUF (sizes from llama.cpp's dry run)."""
    tensors: tuple[ReferenceTensor, ...]
    header_bytes: int
    shape: ModelShape
    output_tensor: str | None = None
    """The matrix llama.cpp treats as the output layer (`lm_head`, or the embedding when they are tied)."""

    @property
    def reference_bytes(self) -> int:
        return self.header_bytes + sum(tensor.n_bytes for tensor in self.tensors)


@dataclass(frozen=True)
class Machine:
    ram_bytes: int
    vram_bytes: int | None
    """Free VRAM of the GPUs together; None without a GPU."""


@dataclass(frozen=True)
class ChoiceSize:
    """One choice's file size and whether the result fits this machine."""

    label: str
    file_bytes: int
    exact: bool
    fit: FitVerdict


@dataclass(frozen=True)
class SizePreview:
    source: SourceModel
    machine: Machine
    presets: dict[str, ChoiceSize]

    def mix(self, file_bytes: int) -> ChoiceSize:
        """A sensitivity mix of at most `file_bytes` (the budget is its size)."""
        return ChoiceSize(f"mix {format_size(file_bytes)}", file_bytes, False,
                          fit_for_size(self.source, file_bytes, self.machine))

    def mix_range(self) -> tuple[int, int]:
        """Budgets worth offering: from the smallest mix the model's rows allow (the i-quants', below Q2_K's
        size where rows are multiples of 256) or the smallest preset's size, to the largest preset's."""
        sizes = [choice.file_bytes for choice in self.presets.values()]
        reference = self.source.reference_bytes
        if not sizes:
            return reference // 8, reference // 2
        smallest_mix = self.source.header_bytes + tensor_bytes_range(self.source.tensors)[0]
        return min(min(sizes), smallest_mix), max(sizes)


def this_machine() -> Machine:
    """The RAM available now and the GPUs' free VRAM (None when there is no GPU or it cannot be asked)."""
    try:
        from qdesk.memory import available_vram

        vram = available_vram()
    except Exception:  # a broken GPU driver must not stop the estimate; it then counts as no GPU
        vram = None
    return Machine(available_ram(), vram)


def read_source(path: str | Path) -> SourceModel:
    """The model at `path` (an HF checkpoint folder, a file inside one, or a GGUF) from its headers alone."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _gguf_source(path)
    return _checkpoint_source(resolve_checkpoint_folder(path))


def _gguf_source(path: Path) -> SourceModel:
    header = check_model_gguf(path)
    tensors = tuple(ReferenceTensor(t.name, tuple(int(d) for d in t.shape), type_name(t.type)) for t in header.tensors)
    header_bytes = path.stat().st_size - sum(t.n_bytes for t in header.tensors)
    return SourceModel(path, False, tensors, header_bytes, read_model_shape(path))


def _checkpoint_source(folder: Path) -> SourceModel:
    config = read_config(folder)
    checkpoint, _ = dequantizing(open_checkpoint(folder, config))  # GPTQ, AWQ ...: the float tensors they stand for
    outtype = OUTTYPES[reference_outtype(folder)]
    tied = bool(config.get("tie_word_embeddings", default=False))
    tensors = []
    for name, source in checkpoint.tensors.items():
        if _IGNORED.fullmatch(name) or (tied and name.endswith("lm_head.weight")):
            continue
        stored = type_name(tensor_type(source.shape, outtype))
        tensors.append(ReferenceTensor(name, tuple(reversed(source.shape)), stored))
    vocab = int(config.get("vocab_size", default=0) or 0)
    header_bytes = _tokenizer_bytes(folder, vocab) + 64 * len(tensors) + 1024
    output = next((t.name for t in tensors if t.name.endswith("lm_head.weight" if not tied else "embed_tokens.weight")),
                  None)
    return SourceModel(folder, True, tuple(tensors), header_bytes, _checkpoint_shape(config, tensors, tied), output)


def _tokenizer_bytes(folder: Path, vocab: int) -> int:
    tokenizer = folder / "tokenizer.json"
    if tokenizer.is_file():
        try:
            document = json.loads(tokenizer.read_text(encoding="utf-8"))
            vocab = max(vocab, len(document.get("model", {}).get("vocab", {})))
            merges = len(document.get("model", {}).get("merges", []))
            return _BYTES_PER_TOKEN_IN_HEADER * (vocab + merges)
        except (OSError, ValueError, AttributeError):
            pass
    return _BYTES_PER_TOKEN_IN_HEADER * vocab


def _checkpoint_shape(config: ModelConfig, tensors: Sequence[ReferenceTensor], tied: bool) -> ModelShape:
    n_layer = int(config.require("num_hidden_layers"))
    layer_bytes = [0] * n_layer
    input_bytes = output_bytes = embedding_bytes = embedding_rows = 0
    for tensor in tensors:
        layer = _LAYER.search(tensor.name)
        if layer is not None and int(layer.group(1)) < n_layer:
            layer_bytes[int(layer.group(1))] += tensor.n_bytes
        elif _OUTPUT_NAMES.search(tensor.name):
            output_bytes += tensor.n_bytes
        else:
            input_bytes += tensor.n_bytes
            if "embed_tokens" in tensor.name and len(tensor.shape) == 2:
                embedding_bytes, embedding_rows = tensor.n_bytes, tensor.shape[1]
    n_ff = int(config.get("intermediate_size", default=0) or 0)
    n_expert = int(config.get("num_local_experts", "num_experts", default=0) or 0)
    used = int(config.get("num_experts_per_tok", default=0) or 0)
    if n_expert and used:
        n_ff = int(config.get("moe_intermediate_size", default=n_ff) or n_ff) * used
    return ModelShape(
        architecture=str(config.get("model_type", default="unknown")),
        n_layer=n_layer,
        n_embd=int(config.require("hidden_size")),
        n_vocab=int(config.get("vocab_size", default=embedding_rows) or embedding_rows),
        n_ctx_train=int(config.get("max_position_embeddings", default=0) or 0),
        n_head=(config.head_count,) * n_layer,
        n_head_kv=(config.head_count_kv,) * n_layer,
        head_dim_k=config.head_dim,
        head_dim_v=config.head_dim,
        n_ff=n_ff,
        n_expert=n_expert,
        has_sliding_window=config.get("sliding_window") is not None,
        input_bytes=input_bytes,
        layer_bytes=tuple(layer_bytes),
        output_bytes=output_bytes,
        tied_output_bytes=embedding_bytes if tied else 0,
        tensor_bytes=input_bytes + sum(layer_bytes) + output_bytes,
        tensor_offsets={},
        tensor_sizes={tensor.name: tensor.n_bytes for tensor in tensors},
    )


@contextmanager
def planning_gguf(source: SourceModel, cancel: CancelToken | None = None) -> Iterator[Path]:
    """A GGUF llama.cpp can plan `source` from: the source itself, or a checkpoint's skeleton in a temporary
    folder, removed afterwards."""
    if not source.is_checkpoint:
        yield source.path
        return
    from converters.writing.convert import write_skeleton

    folder = temporary_folder(None, "sizes")
    try:
        skeleton = folder / "skeleton.gguf"
        run_isolated(write_skeleton, {"source": source.path, "output": skeleton,
                                      "outtype": reference_outtype(source.path)},
                     cancel=cancel, what="reading the checkpoint's tensor table")
        yield skeleton
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def preset_file_bytes(source: SourceModel, preset: str, planned: Path | None = None) -> int:
    """The file size `preset` makes of `source`: the header plus llama.cpp's plan (a dry run) of the GGUF `planned`
    (default: the source; a checkpoint's skeleton from `planning_gguf`)."""
    gguf = planned or source.path
    header = check_gguf(gguf)
    header_bytes = gguf.stat().st_size - sum(tensor.n_bytes for tensor in header.tensors)
    return header_bytes + preset_plan(gguf, preset).n_bytes


def fit_for_size(source: SourceModel, file_bytes: int, machine: Machine, n_ctx: int = DEFAULT_N_CTX) -> FitVerdict:
    """Whether a variant of `source` of `file_bytes` fits `machine` (arithmetic only; no file is read)."""
    shape = resized_shape(source.shape, max(1, file_bytes - source.header_bytes))
    return check_fit_for_shape(shape, ram_bytes=machine.ram_bytes, vram_bytes=machine.vram_bytes, n_ctx=n_ctx)


def preview_sizes(path: str | Path, presets: Sequence[str] = PRESET_CHOICES, *, progress: ProgressFn = no_progress,
                  cancel: CancelToken | None = None) -> SizePreview:
    """Every preset's file size for the model at `path` and whether it fits this machine."""
    cancel = cancel or CancelToken()
    progress(Progress(0, len(presets) + 1, "presets", "reading the model's headers"))
    source = read_source(path)
    machine = this_machine()
    sizes: dict[str, ChoiceSize] = {}
    with planning_gguf(source, cancel) as planned:
        for done, preset in enumerate(presets, start=1):
            cancel.raise_if_cancelled()
            file_bytes = preset_file_bytes(source, preset, planned)
            sizes[preset] = ChoiceSize(preset, file_bytes, True, fit_for_size(source, file_bytes, machine))
            progress(Progress(done, len(presets) + 1, "presets", f"sized {preset}"))
    return SizePreview(source, machine, sizes)
