"""The child's side of `qdesk.memory.measure_allocation`: `load_logged(options)`, run in a child (`native.child`).

It loads one GGUF with `llama_cpp.Llama` the way the engine worker does (`qdesk.chat.engine_worker._load`), with all of
llama.cpp's log (every level) captured by a log callback, and returns `{"log": str, "n_ctx": int}` once the context
exists, or `{"log": str, "error": str}` when loading failed. The parent (`qdesk.memory.parse_allocation_log`) reads
the buffer sizes out of the log text. Running in a child keeps the parent's memory clean and survives llama.cpp
aborting on a file it cannot load.
"""

import llama_cpp  # first: on CUDA builds importing numpy before llama_cpp has segfaulted  # isort: skip

import ctypes
from typing import Any

_log_parts: list[str] = []


@llama_cpp.llama_log_callback
def _keep_log(_level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    _log_parts.append(text.decode("utf-8", errors="replace"))


def _load(options: dict[str, Any]) -> llama_cpp.Llama:
    return llama_cpp.Llama(
        model_path=options["path"],
        n_ctx=options["n_ctx"],
        n_batch=options["n_batch"],
        n_ubatch=options["n_ubatch"],
        n_gpu_layers=options["n_gpu_layers"],
        type_k=options["type_k"],
        type_v=options["type_v"],
        flash_attn=options["flash_attn"],
        n_threads=1,
        seed=0,
        verbose=False,
    )


def load_logged(options: dict[str, Any]) -> dict[str, Any]:
    """Load the model as `options` say and return llama.cpp's log of it (see the module docstring)."""
    llama_cpp.llama_log_set(_keep_log, ctypes.c_void_p(0))
    try:
        llm = _load(options)
    except Exception as error:  # llama-cpp-python reports every load failure as a plain exception
        return {"log": "".join(_log_parts), "error": str(error)}
    return {"log": "".join(_log_parts), "n_ctx": int(llm.n_ctx())}
