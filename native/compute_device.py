"""Where torch does qdesk's heavy arithmetic (covariance sums, Cholesky factors, error-feedback updates).

A CUDA GPU or Apple's MPS when torch sees one, else the CPU with every core. `QDESK_DEVICE=cpu|cuda|mps` (or
`cuda:1`) chooses explicitly; a device that torch does not have is refused in one sentence.
"""

from __future__ import annotations

import os
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["DEVICE_VARIABLE", "DeviceUnavailable", "compute_device", "use_all_cpu_cores"]

DEVICE_VARIABLE = "QDESK_DEVICE"


class DeviceUnavailable(RuntimeError):
    """The device asked for (`QDESK_DEVICE` or an argument) is not one torch can use here."""


def compute_device(preference: str | None = None) -> torch.device:
    """The device for heavy arithmetic: `preference`, else `$QDESK_DEVICE`, else CUDA, MPS or the CPU."""
    import torch

    wanted = preference or os.environ.get(DEVICE_VARIABLE) or ""
    if wanted:
        try:
            device = torch.device(wanted)
        except RuntimeError as error:
            raise DeviceUnavailable(f"{wanted!r} is not a device name; use cpu, cuda or mps.") from error
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DeviceUnavailable(f"{wanted!r} was asked for, but torch sees no CUDA GPU here; use cpu.")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise DeviceUnavailable(f"{wanted!r} was asked for, but torch sees no MPS device here; use cpu.")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if device.type == "cpu":
        use_all_cpu_cores()
    return device


@cache
def use_all_cpu_cores() -> int:
    """Let torch's CPU kernels use every core this process may run on; returns the thread count."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(cores)
    return cores
