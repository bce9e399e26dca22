"""llama.cpp's quantizer called directly, in this process, the way its own tool calls it: the peer that qdesk's
presets must match (tests) and that its overhead is measured against (bench)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np


def bare_llama_quantize(source: Path, output: Path, ftype: int, imatrix: dict[str, np.ndarray] | None = None) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    keep_alive = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for slot, (name, values) in zip(entries, imatrix.items(), strict=False):
            array = np.ascontiguousarray(values, dtype=np.float32)
            keep_alive.append(array)
            slot.name, slot.size = name.encode(), array.size
            slot.data = array.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = entries
    if llama_cpp.llama_model_quantize(str(source).encode(), str(output).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed on {source}")
