"""What `native.backends.discover()` found, worded for people: the `qdesk backends` table (`render_text`) and one line
per backend for Settings and `qdesk about` (`describe_backends`)."""

from __future__ import annotations

from converters.core.units import format_gib
from native.backends import SystemInfo
from qdesk.display.tables import text_table

__all__ = ["describe_backends", "render_text"]


def render_text(info: SystemInfo) -> str:
    """An aligned, human-readable summary: version, CPU SIMD level, backends and their devices with memory in GiB."""
    lines = [f"llama-cpp-python {info.llama_cpp_version}"]
    lines.append(f"CPU SIMD: {' '.join(info.cpu_simd) if info.cpu_simd else 'none reported'}")
    lines.append(f"GPU devices: {len(info.gpu_devices)}")
    lines.append("")
    backend_rows = [
        (backend.name, str(len(backend.devices)),
         " ".join(f"{name}={value}" if value != "1" else name for name, value in backend.features) or "-")
        for backend in info.backends
    ]
    lines.extend(text_table(("backend", "devices", "features"), backend_rows, right={1}, rule=True))
    lines.append("")
    device_rows = [
        (device.backend, device.name, device.kind, format_gib(device.memory_free), format_gib(device.memory_total),
         device.description)
        for device in info.devices
    ]
    lines.extend(text_table(("backend", "device", "kind", "free GiB", "total GiB", "description"), device_rows,
                            right={3, 4}, rule=True))
    return "\n".join(lines)


def describe_backends(info: SystemInfo) -> list[str]:
    """"CPU: AVX2 FMA F16C…" first, then "CUDA: NVIDIA H100 (79.1 of 79.6 GiB free)" and the other backends, and a
    closing line on GPU offload."""
    lines: list[str] = []
    for backend in sorted(info.backends, key=lambda backend: backend.name.upper() != "CPU"):
        if backend.name.upper() == "CPU":
            flags = " ".join(info.cpu_simd) or "no SIMD extensions reported"
            lines.append(f"CPU: {flags}")
            continue
        devices = ", ".join(f"{device.description or device.name} ({format_gib(device.memory_free)} of "
                            f"{format_gib(device.memory_total)} GiB free)" for device in backend.devices)
        if not devices and backend.name.upper() == "RPC":
            devices = "built in, no workers added (`qdesk worker` on another machine, then RPC workers in Serve)"
        lines.append(f"{backend.name}: {devices or 'no devices'}")
    if info.gpu_devices:
        lines.append("GPU layers are offloaded to " + ", ".join(device.name for device in info.gpu_devices) + ".")
    else:
        lines.append("No GPU was found: models run on the CPU whatever the GPU layers say.")
    return lines
