"""llama.cpp's quantizer (`llama_model_quantize`), run in a child process (`native.child`) so that it can be
cancelled and so that an abort inside llama.cpp cannot take the caller down.

`run_quantizer(request, progress, should_stop)` calls `_quantize` in a child and returns what llama.cpp reported:
a record for every tensor (name, shape, source type, target type) and its warnings, or raises `QuantizerFailed`
with its error lines. A dry run (`QuantizeRequest.dry_run`) reports the type llama.cpp would give every tensor
without writing anything, which is how a preset becomes a per-tensor plan. llama.cpp cannot be interrupted
inside a tensor, so a stop kills the child at once; the caller's temporary output goes with its own cleanup.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from native.child import run_in_child
from native.errors import QuantizerFailed

MetadataValue = str | int | float | bool

_TENSOR_LINE = re.compile(
    r"^\[\s*(?P<index>\d+)/\s*(?P<count>\d+)\]\s+(?P<name>\S+)\s+-\s+\[(?P<shape>[^\]]*)\],\s+"
    r"type\s+=\s+(?P<source>\S+),\s*(?P<rest>.*)$"
)
_CONVERTING = re.compile(r"converting to (?P<target>\S+) ")
_DRY_RUN_TARGET = re.compile(r"\((?P<target>[^()\s]+)\)\s*$")
_MAX_METADATA_CHARS = 127


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
    forward = None if progress is None else (lambda step: progress(*step))
    outcome: _Outcome = run_in_child(_quantize, {"request": _child_request(request), "progress": forward,
                                                 "should_stop": should_stop},
                                     what="the quantization", stop_grace_s=0)
    if outcome.return_code == 0:
        return QuantizerReport(outcome.tensors, outcome.warnings)
    raise QuantizerFailed(_failure_sentence(list(outcome.errors), outcome.return_code))


def _failure_sentence(errors: list[str], return_code: int) -> str:
    details = [line for line in errors if line and not set(line) <= set("=")]
    reason = "; ".join(details[-3:]) or f"llama_model_quantize returned {return_code}"
    return f"llama.cpp's quantizer failed: {reason.rstrip('.')}. Check that the input is a complete GGUF model."


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


# --- the child's side ------------------------------------------------------------------------------------------
# The child loads libllama with ctypes alone (no llama_cpp or numpy import), so it starts quickly; the
# declarations below are llama.h's for the pinned llama-cpp-python.


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


@dataclass(frozen=True)
class _Outcome:
    return_code: int
    tensors: tuple[TensorRecord, ...]
    errors: tuple[str, ...]
    warnings: tuple[str, ...]


class _QuantizerLog:
    """llama.cpp's log lines as they come: a record per tensor (forwarded as progress), errors and warnings."""

    def __init__(self, progress: Callable[[tuple[int, int, str]], None] | None) -> None:
        self.progress = progress
        self.tensors: list[TensorRecord] = []
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self._pending = ""

    def __call__(self, level: int, text: bytes, _: Any) -> None:
        self._pending += text.decode(errors="replace")
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self.line(level, line)

    def finish(self) -> None:
        if self._pending:
            self.line(0, self._pending)
            self._pending = ""

    def line(self, level: int, line: str) -> None:
        parsed = parse_tensor_line(line)
        if parsed is not None:
            index, count, record = parsed
            self.tensors.append(record)
            if self.progress is not None:
                self.progress((index, count, record.name))
        elif level == _LOG_ERROR or "failed" in line or "error" in line.lower():
            self.errors.append(line.strip())
        elif level == _LOG_WARN and "manual override" not in line:
            self.warnings.append(line.strip())


def _quantize(request: _ChildRequest, progress: Callable[[tuple[int, int, str]], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> _Outcome:
    """In the child: one `llama_model_quantize` call (`should_stop` is not polled: a stop kills the child)."""
    library = ctypes.CDLL(request.library)
    library.llama_model_quantize_default_params.restype = _QuantizeParams
    library.llama_model_quantize.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(_QuantizeParams)]
    library.llama_model_quantize.restype = ctypes.c_uint32
    library.llama_log_set.argtypes = [_LogCallback, ctypes.c_void_p]
    library.llama_backend_init()
    log = _QuantizerLog(progress)
    log_callback = _LogCallback(log)
    library.llama_log_set(log_callback, None)
    params, keep_alive = _quantize_params(library, request)
    return_code = library.llama_model_quantize(request.source.encode(), request.output.encode(), ctypes.byref(params))
    log.finish()
    del keep_alive
    return _Outcome(int(return_code), tuple(log.tensors), tuple(log.errors), tuple(log.warnings))


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

