"""The models a server offers, loaded on demand within a memory limit, and their turns handed out fairly.

Each offered model is a `qdesk.chat.engine` worker once loaded (the same engine as the app's chat). A model
generates one answer at a time; requests for it wait in line, and the line is fair: clients (the request's `user`,
else its address) take turns, each client's own requests in the order they came. A model that is not loaded is
loaded when its turn comes, after unloading the least recently used idle models until the memory estimate of what
stays loaded, plus the new one, fits the limit. With RPC workers only one model is loaded at a time (a worker serves
one client).

Everything here runs on the server's event loop except loading, closing and generating, which run on threads.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from converters.core.errors import UserError
from converters.core.units import format_size
from qdesk.chat.engine import EngineError, LoadedModel, LoadOptions, load_model
from qdesk.serve.protocol import ApiError

Loader = Callable[[Path, LoadOptions], LoadedModel]


def estimated_bytes(path: Path, options: LoadOptions) -> int:
    """System memory this machine gives the model's worker: llama.cpp's buffers (the memory estimate) and the
    process itself; with RPC workers, this machine's share only."""
    from qdesk.memory.estimate import DEFAULT_RAM_HEADROOM, estimate_memory

    n_gpu_layers = options.n_gpu_layers if isinstance(options.n_gpu_layers, int) else 0
    if options.rpc:
        return DEFAULT_RAM_HEADROOM  # the layers' share is priced at load time by the placement
    try:
        estimate = estimate_memory(path, n_ctx=options.n_ctx, n_gpu_layers=n_gpu_layers, kv_type=options.kv_type)
    except (UserError, ValueError):
        return path.stat().st_size if path.is_file() else 0
    return estimate.ram_bytes + DEFAULT_RAM_HEADROOM


@dataclass
class _Slot:
    name: str
    path: Path
    needs: int
    model: LoadedModel | None = None
    busy: bool = False
    last_used: float = 0.0
    waiting: OrderedDict[str, deque[asyncio.Future[None]]] = field(default_factory=OrderedDict)
    """Per client, its waiting requests in order; clients in the order their turn comes."""


@dataclass(frozen=True)
class Lease:
    """A request's turn on a loaded model; give it back with `ModelPool.release`."""

    name: str
    model: LoadedModel


class ModelPool:
    """The offered models by name; `acquire` waits for a model's turn and loads it if needed."""

    def __init__(self, offered: Mapping[str, Path], options: LoadOptions, memory_limit: int, *,
                 loader: Loader = load_model) -> None:
        self.options = options
        self.memory_limit = memory_limit
        self._loader = loader
        self._slots = {name: _Slot(name, Path(path), estimated_bytes(Path(path), options))
                       for name, path in offered.items()}
        self._changed: asyncio.Condition | None = None
        self._load_lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self._slots)

    def path_of(self, name: str) -> Path:
        return self._slots[name].path

    def loaded(self) -> list[str]:
        return [slot.name for slot in self._slots.values() if slot.model is not None and slot.model.alive]

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def acquire(self, name: str, client: str) -> Lease:
        """Wait for this client's turn on model `name`, load it if needed; ApiError if it cannot be loaded.

        Cancelling the wait (a client that went away) leaves the line without taking a turn.
        """
        slot = self._slots[name]
        if slot.needs > self.memory_limit:
            raise ApiError(503, f"{name} needs about {format_size(slot.needs)} and the server's memory limit is "
                                f"{format_size(self.memory_limit)}; ask for a smaller variant or start the server "
                                "with a larger --memory.", kind="server_error", param="model", code="model_too_large")
        await self._wait_turn(slot, client)
        try:
            if slot.model is None or not slot.model.alive:
                await self._load(slot)
        except BaseException:
            await self._hand_on(slot)
            raise
        slot.last_used = time.monotonic()
        assert slot.model is not None
        return Lease(name, slot.model)

    async def release(self, lease: Lease) -> None:
        """Give the turn back; the next client in line gets it."""
        slot = self._slots[lease.name]
        slot.last_used = time.monotonic()
        await self._hand_on(slot)

    async def _wait_turn(self, slot: _Slot, client: str) -> None:
        if not slot.busy and not slot.waiting:
            slot.busy = True
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        slot.waiting.setdefault(client, deque()).append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                await self._hand_on(slot)  # the turn came just as the client left: pass it on
            else:
                line = slot.waiting.get(client)
                if line is not None and turn in line:
                    line.remove(turn)
                    if not line:
                        del slot.waiting[client]
            raise

    async def _hand_on(self, slot: _Slot) -> None:
        """The next client's first request takes the model; that client goes to the back of the line."""
        while slot.waiting:
            client, line = next(iter(slot.waiting.items()))
            turn = line.popleft()
            del slot.waiting[client]
            if line:
                slot.waiting[client] = line  # re-inserted: now last in the rotation
            if not turn.done():
                turn.set_result(None)
                return
        slot.busy = False
        async with self._condition():
            self._condition().notify_all()

    def _resident(self, but: _Slot) -> list[_Slot]:
        return [slot for slot in self._slots.values() if slot is not but and slot.model is not None]

    async def _load(self, slot: _Slot) -> None:
        while True:
            resident = self._resident(slot)
            over = (sum(other.needs for other in resident) + slot.needs > self.memory_limit
                    or (self.options.rpc and resident))
            if not over:
                break
            idle = sorted((other for other in resident if not other.busy), key=lambda other: other.last_used)
            if idle:
                await self._unload(idle[0])
                continue
            async with self._condition():  # every loaded model is answering: wait for one to finish
                await self._condition().wait()
        loop = asyncio.get_running_loop()
        try:
            slot.model = await loop.run_in_executor(None, self._load_now, slot)
        except (EngineError, UserError) as error:
            raise ApiError(500, f"{slot.name} could not be loaded: {error}", kind="server_error", param="model",
                           code="model_load_failed") from error

    def _load_now(self, slot: _Slot) -> LoadedModel:
        with self._load_lock:
            return self._loader(slot.path, self.options)

    async def _unload(self, slot: _Slot) -> None:
        model, slot.model = slot.model, None
        if model is not None:
            await asyncio.get_running_loop().run_in_executor(None, model.close)

    def close(self) -> None:
        """End every worker (from any thread, once the server has stopped)."""
        for slot in self._slots.values():
            model, slot.model = slot.model, None
            if model is not None:
                model.close()
