"""How much memory a GGUF model takes once llama.cpp has loaded it, and where: `estimate_memory`, `check_fit`.

The estimate reads the file's header only (`converters.gguf_file.check_gguf` first, then the few metadata keys it
needs) and follows the rules of the llama.cpp that llama-cpp-python 0.3.36 ships, read from its source
(`src/llama-model.cpp`, `src/llama-kv-cache.cpp`, `src/llama-context.cpp`) and checked against what it allocates
(`measure_allocation`; see docs/memory.md for the rules and the accuracy table):

* **Weights** are the tensors' bytes, placed per llama.cpp's layer assignment. llama.cpp counts `block_count + 1`
  offloadable layers, the last being the output layer: with `n_gpu_layers = k` the layers from
  `block_count + 1 - k` on go to the GPU, so the output layer (`output.weight`, `output_norm`) is the first to
  move, then the repeating blocks from the last one down; the token embedding always stays on the CPU. A model
  with tied embeddings (no `output.weight`) gets a copy of `token_embd` on the output layer's device when that is
  a GPU.
* **KV cache**: per layer, K is `head_count_kv * key_length` values and V `head_count_kv * value_length` values
  per cell, in the cache type's real block size (q8_0: 34 bytes per 32 values, q4_0: 18 per 32), for
  `n_ctx` rounded up to a multiple of 256 cells, on the device of its layer. Sliding-window layers get a full-size
  cache too (llama.cpp's default `swa_full`).
* **Compute buffers**: the peak of ggml's graph allocator for the worst-case batch of `n_ubatch` tokens that
  llama.cpp reserves at load, with every token an output: the largest of the logits (`n_vocab * n_ubatch` floats)
  and, inside a layer, the attention scores (`head_count * n_ctx * n_ubatch` floats without flash attention)
  or the feed-forward intermediates, with the attention mask alive through all layers, plus the small output
  buffer llama.cpp keeps for one token's logits.

The engine loads models through `llama_cpp.Llama` with its defaults (`n_batch = n_ubatch = 512`, flash attention
off), which are this module's defaults too. llama.cpp refuses a quantized V cache without flash attention, so
the quantized KV types are estimated (and measured) with flash attention on.

GPU splits follow the placement rules above; they are verified on a CPU-only machine only.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import struct
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from converters.errors import GGUFFileError, UserError
from converters.gguf_file import GGUFHeader, check_gguf

__all__ = [
    "DEFAULT_N_BATCH",
    "DEFAULT_N_CTX",
    "DEFAULT_N_UBATCH",
    "DEFAULT_RAM_HEADROOM",
    "DEFAULT_VRAM_HEADROOM",
    "KV_TYPES",
    "AllocationLogError",
    "FitVerdict",
    "MeasuredAllocation",
    "MemoryEstimate",
    "ModelShape",
    "SizeError",
    "available_ram",
    "available_vram",
    "check_fit",
    "check_fit_for_shape",
    "estimate_for_shape",
    "estimate_memory",
    "format_size",
    "max_gpu_layers",
    "measure_allocation",
    "parse_allocation_log",
    "parse_size",
    "read_model_shape",
    "read_model_shape_from_prefix",
    "render_memory_text",
]

MiB = 1 << 20
GiB = 1 << 30
F32_BYTES = 4
F16_BYTES = 2

DEFAULT_N_CTX = 4096
DEFAULT_N_BATCH = 512
"""llama-cpp-python's `Llama` default, which the engine keeps; llama-cpp-python lowers it to `n_ctx` when smaller."""
DEFAULT_N_UBATCH = 512
CONTEXT_PADDING = 256
"""llama.cpp rounds the context (the number of KV cells) up to a multiple of this."""
DEFAULT_VRAM_HEADROOM = 512 * MiB
"""VRAM kept free for what the estimate does not see: the GPU runtime's own context and library workspaces."""
DEFAULT_RAM_HEADROOM = 256 * MiB
"""RAM kept free for the worker process itself (Python, llama-cpp-python) on top of llama.cpp's buffers."""

KV_TYPES: dict[str, GGMLQuantizationType] = {
    "f16": GGMLQuantizationType.F16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
    "f32": GGMLQuantizationType.F32,
    "bf16": GGMLQuantizationType.BF16,
    "q4_1": GGMLQuantizationType.Q4_1,
    "q5_0": GGMLQuantizationType.Q5_0,
    "q5_1": GGMLQuantizationType.Q5_1,
    "iq4_nl": GGMLQuantizationType.IQ4_NL,
}
"""KV cache types llama.cpp accepts, by the names its tools use; the first three are the usual choices."""

_UNQUANTIZED_KV = frozenset({"f16", "f32", "bf16"})

# Live tensors besides the big ones, in units of one activation row set (n_embd floats per token), read off
# ggml's allocator peaks: residual stream, norm output and the previous block's output.
_ACTIVATIONS_AROUND_ATTENTION = 3
_ACTIVATIONS_AROUND_FFN = 3
_ACTIVATIONS_AROUND_OUTPUT = 3
_FFN_INTERMEDIATES = 3
"""gate, up and their gated product, all alive before the down projection."""


class SizeError(UserError):
    """A memory size the user typed cannot be read."""


class AllocationLogError(RuntimeError):
    """llama.cpp's log did not say what it allocated (or it failed to load the model)."""


# --- the model's shape --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs from a GGUF: hyperparameters per layer and tensor bytes by placement."""

    architecture: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    n_head: tuple[int, ...]
    """Query heads per layer."""
    n_head_kv: tuple[int, ...]
    """KV heads per layer (0 for a layer without a KV cache)."""
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    """Feed-forward width a token goes through (for mixture-of-experts: the used experts' widths together)."""
    n_expert: int
    has_sliding_window: bool
    input_bytes: int
    """Tensors of the input layer (token embedding and anything outside the blocks and the output): always CPU."""
    layer_bytes: tuple[int, ...]
    output_bytes: int
    """`output.weight` and `output_norm`; for tied embeddings only the norm (see `tied_output_bytes`)."""
    tied_output_bytes: int
    """Bytes of `token_embd.weight` when the model has no `output.weight` (llama.cpp then reuses it), else 0."""
    tensor_bytes: int
    tensor_offsets: Mapping[str, int] = field(repr=False, compare=False)
    """Where each tensor's data starts, relative to the data section (for the repack correction of measurements)."""
    tensor_sizes: Mapping[str, int] = field(repr=False, compare=False)

    @property
    def offloadable_layers(self) -> int:
        """llama.cpp's count of offloadable layers: the repeating blocks and the output layer."""
        return self.n_layer + 1


def _per_layer(value: Any, n_layer: int, key: str, path: Path) -> tuple[int, ...]:
    if isinstance(value, list):
        if len(value) != n_layer:
            raise GGUFFileError(f"{path} lists {len(value)} values for {key} but has {n_layer} layers; "
                                "download or convert it again.")
        return tuple(int(v) for v in value)
    return (int(value),) * n_layer


def _layer_of(tensor_name: str) -> int | None:
    match = re.match(r"blk\.(\d+)\.", tensor_name)
    return int(match.group(1)) if match else None


_OUTPUT_TENSOR_PREFIXES = ("output.", "output_norm.")


def read_model_shape(path: str | os.PathLike[str]) -> ModelShape:
    """The hyperparameters and tensor placement of the GGUF at `path`; raises GGUFFileError for a bad file."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        check_gguf(path)  # the sentence for a missing or unreadable file
        raise
    return _cached_shape(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=32)
def _cached_shape(path: Path, _mtime_ns: int, _size: int) -> ModelShape:
    """The shape of one version of a file (the cache key holds its modification time and size)."""
    header = check_gguf(path)  # first: a clear sentence for a damaged or foreign file
    try:
        return _shape_from_header(path, header)
    except GGUFFileError:
        raise
    except (ValueError, TypeError, KeyError, struct.error) as error:  # a header gguf accepts that holds nonsense
        raise GGUFFileError(f"{path} has metadata qdesk cannot make sense of ({type(error).__name__}: {error}); "
                            "download or convert it again.") from error


def _shape_from_header(path: Path, header: GGUFHeader) -> ModelShape:
    architecture = header.metadata.get("general.architecture")
    if not isinstance(architecture, str) or not architecture:
        raise GGUFFileError(f"{path} does not name its architecture (general.architecture), so qdesk cannot "
                            "estimate its memory; convert it again with a current converter.")
    values = {key.removeprefix(architecture + "."): value for key, value in header.metadata.items()
              if key.startswith(architecture + ".")}

    def number(key: str, default: int | None = None) -> int:
        value = values.get(key, default)
        if value is None:
            raise GGUFFileError(f"{path} lacks {architecture}.{key}, which the memory estimate needs; "
                                "convert it again with a current converter.")
        if isinstance(value, list):
            return max((int(v) for v in value), default=0)
        return int(value)

    n_layer = number("block_count")
    n_embd = number("embedding_length")
    n_head = _per_layer(values.get("attention.head_count", 0), n_layer, "attention.head_count", path)
    n_head_kv = (_per_layer(values["attention.head_count_kv"], n_layer, "attention.head_count_kv", path)
                 if "attention.head_count_kv" in values else n_head)
    largest_head_count = max(n_head, default=0)
    default_head_dim = n_embd // largest_head_count if largest_head_count else 0
    n_expert = number("expert_count", 0)
    n_expert_used = number("expert_used_count", 0)
    if n_expert and n_expert_used:
        n_ff = number("expert_feed_forward_length", number("feed_forward_length", 0)) * n_expert_used
        n_ff += number("expert_shared_feed_forward_length", 0) * number("expert_shared_count", 0)
    else:
        n_ff = number("feed_forward_length", 0)

    tensors = {tensor.name: tensor for tensor in header.tensors}
    token_embd = tensors.get("token_embd.weight")
    output = tensors.get("output.weight")
    vocab_tensor = output or token_embd
    if vocab_tensor is not None and len(vocab_tensor.shape) > 1:
        n_vocab = int(vocab_tensor.shape[1])
    else:
        n_vocab = header.array_lengths.get("tokenizer.ggml.tokens") or number("vocab_size", 0)

    layer_bytes = [0] * n_layer
    input_bytes = output_bytes = 0
    for tensor in header.tensors:
        layer = _layer_of(tensor.name)
        if layer is not None and layer < n_layer:
            layer_bytes[layer] += tensor.n_bytes
        elif tensor.name.startswith(_OUTPUT_TENSOR_PREFIXES):
            output_bytes += tensor.n_bytes
        else:
            input_bytes += tensor.n_bytes
    return ModelShape(
        architecture=architecture,
        n_layer=n_layer,
        n_embd=n_embd,
        n_vocab=n_vocab,
        n_ctx_train=number("context_length", 0),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=number("attention.key_length", default_head_dim),
        head_dim_v=number("attention.value_length", default_head_dim),
        n_ff=n_ff,
        n_expert=n_expert,
        has_sliding_window="attention.sliding_window" in values,
        input_bytes=input_bytes,
        layer_bytes=tuple(layer_bytes),
        output_bytes=output_bytes,
        tied_output_bytes=token_embd.n_bytes if output is None and token_embd is not None else 0,
        tensor_bytes=sum(tensor.n_bytes for tensor in header.tensors),
        tensor_offsets={tensor.name: tensor.offset for tensor in header.tensors},
        tensor_sizes={tensor.name: tensor.n_bytes for tensor in header.tensors},
    )


# --- the estimate ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemorySplit:
    """Bytes of weights, KV cache and compute buffers, in system memory (cpu) and in GPU memory (gpu)."""

    weights_cpu: int
    weights_gpu: int
    kv_cpu: int
    kv_gpu: int
    compute_cpu: int
    compute_gpu: int

    @property
    def ram_bytes(self) -> int:
        return self.weights_cpu + self.kv_cpu + self.compute_cpu

    @property
    def vram_bytes(self) -> int:
        return self.weights_gpu + self.kv_gpu + self.compute_gpu

    @property
    def total_bytes(self) -> int:
        return self.ram_bytes + self.vram_bytes

    @property
    def weights_bytes(self) -> int:
        return self.weights_cpu + self.weights_gpu

    @property
    def kv_bytes(self) -> int:
        return self.kv_cpu + self.kv_gpu

    @property
    def compute_bytes(self) -> int:
        return self.compute_cpu + self.compute_gpu

    def _split_json(self) -> dict[str, Any]:
        return {
            "weights_bytes": self.weights_bytes,
            "kv_bytes": self.kv_bytes,
            "compute_bytes": self.compute_bytes,
            "ram_bytes": self.ram_bytes,
            "vram_bytes": self.vram_bytes,
            "total_bytes": self.total_bytes,
            "cpu": {"weights": self.weights_cpu, "kv": self.kv_cpu, "compute": self.compute_cpu},
            "gpu": {"weights": self.weights_gpu, "kv": self.kv_gpu, "compute": self.compute_gpu},
        }


@dataclass(frozen=True)
class MemoryEstimate(MemorySplit):
    """What llama.cpp will allocate for one model at one context, split between system memory and the GPU."""

    n_ctx: int
    """The context asked for (llama.cpp makes `n_cells` KV cells)."""
    n_gpu_layers: int
    """Layers on the GPU, output layer included, as llama.cpp counts them (0 … block_count + 1)."""
    kv_type: str
    n_cells: int = 0
    n_ubatch: int = DEFAULT_N_UBATCH
    flash_attention: bool = False
    offloadable_layers: int = 0

    def to_json(self) -> dict[str, Any]:
        """`{"n_ctx", "n_gpu_layers", "kv_type", "weights_bytes", "kv_bytes", "compute_bytes", "ram_bytes",
        "vram_bytes", "total_bytes", "cpu": {"weights", "kv", "compute"}, "gpu": {...}}`, sizes in bytes."""
        return {"n_ctx": self.n_ctx, "n_gpu_layers": self.n_gpu_layers, "kv_type": self.kv_type, **self._split_json()}


def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _row_bytes(tensor_type: GGMLQuantizationType, n_values: int) -> int:
    block_size, block_bytes = GGML_QUANT_SIZES[tensor_type]
    return math.ceil(n_values / block_size) * block_bytes


def _effective_gpu_layers(shape: ModelShape, n_gpu_layers: int) -> int:
    """llama.cpp's reading of `n_gpu_layers`: negative means all, and no more than exist are offloaded."""
    return shape.offloadable_layers if n_gpu_layers < 0 else min(n_gpu_layers, shape.offloadable_layers)


def _layers_on_gpu(shape: ModelShape, gpu_layers: int) -> tuple[bool, ...]:
    """Per repeating block: on the GPU? llama.cpp offloads from the output layer backwards."""
    first_gpu_layer = shape.offloadable_layers - gpu_layers
    return tuple(layer >= first_gpu_layer for layer in range(shape.n_layer))


def _check_kv_type(kv_type: str) -> GGMLQuantizationType:
    try:
        return KV_TYPES[kv_type]
    except KeyError:
        raise ValueError(f"unknown KV cache type {kv_type!r}; choose one of {', '.join(KV_TYPES)}") from None


def _flash_attention(kv_type: str, flash_attention: bool | None) -> bool:
    """The engine runs with flash attention off; llama.cpp needs it on for a quantized V cache."""
    needs_flash = kv_type not in _UNQUANTIZED_KV
    if flash_attention is None:
        return needs_flash
    if needs_flash and not flash_attention:
        raise ValueError(f"llama.cpp needs flash attention for a {kv_type} KV cache (its V cache is quantized)")
    return flash_attention


@dataclass(frozen=True)
class _Batch:
    """The batch sizes llama-cpp-python and llama.cpp end up with for a context."""

    n_ctx: int
    n_cells: int
    n_ubatch: int

    @classmethod
    def of(cls, n_ctx: int, n_batch: int, n_ubatch: int) -> _Batch:
        effective_batch = min(n_ctx, n_batch)  # llama-cpp-python, then llama.cpp for causal models
        n_cells = _padded(n_ctx, CONTEXT_PADDING)
        return cls(n_ctx, n_cells, min(effective_batch, n_ubatch, n_cells))


def _kv_bytes_per_layer(shape: ModelShape, cache_type: GGMLQuantizationType, n_cells: int,
                        flash_attention: bool) -> list[int]:
    widest_v = max((heads * shape.head_dim_v for heads in shape.n_head_kv), default=0)
    sizes = []
    for heads in shape.n_head_kv:
        if heads == 0:
            sizes.append(0)
            continue
        # Without flash attention V is stored transposed, every layer as wide as the widest.
        v_width = heads * shape.head_dim_v if flash_attention else widest_v
        sizes.append(n_cells * (_row_bytes(cache_type, heads * shape.head_dim_k) + _row_bytes(cache_type, v_width)))
    return sizes


@dataclass(frozen=True)
class _ComputePeaks:
    """Peaks of the graph allocator for the reserved batch, by phase of the graph (bytes)."""

    layers: int
    """Inside a repeating block (attention or feed-forward), with the attention masks that live through all."""
    output: int
    """At the output product: the logits of every token of the batch."""
    host_inputs: int
    """Input tensors kept in system memory when the graph runs on a GPU: embeddings of the batch and the masks."""
    output_buffer: int
    """llama.cpp's buffer for the logits handed back (one token's, as llama-cpp-python asks)."""


def _compute_peaks(shape: ModelShape, batch: _Batch, flash_attention: bool) -> _ComputePeaks:
    tokens = batch.n_ubatch
    activations = shape.n_embd * tokens * F32_BYTES
    n_head = max(shape.n_head, default=0)
    n_head_kv = max(shape.n_head_kv, default=0)
    queries = n_head * shape.head_dim_k * tokens * F32_BYTES
    keys = n_head_kv * shape.head_dim_k * tokens * F32_BYTES
    values = n_head_kv * shape.head_dim_v * tokens * F32_BYTES
    masks = (2 if shape.has_sliding_window else 1) * batch.n_cells * tokens * (F16_BYTES if flash_attention
                                                                                   else F32_BYTES)
    if flash_attention:
        scores = n_head * shape.head_dim_v * tokens * F32_BYTES  # the fused kernel's output only
    else:
        scores = n_head * batch.n_cells * tokens * F32_BYTES
    attention = scores + _ACTIVATIONS_AROUND_ATTENTION * activations + 2 * queries + keys + values
    feed_forward = (_FFN_INTERMEDIATES * shape.n_ff * tokens * F32_BYTES + shape.n_expert * tokens * F32_BYTES
                    + _ACTIVATIONS_AROUND_FFN * activations)
    return _ComputePeaks(
        layers=masks + max(attention, feed_forward),
        output=shape.n_vocab * tokens * F32_BYTES + _ACTIVATIONS_AROUND_OUTPUT * activations,
        host_inputs=activations + masks,
        output_buffer=shape.n_vocab * F32_BYTES,
    )


def estimate_memory(
    path: str | os.PathLike[str],
    *,
    n_ctx: int = DEFAULT_N_CTX,
    n_gpu_layers: int = 0,
    kv_type: str = "f16",
    n_batch: int = DEFAULT_N_BATCH,
    n_ubatch: int = DEFAULT_N_UBATCH,
    flash_attention: bool | None = None,
) -> MemoryEstimate:
    """What llama.cpp allocates to run the GGUF at `path` with a context of `n_ctx` tokens (0: the trained one).

    `n_gpu_layers` counts as llama.cpp does: the output layer first, then repeating blocks from the last; -1 is
    all. `flash_attention=None` means what the engine does: off, except for a quantized KV cache, which needs it.
    Raises GGUFFileError for a bad file and ValueError for impossible settings.
    """
    return estimate_for_shape(read_model_shape(path), n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, kv_type=kv_type,
                              n_batch=n_batch, n_ubatch=n_ubatch, flash_attention=flash_attention)


def estimate_for_shape(
    shape: ModelShape,
    *,
    n_ctx: int = DEFAULT_N_CTX,
    n_gpu_layers: int = 0,
    kv_type: str = "f16",
    n_batch: int = DEFAULT_N_BATCH,
    n_ubatch: int = DEFAULT_N_UBATCH,
    flash_attention: bool | None = None,
) -> MemoryEstimate:
    """`estimate_memory` for a shape already read (`read_model_shape`)."""
    cache_type = _check_kv_type(kv_type)
    flash = _flash_attention(kv_type, flash_attention)
    if n_ctx < 0 or n_batch < 1 or n_ubatch < 1:
        raise ValueError("n_ctx must be 0 or more, n_batch and n_ubatch 1 or more")
    if n_ctx == 0:
        n_ctx = shape.n_ctx_train or DEFAULT_N_CTX
    batch = _Batch.of(n_ctx, n_batch, n_ubatch)
    gpu_layers = _effective_gpu_layers(shape, n_gpu_layers)
    on_gpu = _layers_on_gpu(shape, gpu_layers)
    output_on_gpu = gpu_layers >= 1

    weights_gpu = sum(size for size, gpu in zip(shape.layer_bytes, on_gpu, strict=True) if gpu)
    if output_on_gpu:
        weights_gpu += shape.output_bytes + shape.tied_output_bytes
    weights_cpu = shape.tensor_bytes - weights_gpu + (shape.tied_output_bytes if output_on_gpu else 0)

    kv_per_layer = _kv_bytes_per_layer(shape, cache_type, batch.n_cells, flash)
    kv_gpu = sum(size for size, gpu in zip(kv_per_layer, on_gpu, strict=True) if gpu)
    kv_cpu = sum(kv_per_layer) - kv_gpu

    peaks = _compute_peaks(shape, batch, flash)
    if gpu_layers == 0:
        compute_cpu = max(peaks.layers, peaks.output) + peaks.output_buffer
        compute_gpu = 0
    else:
        compute_gpu = max(peaks.output, peaks.layers if any(on_gpu) else 0)
        compute_cpu = max(peaks.host_inputs, peaks.layers if not all(on_gpu) else 0) + peaks.output_buffer

    return MemoryEstimate(
        weights_cpu=weights_cpu, weights_gpu=weights_gpu, kv_cpu=kv_cpu, kv_gpu=kv_gpu,
        compute_cpu=compute_cpu, compute_gpu=compute_gpu,
        n_ctx=n_ctx, n_gpu_layers=gpu_layers, kv_type=kv_type, n_cells=batch.n_cells, n_ubatch=batch.n_ubatch,
        flash_attention=flash, offloadable_layers=shape.offloadable_layers,
    )


def max_gpu_layers(
    path: str | os.PathLike[str],
    *,
    vram_bytes: int,
    n_ctx: int = DEFAULT_N_CTX,
    kv_type: str = "f16",
    headroom_bytes: int = DEFAULT_VRAM_HEADROOM,
) -> int:
    """The most layers (llama.cpp's count, output layer included) whose VRAM, plus headroom, fits `vram_bytes`."""
    return max_gpu_layers_for_shape(read_model_shape(path), vram_bytes=vram_bytes, n_ctx=n_ctx, kv_type=kv_type,
                                    headroom_bytes=headroom_bytes)


def max_gpu_layers_for_shape(shape: ModelShape, *, vram_bytes: int, n_ctx: int = DEFAULT_N_CTX, kv_type: str = "f16",
                             headroom_bytes: int = DEFAULT_VRAM_HEADROOM) -> int:
    """`max_gpu_layers` for a shape already read."""
    best = 0
    for layers in range(1, shape.offloadable_layers + 1):
        needed = estimate_for_shape(shape, n_ctx=n_ctx, n_gpu_layers=layers, kv_type=kv_type).vram_bytes
        if needed + headroom_bytes > vram_bytes:
            break
        best = layers
    return best


# --- does it fit? ---------------------------------------------------------------------------------------------------

def available_ram() -> int:
    """Bytes of system memory available to a new process now."""
    try:
        import psutil
    except ImportError:  # psutil comes with the test tools, not with qdesk itself
        from qdesk.compare import available_memory

        return available_memory()
    return int(psutil.virtual_memory().available)


def available_vram() -> int | None:
    """Free bytes on this machine's GPUs together (llama.cpp spreads layers over them), None without a GPU."""
    from native.backends import discover

    gpus = discover().gpu_devices
    return sum(device.memory_free for device in gpus) if gpus else None


@dataclass(frozen=True)
class FitVerdict:
    """Whether a model fits this machine (or the sizes given) at one context, and how many layers a GPU takes."""

    n_ctx: int
    kv_type: str
    ram_available: int
    vram_available: int | None
    """None: no GPU."""
    offloadable_layers: int
    gpu_layers: int
    """The most layers that fit in the VRAM (0 without a GPU)."""
    ram_needed: int
    """System memory needed with `gpu_layers` on the GPU."""
    vram_needed: int
    ram_needed_cpu_only: int
    fits_in_ram_alone: bool
    fits: bool
    """With `gpu_layers` offloaded, the rest fits in the RAM."""
    summary: str

    def to_json(self) -> dict[str, Any]:
        return {
            "n_ctx": self.n_ctx,
            "kv_type": self.kv_type,
            "ram_available": self.ram_available,
            "vram_available": self.vram_available,
            "offloadable_layers": self.offloadable_layers,
            "gpu_layers": self.gpu_layers,
            "ram_needed": self.ram_needed,
            "vram_needed": self.vram_needed,
            "ram_needed_cpu_only": self.ram_needed_cpu_only,
            "fits_in_ram_alone": self.fits_in_ram_alone,
            "fits": self.fits,
            "summary": self.summary,
        }


def check_fit(
    path: str | os.PathLike[str],
    *,
    ram_bytes: int | None = None,
    vram_bytes: int | None = None,
    n_ctx: int = DEFAULT_N_CTX,
    kv_type: str = "f16",
) -> FitVerdict:
    """Does the model fit in `ram_bytes` of RAM (default: available now) and how many layers fit in `vram_bytes`
    of VRAM (default: free on this machine's GPUs; no GPU, no offload)?"""
    return check_fit_for_shape(read_model_shape(path), ram_bytes=ram_bytes, vram_bytes=vram_bytes, n_ctx=n_ctx,
                               kv_type=kv_type)


def _fit_summary(verdict: FitVerdict) -> str:
    setting = f"with a context of {verdict.n_ctx:,} tokens and an {verdict.kv_type} KV cache"
    ram = format_size(verdict.ram_available)
    process = f" (and {format_size(DEFAULT_RAM_HEADROOM)} for the process itself)"
    if verdict.vram_available is None or verdict.gpu_layers == 0:
        where = ("With no GPU," if verdict.vram_available is None
                 else f"No layer fits in {format_size(verdict.vram_available)} of VRAM (keeping "
                      f"{format_size(DEFAULT_VRAM_HEADROOM)} free for the GPU runtime), so")
        needs = f"it needs {format_size(verdict.ram_needed_cpu_only)} of RAM {setting}"
        if verdict.fits_in_ram_alone:
            return f"{where} {needs}; {ram} is available, so it fits."
        return (f"{where} {needs}{process}, more than the {ram} available: choose a smaller variant or a shorter "
                "context.")
    layers = (f"All {verdict.offloadable_layers} layers fit" if verdict.gpu_layers == verdict.offloadable_layers
              else f"{verdict.gpu_layers} of {verdict.offloadable_layers} layers fit")
    gpu = (f"{layers} on the GPU {setting} ({format_size(verdict.vram_needed)} of "
           f"{format_size(verdict.vram_available)} VRAM)")
    if verdict.fits:
        return f"{gpu}; the rest needs {format_size(verdict.ram_needed)} of RAM, and {ram} is available."
    return (f"{gpu}, but the rest needs {format_size(verdict.ram_needed)} of RAM{process}, more than the {ram} "
            "available: choose a smaller variant or a shorter context.")


def check_fit_for_shape(
    shape: ModelShape,
    *,
    ram_bytes: int | None = None,
    vram_bytes: int | None = None,
    n_ctx: int = DEFAULT_N_CTX,
    kv_type: str = "f16",
) -> FitVerdict:
    """`check_fit` for a shape already read (`read_model_shape`; `read_model_shape_from_prefix` for a remote file)."""
    if ram_bytes is None:
        ram_bytes = available_ram()
    if vram_bytes is None:
        vram_bytes = available_vram()
    cpu_only = estimate_for_shape(shape, n_ctx=n_ctx, kv_type=kv_type)
    gpu_layers = 0 if vram_bytes is None else max_gpu_layers_for_shape(shape, vram_bytes=vram_bytes, n_ctx=n_ctx,
                                                                         kv_type=kv_type)
    chosen = (estimate_for_shape(shape, n_ctx=n_ctx, kv_type=kv_type, n_gpu_layers=gpu_layers) if gpu_layers
              else cpu_only)
    verdict = FitVerdict(
        n_ctx=cpu_only.n_ctx, kv_type=kv_type, ram_available=ram_bytes, vram_available=vram_bytes,
        offloadable_layers=cpu_only.offloadable_layers, gpu_layers=gpu_layers, ram_needed=chosen.ram_bytes,
        vram_needed=chosen.vram_bytes, ram_needed_cpu_only=cpu_only.ram_bytes,
        fits_in_ram_alone=cpu_only.ram_bytes + DEFAULT_RAM_HEADROOM <= ram_bytes,
        fits=chosen.ram_bytes + DEFAULT_RAM_HEADROOM <= ram_bytes, summary="",
    )
    return FitVerdict(**{**verdict.__dict__, "summary": _fit_summary(verdict)})


def read_model_shape_from_prefix(path: str | os.PathLike[str], *, file_size: int,
                                 name: str | None = None) -> ModelShape | None:
    """The shape of a GGUF file of `file_size` bytes from a file holding only its first bytes (a remote file's
    header fetched with HTTP Range requests); None while those bytes end inside the header: fetch more.

    Raises GGUFFileError (naming `name`, default the path) for bytes that are not a readable GGUF header, or a header
    whose tensor data would end past `file_size`.
    """
    from converters.gguf_file import header_from_prefix

    label = Path(name) if name else Path(path)
    prefix = Path(path).read_bytes()
    header = header_from_prefix(prefix, str(label))
    if header is None:
        return None
    if header.data_end > file_size:
        raise GGUFFileError(f"{label} is truncated: its tensor data ends at byte {header.data_end:,} but the file "
                            f"has {file_size:,} bytes.")
    try:
        return _shape_from_header(label, header)
    except GGUFFileError:
        raise
    except (ValueError, TypeError, KeyError, struct.error) as error:
        raise GGUFFileError(f"{label} has metadata qdesk cannot make sense of ({type(error).__name__}: "
                            f"{error}).") from error


# --- sizes as people write them -------------------------------------------------------------------------------------

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str, *, option: str | None = None) -> int:
    """Bytes in a size such as "8GB" (10^9), "1.5GiB" (2^30), "512MiB", "8G" (GiB) or "1000000" (bytes).

    Raises SizeError (one sentence, naming `option` when given) for anything else.
    """
    match = _SIZE_PATTERN.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        what = f"{option} {text!r}" if option else repr(text)
        raise SizeError(f"{what} is not a memory size; write it like 8GB, 1.5GiB or 512MB.")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def format_size(n: int) -> str:
    """A size for people: "1.2 GB", "300 MB", "12 kB" (powers of 1000, like `qdesk info`)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{n} bytes"


def render_memory_text(estimate: MemoryEstimate, verdict: FitVerdict | None = None) -> str:
    """The memory table of `qdesk info`: weights, KV cache and compute buffers in RAM and VRAM, then the verdict."""
    flash = ", flash attention" if estimate.flash_attention else ""
    lines = [f"memory at {estimate.n_ctx:,} tokens ({estimate.kv_type} KV cache{flash}), "
             f"{estimate.n_gpu_layers} of {estimate.offloadable_layers} layers on the GPU:"]
    rows = [("", "RAM", "VRAM", "total"),
            ("weights", estimate.weights_cpu, estimate.weights_gpu, estimate.weights_bytes),
            ("KV cache", estimate.kv_cpu, estimate.kv_gpu, estimate.kv_bytes),
            ("compute", estimate.compute_cpu, estimate.compute_gpu, estimate.compute_bytes),
            ("total", estimate.ram_bytes, estimate.vram_bytes, estimate.total_bytes)]
    cells = [[row[0], *(cell if isinstance(cell, str) else format_size(cell) if cell else "-" for cell in row[1:])]
             for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(4)]
    lines += ["  " + "  ".join(cell.ljust(widths[0]) if column == 0 else cell.rjust(widths[column])
                               for column, cell in enumerate(row)).rstrip() for row in cells]
    if verdict is not None:
        lines.append(verdict.summary)
    return "\n".join(lines)


# --- what llama.cpp really allocates --------------------------------------------------------------------------------

PROBE_MODULE = "qdesk.memory_probe"
PROBE_TIMEOUT_S = 300

_BUFFER_LINE = re.compile(
    r"^(?P<source>\w+):\s+(?P<buffer>\S+)\s+(?P<kind>model|output|KV|RS|compute) buffer size\s*=\s*"
    r"(?P<mib>\d+(?:\.\d+)?) MiB\s*$")
"""`load_tensors: CPU_Mapped model buffer size = 92.10 MiB`, `llama_context: CPU  output buffer size = 0.19 MiB`,
`llama_kv_cache: CPU KV buffer size = 90.00 MiB`, `sched_reserve: CPU compute buffer size = 99.38 MiB`."""
_REPACK_LINE = re.compile(r"^repack: repack tensor (?P<name>\S+) with ")
"""A debug line of ggml's CPU backend for each weight it copies into its interleaved layout (`CPU_REPACK`)."""
_RESERVE_START = "sched_reserve: reserving"
"""Each reservation of the compute graph replaces the compute buffers of the one before."""
_BUFFER_KINDS = {"model": "model", "KV": "kv", "RS": "kv", "compute": "compute", "output": "output"}


@dataclass(frozen=True)
class AllocationLog:
    """The buffers llama.cpp logged while loading, in bytes: kind ("model", "kv", "compute", "output") → name → size.

    Sizes are logged in MiB with two decimals, so each is exact to ±5 kiB.
    """

    buffers: dict[str, dict[str, int]]
    repacked_tensors: tuple[str, ...]


def parse_allocation_log(log: str) -> AllocationLog:
    """Read the buffer sizes out of llama.cpp's log of one model load and context creation."""
    buffers: dict[str, dict[str, int]] = {kind: {} for kind in ("model", "kv", "compute", "output")}
    repacked: list[str] = []
    for raw_line in log.splitlines():
        line = raw_line.lstrip(".")  # llama.cpp's loading progress dots run into the next line
        if line.startswith(_RESERVE_START):
            buffers["compute"] = {}
            continue
        repack = _REPACK_LINE.match(line)
        if repack:
            repacked.append(repack.group("name"))
            continue
        match = _BUFFER_LINE.match(line)
        if match:
            kind = _BUFFER_KINDS[match.group("kind")]
            name = match.group("buffer")
            size = round(float(match.group("mib")) * MiB)
            buffers[kind][name] = buffers[kind].get(name, 0) + size if kind in ("model", "kv") else size
    return AllocationLog(buffers, tuple(repacked))


def _is_host_buffer(name: str) -> bool:
    """CPU buffers (`CPU`, `CPU_Mapped`, `CPU_REPACK`) and GPU backends' pinned host buffers (`CUDA_Host`)."""
    return name.upper().startswith("CPU") or name.endswith("_Host")


def _split(sizes: Mapping[str, int]) -> tuple[int, int]:
    host = sum(size for name, size in sizes.items() if _is_host_buffer(name))
    return host, sum(sizes.values()) - host


@dataclass(frozen=True)
class MeasuredAllocation(MemorySplit):
    """What llama.cpp allocated when it loaded a model in a child process, from its log (see `parse_allocation_log`).

    Compute includes llama.cpp's output (logits) buffer. Weights count each tensor once: when ggml's CPU backend
    repacks a weight into its own buffer, the memory-mapped copy it was read from is left out
    (`repack_duplicate_bytes`; `buffers` has the sizes as logged).
    """

    n_ctx: int
    n_gpu_layers: int
    kv_type: str
    buffers: dict[str, dict[str, int]]
    repack_duplicate_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"n_ctx": self.n_ctx, "n_gpu_layers": self.n_gpu_layers, "kv_type": self.kv_type,
                **self._split_json(), "buffers": self.buffers, "repack_duplicate_bytes": self.repack_duplicate_bytes}


def _repack_duplicate_bytes(shape: ModelShape, repacked: tuple[str, ...], host_tensors: set[str]) -> int:
    """Bytes of repacked weights that lie inside the memory-mapped range of the weights left in place.

    llama.cpp maps one range per file, from the first to the last tensor it uses in place, so a repacked
    weight inside that range is counted twice in the logged buffer sizes.
    """
    repacked_set = set(repacked)
    in_place = [name for name in host_tensors if name not in repacked_set and name in shape.tensor_offsets]
    if not repacked_set or not in_place:
        return 0
    start = min(shape.tensor_offsets[name] for name in in_place)
    end = max(shape.tensor_offsets[name] + shape.tensor_sizes[name] for name in in_place)
    return sum(shape.tensor_sizes[name] for name in repacked_set
               if name in shape.tensor_offsets and start <= shape.tensor_offsets[name] < end)


def _host_tensor_names(shape: ModelShape, gpu_layers: int) -> set[str]:
    on_gpu = _layers_on_gpu(shape, gpu_layers)
    names = set()
    for name in shape.tensor_offsets:
        layer = _layer_of(name)
        if layer is not None and layer < shape.n_layer:
            if not on_gpu[layer]:
                names.add(name)
        elif not (name.startswith(_OUTPUT_TENSOR_PREFIXES) and gpu_layers >= 1):
            names.add(name)
    return names


def measure_allocation(
    path: str | os.PathLike[str],
    *,
    n_ctx: int,
    n_gpu_layers: int = 0,
    kv_type: str = "f16",
    n_batch: int = DEFAULT_N_BATCH,
    n_ubatch: int = DEFAULT_N_UBATCH,
    flash_attention: bool | None = None,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> MeasuredAllocation:
    """Load the model with `llama_cpp.Llama` in a child process, as the engine does, and read what llama.cpp
    allocated from its log. Raises GGUFFileError for a bad file and AllocationLogError when llama.cpp fails or its
    log lacks the buffer lines."""
    path = Path(path)
    shape = read_model_shape(path)
    cache_type = _check_kv_type(kv_type)
    options = {"path": str(path), "n_ctx": n_ctx, "n_batch": n_batch, "n_ubatch": n_ubatch,
               "n_gpu_layers": n_gpu_layers, "type_k": int(cache_type), "type_v": int(cache_type),
               "flash_attn": _flash_attention(kv_type, flash_attention)}
    try:
        child = subprocess.run([sys.executable, "-m", PROBE_MODULE, json.dumps(options)], capture_output=True,
                               timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as error:
        raise AllocationLogError(f"loading {path.name} took longer than {timeout_s:.0f} s") from error
    result = _probe_result(child.stdout)
    if result is None:
        tail = child.stderr.decode("utf-8", errors="replace")[-2000:]
        raise AllocationLogError(f"the probe loading {path.name} ended with status {child.returncode} and no "
                                 f"result:\n{tail}")
    if "error" in result:
        raise AllocationLogError(f"llama.cpp could not load {path.name}: {result['error']}\n{result['log'][-2000:]}")
    log = parse_allocation_log(result["log"])
    missing = [kind for kind in ("model", "kv", "compute") if not log.buffers[kind]]
    if missing:
        raise AllocationLogError(f"llama.cpp's log of loading {path.name} has no {' / '.join(missing)} buffer size "
                                 "lines; this llama.cpp logs differently from the one qdesk was written for")

    gpu_layers = _effective_gpu_layers(shape, n_gpu_layers)
    weights_cpu, weights_gpu = _split(log.buffers["model"])
    has_gpu_weights = weights_gpu > 0
    duplicate = _repack_duplicate_bytes(shape, log.repacked_tensors,
                                        _host_tensor_names(shape, gpu_layers if has_gpu_weights else 0))
    kv_cpu, kv_gpu = _split(log.buffers["kv"])
    compute_cpu, compute_gpu = _split(log.buffers["compute"])
    output_cpu, output_gpu = _split(log.buffers["output"])
    return MeasuredAllocation(
        weights_cpu=weights_cpu - duplicate, weights_gpu=weights_gpu, kv_cpu=kv_cpu, kv_gpu=kv_gpu,
        compute_cpu=compute_cpu + output_cpu, compute_gpu=compute_gpu + output_gpu, n_ctx=int(result["n_ctx"]),
        n_gpu_layers=gpu_layers if has_gpu_weights else 0, kv_type=kv_type, buffers=log.buffers,
        repack_duplicate_bytes=duplicate,
    )


def _probe_result(stdout: bytes) -> dict[str, Any] | None:
    for line in reversed(stdout.decode("utf-8", errors="replace").splitlines()):
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(result, dict) and "log" in result:
            return result
    return None
