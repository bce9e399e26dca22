"""Which compute backends and devices the installed llama.cpp can use, as ggml's backend registry reports them.

`discover()` walks the registry once: every backend (CPU, CUDA, Metal, Vulkan, …) with its devices, their kind
and memory, and the features the backend announces through `ggml_backend_get_features` (the CPU backend's SIMD
flags such as AVX2 or NEON, a GPU backend's build options). The engine picks GPU offload from `gpu_devices`;
`qdesk.display.backends.render_text` words the same facts for people.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from native.ggml import GGML, GetFeatures, ggml

DEVICE_KINDS = ("cpu", "gpu", "igpu", "accel", "meta")
"""`enum ggml_backend_dev_type`, in its order."""

GPU_KINDS = frozenset({"gpu", "igpu"})

CPU_BUILD_FEATURES = frozenset({"LLAMAFILE", "ACCELERATE", "CPU_HBM", "OPENMP", "KLEIDIAI", "REPACK"})
"""CPU features that describe how ggml was built rather than what instructions the processor has."""

CPU_VECTOR_WIDTH_FEATURES = {"SVE_CNT": "SVE", "RVV_VLEN": "RISCV_V"}
"""CPU features whose value is a vector length; a positive length means the named extension is on."""

@dataclass(frozen=True)
class Device:
    """One device of a backend, with the memory ggml reports for it (system memory for the CPU device)."""

    backend: str
    name: str
    description: str
    kind: str
    memory_free: int
    memory_total: int

    @property
    def is_gpu(self) -> bool:
        return self.kind in GPU_KINDS

    def to_json(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "name": self.name,
            "description": self.description,
            "kind": self.kind,
            "memory_free": self.memory_free,
            "memory_total": self.memory_total,
        }


@dataclass(frozen=True)
class Backend:
    """A registered ggml backend: its registry name, devices and announced features (name, value) in order."""

    name: str
    devices: tuple[Device, ...]
    features: tuple[tuple[str, str], ...]

    def feature(self, name: str) -> str | None:
        for feature_name, value in self.features:
            if feature_name == name:
                return value
        return None

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "devices": [device.to_json() for device in self.devices],
            "features": dict(self.features),
        }


@dataclass(frozen=True)
class SystemInfo:
    """What llama.cpp can run on here: its version, its own system summary, and every backend with its devices."""

    llama_cpp_version: str
    llama_system_info: str
    backends: tuple[Backend, ...]

    def backend(self, name: str) -> Backend | None:
        for backend in self.backends:
            if backend.name.lower() == name.lower():
                return backend
        return None

    @property
    def devices(self) -> tuple[Device, ...]:
        return tuple(device for backend in self.backends for device in backend.devices)

    @property
    def gpu_devices(self) -> tuple[Device, ...]:
        """Devices that can take offloaded layers (dedicated and integrated GPUs), in registry order."""
        return tuple(device for device in self.devices if device.is_gpu)

    @property
    def cpu_simd(self) -> tuple[str, ...]:
        """The instruction-set extensions the CPU backend reports as on (e.g. AVX2, AVX512, NEON, SVE)."""
        cpu = self.backend("CPU")
        return cpu_simd_flags(cpu.features) if cpu else ()

    def to_json(self) -> dict[str, object]:
        return {
            "llama_cpp_version": self.llama_cpp_version,
            "llama_system_info": self.llama_system_info,
            "backends": [backend.to_json() for backend in self.backends],
            "cpu_simd": list(self.cpu_simd),
            "gpu_devices": [device.to_json() for device in self.gpu_devices],
        }


def cpu_simd_flags(features: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    """The SIMD extensions among a CPU backend's features: flags that are on, minus build options."""
    flags: list[str] = []
    for name, value in features:
        if name in CPU_BUILD_FEATURES:
            continue
        if name in CPU_VECTOR_WIDTH_FEATURES:
            flag = CPU_VECTOR_WIDTH_FEATURES[name]
            if _is_positive(value) and flag not in flags:
                flags.append(flag)
        elif _is_on(value) and name not in flags:
            flags.append(name)
    return tuple(flags)


def _is_on(value: str) -> bool:
    return value.strip().lower() not in {"", "0", "off", "false", "no"}


def _is_positive(value: str) -> bool:
    try:
        return int(value) > 0
    except ValueError:
        return False


def _text(raw: bytes | None) -> str:
    return raw.decode(errors="replace") if raw else ""


def _ensure_backends_loaded(lib: GGML) -> None:
    """Builds with dynamically loaded backends register nothing until llama.cpp loads them, as llama does itself."""
    if lib.ggml_backend_reg_count() == 0:
        import llama_cpp

        llama_cpp.llama_backend_init()


def _device(lib: GGML, backend_name: str, handle: int) -> Device:
    free = ctypes.c_size_t(0)
    total = ctypes.c_size_t(0)
    lib.ggml_backend_dev_memory(handle, ctypes.byref(free), ctypes.byref(total))
    kind_code = lib.ggml_backend_dev_type(handle)
    kind = DEVICE_KINDS[kind_code] if 0 <= kind_code < len(DEVICE_KINDS) else f"kind{kind_code}"
    return Device(
        backend=backend_name,
        name=_text(lib.ggml_backend_dev_name(handle)),
        description=_text(lib.ggml_backend_dev_description(handle)),
        kind=kind,
        memory_free=int(free.value),
        memory_total=int(total.value),
    )


def _features(lib: GGML, registry: int) -> tuple[tuple[str, str], ...]:
    address = lib.ggml_backend_reg_get_proc_address(registry, b"ggml_backend_get_features")
    if not address:
        return ()
    entries = GetFeatures(address)(registry)
    features: list[tuple[str, str]] = []
    index = 0
    while entries and entries[index].name:
        features.append((_text(entries[index].name), _text(entries[index].value)))
        index += 1
    return tuple(features)


def discover() -> SystemInfo:
    """Read the backend registry of the installed llama.cpp: backends, devices, memory and features."""
    import llama_cpp

    lib = ggml()
    _ensure_backends_loaded(lib)
    backends: list[Backend] = []
    for registry_index in range(lib.ggml_backend_reg_count()):
        registry = lib.ggml_backend_reg_get(registry_index)
        name = _text(lib.ggml_backend_reg_name(registry))
        devices = tuple(
            _device(lib, name, lib.ggml_backend_reg_dev_get(registry, device_index))
            for device_index in range(lib.ggml_backend_reg_dev_count(registry))
        )
        backends.append(Backend(name=name, devices=devices, features=_features(lib, registry)))
    return SystemInfo(
        llama_cpp_version=str(getattr(llama_cpp, "__version__", "unknown")),
        llama_system_info=_text(llama_cpp.llama_print_system_info()).strip(),
        backends=tuple(backends),
    )
