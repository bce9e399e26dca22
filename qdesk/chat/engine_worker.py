"""The process that holds one loaded model: `python -m qdesk.chat.engine_worker`, driven by `qdesk.chat.engine`.

Protocol: JSON lines. The caller writes commands on stdin (first a `load`, then `chat`, `stop`, `exit`); the worker
answers on the file descriptor that was stdout (`ready`/`error` after load; per chat a `token` line per generated
token, then `done` or `error`). Everything llama.cpp prints goes to stderr, which the caller keeps for error reports.
A reader thread takes stop requests while the main thread generates, so a stop lands between two tokens.
"""

import llama_cpp  # first: on CUDA builds importing numpy before llama_cpp has segfaulted  # isort: skip

import base64
import codecs
import ctypes
import json
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import psutil
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

MIN_P = 0.05
"""llama.cpp's default min-p cut, kept so sampling matches a stock llama.cpp run with the same settings."""
PIECE_BUFFER_BYTES = 64
RECENT_LOG_LINES = 40
_FALLBACK_ROLE_SUFFIX = "assistant:"

_recent_log: deque[str] = deque(maxlen=RECENT_LOG_LINES)
GGML_LOG_LEVEL_WARN = 3
GGML_LOG_LEVEL_ERROR = 4
"""ggml's log levels as this llama.cpp numbers them (0 none, 1 debug, 2 info, 3 warn, 4 error, 5 continuation)."""


@llama_cpp.llama_log_callback
def _keep_warnings(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    if level in (GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR):
        _recent_log.append(text.decode("utf-8", errors="replace").strip())


class _Channel:
    """The protocol's output side: whole JSON lines written to the original stdout descriptor."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]


class _Commands:
    """Reads stdin on its own thread: `stop` raises the stop mark at once, other commands queue for the main thread."""

    def __init__(self) -> None:
        self.pending: queue.Queue[dict[str, Any]] = queue.Queue()
        self.stopped_through = -1
        """The highest generation id the caller asked to stop."""
        threading.Thread(target=self._read, name="commands", daemon=True).start()

    def _read(self) -> None:
        for line in sys.stdin.buffer:
            try:
                command = json.loads(line)
            except ValueError:
                command = None
            if not isinstance(command, dict) or "op" not in command:
                print(f"qdesk worker: not a command: {line[:200]!r}; the protocol is broken, so it stops.",
                      file=sys.stderr, flush=True)
                os._exit(2)
            if command["op"] == "stop":
                self.stopped_through = max(self.stopped_through, int(command["id"]))
            elif command["op"] == "exit":
                os._exit(0)
            else:
                self.pending.put(command)
        os._exit(0)  # the caller went away: nothing left to serve

    def stop_requested(self, generation: int) -> bool:
        return self.stopped_through >= generation


def _resolve_gpu_layers(requested: int | str) -> int:
    if requested != "auto":
        return int(requested)
    from native.backends import discover

    return -1 if discover().gpu_devices else 0


_KV_GGML_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}


class AdapterLoadError(Exception):
    """llama.cpp refused a LoRA adapter (wrong base, damaged file)."""


def _load(options: dict[str, Any]) -> llama_cpp.Llama:
    kv_type = options.get("kv_type", "f16")
    if options.get("rpc"):
        from native.rpc import add_servers

        add_servers(options["rpc"])  # the workers become devices, ahead of any local GPU in llama.cpp's order
    llm = llama_cpp.Llama(
        type_k=_KV_GGML_TYPES[kv_type],
        type_v=_KV_GGML_TYPES[kv_type],
        flash_attn=kv_type != "f16",
        model_path=options["path"],
        n_ctx=options["n_ctx"],
        n_threads=options["n_threads"],
        n_threads_batch=options["n_threads"],
        n_gpu_layers=_resolve_gpu_layers(options["n_gpu_layers"]),
        tensor_split=options.get("tensor_split") or None,
        seed=0,
        verbose=False,
    )
    _apply_adapters(llm, options.get("loras") or [])
    return llm


def _apply_adapters(llm: llama_cpp.Llama, loras: list[tuple[str, float]]) -> None:
    """Load each LoRA adapter GGUF for this model and set them all on its context; llama.cpp frees them with it."""
    if not loras:
        return
    adapters = []
    for path, _ in loras:
        adapter = llama_cpp.llama_adapter_lora_init(llm.model, path.encode("utf-8"))
        if not adapter:  # ctypes gives a null pointer, which is falsy, not None
            said = next((line for line in reversed(_recent_log) if "lora" in line.lower()), "")
            reason = said.split(": ", 1)[-1].strip() if said else "llama.cpp gave no reason"
            raise AdapterLoadError(f"the adapter {os.path.basename(path)} does not fit this model: {reason}")
        adapters.append(adapter)
    handles = (llama_cpp.llama_adapter_lora_p_ctypes * len(adapters))(*adapters)
    scales = (ctypes.c_float * len(loras))(*(float(scale) for _, scale in loras))
    if llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, handles, len(adapters), scales):
        raise AdapterLoadError("llama.cpp could not set the adapters on the context")


def _chat_formatter(llm: llama_cpp.Llama) -> Callable[[list[dict[str, str]]], str]:
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return _plain_conversation

    def token_text(token: int) -> str:
        return llm._model.token_get_text(token) if token >= 0 else ""

    formatter = Jinja2ChatFormatter(template, eos_token=token_text(llm.token_eos()),
                                    bos_token=token_text(llm.token_bos()))
    return lambda messages: formatter(messages=messages).prompt  # type: ignore[arg-type]


def _plain_conversation(messages: list[dict[str, str]]) -> str:
    """For a GGUF without a chat template: one `role: content` line per message, then the assistant's cue."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + _FALLBACK_ROLE_SUFFIX


def _token_piece(vocab: Any, token: int) -> bytes:
    size = PIECE_BUFFER_BYTES
    while True:
        buffer = ctypes.create_string_buffer(size)
        length = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, False)
        if length >= 0:
            return buffer.raw[:length]
        size = -length


def _usable_context(llm: llama_cpp.Llama) -> int:
    """llama.cpp may round the context up; llama-cpp-python's token buffer keeps the size asked for."""
    return min(llm.n_ctx(), len(llm.input_ids))


def _resident_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


def _generate(llm: llama_cpp.Llama, format_chat: Callable[[list[dict[str, str]]], str], command: dict[str, Any],
              commands: _Commands, channel: _Channel) -> None:
    generation = int(command["id"])
    sampling = command["sampling"]
    if "prompt" in command:  # plain text completion: the model's own BOS, no chat template
        prompt = llm.tokenize(command["prompt"].encode("utf-8"), add_bos=True, special=True)
    else:
        prompt = llm.tokenize(format_chat(command["messages"]).encode("utf-8"), add_bos=False, special=True)
    context = _usable_context(llm)
    room = context - len(prompt)
    if room <= 0:
        channel.send({"error": {"kind": "context", "message": (
            f"the conversation is {len(prompt)} tokens long and the context holds {context}; "
            "start a new conversation or load the model with a longer context.")}})
        return
    max_tokens = min(int(sampling["max_tokens"]), room)
    vocab = llm._model.vocab
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    llm.reset()  # no prompt-cache reuse: the same request always runs the same computation
    llm.set_seed(int(sampling["seed"]))
    produced = 0
    stop_reason = "length"
    if commands.stop_requested(generation):
        stop_reason = "cancelled"
    else:
        for token in llm.generate(prompt, top_k=int(sampling["top_k"]), top_p=float(sampling["top_p"]), min_p=MIN_P,
                                  temp=float(sampling["temperature"]),
                                  repeat_penalty=float(sampling["repeat_penalty"]),
                                  frequency_penalty=float(sampling.get("frequency_penalty", 0.0)),
                                  presence_penalty=float(sampling.get("presence_penalty", 0.0))):
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                stop_reason = "stop"
                break
            channel.send({"token": token, "text": decoder.decode(_token_piece(vocab, token)),
                          "at": time.perf_counter()})
            produced += 1
            if commands.stop_requested(generation):
                stop_reason = "cancelled"
                break
            if produced >= max_tokens:
                break
    tail = decoder.decode(b"", final=True)
    channel.send({"done": {"prompt_tokens": len(prompt), "stop_reason": stop_reason, "tail": tail,
                           "memory_bytes": _resident_bytes()}})


def _send_logits(llm: llama_cpp.Llama, command: dict[str, Any], channel: _Channel) -> None:
    """The logits after `command["tokens"]`, from an empty state, as base64 of float32 values."""
    tokens = [int(token) for token in command["tokens"]]
    if not 0 < len(tokens) <= _usable_context(llm):
        channel.send({"error": {"kind": "context", "message": (
            f"{len(tokens)} tokens do not fit a context of {_usable_context(llm)}; give 1 to that many.")}})
        return
    llm.reset()
    llm.eval(tokens)
    row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)  # llama-cpp-python keeps no logits unless asked for all
    logits = ctypes.string_at(row, llm.n_vocab() * ctypes.sizeof(ctypes.c_float))
    channel.send({"logits": base64.b64encode(logits).decode("ascii")})


def _load_error(error: Exception) -> dict[str, str]:
    log = "\n".join(line for line in _recent_log if line)
    lowered = log.lower()
    if isinstance(error, AdapterLoadError):
        kind = "adapter"
    elif "unknown model architecture" in lowered:
        kind = "architecture"
    elif "failed to create" in str(error).lower() and "context" in str(error).lower():
        kind = "context"
    elif "does not exist" in str(error).lower():
        kind = "missing"
    else:
        kind = "load"
    return {"kind": kind, "message": str(error), "log": log[-2000:]}


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the terminal is the caller's to handle
    channel = _Channel(os.dup(1))
    os.dup2(2, 1)  # whatever llama.cpp prints to stdout lands in stderr, never in the protocol
    sys.stdout = sys.stderr
    llama_cpp.llama_log_set(_keep_warnings, ctypes.c_void_p(0))
    commands = _Commands()
    options = commands.pending.get()
    started = time.perf_counter()
    try:
        llm = _load(options)
        format_chat = _chat_formatter(llm)
    except Exception as error:  # llama-cpp-python reports every load failure as a plain exception
        channel.send({"error": _load_error(error)})
        return
    channel.send({"ready": {"load_s": time.perf_counter() - started, "n_ctx": _usable_context(llm),
                            "memory_bytes": _resident_bytes()}})
    while True:
        command = commands.pending.get()
        try:
            if command["op"] == "chat":
                _generate(llm, format_chat, command, commands, channel)
            elif command["op"] == "logits":
                _send_logits(llm, command, channel)
        except Exception as error:  # a template or decode failure ends this answer, not the worker
            channel.send({"error": {"kind": "generation", "message": str(error)}})


if __name__ == "__main__":
    main()
