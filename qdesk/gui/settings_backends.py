"""What the Settings section says about this machine's compute backends (no Qt): one line per backend."""

from __future__ import annotations

from converters.core.units import format_gib
from native.backends import SystemInfo


def describe_backends(info: SystemInfo) -> list[str]:
    """"CPU: AVX2 FMA F16C…", "CUDA: NVIDIA H100 (79.1 of 79.6 GiB free)", and a closing line on GPU offload."""
    lines: list[str] = []
    for backend in info.backends:
        if backend.name.upper() == "CPU":
            flags = " ".join(info.cpu_simd) or "no SIMD extensions reported"
            lines.append(f"CPU: {flags}")
            continue
        devices = ", ".join(f"{device.description or device.name} ({format_gib(device.memory_free)} of "
                            f"{format_gib(device.memory_total)} GiB free)" for device in backend.devices)
        lines.append(f"{backend.name}: {devices or 'no devices'}")
    if info.gpu_devices:
        lines.append("GPU layers are offloaded to " + ", ".join(device.name for device in info.gpu_devices) + ".")
    else:
        lines.append("No GPU was found: models run on the CPU whatever the GPU layers say.")
    return lines
