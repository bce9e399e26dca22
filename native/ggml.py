"""ctypes declarations of the parts of libggml the bridge uses, checked once against the loaded library.

llama-cpp-python binds libllama but not libggml. This module declares what qdesk needs from
libggml (tensor layout, type traits, the quantize kernels, the backend registry) for the ggml
vendored in llama-cpp-python 0.3.36, and `ggml()` verifies at first use that the loaded
library really has that layout, so a different build fails with one clear sentence instead
of reading garbage.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

from native.errors import LibraryMismatch

EXPECTED_LLAMA_CPP_PYTHON = "0.3.36"

MAX_DIMS = 4
MAX_OP_PARAMS_INT32 = 64 // 4
MAX_SRC = 10
MAX_NAME = 64
TYPE_COUNT = 43
OP_COUNT = 101


class GGMLTensor(ctypes.Structure):
    """`struct ggml_tensor` as laid out by the pinned ggml."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * MAX_DIMS),
        ("nb", ctypes.c_size_t * MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * MAX_OP_PARAMS_INT32),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


TensorPointer = ctypes.POINTER(GGMLTensor)

ToFloat = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


class TypeTraits(ctypes.Structure):
    """`struct ggml_type_traits`."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


class BackendFeature(ctypes.Structure):
    """`struct ggml_backend_feature`: one name/value pair a backend reports (e.g. AVX2 = 1)."""

    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


GetFeatures = ctypes.CFUNCTYPE(ctypes.POINTER(BackendFeature), ctypes.c_void_p)


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


_c_size_p = ctypes.POINTER(ctypes.c_size_t)
_c_float_p = ctypes.POINTER(ctypes.c_float)

_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "ggml_type_name": (ctypes.c_char_p, [ctypes.c_int]),
    "ggml_op_name": (ctypes.c_char_p, [ctypes.c_int]),
    "ggml_type_size": (ctypes.c_size_t, [ctypes.c_int]),
    "ggml_blck_size": (ctypes.c_int64, [ctypes.c_int]),
    "ggml_row_size": (ctypes.c_size_t, [ctypes.c_int, ctypes.c_int64]),
    "ggml_is_quantized": (ctypes.c_bool, [ctypes.c_int]),
    "ggml_get_type_traits": (ctypes.POINTER(TypeTraits), [ctypes.c_int]),
    "ggml_quantize_requires_imatrix": (ctypes.c_bool, [ctypes.c_int]),
    "ggml_quantize_init": (None, [ctypes.c_int]),
    "ggml_quantize_chunk": (
        ctypes.c_size_t,
        [ctypes.c_int, _c_float_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, _c_float_p],
    ),
    "ggml_init": (ctypes.c_void_p, [_InitParams]),
    "ggml_free": (None, [ctypes.c_void_p]),
    "ggml_new_tensor_2d": (TensorPointer, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]),
    "ggml_set_name": (TensorPointer, [ctypes.c_void_p, ctypes.c_char_p]),
    "ggml_nbytes": (ctypes.c_size_t, [ctypes.c_void_p]),
    "ggml_nrows": (ctypes.c_int64, [ctypes.c_void_p]),
    "ggml_backend_buffer_is_host": (ctypes.c_bool, [ctypes.c_void_p]),
    "ggml_backend_tensor_get": (None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]),
    "ggml_backend_tensor_set": (None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]),
    "ggml_backend_reg_count": (ctypes.c_size_t, []),
    "ggml_backend_reg_get": (ctypes.c_void_p, [ctypes.c_size_t]),
    "ggml_backend_reg_name": (ctypes.c_char_p, [ctypes.c_void_p]),
    "ggml_backend_reg_dev_count": (ctypes.c_size_t, [ctypes.c_void_p]),
    "ggml_backend_reg_dev_get": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
    "ggml_backend_reg_get_proc_address": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
    "ggml_backend_dev_name": (ctypes.c_char_p, [ctypes.c_void_p]),
    "ggml_backend_dev_description": (ctypes.c_char_p, [ctypes.c_void_p]),
    "ggml_backend_dev_memory": (None, [ctypes.c_void_p, _c_size_p, _c_size_p]),
    "ggml_backend_dev_type": (ctypes.c_int, [ctypes.c_void_p]),
}


@dataclass(frozen=True)
class GGML:
    """The loaded libggml with its functions declared, plus the operation codes the bridge looks for."""

    lib: ctypes.CDLL
    op_mul_mat: int
    op_mul_mat_id: int

    def __getattr__(self, name: str) -> object:
        return getattr(self.lib, name)

    def type_name(self, type_id: int) -> str:
        if not 0 <= type_id < TYPE_COUNT:
            raise ValueError(f"ggml type {type_id} is out of range")
        name = self.lib.ggml_type_name(type_id)
        return name.decode() if name else f"type{type_id}"

    def type_id(self, name: str) -> int:
        return _type_ids(self)[name.lower()]

    def type_names(self) -> dict[str, int]:
        return dict(_type_ids(self))

    def traits(self, type_id: int) -> TypeTraits:
        return self.lib.ggml_get_type_traits(type_id).contents


@functools.cache
def _type_ids(lib: GGML) -> dict[str, int]:
    ids: dict[str, int] = {}
    for type_id in range(TYPE_COUNT):
        traits = lib.traits(type_id)
        if traits.blck_size > 0 and traits.type_name:
            ids[traits.type_name.decode().lower()] = type_id
    return ids


def _installed_llama_cpp_version() -> str:
    import llama_cpp

    return str(getattr(llama_cpp, "__version__", "unknown"))


def _load_library() -> ctypes.CDLL:
    try:
        from llama_cpp._ggml import libggml
    except Exception as error:
        raise LibraryMismatch(
            f"llama-cpp-python's ggml library could not be loaded ({error}); "
            f"reinstall it with `pip install llama-cpp-python=={EXPECTED_LLAMA_CPP_PYTHON}`."
        ) from error
    return libggml


def _declare(lib: ctypes.CDLL) -> None:
    for name, (restype, argtypes) in _SIGNATURES.items():
        try:
            function = getattr(lib, name)
        except AttributeError as error:
            raise LibraryMismatch(
                f"the installed ggml library lacks {name}; qdesk needs llama-cpp-python=="
                f"{EXPECTED_LLAMA_CPP_PYTHON}, so reinstall that version."
            ) from error
        function.restype = restype
        function.argtypes = argtypes


def _find_op(lib: ctypes.CDLL, op_name: str) -> int:
    for op in range(OP_COUNT):
        name = lib.ggml_op_name(op)
        if name is not None and name.decode() == op_name:
            return op
    raise LibraryMismatch(f"the installed ggml has no {op_name} operation; reinstall llama-cpp-python=="
                          f"{EXPECTED_LLAMA_CPP_PYTHON}.")


def _check_tensor_layout(lib: ctypes.CDLL) -> None:
    """Make a real tensor and read it back through `GGMLTensor`; a different layout shows at once."""
    f32 = 0
    context = lib.ggml_init(_InitParams(1 << 20, None, True))
    if not context:
        raise LibraryMismatch("ggml could not create a context; reinstall llama-cpp-python.")
    try:
        tensor = lib.ggml_new_tensor_2d(context, f32, 12, 7)
        lib.ggml_set_name(ctypes.cast(tensor, ctypes.c_void_p), b"qdesk.layout-probe")
        fields = tensor.contents
        layout_ok = (
            fields.type == f32
            and tuple(fields.ne) == (12, 7, 1, 1)
            and fields.nb[1] == 12 * 4
            and fields.name == b"qdesk.layout-probe"
            and lib.ggml_nbytes(ctypes.cast(tensor, ctypes.c_void_p)) == 12 * 7 * 4
        )
    finally:
        lib.ggml_free(context)
    if not layout_ok:
        raise LibraryMismatch(
            "the installed llama-cpp-python was built from a different ggml than qdesk expects; "
            f"install llama-cpp-python=={EXPECTED_LLAMA_CPP_PYTHON}."
        )


@functools.cache
def ggml() -> GGML:
    """The checked libggml of the installed llama-cpp-python (raises `LibraryMismatch` if it is not the pinned one)."""
    installed = _installed_llama_cpp_version()
    if installed != EXPECTED_LLAMA_CPP_PYTHON:
        raise LibraryMismatch(
            f"qdesk's native bridge was built for llama-cpp-python {EXPECTED_LLAMA_CPP_PYTHON} but "
            f"{installed} is installed; run `pip install llama-cpp-python=={EXPECTED_LLAMA_CPP_PYTHON}`."
        )
    lib = _load_library()
    _declare(lib)
    _check_tensor_layout(lib)
    return GGML(lib, op_mul_mat=_find_op(lib, "MUL_MAT"), op_mul_mat_id=_find_op(lib, "MUL_MAT_ID"))


def tensor_name(tensor: GGMLTensor) -> str:
    return tensor.name.decode(errors="replace")
