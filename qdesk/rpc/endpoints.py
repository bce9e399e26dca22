"""`host:port` addresses of RPC workers: parsing, whether they are this machine, and whether they answer."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from converters.core.errors import UserError

DEFAULT_WORKER_PORT = 50052
CONNECT_TIMEOUT_S = 3.0
TRUST_WARNING = ("ggml's RPC protocol has no authentication and no encryption: anyone who can reach a worker can "
                 "run computations on it and read what it holds, so use workers only on a network you trust")


class WorkerUnreachable(UserError):
    """An RPC worker does not accept connections."""


def parse_endpoint(text: str) -> str:
    """`host:port` checked and normalised (IPv6 in brackets); UserError with the expected form otherwise."""
    text = text.strip()
    host, separator, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not separator or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UserError(f"{text!r} is not an RPC worker address; write it as host:port, e.g. 192.168.1.20:"
                        f"{DEFAULT_WORKER_PORT}.")
    return f"[{host}]:{int(port_text)}" if ":" in host else f"{host}:{int(port_text)}"


def parse_endpoints(text: str | Iterable[str]) -> tuple[str, ...]:
    """A comma-separated list (or several) of `host:port`, each once, in order."""
    parts = text.split(",") if isinstance(text, str) else [part for item in text for part in item.split(",")]
    endpoints: list[str] = []
    for part in parts:
        if part.strip():
            endpoint = parse_endpoint(part)
            if endpoint not in endpoints:
                endpoints.append(endpoint)
    return tuple(endpoints)


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warnings(endpoints: Iterable[str]) -> list[str]:
    """One sentence per worker that is not on this machine: the protocol is open to whoever can reach it."""
    return [f"the RPC worker {endpoint} is not on this machine; {TRUST_WARNING}."
            for endpoint in endpoints if not is_loopback(split_endpoint(endpoint)[0])]


def check_reachable(endpoints: Iterable[str], timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise WorkerUnreachable for the first worker that does not accept a TCP connection within `timeout_s`."""
    for endpoint in endpoints:
        host, port = split_endpoint(endpoint)
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                pass
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise WorkerUnreachable(f"no RPC worker answers at {endpoint} ({reason}); start one there with "
                                    f"`qdesk worker --host {host} --port {port}` or correct the address.") from None
