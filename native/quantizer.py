"""llama.cpp's quantizer (`llama_model_quantize`), run in a child process so that it can be cancelled and
so that an abort inside llama.cpp cannot take the caller down.

`run_quantizer(request, progress, should_stop)` starts `python -m native.quantizer`, hands it the
request on stdin and reads one JSON event per line back: a record for every tensor as llama.cpp
reports it (name, shape, source type, target type), error lines, and the return code. A dry run
(`QuantizeRequest.dry_run`) reports the type llama.cpp would give every tensor without writing
anything, which is how a preset becomes a per-tensor plan.
"""

from __future__ import annotations

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
        child.stdin.write(pickle.dumps(request))
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


def _child_main() -> int:
    import llama_cpp  # before numpy: CUDA builds have crashed when numpy came first

    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    request: QuantizeRequest = pickle.loads(sys.stdin.buffer.read())

    def emit(event: dict[str, Any]) -> None:
        protocol.write(json.dumps(event) + "\n")

    pending = [""]

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, _: Any) -> None:
        pending[0] += text.decode(errors="replace")
        *lines, pending[0] = pending[0].split("\n")
        for line in lines:
            _emit_log_line(emit, level, line)

    llama_cpp.llama_log_set(on_log, None)
    params = _quantize_params(llama_cpp, request)
    return_code = llama_cpp.llama_model_quantize(request.source.encode(), request.output.encode(), params.pointer)
    if pending[0]:
        _emit_log_line(emit, 0, pending[0])
    emit({"return_code": int(return_code)})
    protocol.close()
    return 0


def _emit_log_line(emit: Callable[[dict[str, Any]], None], level: int, line: str) -> None:
    error_level, warn_level = 4, 3
    parsed = parse_tensor_line(line)
    if parsed is not None:
        index, count, record = parsed
        emit({"index": index, "count": count, "tensor": record.__dict__})
    elif level == error_level or "failed" in line or "error" in line.lower():
        emit({"error": line.strip()})
    elif level == warn_level and "manual override" not in line:
        emit({"warning": line.strip()})


@dataclass
class _Params:
    """The params struct and every buffer it points into, kept alive together for the call."""

    params: Any
    keep_alive: list[Any]

    @property
    def pointer(self) -> Any:
        import ctypes

        return ctypes.byref(self.params)


def _quantize_params(llama_cpp: Any, request: QuantizeRequest) -> _Params:
    import ctypes

    import numpy as np

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = request.ftype
    params.nthread = request.threads
    params.allow_requantize = request.allow_requantize
    params.dry_run = request.dry_run
    keep_alive: list[Any] = []

    if request.imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(request.imatrix) + 1))()
        for slot, (name, values) in zip(entries, request.imatrix.items(), strict=False):
            array = np.ascontiguousarray(values, dtype=np.float32)
            keep_alive.append(array)
            slot.name = name.encode()
            slot.data = array.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            slot.size = array.size
        keep_alive.append(entries)
        params.imatrix = entries

    if request.tensor_types:
        from native.ggml import ggml

        lib = ggml()
        overrides = (llama_cpp.llama_model_tensor_override * (len(request.tensor_types) + 1))()
        for slot, (name, type_name) in zip(overrides, request.tensor_types.items(), strict=False):
            slot.pattern = ("^" + re.escape(name) + "$").encode()
            slot.type = lib.type_id(type_name)
        keep_alive.append(overrides)
        params.tt_overrides = overrides

    if request.metadata:
        kv = (llama_cpp.llama_model_kv_override * (len(request.metadata) + 1))()
        for slot, (key, value) in zip(kv, request.metadata.items(), strict=False):
            slot.key = key.encode()[:_MAX_METADATA_CHARS]
            _set_override_value(llama_cpp, slot, value)
        keep_alive.append(kv)
        params.kv_overrides = kv

    return _Params(params, keep_alive)


def _set_override_value(llama_cpp: Any, slot: Any, value: MetadataValue) -> None:
    if isinstance(value, bool):
        slot.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_BOOL
        slot.value.val_bool = value
    elif isinstance(value, int):
        slot.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
        slot.value.val_i64 = value
    elif isinstance(value, float):
        slot.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_FLOAT
        slot.value.val_f64 = value
    else:
        slot.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
        slot.value.val_str = str(value).encode()[:_MAX_METADATA_CHARS]


if __name__ == "__main__":
    sys.exit(_child_main())
