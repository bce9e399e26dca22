"""How much memory a GGUF model takes once llama.cpp has loaded it, and where: `estimate_memory`, `check_fit`.

The estimate reads the file's header only (`converters.core.gguf_file.check_gguf` first, then the few metadata keys it
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

from qdesk.memory.allocation import (
    AllocationLog,
    AllocationLogError,
    MeasuredAllocation,
    measure_allocation,
    parse_allocation_log,
)
from qdesk.memory.estimate import (
    DEFAULT_N_BATCH,
    DEFAULT_N_CTX,
    DEFAULT_N_UBATCH,
    DEFAULT_RAM_HEADROOM,
    DEFAULT_VRAM_HEADROOM,
    KV_TYPES,
    GiB,
    MemoryEstimate,
    MemorySplit,
    MiB,
    estimate_for_shape,
    estimate_memory,
    max_gpu_layers,
    max_gpu_layers_for_shape,
)
from qdesk.memory.fit import FitVerdict, available_ram, available_vram, check_fit, check_fit_for_shape
from qdesk.memory.render import render_memory_text
from qdesk.memory.shape import ModelShape, read_model_shape, read_model_shape_from_prefix

__all__ = [
    "DEFAULT_N_BATCH",
    "DEFAULT_N_CTX",
    "DEFAULT_N_UBATCH",
    "DEFAULT_RAM_HEADROOM",
    "DEFAULT_VRAM_HEADROOM",
    "KV_TYPES",
    "AllocationLog",
    "AllocationLogError",
    "FitVerdict",
    "GiB",
    "MeasuredAllocation",
    "MemoryEstimate",
    "MemorySplit",
    "MiB",
    "ModelShape",
    "available_ram",
    "available_vram",
    "check_fit",
    "check_fit_for_shape",
    "estimate_for_shape",
    "estimate_memory",
    "max_gpu_layers",
    "max_gpu_layers_for_shape",
    "measure_allocation",
    "parse_allocation_log",
    "read_model_shape",
    "read_model_shape_from_prefix",
    "render_memory_text",
]
