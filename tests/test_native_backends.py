"""Backend and device discovery against the llama.cpp actually installed (the CPU build on CI machines)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest

from native.backends import DEVICE_KINDS, SystemInfo, cpu_simd_flags, discover
from qdesk.display.backends import render_text

# /proc/cpuinfo flag -> the name ggml's CPU backend reports for it.
X86_FLAG_NAMES = {
    "pni": "SSE3",
    "ssse3": "SSSE3",
    "avx": "AVX",
    "avx2": "AVX2",
    "f16c": "F16C",
    "fma": "FMA",
    "bmi2": "BMI2",
    "avx512f": "AVX512",
    "avx512vbmi": "AVX512_VBMI",
    "avx512_vnni": "AVX512_VNNI",
    "avx512_bf16": "AVX512_BF16",
    "avx_vnni": "AVX_VNNI",
    "amx_int8": "AMX_INT8",
}


@pytest.fixture(scope="module")
def info() -> SystemInfo:
    return discover()


def _x86_cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine().lower() not in {"x86_64", "amd64"} or not cpuinfo.is_file():
        pytest.skip("the SIMD cross-check reads x86 flags from /proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    pytest.skip("/proc/cpuinfo lists no flags")


def test_versions_are_reported(info: SystemInfo) -> None:
    assert info.llama_cpp_version == "0.3.36"
    assert "CPU" in info.llama_system_info


def test_cpu_backend_has_a_cpu_device_with_memory(info: SystemInfo) -> None:
    cpu = info.backend("CPU")
    assert cpu is not None
    cpu_devices = [device for device in cpu.devices if device.kind == "cpu"]
    assert cpu_devices
    for device in cpu_devices:
        assert device.backend == "CPU"
        assert device.name
        assert device.memory_total > 0
        assert device.memory_total >= device.memory_free >= 0
        assert not device.is_gpu


def test_every_device_has_a_known_kind_and_gpus_are_derived(info: SystemInfo) -> None:
    for device in info.devices:
        assert device.kind in DEVICE_KINDS
    assert info.gpu_devices == tuple(device for device in info.devices if device.kind in {"gpu", "igpu"})


def test_simd_flags_agree_with_proc_cpuinfo(info: SystemInfo) -> None:
    flags = _x86_cpu_flags()
    simd = set(info.cpu_simd)
    assert simd, "the CPU backend reported no SIMD extensions on x86"
    expected = {name for flag, name in X86_FLAG_NAMES.items() if flag in flags}
    reported_known = simd & set(X86_FLAG_NAMES.values())
    # What ggml reports, the processor has; and a native build reports what the processor has.
    assert reported_known <= expected
    for flag in ("avx", "avx2", "fma", "f16c", "avx512f"):
        if flag in flags:
            assert X86_FLAG_NAMES[flag] in simd


def test_cpu_features_keep_values_and_simd_leaves_out_build_options(info: SystemInfo) -> None:
    cpu = info.backend("CPU")
    assert cpu is not None
    assert all(value for _, value in cpu.features)
    for build_option in ("OPENMP", "LLAMAFILE", "REPACK"):
        assert build_option not in info.cpu_simd
    assert cpu_simd_flags((("NEON", "1"), ("SVE_CNT", "32"), ("DOTPROD", "0"), ("OPENMP", "1"))) == ("NEON", "SVE")


def test_json_round_trips(info: SystemInfo) -> None:
    document = info.to_json()
    assert json.loads(json.dumps(document)) == document
    assert document["cpu_simd"] == list(info.cpu_simd)
    cpu = next(backend for backend in document["backends"] if backend["name"] == "CPU")
    assert cpu["devices"][0]["memory_total"] == info.backend("CPU").devices[0].memory_total


def test_text_table_lists_backends_devices_and_memory(info: SystemInfo) -> None:
    text = render_text(info)
    assert "CPU SIMD:" in text
    for backend in info.backends:
        assert backend.name in text
    cpu_device = info.backend("CPU").devices[0]
    total = f"{cpu_device.memory_total / (1 << 30):.1f}"
    lines = text.splitlines()
    header = next(line for line in lines if "total GiB" in line)
    row = next(line for line in lines if line.startswith("CPU") and cpu_device.kind in line.split())
    # Memory columns are right-aligned under their headings.
    assert header.index("total GiB") + len("total GiB") == row.rindex(total) + len(total)
