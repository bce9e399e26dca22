"""The memory table of `qdesk info` as text."""

from __future__ import annotations

from converters.core.units import format_size
from qdesk.display.tables import text_table
from qdesk.memory.estimate import MemoryEstimate
from qdesk.memory.fit import FitVerdict


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
    lines += text_table(None, cells, right={1, 2, 3}, indent="  ")
    if verdict is not None:
        lines.append(verdict.summary)
    return "\n".join(lines)
