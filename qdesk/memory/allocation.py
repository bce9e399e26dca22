"""What llama.cpp really allocates: a model loaded in a child process, its log read for the buffer sizes."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from native.child import run_in_child
from native.errors import ChildFailed
from qdesk.memory.estimate import (
    DEFAULT_N_BATCH,
    DEFAULT_N_UBATCH,
    MemorySplit,
    MiB,
    check_kv_type,
    effective_gpu_layers,
    flash_attention_for,
    layers_on_gpu,
)
from qdesk.memory.shape import OUTPUT_TENSOR_PREFIXES, ModelShape, layer_of, read_model_shape


class AllocationLogError(RuntimeError):
    """llama.cpp's log did not say what it allocated (or it failed to load the model)."""


PROBE = "qdesk.memory.probe:load_logged"
"""The function the child runs, by name: importing its module would load llama_cpp into this process."""
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
    on_gpu = layers_on_gpu(shape, gpu_layers)
    names = set()
    for name in shape.tensor_offsets:
        layer = layer_of(name)
        if layer is not None and layer < shape.n_layer:
            if not on_gpu[layer]:
                names.add(name)
        elif not (name.startswith(OUTPUT_TENSOR_PREFIXES) and gpu_layers >= 1):
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
    cache_type = check_kv_type(kv_type)
    options = {"path": str(path), "n_ctx": n_ctx, "n_batch": n_batch, "n_ubatch": n_ubatch,
               "n_gpu_layers": n_gpu_layers, "type_k": int(cache_type), "type_v": int(cache_type),
               "flash_attn": flash_attention_for(kv_type, flash_attention)}
    try:
        result = run_in_child(PROBE, {"options": options}, what=f"loading {path.name}", stall_s=timeout_s)
    except ChildFailed as error:
        raise AllocationLogError(str(error)) from error
    if "error" in result:
        raise AllocationLogError(f"llama.cpp could not load {path.name}: {result['error']}\n{result['log'][-2000:]}")
    log = parse_allocation_log(result["log"])
    missing = [kind for kind in ("model", "kv", "compute") if not log.buffers[kind]]
    if missing:
        raise AllocationLogError(f"llama.cpp's log of loading {path.name} has no {' / '.join(missing)} buffer size "
                                 "lines; this llama.cpp logs differently from the one qdesk was written for")

    gpu_layers = effective_gpu_layers(shape, n_gpu_layers)
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
