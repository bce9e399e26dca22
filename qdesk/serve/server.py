"""`qdesk serve` as a function: an OpenAI-compatible server over library variants, started and stopped from code.

`start_server(ServeOptions(...))` binds the socket (so a taken port is one sentence, and port 0 picks a free one),
runs uvicorn with the `ServeApp` on a thread of its own and returns a `RunningServer`: its address, the models it
offers, the request log, and `stop()`, which ends the server and every model worker it started. The command line
runs the same server until Ctrl-C; the desktop app starts and stops it from its Serve section.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from converters.core.errors import UserError
from qdesk.chat.engine import LoadOptions
from qdesk.rpc.endpoints import is_loopback
from qdesk.serve.app import RequestRecord, ServeApp
from qdesk.serve.pool import ModelPool

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_CTX = 4096
API_KEY_ENV = "QDESK_API_KEY"
LOG_LENGTH = 500
START_TIMEOUT_S = 30.0
STOP_GRACE_S = 3.0
"""How long open answers get to finish when the server stops before they are cut (their generation stops too)."""


class ServeError(UserError):
    """The server cannot start as asked."""


@dataclass(frozen=True)
class ServeOptions:
    models: tuple[str, ...] = ()
    """Library names or GGUF paths; empty: every usable model of the library."""
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    """0: any free port."""
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    load: LoadOptions = field(default_factory=lambda: LoadOptions(n_ctx=DEFAULT_CTX))
    memory_limit: int | None = None
    """Bytes the loaded models may take together by the memory estimate; None: the memory available at start."""


def offered_models(names: Sequence[str], library_root: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Model name → GGUF file: each of `names` is a library name or a GGUF path (offered under its library name if
    it is in the library, else its file name without .gguf); no names: every usable model in the library."""
    from qdesk.library.store import Library

    library = Library(library_root)
    library.ensure_starter()
    entries = library.entries()
    if not names:
        offered = {entry.id: entry.path for entry in entries if entry.status == "ok"}
        if not offered:
            raise ServeError("the library has no usable models to serve; import one with `qdesk models import` or "
                             "name GGUF files after `qdesk serve`.")
        return offered
    by_path = {entry.path.absolute(): entry.id for entry in entries}
    chosen: dict[str, Path] = {}
    for name in names:
        path = Path(name).expanduser()
        if path.suffix.lower() == ".gguf" or path.is_file():
            if not path.is_file():
                raise ServeError(f"{path} does not exist; check the path of the model to serve.")
            wanted = by_path.get(path.absolute(), path.stem)
        else:
            entry = library.find(name)
            wanted, path = entry.id, entry.path
        unique, number = wanted, 1
        while unique in chosen and chosen[unique] != path:
            number += 1
            unique = f"{wanted}-{number}"
        chosen[unique] = path
    return chosen


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise ServeError(f"cannot listen on {host}:{port} ({error.strerror or error}); choose another --port or "
                         "stop the program that uses it.") from None
    listener.listen(128)
    listener.setblocking(False)
    return listener


def check_exposure(host: str, api_key: str | None) -> None:
    """A server reachable from other machines needs an API key."""
    if not is_loopback(host) and not api_key:
        raise ServeError(f"listening on {host} lets other machines use the server; give an --api-key (or set "
                         f"{API_KEY_ENV}) so only those who know it can, or keep the default host {DEFAULT_HOST}.")


class RunningServer:
    """A server on its own thread; `stop()` ends it and its model workers."""

    def __init__(self, options: ServeOptions, pool: ModelPool, listener: socket.socket,
                 on_request: Callable[[RequestRecord], None] | None) -> None:
        import uvicorn

        self.options = options
        self.pool = pool
        self._listener = listener
        self._on_request = on_request
        self._log: deque[RequestRecord] = deque(maxlen=LOG_LENGTH)
        self._log_lock = threading.Lock()
        address = listener.getsockname()
        self.host, self.port = options.host, int(address[1])
        app = ServeApp(pool, api_key=options.api_key, cors_origins=options.cors_origins, logger=self._record)
        config = uvicorn.Config(app.asgi, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=int(STOP_GRACE_S), ws="none")
        self._server = uvicorn.Server(config)
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="qdesk serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self._server.started:
            self.stop()
            raise ServeError(f"the server did not start on {self.url} ({self._failure or 'no reason given'}); "
                             "try another --port.")

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._listener])
        except BaseException as error:  # reported by the constructor or `wait`
            self._failure = error
        finally:
            self.pool.close()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def models(self) -> list[str]:
        return self.pool.names

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _record(self, record: RequestRecord) -> None:
        with self._log_lock:
            self._log.append(record)
        if self._on_request is not None:
            with contextlib.suppress(Exception):  # a view's failure must not break the server
                self._on_request(record)

    def log(self) -> list[RequestRecord]:
        """The latest requests, oldest first."""
        with self._log_lock:
            return list(self._log)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped (True) or `timeout` passed (False)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        """End the server, cut answers still open after a short grace, and end every model worker."""
        self._server.should_exit = True
        self._thread.join(STOP_GRACE_S + 10.0)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(5.0)
        self.pool.close()
        with contextlib.suppress(OSError):
            self._listener.close()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def start_server(options: ServeOptions, *, on_request: Callable[[RequestRecord], None] | None = None,
                 library_root: str | os.PathLike[str] | None = None) -> RunningServer:
    """Start serving; returns once the server answers. Raises ServeError (or another UserError) when it cannot."""
    from qdesk.memory.fit import available_ram

    check_exposure(options.host, options.api_key)
    if not 0 <= options.port < 65536:
        raise ServeError(f"--port must be between 0 and 65535, not {options.port}.")
    offered = offered_models(options.models, library_root)
    limit = options.memory_limit if options.memory_limit is not None else available_ram()
    pool = ModelPool(offered, options.load, limit)
    return RunningServer(options, pool, _bind(options.host, options.port), on_request)
