"""llama.cpp's quantizer (`llama_model_quantize`), run in a child process so that it can be cancelled and
so that an abort inside llama.cpp cannot take the caller down.

`run_quantizer(request, progress, should_stop)` starts `python -m native.quantizer`, hands it the
request on stdin and reads one JSON event per line back: a record for every tensor as llama.cpp
reports it (name, shape, source type, target type), error lines, and the return code. A dry run
(`QuantizeRequest.dry_run`) reports the type llama.cpp would give every tensor without writing
anything, which is how a preset becomes a per-tensor plan.
"""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from native.errors import QuantizerFailed, Stopped

MetadataValue = str | int | float | bool

_TENSOR_LINE = re.compile(
    r"^\[\s*(?P<index>\d+)/\s*(?P<count>\d+)\]\s+(?P<name>\S+)\s+-\s+\[(?P<shape>[^\]]*)\],\s+"
    r"type\s+=\s+(?P<source>\S+),\s*(?P<rest>.*)$"
)
_CONVERTING = re.compile(r"converting to (?P<target>\S+) ")
_DRY_RUN_TARGET = re.compile(r"\((?P<target>[^()\s]+)\)\s*$")
_MAX_METADATA_CHARS = 127
_STOP_POLL_SECONDS = 0.1


@dataclass
class QuantizeRequest:
    """What to quantize and how; `tensor_types` maps exact tensor names to ggml type names (e.g. "q4_K")."""

    source: str
    output: str
    ftype: int
    threads: int = 0
    imatrix: Mapping[str, Any] | None = None
    tensor_types: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, MetadataValue] = field(default_factory=dict)
    allow_requantize: bool = False
    dry_run: bool = False


@dataclass(frozen=True)
class TensorRecord:
    """One tensor as llama.cpp's quantizer handled it."""

    name: str
    shape: tuple[int, ...]
    source_type: str
    target_type: str


@dataclass(frozen=True)
class QuantizerReport:
    tensors: tuple[TensorRecord, ...]
    warnings: tuple[str, ...]


ProgressCallback = Callable[[int, int, str], None]


def run_quantizer(
    request: QuantizeRequest,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> QuantizerReport:
    """Run llama.cpp's quantizer on `request` in a child process; raises `QuantizerFailed` or `Stopped`."""
    child = subprocess.Popen(
        [sys.executable, "-m", "native.quantizer"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": _package_root() + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    events: queue.Queue[dict[str, Any] | None] = queue.Queue()
    stderr_tail: list[str] = []
    readers = [
        threading.Thread(target=_read_events, args=(child.stdout, events), daemon=True),
        threading.Thread(target=_read_tail, args=(child.stderr, stderr_tail), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        assert child.stdin is not None
        child.stdin.write(pickle.dumps(_child_request(request)))
        child.stdin.close()
    except BrokenPipeError:
        pass
    try:
        return _follow(child, events, stderr_tail, progress, should_stop)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        for reader in readers:
            reader.join(timeout=5)


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _follow(
    child: subprocess.Popen[bytes],
    events: queue.Queue[dict[str, Any] | None],
    stderr_tail: list[str],
    progress: ProgressCallback | None,
    should_stop: Callable[[], bool] | None,
) -> QuantizerReport:
    tensors: list[TensorRecord] = []
    errors: list[str] = []
    warnings: list[str] = []
    return_code: int | None = None
    while True:
        if should_stop is not None and should_stop():
            child.kill()
            raise Stopped("quantization was stopped")
        try:
            event = events.get(timeout=_STOP_POLL_SECONDS)
        except queue.Empty:
            continue
        if event is None:
            break
        if "tensor" in event:
            record = TensorRecord(**{**event["tensor"], "shape": tuple(event["tensor"]["shape"])})
            tensors.append(record)
            if progress is not None:
                progress(event["index"], event["count"], record.name)
        elif "error" in event:
            errors.append(event["error"])
        elif "warning" in event:
            warnings.append(event["warning"])
        elif "return_code" in event:
            return_code = int(event["return_code"])
    child.wait()
    if return_code == 0 and child.returncode == 0:
        return QuantizerReport(tuple(tensors), tuple(warnings))
    raise QuantizerFailed(_failure_sentence(errors, stderr_tail, child.returncode))


def _failure_sentence(errors: list[str], stderr_tail: list[str], exit_code: int) -> str:
    details = [line for line in errors if line and not set(line) <= set("=")]
    if not details:
        details = [line for line in stderr_tail if line.strip()][-3:]
    reason = "; ".join(details[-3:]) or f"the quantizer process ended with status {exit_code}"
    return f"llama.cpp's quantizer failed: {reason.rstrip('.')}. Check that the input is a complete GGUF model."


def _read_events(stream: IO[bytes] | None, events: queue.Queue[dict[str, Any] | None]) -> None:
    assert stream is not None
    for raw in stream:
        try:
            events.put(json.loads(raw))
        except ValueError:
            continue
    events.put(None)


def _read_tail(stream: IO[bytes] | None, tail: list[str]) -> None:
    assert stream is not None
    for raw in stream:
        tail.append(raw.decode(errors="replace").rstrip())
        del tail[:-20]


def parse_tensor_line(line: str) -> tuple[int, int, TensorRecord] | None:
    """The (index, count, record) of one per-tensor line of llama.cpp's quantizer log, or None for other lines."""
    match = _TENSOR_LINE.match(line.strip())
    if match is None:
        return None
    rest = match["rest"]
    target = _CONVERTING.search(rest) or _DRY_RUN_TARGET.search(rest)
    source = match["source"]
    shape = tuple(int(part) for part in match["shape"].replace(",", " ").split())
    record = TensorRecord(match["name"], shape, source, target["target"] if target else source)
    return int(match["index"]), int(match["count"]), record


# --- the child process ------------------------------------------------------------------------------------------
# The child loads libllama with ctypes alone (no llama_cpp or numpy import), so it starts in a few
# milliseconds; the declarations below are llama.h's for the pinned llama-cpp-python.


class _ImatrixData(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("data", ctypes.POINTER(ctypes.c_float)), ("size", ctypes.c_size_t)]


class _TensorOverride(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("type", ctypes.c_int)]


class _KVValue(ctypes.Union):
    _fields_ = [("val_i64", ctypes.c_int64), ("val_f64", ctypes.c_double), ("val_bool", ctypes.c_bool),
                ("val_str", ctypes.c_char * 128)]


class _KVOverride(ctypes.Structure):
    _fields_ = [("tag", ctypes.c_int), ("key", ctypes.c_char * 128), ("value", _KVValue)]


class _QuantizeParams(ctypes.Structure):
    _fields_ = [
        ("nthread", ctypes.c_int32),
        ("ftype", ctypes.c_int),
        ("output_tensor_type", ctypes.c_int),
        ("token_embedding_type", ctypes.c_int),
        ("allow_requantize", ctypes.c_bool),
        ("quantize_output_tensor", ctypes.c_bool),
        ("only_copy", ctypes.c_bool),
        ("pure", ctypes.c_bool),
        ("keep_split", ctypes.c_bool),
        ("dry_run", ctypes.c_bool),
        ("imatrix", ctypes.POINTER(_ImatrixData)),
        ("kv_overrides", ctypes.POINTER(_KVOverride)),
        ("tt_overrides", ctypes.POINTER(_TensorOverride)),
        ("prune_layers", ctypes.POINTER(ctypes.c_int32)),
        ("max_buf_size", ctypes.c_size_t),
    ]


_LogCallback = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_KV_INT, _KV_FLOAT, _KV_BOOL, _KV_STR = 0, 1, 2, 3
_LOG_WARN, _LOG_ERROR = 3, 4


def _child_main() -> int:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    request: _ChildRequest = pickle.loads(sys.stdin.buffer.read())
    library = ctypes.CDLL(request.library)
    library.llama_model_quantize_default_params.restype = _QuantizeParams
    library.llama_model_quantize.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(_QuantizeParams)]
    library.llama_model_quantize.restype = ctypes.c_uint32
    library.llama_log_set.argtypes = [_LogCallback, ctypes.c_void_p]
    library.llama_backend_init()

    def emit(event: dict[str, Any]) -> None:
        protocol.write(json.dumps(event) + "\n")

    pending = [""]

    def on_log(level: int, text: bytes, _: Any) -> None:
        pending[0] += text.decode(errors="replace")
        *lines, pending[0] = pending[0].split("\n")
        for line in lines:
            _emit_log_line(emit, level, line)

    log_callback = _LogCallback(on_log)
    library.llama_log_set(log_callback, None)
    params, keep_alive = _quantize_params(library, request)
    return_code = library.llama_model_quantize(request.source.encode(), request.output.encode(), ctypes.byref(params))
    if pending[0]:
        _emit_log_line(emit, 0, pending[0])
    emit({"return_code": int(return_code)})
    protocol.close()
    del keep_alive
    return 0


def _emit_log_line(emit: Callable[[dict[str, Any]], None], level: int, line: str) -> None:
    parsed = parse_tensor_line(line)
    if parsed is not None:
        index, count, record = parsed
        emit({"index": index, "count": count, "tensor": record.__dict__})
    elif level == _LOG_ERROR or "failed" in line or "error" in line.lower():
        emit({"error": line.strip()})
    elif level == _LOG_WARN and "manual override" not in line:
        emit({"warning": line.strip()})


@dataclass
class _ChildRequest:
    """What the child needs, in plain Python values: paths, numbers, type ids and float32 bytes."""

    library: str
    source: str
    output: str
    ftype: int
    threads: int
    allow_requantize: bool
    dry_run: bool
    imatrix: dict[str, bytes]
    tensor_types: dict[str, int]
    metadata: dict[str, MetadataValue]


def _child_request(request: QuantizeRequest) -> _ChildRequest:
    import llama_cpp.llama_cpp
    import numpy as np

    from native.ggml import ggml

    lib = ggml()
    return _ChildRequest(
        library=str(llama_cpp.llama_cpp._lib._name),
        source=request.source,
        output=request.output,
        ftype=request.ftype,
        threads=request.threads,
        allow_requantize=request.allow_requantize,
        dry_run=request.dry_run,
        imatrix={name: np.ascontiguousarray(values, dtype="<f4").tobytes()
                 for name, values in (request.imatrix or {}).items()},
        tensor_types={name: lib.type_id(type_name) for name, type_name in request.tensor_types.items()},
        metadata=dict(request.metadata),
    )


def _quantize_params(library: ctypes.CDLL, request: _ChildRequest) -> tuple[_QuantizeParams, list[Any]]:
    params = library.llama_model_quantize_default_params()
    params.ftype = request.ftype
    params.nthread = request.threads
    params.allow_requantize = request.allow_requantize
    params.dry_run = request.dry_run
    keep_alive: list[Any] = []

    if request.imatrix:
        entries = (_ImatrixData * (len(request.imatrix) + 1))()
        for slot, (name, raw) in zip(entries, request.imatrix.items(), strict=False):
            values = (ctypes.c_float * (len(raw) // 4)).from_buffer_copy(raw)
            keep_alive.append(values)
            slot.name = name.encode()
            slot.data = values
            slot.size = len(values)
        keep_alive.append(entries)
        params.imatrix = entries

    if request.tensor_types:
        overrides = (_TensorOverride * (len(request.tensor_types) + 1))()
        for slot, (name, type_id) in zip(overrides, request.tensor_types.items(), strict=False):
            slot.pattern = ("^" + re.escape(name) + "$").encode()
            slot.type = type_id
        keep_alive.append(overrides)
        params.tt_overrides = overrides

    if request.metadata:
        kv = (_KVOverride * (len(request.metadata) + 1))()
        for slot, (key, value) in zip(kv, request.metadata.items(), strict=False):
            slot.key = key.encode()[:_MAX_METADATA_CHARS]
            _set_override_value(slot, value)
        keep_alive.append(kv)
        params.kv_overrides = kv

    return params, keep_alive


def _set_override_value(slot: _KVOverride, value: MetadataValue) -> None:
    if isinstance(value, bool):
        slot.tag, slot.value.val_bool = _KV_BOOL, value
    elif isinstance(value, int):
        slot.tag, slot.value.val_i64 = _KV_INT, value
    elif isinstance(value, float):
        slot.tag, slot.value.val_f64 = _KV_FLOAT, value
    else:
        slot.tag, slot.value.val_str = _KV_STR, str(value).encode()[:_MAX_METADATA_CHARS]


if __name__ == "__main__":
    sys.exit(_child_main())
