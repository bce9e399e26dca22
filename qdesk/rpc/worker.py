"""`qdesk worker`: this machine's devices served to llama.cpp clients elsewhere (ggml's RPC server, in this process).

The server runs on a thread of its own (ggml's accept loop never returns), so Ctrl-C still reaches Python; it
serves one client (one loaded model) at a time. The protocol has no authentication or encryption
(`qdesk.rpc.endpoints.TRUST_WARNING`): the worker binds to loopback unless told otherwise.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from converters.core.errors import UserError
from converters.core.units import format_size
from qdesk.rpc.endpoints import DEFAULT_WORKER_PORT, is_loopback

WAIT_STEP_S = 0.2


@dataclass(frozen=True)
class WorkerInfo:
    endpoint: str
    devices: tuple[str, ...]
    """Each served device with the memory it reports, in words."""
    exposed: bool
    """Bound to an address other machines can reach."""


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(f"cannot listen on {host}:{port} ({error.strerror or error}); choose another --port or "
                            "stop what uses it.") from None


def run_worker(host: str = "127.0.0.1", port: int = DEFAULT_WORKER_PORT, *, threads: int | None = None,
               memory_limit: int | None = None, on_ready: Callable[[WorkerInfo], None] | None = None,
               stop: threading.Event | None = None) -> None:
    """Serve this machine's GPUs (or its CPU) on host:port until `stop` is set or ggml gives up.

    `memory_limit` caps the memory each device reports, so clients place no more than that here.
    """
    from native.rpc import cap_reported_memory, device_memory, device_name, local_devices, serve

    if not 0 < port < 65536:
        raise UserError(f"--port must be between 1 and 65535, not {port}.")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, not {threads}.")
    if memory_limit is not None and memory_limit <= 0:
        raise UserError("--mem must be a positive size, e.g. 8GiB.")
    _check_port(host, port)
    devices = local_devices()
    if memory_limit is not None:
        for device in devices:
            cap_reported_memory(device, memory_limit)
    endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    described = tuple(f"{device_name(device)}: {format_size(device_memory(device)[0])} free" for device in devices)
    stop = stop or threading.Event()
    server = threading.Thread(target=serve, args=(endpoint, devices), name="rpc-server", daemon=True,
                              kwargs={"n_threads": threads or os.cpu_count() or 1})
    server.start()
    if on_ready is not None:
        on_ready(WorkerInfo(endpoint, described, not is_loopback(host)))
    while server.is_alive() and not stop.is_set():
        server.join(WAIT_STEP_S)
    if not server.is_alive():
        raise UserError(f"llama.cpp's RPC server stopped at once on {endpoint} (see the lines above); check the "
                        "address and that the port is free.")
