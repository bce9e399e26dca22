"""`qdesk backends` as text: what `native.backends.discover()` found, worded for people."""

from __future__ import annotations

from converters.core.units import format_gib
from native.backends import SystemInfo
from qdesk.display.tables import text_table


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
