"""The memory llama.cpp allocates for a model, from its shape: weights, KV cache and compute buffers."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from qdesk.memory.shape import ModelShape, read_model_shape

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


def effective_gpu_layers(shape: ModelShape, n_gpu_layers: int) -> int:
    """llama.cpp's reading of `n_gpu_layers`: negative means all, and no more than exist are offloaded."""
    return shape.offloadable_layers if n_gpu_layers < 0 else min(n_gpu_layers, shape.offloadable_layers)


def layers_on_gpu(shape: ModelShape, gpu_layers: int) -> tuple[bool, ...]:
    """Per repeating block: on the GPU? llama.cpp offloads from the output layer backwards."""
    first_gpu_layer = shape.offloadable_layers - gpu_layers
    return tuple(layer >= first_gpu_layer for layer in range(shape.n_layer))


def check_kv_type(kv_type: str) -> GGMLQuantizationType:
    try:
        return KV_TYPES[kv_type]
    except KeyError:
        raise ValueError(f"unknown KV cache type {kv_type!r}; choose one of {', '.join(KV_TYPES)}") from None


def flash_attention_for(kv_type: str, flash_attention: bool | None) -> bool:
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
    cache_type = check_kv_type(kv_type)
    flash = flash_attention_for(kv_type, flash_attention)
    if n_ctx < 0 or n_batch < 1 or n_ubatch < 1:
        raise ValueError("n_ctx must be 0 or more, n_batch and n_ubatch 1 or more")
    if n_ctx == 0:
        n_ctx = shape.n_ctx_train or DEFAULT_N_CTX
    batch = _Batch.of(n_ctx, n_batch, n_ubatch)
    gpu_layers = effective_gpu_layers(shape, n_gpu_layers)
    on_gpu = layers_on_gpu(shape, gpu_layers)
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
