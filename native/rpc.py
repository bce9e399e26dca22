"""llama.cpp's RPC backend: ggml devices on other machines (`ggml_backend_rpc_*`), reached through libggml.

A process that runs a model adds each worker with `add_servers(["host:port", ...])`: the workers become devices in
ggml's registry (llama.cpp lists them before any local GPU) and llama.cpp places layers on them like on a GPU. A
worker process serves this machine's devices with `serve(endpoint, ...)`, which blocks for good.

The RPC backend is part of llama-cpp-python when it was built with `CMAKE_ARGS="-DGGML_RPC=on"` (`make install`
does that). `QDESK_GGML_RPC_LIBRARY` may name a `libggml-rpc` built separately against the same ggml, for an
installation built without it.

The registry lives in the copy of libggml that libllama is linked against. llama-cpp-python's wheel ships the
library under several names (`libggml.so`, `libggml.so.0`) that the loader maps as separate copies, so this module
opens the versioned name libllama needs rather than `llama_cpp._ggml.libggml`.

Connecting to a worker that is not there makes ggml abort the process: call `add_servers` in a child process (the
engine's worker, `qdesk.rpc.probe`), after `qdesk.rpc.endpoints.check_reachable`.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from native.errors import NativeError

RPC_LIBRARY_ENV = "QDESK_GGML_RPC_LIBRARY"
DEVICE_TYPE_CPU = 0
DEVICE_TYPE_GPU = 1

_AddServer = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
_StartServer = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                                ctypes.POINTER(ctypes.c_void_p))
_GetMemory = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t))
_GET_MEMORY_SLOT = 2
"""`struct ggml_backend_device` starts with its interface of function pointers: get_name, get_description,
get_memory, …"""

_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "ggml_backend_reg_by_name": (ctypes.c_void_p, [ctypes.c_char_p]),
    "ggml_backend_register": (None, [ctypes.c_void_p]),
    "ggml_backend_reg_get_proc_address": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
    "ggml_backend_reg_dev_count": (ctypes.c_size_t, [ctypes.c_void_p]),
    "ggml_backend_reg_dev_get": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
    "ggml_backend_dev_count": (ctypes.c_size_t, []),
    "ggml_backend_dev_get": (ctypes.c_void_p, [ctypes.c_size_t]),
    "ggml_backend_dev_type": (ctypes.c_int, [ctypes.c_void_p]),
    "ggml_backend_dev_name": (ctypes.c_char_p, [ctypes.c_void_p]),
    "ggml_backend_dev_description": (ctypes.c_char_p, [ctypes.c_void_p]),
    "ggml_backend_dev_memory": (None, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                       ctypes.POINTER(ctypes.c_size_t)]),
    "ggml_backend_dev_backend_reg": (ctypes.c_void_p, [ctypes.c_void_p]),
    "ggml_backend_reg_name": (ctypes.c_char_p, [ctypes.c_void_p]),
}


class RPCUnavailable(NativeError):
    """The installed llama.cpp was built without its RPC backend."""


@dataclass(frozen=True)
class RemoteDevice:
    """One device a worker offers, with the memory it reports."""

    endpoint: str
    name: str
    description: str
    memory_free: int
    memory_total: int

    def to_json(self) -> dict[str, object]:
        return {"endpoint": self.endpoint, "name": self.name, "description": self.description,
                "memory_free": self.memory_free, "memory_total": self.memory_total}


def _library_folder() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


def _libggml_names() -> tuple[str, ...]:
    if sys.platform == "darwin":
        return ("libggml.0.dylib", "libggml.dylib")
    if sys.platform == "win32":
        return ("ggml.dll",)
    return ("libggml.so.0", "libggml.so")


@functools.cache
def _ggml() -> ctypes.CDLL:
    import llama_cpp  # noqa: F401 (loads libllama, and with it the libggml it links)

    folder = _library_folder()
    path = next((folder / name for name in _libggml_names() if (folder / name).exists()), None)
    if path is None:
        raise RPCUnavailable(f"llama-cpp-python's ggml library is not in {folder}; reinstall llama-cpp-python.")
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    return lib


@functools.cache
def _rpc_registry() -> int | None:
    """The RPC backend's registry entry, registering a separately built library first when one is named."""
    lib = _ggml()
    registry = lib.ggml_backend_reg_by_name(b"RPC")
    if registry:
        return int(registry)
    separate = os.environ.get(RPC_LIBRARY_ENV)
    if not separate:
        return None
    try:
        rpc = ctypes.CDLL(separate)
    except OSError as error:
        raise RPCUnavailable(f"{RPC_LIBRARY_ENV} names {separate}, which could not be loaded ({error}); "
                             "unset it or build that library again.") from error
    rpc.ggml_backend_rpc_reg.restype = ctypes.c_void_p
    lib.ggml_backend_register(rpc.ggml_backend_rpc_reg())
    return int(lib.ggml_backend_reg_by_name(b"RPC") or 0) or None


def rpc_available() -> bool:
    """Whether llama.cpp's RPC backend can be used in this installation."""
    try:
        return _rpc_registry() is not None
    except (OSError, NativeError):
        return False


def _require_registry() -> int:
    registry = _rpc_registry()
    if registry is None:
        raise RPCUnavailable("the installed llama-cpp-python was built without llama.cpp's RPC backend; reinstall "
                             "it with `make install` (which builds it with CMAKE_ARGS=\"-DGGML_RPC=on\").")
    return registry


def _function(name: str, prototype: type) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    address = _ggml().ggml_backend_reg_get_proc_address(_require_registry(), name.encode())
    if not address:
        raise RPCUnavailable(f"llama.cpp's RPC backend lacks {name}; reinstall llama-cpp-python with `make install`.")
    return prototype(address)


def _text(raw: bytes | None) -> str:
    return raw.decode("utf-8", errors="replace") if raw else ""


def _memory(device: int) -> tuple[int, int]:
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    _ggml().ggml_backend_dev_memory(device, ctypes.byref(free), ctypes.byref(total))
    return free.value, total.value


_added: dict[str, int] = {}


def add_servers(endpoints: Iterable[str]) -> list[RemoteDevice]:
    """Make each worker's devices ggml devices of this process (once per endpoint); their devices, in order.

    ggml aborts the process when a worker cannot be reached: check first, and call this in a child process.
    """
    lib = _ggml()
    add_server = _function("ggml_backend_rpc_add_server", _AddServer)
    devices: list[RemoteDevice] = []
    for endpoint in endpoints:
        if endpoint not in _added:
            registry = add_server(endpoint.encode())
            lib.ggml_backend_register(registry)
            _added[endpoint] = int(registry)
        registry = _added[endpoint]
        for index in range(lib.ggml_backend_reg_dev_count(registry)):
            device = lib.ggml_backend_reg_dev_get(registry, index)
            free, total = _memory(device)
            devices.append(RemoteDevice(endpoint, _text(lib.ggml_backend_dev_name(device)),
                                        _text(lib.ggml_backend_dev_description(device)), free, total))
    return devices


def local_devices() -> list[int]:
    """The devices a worker serves: this machine's GPUs when it has any, else its CPU (never another worker)."""
    lib = _ggml()
    gpus, cpus = [], []
    for index in range(lib.ggml_backend_dev_count()):
        device = lib.ggml_backend_dev_get(index)
        backend = _text(lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(device)))
        if backend.startswith("RPC"):
            continue
        kind = lib.ggml_backend_dev_type(device)
        (gpus if kind == DEVICE_TYPE_GPU else cpus if kind == DEVICE_TYPE_CPU else []).append(device)
    return gpus or cpus


def device_name(device: int) -> str:
    return _text(_ggml().ggml_backend_dev_name(device))


def device_memory(device: int) -> tuple[int, int]:
    """(free, total) bytes as the device reports them."""
    return _memory(device)


_memory_caps: list[object] = []
"""The replacement memory functions, kept alive for as long as the process runs."""


def cap_reported_memory(device: int, limit: int) -> None:
    """Make `device` report at most `limit` bytes free and in total, so clients place no more than that on it.

    Only a worker process does this, to its own devices, before it serves them: ggml has no option for it, so the
    device's `get_memory` entry is replaced by one that reads the real figures and caps them.
    """
    slot = ctypes.c_void_p.from_address(device + _GET_MEMORY_SLOT * ctypes.sizeof(ctypes.c_void_p))
    original = _GetMemory(slot.value)

    @_GetMemory
    def capped(handle: int, free: ctypes._Pointer, total: ctypes._Pointer) -> None:  # type: ignore[type-arg]
        original(handle, free, total)
        free[0] = min(free[0], limit)
        total[0] = min(total[0], limit)

    _memory_caps.append((original, capped))
    slot.value = ctypes.cast(capped, ctypes.c_void_p).value


def serve(endpoint: str, devices: list[int], *, n_threads: int, cache_dir: str | None = None) -> None:
    """Serve `devices` to RPC clients on `endpoint` ("host:port"), one client at a time; returns only when ggml
    cannot open the socket or a device (it prints why on stderr)."""
    start_server = _function("ggml_backend_rpc_start_server", _StartServer)
    array = (ctypes.c_void_p * len(devices))(*devices)
    start_server(endpoint.encode(), cache_dir.encode() if cache_dir else None, n_threads, len(devices), array)


__all__ = [
    "RPC_LIBRARY_ENV",
    "RPCUnavailable",
    "RemoteDevice",
    "add_servers",
    "cap_reported_memory",
    "device_memory",
    "device_name",
    "local_devices",
    "rpc_available",
    "serve",
]
