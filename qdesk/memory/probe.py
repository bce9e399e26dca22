"""The child process behind `qdesk.memory.measure_allocation`: `python -m qdesk.memory.probe OPTIONS_JSON`.

It loads one GGUF with `llama_cpp.Llama` the way the engine worker does (`qdesk.chat.engine_worker._load`), with all of
llama.cpp's log (every level) captured by a log callback, and writes one JSON line to stdout:
`{"log": str, "n_ctx": int}` once the context exists, or `{"log": str, "error": str}` when loading failed.
The parent (`qdesk.memory.parse_allocation_log`) reads the buffer sizes out of the log text. Running in a child
keeps the parent's memory clean and survives llama.cpp aborting on a file it cannot load.
"""

import llama_cpp  # first: on CUDA builds importing numpy before llama_cpp has segfaulted  # isort: skip

import ctypes
import json
import os
import sys
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


def main() -> None:
    options = json.loads(sys.argv[1])
    channel = os.dup(1)
    os.dup2(2, 1)  # anything llama.cpp prints itself stays out of the one JSON line
    llama_cpp.llama_log_set(_keep_log, ctypes.c_void_p(0))
    try:
        llm = _load(options)
    except Exception as error:  # llama-cpp-python reports every load failure as a plain exception
        result: dict[str, Any] = {"log": "".join(_log_parts), "error": str(error)}
    else:
        result = {"log": "".join(_log_parts), "n_ctx": int(llm.n_ctx())}
    with os.fdopen(channel, "wb") as stream:
        stream.write((json.dumps(result) + "\n").encode("utf-8"))
    os._exit(0)  # no teardown: nothing after the load is measured


if __name__ == "__main__":
    main()
