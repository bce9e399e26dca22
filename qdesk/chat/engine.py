"""Loading and running GGUF models, each in its own worker process (`qdesk.chat.engine_worker`).

A `LoadedModel` is a handle on one worker: two handles generate at the same time, a worker that llama.cpp
crashes takes nothing else down (the caller gets `ModelCrashed`), and `stop()` lands between two tokens.
Timings are taken here, in the caller, so they include everything the app adds on top of llama.cpp.

Why the worker is not a `native.child.run_in_child` call like qdesk's other steps: those run one function and
end, while a worker lives as long as its model is loaded and holds a conversation with the caller (a chat at a
time, a stop that must land between two tokens, tokens streamed as they come, every few milliseconds), so it
speaks its own line protocol and has no progress watchdog (a model may sit idle for hours). It is started by the
same primitive, `native.child.spawn_python`, so it too dies with the app and never starts gdb when llama.cpp
aborts.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import IO, Any

from converters.core.errors import GGUFFileError, UserError
from converters.core.hyperparameters import check_model_gguf
from converters.core.jobs import CancelToken
from native.child import spawn_python
from qdesk.chat.lora import LoraChoice, check_adapters

WORKER_MODULE = "qdesk.chat.engine_worker"
POLL_S = 0.02
"""How long one wait for the worker's next message lasts before a chat checks its stop deadline again."""
STREAM_BATCH_S = 0.05
"""After a token, the caller rests this long (or until `stop()`) before reading again, so it takes the CPU from
the worker's threads once per batch of tokens rather than once per token (timings use the worker's own clock);
a cancel token wakes it through `stop()` at once."""
STOP_GRACE_S = 15.0
"""How long a stopped worker may take to answer before it is killed: it answers between two decoding steps, and
one step of a long prompt on a large model, or any step on a busy machine, can take seconds."""
EXIT_GRACE_S = 2.0
STDERR_TAIL_BYTES = 4000
STOP_REASONS = ("stop", "length", "cancelled")
RPC_ABORT_MARKERS = ("Remote RPC server crashed", "Failed to connect to", "RPC handshake failed")
"""What ggml's RPC client says when it aborts because a worker went away."""
RPC_ABORT_SEARCH_BYTES = 1 << 20
"""How far back in a crashed worker's stderr to look for those words (ggml's backtrace follows them)."""


class EngineError(UserError):
    """A model cannot be loaded or run; the message says what is wrong and what to do."""


class ModelCrashed(EngineError):
    """The worker process died (a signal, an abort inside llama.cpp) while loading or generating."""


class ContextOverflow(EngineError):
    """The conversation or prompt does not fit in the model's context."""


class ModelFileError(EngineError, GGUFFileError):
    """The model file is missing, not a GGUF, or damaged (found before any worker starts)."""


@dataclass(frozen=True)
class LoadOptions:
    n_ctx: int = 2048
    n_threads: int | None = None
    """None: one thread per CPU core."""
    n_gpu_layers: int | str = 0
    """A number of layers to offload, or "auto": all layers when a GPU device is present, else none."""
    kv_type: str = "f16"
    """The KV cache's type: "f16", or "q8_0"/"q4_0" to fit a longer context (these turn flash attention on,
    which llama.cpp needs for a quantized V cache)."""
    rpc: tuple[str, ...] = ()
    """`host:port` of ggml RPC workers (`qdesk worker`) that hold some of the layers; `load_model` places the layers
    across this machine and them by free memory (`qdesk.rpc.placement`) unless `tensor_split` is given."""
    tensor_split: tuple[float, ...] = ()
    """Shares of the offloaded layers per device in llama.cpp's order (RPC workers first, then local GPUs)."""
    loras: tuple[LoraChoice, ...] = ()
    """LoRA adapters (GGUF) applied on top of the model, each at its scale."""


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.1
    max_tokens: int = 256
    seed: int = 0
    """Same seed and settings give the same answer; temperature 0 is greedy."""
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> SamplingOptions:
        """The options in `document` (as `asdict` writes them), with the default for any missing or non-numeric."""
        values: dict[str, Any] = {}
        for item in fields(cls):
            value = document.get(item.name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                values[item.name] = type(getattr(_DEFAULT_SAMPLING, item.name))(value)
        return replace(_DEFAULT_SAMPLING, **values)


_DEFAULT_SAMPLING = SamplingOptions()
KV_TYPES = ("f16", "q8_0", "q4_0")


@dataclass(frozen=True)
class TokenEvent:
    text: str
    """The decoded piece; "" while a multi-byte character is still incomplete."""
    index: int
    """0-based position among the generated tokens."""


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    time_to_first_token_s: float
    tokens_per_second: float
    """Decoding speed: tokens after the first over the time from the first to the last."""
    total_s: float
    stop_reason: str
    """"stop" (end of turn), "length" (max_tokens or a full context) or "cancelled"."""
    memory_bytes: int
    """The worker's resident memory after generation."""


@dataclass(frozen=True)
class ChatResult:
    text: str
    token_ids: tuple[int, ...]
    stats: GenerationStats


Message = Mapping[str, str]


def _check_options(options: LoadOptions) -> None:
    if options.n_ctx < 1:
        raise EngineError(f"the context length must be at least 1 token, not {options.n_ctx}; choose a larger one.")
    if options.n_threads is not None and options.n_threads < 1:
        raise EngineError(f"the thread count must be at least 1, not {options.n_threads}; choose a larger one.")
    if options.kv_type not in KV_TYPES:
        raise EngineError(f"the KV cache type must be one of {', '.join(KV_TYPES)}, not {options.kv_type!r}; "
                          "pick one of those.")
    layers = options.n_gpu_layers
    if not (layers == "auto" or (isinstance(layers, int) and not isinstance(layers, bool) and layers >= -1)):
        raise EngineError(f"GPU layers must be a number of layers or \"auto\", not {layers!r}; pick one of those.")


def _check_sampling(sampling: SamplingOptions) -> None:
    if sampling.max_tokens < 1:
        raise EngineError(f"max_tokens must be at least 1, not {sampling.max_tokens}; choose a larger one.")
    if sampling.temperature < 0 or not 0 < sampling.top_p <= 1 or sampling.top_k < 0 or sampling.repeat_penalty <= 0:
        raise EngineError("sampling settings out of range: temperature ≥ 0, 0 < top-p ≤ 1, top-k ≥ 0 and "
                          "repeat penalty > 0; correct them and ask again.")


class _Worker:
    """The process and its pipes; knows nothing of chats, only of lines and of dying."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stderr: IO[bytes] = tempfile.TemporaryFile(prefix="qdesk-worker-")  # noqa: SIM115 (lives with the worker)
        self.process = spawn_python(WORKER_MODULE, stderr=self._stderr, environment={"PYTHONUNBUFFERED": "1"})
        assert self.process.stdin is not None and self.process.stdout is not None
        self._stdin = self.process.stdin
        self._fd = self.process.stdout.fileno()
        os.set_blocking(self._fd, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._fd, selectors.EVENT_READ)
        self._buffer = b""
        self._write_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> bool:
        """Write one command; False if the worker is gone."""
        data = (json.dumps(message) + "\n").encode("utf-8")
        with self._write_lock:
            try:
                self._stdin.write(data)
                self._stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                return False
        return True

    def has_pending_line(self) -> bool:
        return b"\n" in self._buffer

    def receive(self, timeout: float) -> dict[str, Any] | None:
        """The next message, None on timeout; raises EOFError when the worker has closed its end."""
        while b"\n" not in self._buffer:
            if not self._selector.select(timeout):
                return None
            chunk = os.read(self._fd, 1 << 16)
            if not chunk:
                raise EOFError
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def stderr_tail(self, limit: int = STDERR_TAIL_BYTES) -> str:
        try:
            self._stderr.seek(0, os.SEEK_END)
            size = self._stderr.tell()
            self._stderr.seek(max(0, size - limit))
            return self._stderr.read().decode("utf-8", errors="replace").strip()
        except (OSError, ValueError):
            return ""

    def death(self) -> str:
        """How the process ended, in words (waits briefly for it to be reaped)."""
        try:
            code = self.process.wait(timeout=EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.process.wait()
        if code < 0:
            try:
                return f"it was ended by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"it was ended by signal {-code}"
        return f"it exited with status {code}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def shut(self) -> None:
        """Ask the worker to exit, kill it if it does not, and release every descriptor."""
        if self.process.poll() is None:
            self.send({"op": "exit"})
            try:
                self.process.wait(timeout=EXIT_GRACE_S)
            except subprocess.TimeoutExpired:
                self.kill()
        for closable in (self._stdin, self.process.stdout, self._stderr):
            with contextlib.suppress(OSError, ValueError):
                closable.close()  # type: ignore[union-attr]
        self._selector.close()


class LoadedModel:
    """A handle on one model loaded in its own worker process; a context manager that closes the worker."""

    def __init__(self, path: Path, worker: _Worker, n_ctx: int, rpc: tuple[str, ...] = ()) -> None:
        self.path = path
        self.n_ctx = n_ctx
        self.rpc = rpc
        """The RPC workers holding some of its layers (empty: all on this machine)."""
        self._worker = worker
        self._chat_lock = threading.Lock()
        self._generation = 0
        self._active: int | None = None
        self._stop_requested_at: float | None = None
        self._wake = threading.Event()
        self._closed = False
        self._broken: str | None = None
        self._finalizer = weakref.finalize(self, worker.shut)

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LoadedModel({str(self.path)!r}, pid={self.pid}, alive={self.alive})"

    @property
    def pid(self) -> int:
        return self._worker.process.pid

    @property
    def alive(self) -> bool:
        return not self._closed and self._broken is None and self._worker.process.poll() is None

    def close(self) -> None:
        """End the worker; calling it again does nothing."""
        self._closed = True
        self._finalizer()

    def stop(self) -> None:
        """Stop the generation in progress, from any thread; its chat() returns with stop_reason "cancelled"."""
        active = self._active
        if active is not None:
            self._stop_requested_at = time.perf_counter()
            self._worker.send({"op": "stop", "id": active})
            self._wake.set()

    def chat(self, messages: Sequence[Message], sampling: SamplingOptions = SamplingOptions(), *,
             system: str | None = None, on_token: Callable[[TokenEvent], None] | None = None,
             cancel: CancelToken | None = None) -> ChatResult:
        """Answer the conversation `messages` (role/content mappings), streaming each token to `on_token`."""
        conversation = [{"role": m["role"], "content": m["content"]} for m in messages]
        if system is not None:
            conversation.insert(0, {"role": "system", "content": system})
        return self._answer({"messages": conversation}, sampling, on_token, cancel)

    def complete(self, prompt: str, sampling: SamplingOptions = SamplingOptions(), *,
                 on_token: Callable[[TokenEvent], None] | None = None,
                 cancel: CancelToken | None = None) -> ChatResult:
        """Continue the plain text `prompt` (no chat template), streaming each token to `on_token`."""
        return self._answer({"prompt": prompt}, sampling, on_token, cancel)

    def next_token_logits(self, tokens: Sequence[int]) -> Any:
        """The logits (a float32 numpy array over the vocabulary) after evaluating `tokens` from an empty state."""
        import base64

        import numpy as np

        with self._chat_lock:
            self._require_usable()
            if not self._worker.send({"op": "logits", "tokens": [int(token) for token in tokens]}):
                raise self._crashed("while evaluating tokens")
            while True:
                try:
                    message = self._worker.receive(POLL_S)
                except EOFError:
                    raise self._crashed("while evaluating tokens") from None
                if message is None:
                    continue
                if "error" in message:
                    raise EngineError(f"{self.path.name} could not evaluate the tokens: {message['error']['message']}")
                return np.frombuffer(base64.b64decode(message["logits"]), dtype=np.float32)

    def _answer(self, request: dict[str, Any], sampling: SamplingOptions,
                on_token: Callable[[TokenEvent], None] | None, cancel: CancelToken | None) -> ChatResult:
        _check_sampling(sampling)
        with self._chat_lock:
            self._require_usable()
            self._generation += 1
            generation = self._generation
            started = time.perf_counter()
            self._stop_requested_at = None
            self._wake.clear()
            self._active = generation
            try:
                if not self._worker.send({"op": "chat", "id": generation, **request, "sampling": asdict(sampling)}):
                    raise self._crashed("while starting an answer")
                unsubscribe = cancel.subscribe(self.stop) if cancel is not None else None
                try:
                    return self._stream(started, on_token)
                finally:
                    if unsubscribe is not None:
                        unsubscribe()
            finally:
                self._active = None

    def _require_usable(self) -> None:
        if self._closed:
            raise EngineError(f"{self.path.name} was closed; load it again to chat with it.")
        if self._broken is not None:
            raise EngineError(f"{self.path.name} is no longer loaded ({self._broken}); load it again.")

    def _crashed(self, when: str) -> ModelCrashed:
        how = self._worker.death()
        self._broken = f"its worker stopped {when}"
        detail = self._worker.stderr_tail().splitlines()
        hint = f" (last words: {detail[-1][:300]})" if detail else ""
        rpc_failed = bool(self.rpc) and _mentions_rpc(self._worker.stderr_tail(RPC_ABORT_SEARCH_BYTES))
        self._worker.shut()
        if rpc_failed:
            return ModelCrashed(f"an RPC worker holding layers of {self.path.name} ({', '.join(self.rpc)}) stopped "
                                f"answering {when}; start `qdesk worker` there again and load the model again.")
        return ModelCrashed(f"the worker running {self.path.name} stopped unexpectedly {when}: {how}{hint}; "
                            "load the model again, and if it keeps happening the file may be damaged.")

    def _stream(self, started: float, on_token: Callable[[TokenEvent], None] | None) -> ChatResult:
        """Read the worker's answer; a stop (by `stop()`, a cancel token or a failing callback) is sent by `stop()`,
        which records when, so a worker that does not answer it in time is ended here."""
        pieces: list[str] = []
        token_ids: list[int] = []
        first_at: float | None = None
        last_at = started
        callback_error: BaseException | None = None
        while True:
            try:
                message = self._worker.receive(POLL_S)
            except EOFError:
                raise self._crashed("while generating") from None
            if message is None:
                stop_sent_at = self._stop_requested_at
                if stop_sent_at is not None and time.perf_counter() - stop_sent_at > STOP_GRACE_S:
                    self._worker.kill()
                    self._broken = "it did not answer a stop request in time and was ended"
                    self._worker.shut()
                    return self._result(pieces, token_ids, started, first_at, last_at, 0, "cancelled", 0)
                continue
            if "token" in message:
                last_at = float(message.get("at", time.perf_counter()))
                first_at = first_at if first_at is not None else last_at
                event = TokenEvent(message["text"], len(token_ids))
                pieces.append(event.text)
                token_ids.append(int(message["token"]))
                if on_token is not None and callback_error is None:
                    try:
                        on_token(event)
                    except BaseException as error:  # stop the worker, then let the caller see its own error
                        callback_error = error
                        self.stop()
                if self._stop_requested_at is None and not self._worker.has_pending_line():
                    self._wake.wait(STREAM_BATCH_S)
            elif "done" in message:
                done = message["done"]
                if callback_error is not None:
                    raise callback_error
                pieces.append(done["tail"])
                return self._result(pieces, token_ids, started, first_at, last_at, int(done["prompt_tokens"]),
                                    str(done["stop_reason"]), int(done["memory_bytes"]))
            elif "error" in message:
                error = ContextOverflow if message["error"].get("kind") == "context" else EngineError
                raise error(f"{self.path.name} could not answer: {message['error']['message']}")

    @staticmethod
    def _result(pieces: list[str], token_ids: list[int], started: float, first_at: float | None, last_at: float,
                prompt_tokens: int, stop_reason: str, memory_bytes: int) -> ChatResult:
        total = time.perf_counter() - started
        count = len(token_ids)
        if first_at is None:
            ttft, speed = total, 0.0
        elif count > 1 and last_at > first_at:
            ttft, speed = first_at - started, (count - 1) / (last_at - first_at)
        else:
            ttft, speed = first_at - started, count / max(total, 1e-9)
        stats = GenerationStats(prompt_tokens, count, ttft, speed, total, stop_reason, memory_bytes)
        return ChatResult("".join(pieces), tuple(token_ids), stats)


def load_model(path: str | Path, options: LoadOptions = LoadOptions()) -> LoadedModel:
    """Start a worker process and load the GGUF at `path` in it; raises EngineError (or a subclass) on failure."""
    path = Path(path)
    _check_options(options)
    try:
        check_model_gguf(path)
    except GGUFFileError as error:
        raise ModelFileError(str(error)) from error
    check_adapters(path, options.loras)
    if options.rpc and not options.tensor_split:
        from qdesk.rpc.placement import place_layers

        options = place_layers(path, options).load_options
    worker = _Worker(path)
    n_threads = options.n_threads or os.cpu_count() or 1
    if not worker.send({"op": "load", "path": str(path), "n_ctx": options.n_ctx, "n_threads": n_threads,
                        "n_gpu_layers": options.n_gpu_layers, "kv_type": options.kv_type,
                        "rpc": list(options.rpc), "tensor_split": list(options.tensor_split),
                        "loras": [[str(lora.path), lora.scale] for lora in options.loras]}):
        raise _load_crash(worker, path, options.rpc)
    try:
        message = None
        while message is None:
            message = worker.receive(1.0)
    except EOFError:
        raise _load_crash(worker, path, options.rpc) from None
    except BaseException:
        worker.kill()
        worker.shut()
        raise
    if "ready" in message:
        return LoadedModel(path, worker, int(message["ready"]["n_ctx"]), options.rpc)
    worker.shut()
    raise _load_failure(path, options, message["error"])


def _load_crash(worker: _Worker, path: Path, rpc: tuple[str, ...] = ()) -> ModelCrashed:
    how = worker.death()
    detail = worker.stderr_tail().splitlines()
    rpc_failed = bool(rpc) and _mentions_rpc(worker.stderr_tail(RPC_ABORT_SEARCH_BYTES))
    worker.shut()
    if rpc_failed:
        return ModelCrashed(f"the RPC workers ({', '.join(rpc)}) stopped answering while {path.name} was loading "
                            "onto them; check that `qdesk worker` still runs there and load the model again.")
    hint = f" (last words: {detail[-1][:300]})" if detail else ""
    return ModelCrashed(f"llama.cpp crashed while loading {path.name}: {how}{hint}; the file is probably damaged "
                        "or made for a newer llama.cpp, so convert or download it again.")


def _mentions_rpc(stderr: str) -> bool:
    """Whether ggml's RPC client gave up (its abort message comes before the backtrace ggml prints)."""
    return any(marker in stderr for marker in RPC_ABORT_MARKERS)


def _load_failure(path: Path, options: LoadOptions, error: Mapping[str, str]) -> EngineError:
    kind, log = error.get("kind"), error.get("log", "")
    if kind == "architecture":
        architecture = _quoted_after(log, "unknown model architecture") or "unknown"
        return EngineError(f"the installed llama.cpp cannot run this model's architecture ({architecture}) in "
                           f"{path.name}; update qdesk or choose a model of a supported architecture.")
    if kind == "context":
        return EngineError(f"a context of {options.n_ctx} tokens does not fit in memory for {path.name}; "
                           "lower the context length and load it again.")
    if kind == "missing":
        return ModelFileError(f"{path} does not exist any more; check the path.")
    if kind == "adapter":
        return EngineError(f"llama.cpp could not apply a LoRA adapter to {path.name} ({error.get('message', '')}); "
                           "use an adapter converted for this base model.")
    reason = _first_error_line(log) or error.get("message", "")
    return EngineError(f"llama.cpp could not load {path.name} ({reason or 'no reason given'}); the file may be "
                       "damaged or need a newer llama.cpp, so convert or download it again.")


def _first_error_line(log: str) -> str:
    for line in log.splitlines():
        marker = line.find("error loading model:")
        if marker >= 0:
            return line[marker + len("error loading model:"):].strip()
    return next((line for line in log.splitlines() if "error" in line.lower()), "")


def _quoted_after(text: str, marker: str) -> str | None:
    start = text.find(marker)
    if start < 0:
        return None
    rest = text[start + len(marker):]
    quote = rest.find("'")
    end = rest.find("'", quote + 1)
    return rest[quote + 1:end] if 0 <= quote < end else None


__all__ = [
    "ChatResult",
    "ContextOverflow",
    "EngineError",
    "GenerationStats",
    "LoadOptions",
    "LoadedModel",
    "ModelCrashed",
    "ModelFileError",
    "SamplingOptions",
    "TokenEvent",
    "load_model",
]
