"""Whether a model fits this machine: the memory available now, and the verdict for a shape."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import psutil

from converters.core.units import format_size
from qdesk.memory.estimate import (
    DEFAULT_N_CTX,
    DEFAULT_RAM_HEADROOM,
    DEFAULT_VRAM_HEADROOM,
    estimate_for_shape,
    max_gpu_layers_for_shape,
)
from qdesk.memory.shape import ModelShape, read_model_shape


def available_ram() -> int:
    """Bytes of system memory available to a new process now."""
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
