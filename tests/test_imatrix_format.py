"""Importance matrices: llama.cpp's GGUF and legacy .dat formats written and read back, llama.cpp's own
GGUF parser reading what qdesk writes, one clear sentence for every bad file, and matching a model."""

from __future__ import annotations

import ctypes
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFValueType

from converters.calibration.imatrix import (
    ImatrixEntry,
    ImportanceMatrix,
    check_matches_model,
    read_imatrix,
    write_imatrix,
    write_legacy_imatrix,
)
from converters.core.errors import ImatrixError, OutputError, UserError

N_EMBD = 64
N_FF = 96
N_EXPERTS = 4


def random_entry(rng: np.random.Generator, n_mat: int, n_in: int, counts: list[int] | None = None) -> ImatrixEntry:
    """Sums representable in float32 (so a GGUF round trip is exact) and plausible token counts."""
    sums = rng.gamma(2.0, 50.0, size=(n_mat, n_in)).astype(np.float32).astype(np.float64)
    return ImatrixEntry(sums, np.array(counts if counts is not None else rng.integers(1, 5000, n_mat)))


def sample_matrix(seed: int = 0) -> ImportanceMatrix:
    """Two layers of a small MoE model: attention weights, one expert tensor with an unused expert, a dense FFN."""
    rng = np.random.default_rng(seed)
    entries = {
        "blk.1.attn_q.weight": random_entry(rng, 1, N_EMBD, [4096]),
        "blk.0.attn_q.weight": random_entry(rng, 1, N_EMBD, [4096]),
        "blk.0.attn_output.weight": random_entry(rng, 1, N_EMBD, [4096]),
        "blk.0.ffn_down_exps.weight": random_entry(rng, N_EXPERTS, N_FF, [1500, 0, 3100, 2]),
        "blk.1.ffn_down.weight": random_entry(rng, 1, N_FF, [4096]),
    }
    return ImportanceMatrix(entries, datasets=["wiki.test.raw", "code.txt"], chunk_count=8, chunk_size=512)


def expected_means(entry: ImatrixEntry) -> np.ndarray:
    """What llama.cpp's quantizer computes: float sums / float count per matrix, 1 where a matrix saw nothing."""
    sums = entry.sums.astype(np.float32)
    rows = [
        sums[j] / np.float32(entry.counts[j]) if entry.counts[j] > 0 else np.ones(entry.n_in, np.float32)
        for j in range(entry.n_mat)
    ]
    return np.concatenate(rows).astype(np.float32)


def assert_one_sentence(error: pytest.ExceptionInfo[UserError], *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message and message.endswith("."), message
    for fragment in fragments:
        assert fragment in message, message


def files_in(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir()}


# --- GGUF ----------------------------------------------------------------------------------------


def test_gguf_round_trip_is_exact(tmp_path: Path) -> None:
    matrix = sample_matrix()
    path = tmp_path / "imatrix.gguf"
    write_imatrix(matrix, path)
    loaded = read_imatrix(path)

    assert list(loaded.entries) == sorted(matrix.entries)
    for name, entry in matrix.entries.items():
        np.testing.assert_array_equal(loaded.entries[name].sums, entry.sums)
        np.testing.assert_array_equal(loaded.entries[name].counts, entry.counts)
        assert loaded.entries[name].sums.dtype == np.float64 and loaded.entries[name].counts.dtype == np.int64
    assert loaded.datasets == ["wiki.test.raw", "code.txt"]
    assert (loaded.chunk_count, loaded.chunk_size) == (8, 512)
    assert loaded.token_count == 4096

    data = loaded.quantizer_data()
    assert set(data) == set(matrix.entries)
    for name, vector in data.items():
        assert vector.dtype == np.float32 and vector.flags.c_contiguous
        np.testing.assert_array_equal(vector, expected_means(matrix.entries[name]))


def test_gguf_layout_as_gguf_py_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "imatrix.gguf"
    write_imatrix(sample_matrix(), path)
    reader = gguf.GGUFReader(path)

    general_type = reader.get_field("general.type")
    assert general_type is not None and general_type.types == [GGUFValueType.STRING]
    assert bytes(general_type.parts[-1]).decode() == "imatrix"
    assert reader.get_field("general.architecture") is None

    datasets = reader.get_field("imatrix.datasets")
    assert datasets is not None and datasets.types == [GGUFValueType.ARRAY, GGUFValueType.STRING]
    assert [bytes(datasets.parts[i]).decode() for i in datasets.data] == ["wiki.test.raw", "code.txt"]
    for key, value in (("imatrix.chunk_count", 8), ("imatrix.chunk_size", 512)):
        found = reader.get_field(key)
        assert found is not None and found.types == [GGUFValueType.UINT32]
        assert int(found.parts[-1][0]) == value

    in_order = [f"{base}{suffix}" for base in sorted(sample_matrix().entries) for suffix in (".in_sum2", ".counts")]
    assert [t.name for t in reader.tensors] == in_order
    tensors = {t.name: t for t in reader.tensors}
    assert all(t.tensor_type == GGMLQuantizationType.F32 for t in reader.tensors)
    experts = "blk.0.ffn_down_exps.weight"
    assert list(tensors[f"{experts}.in_sum2"].shape) == [N_FF, N_EXPERTS]
    assert tensors[f"{experts}.in_sum2"].data.shape == (N_EXPERTS, N_FF)
    assert list(tensors[f"{experts}.counts"].shape) == [1, N_EXPERTS]
    assert tensors[f"{experts}.counts"].data.shape == (N_EXPERTS, 1)
    np.testing.assert_array_equal(tensors[f"{experts}.counts"].data.reshape(-1), [1500, 0, 3100, 2])
    assert list(tensors["blk.0.attn_q.weight.in_sum2"].shape) == [N_EMBD, 1]
    assert list(tensors["blk.0.attn_q.weight.counts"].shape) == [1, 1]


class _GGUFInitParams(ctypes.Structure):
    _fields_ = (("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p))


GGUF_TYPE_UINT32 = 4
GGUF_TYPE_STRING = 8
GGUF_TYPE_ARRAY = 9
GGML_TYPE_F32 = 0


@contextmanager
def ggml_gguf(path: Path) -> Iterator[tuple[ctypes.CDLL, int]]:
    """Open `path` with ggml's own GGUF parser (the one llama.cpp's imatrix loader uses)."""
    from llama_cpp._ggml import libggml

    signatures = {
        "gguf_init_from_file": (ctypes.c_void_p, [ctypes.c_char_p, _GGUFInitParams]),
        "gguf_free": (None, [ctypes.c_void_p]),
        "gguf_find_key": (ctypes.c_int64, [ctypes.c_void_p, ctypes.c_char_p]),
        "gguf_get_kv_type": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_arr_type": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_arr_n": (ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_arr_str": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t]),
        "gguf_get_val_str": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_val_u32": (ctypes.c_uint32, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_n_tensors": (ctypes.c_int64, [ctypes.c_void_p]),
        "gguf_get_tensor_name": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_tensor_type": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_tensor_size": (ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(libggml, name)
        function.restype, function.argtypes = restype, argtypes
    context = libggml.gguf_init_from_file(str(path).encode(), _GGUFInitParams(True, None))
    assert context, f"ggml could not parse {path}"
    try:
        yield libggml, context
    finally:
        libggml.gguf_free(context)


@pytest.mark.parametrize("datasets", [["wiki.test.raw", "code.txt"], []], ids=["datasets", "no-datasets"])
def test_ggml_reads_what_qdesk_writes(tmp_path: Path, datasets: list[str]) -> None:
    matrix = sample_matrix()
    matrix.datasets = datasets
    path = tmp_path / "imatrix.gguf"
    write_imatrix(matrix, path)

    with ggml_gguf(path) as (lib, context):
        general_type = lib.gguf_find_key(context, b"general.type")
        assert lib.gguf_get_kv_type(context, general_type) == GGUF_TYPE_STRING
        assert lib.gguf_get_val_str(context, general_type) == b"imatrix"
        key = lib.gguf_find_key(context, b"imatrix.datasets")
        assert lib.gguf_get_kv_type(context, key) == GGUF_TYPE_ARRAY
        assert lib.gguf_get_arr_type(context, key) == GGUF_TYPE_STRING
        names = [lib.gguf_get_arr_str(context, key, i).decode() for i in range(lib.gguf_get_arr_n(context, key))]
        assert names == datasets
        for key_name, value in ((b"imatrix.chunk_count", 8), (b"imatrix.chunk_size", 512)):
            key = lib.gguf_find_key(context, key_name)
            assert lib.gguf_get_kv_type(context, key) == GGUF_TYPE_UINT32
            assert lib.gguf_get_val_u32(context, key) == value

        sizes = {}
        for index in range(lib.gguf_get_n_tensors(context)):
            assert lib.gguf_get_tensor_type(context, index) == GGML_TYPE_F32
            sizes[lib.gguf_get_tensor_name(context, index).decode()] = lib.gguf_get_tensor_size(context, index)
    for name, entry in matrix.entries.items():
        assert sizes[f"{name}.in_sum2"] == 4 * entry.n_mat * entry.n_in
        assert sizes[f"{name}.counts"] == 4 * entry.n_mat
    assert read_imatrix(path).datasets == datasets


def test_reads_the_one_dimensional_tensors_llama_cpp_writes(tmp_path: Path) -> None:
    """llama.cpp stores a single matrix's tensors with trailing dimensions of 1 dropped: ne [n_in] and [1]."""
    path = tmp_path / "from-llama-imatrix.gguf"
    writer = gguf.GGUFWriter(path, "")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", ["calibration_datav3.txt"])
    writer.add_uint32("imatrix.chunk_count", 100)
    writer.add_uint32("imatrix.chunk_size", 512)
    writer.add_tensor("blk.0.attn_k.weight.in_sum2", np.full(8, 25600.0, np.float32))
    writer.add_tensor("blk.0.attn_k.weight.counts", np.array([51200.0], np.float32))
    writer.add_tensor("blk.0.ffn_up_exps.weight.in_sum2", np.arange(16, dtype=np.float32).reshape(2, 8))
    writer.add_tensor("blk.0.ffn_up_exps.weight.counts", np.array([[2.0], [4.0]], np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    loaded = read_imatrix(path)
    assert (loaded.entries["blk.0.attn_k.weight"].n_mat, loaded.entries["blk.0.attn_k.weight"].n_in) == (1, 8)
    np.testing.assert_array_equal(loaded.quantizer_data()["blk.0.attn_k.weight"], np.full(8, 0.5, np.float32))
    moe = loaded.quantizer_data()["blk.0.ffn_up_exps.weight"]
    np.testing.assert_array_equal(moe, np.concatenate([np.arange(8) / 2, np.arange(8, 16) / 4]).astype(np.float32))
    assert (loaded.datasets, loaded.chunk_count, loaded.chunk_size, loaded.token_count) == (
        ["calibration_datav3.txt"], 100, 512, 51200)


def test_moe_entries_round_trip_in_both_formats(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    experts = random_entry(rng, N_EXPERTS, N_FF, [640, 0, 1280, 64])
    matrix = ImportanceMatrix({"blk.3.ffn_gate_exps.weight": experts}, ["moe.txt"], 5, 512)

    write_imatrix(matrix, tmp_path / "moe.gguf")
    from_gguf = read_imatrix(tmp_path / "moe.gguf").entries["blk.3.ffn_gate_exps.weight"]
    assert (from_gguf.n_mat, from_gguf.n_in) == (N_EXPERTS, N_FF)
    np.testing.assert_array_equal(from_gguf.counts, [640, 0, 1280, 64])
    means = from_gguf.mean_squares()
    assert means.shape == (N_EXPERTS * N_FF,)
    np.testing.assert_array_equal(means[N_FF : 2 * N_FF], 1.0)  # the expert no token was routed to
    np.testing.assert_array_equal(means, expected_means(experts))

    write_legacy_imatrix(matrix, tmp_path / "moe.dat")
    from_legacy = read_imatrix(tmp_path / "moe.dat").entries["blk.3.ffn_gate_exps.weight"]
    np.testing.assert_allclose(from_legacy.mean_squares(), expected_means(experts), rtol=3e-7)


# --- legacy .dat ---------------------------------------------------------------------------------


def test_legacy_round_trip_keeps_mean_squares(tmp_path: Path) -> None:
    matrix = sample_matrix()
    matrix.entries["blk.9.unused.weight"] = ImatrixEntry(np.zeros((1, 8)), np.array([0]))
    path = tmp_path / "imatrix.dat"
    write_legacy_imatrix(matrix, path)
    loaded = read_imatrix(path)

    assert "blk.9.unused.weight" not in loaded.entries  # llama.cpp leaves out tensors that saw nothing
    assert list(loaded.entries) == sorted(sample_matrix().entries)
    for name, vector in loaded.quantizer_data().items():
        np.testing.assert_allclose(vector, expected_means(matrix.entries[name]), rtol=3e-7)
    assert loaded.datasets == ["code.txt"]  # one name fits the legacy trailer: the latest
    assert (loaded.chunk_count, loaded.chunk_size) == (8, 0)
    assert loaded.token_count == math.ceil(4096 / 512)  # legacy counts are chunks


def test_legacy_bytes_follow_llama_cpp_layout(tmp_path: Path) -> None:
    entry = ImatrixEntry(np.array([[30.0, 60.0, 90.0]]), np.array([600]))
    path = tmp_path / "one.dat"
    write_legacy_imatrix(ImportanceMatrix({"output.weight": entry}, ["text.txt"], 2, 512), path)

    ncall = math.ceil(600 / 512)
    means = np.array([30.0, 60.0, 90.0]) / 600
    expected = (
        struct.pack("<i", 1)
        + struct.pack("<i", len(b"output.weight")) + b"output.weight"
        + struct.pack("<ii", ncall, 3)
        + (means * ncall).astype("<f4").tobytes()
        + struct.pack("<ii", 2, len(b"text.txt")) + b"text.txt"
    )
    assert path.read_bytes() == expected


def legacy_entry_bytes(name: str, ncall: int, values: list[float]) -> bytes:
    encoded = name.encode()
    return struct.pack("<i", len(encoded)) + encoded + struct.pack("<ii", ncall, len(values)) + struct.pack(
        f"<{len(values)}f", *values)


def test_hand_built_legacy_file(tmp_path: Path) -> None:
    path = tmp_path / "old.dat"
    path.write_bytes(
        struct.pack("<i", 3)
        + legacy_entry_bytes("blk.0.attn_v.weight", 10, [5.0, 20.0, 0.5, 100.0])
        + legacy_entry_bytes("blk.0.ffn_down.weight", 4, [2.0, 6.0])
        + legacy_entry_bytes("blk.0.ffn_up.weight", 0, [0.25, 3.0])  # ncall 0: llama.cpp takes values as they are
        + struct.pack("<i", 10)
        + struct.pack("<i", len(b"groups_merged.txt")) + b"groups_merged.txt"
    )
    loaded = read_imatrix(path)
    data = loaded.quantizer_data()
    np.testing.assert_array_equal(data["blk.0.attn_v.weight"], np.array([0.5, 2.0, 0.05, 10.0], np.float32))
    np.testing.assert_array_equal(data["blk.0.ffn_down.weight"], np.array([0.5, 1.5], np.float32))
    np.testing.assert_array_equal(data["blk.0.ffn_up.weight"], np.array([0.25, 3.0], np.float32))
    assert (loaded.datasets, loaded.chunk_count, loaded.chunk_size) == (["groups_merged.txt"], 10, 0)


def test_legacy_file_without_trailer(tmp_path: Path) -> None:
    path = tmp_path / "bare.dat"
    path.write_bytes(struct.pack("<i", 1) + legacy_entry_bytes("output.weight", 2, [4.0, 8.0]))
    loaded = read_imatrix(path)
    np.testing.assert_array_equal(loaded.quantizer_data()["output.weight"], np.array([2.0, 4.0], np.float32))
    assert (loaded.datasets, loaded.chunk_count) == ([], 0)


# --- merging -------------------------------------------------------------------------------------


def test_merged_adds_statistics() -> None:
    first, second = sample_matrix(1), sample_matrix(2)
    second.entries["output.weight"] = ImatrixEntry(np.full((1, N_EMBD), 3.0), np.array([100]))
    second.datasets = ["more.txt"]
    second.chunk_count = 4
    merged = first.merged(second)

    assert set(merged.entries) == set(first.entries) | {"output.weight"}
    for name, entry in first.entries.items():
        np.testing.assert_array_equal(merged.entries[name].sums, entry.sums + second.entries[name].sums)
        np.testing.assert_array_equal(merged.entries[name].counts, entry.counts + second.entries[name].counts)
    np.testing.assert_array_equal(merged.entries["output.weight"].sums, second.entries["output.weight"].sums)
    assert merged.datasets == ["wiki.test.raw", "code.txt", "more.txt"]
    assert (merged.chunk_count, merged.chunk_size) == (12, 512)
    assert merged.token_count == 8192
    np.testing.assert_array_equal(first.entries["blk.0.attn_q.weight"].sums, sample_matrix(1).entries[
        "blk.0.attn_q.weight"].sums)  # the inputs are left as they were


def test_merged_converts_legacy_chunks_to_tokens(tmp_path: Path) -> None:
    """A legacy matrix counts chunks; merged with one that knows its chunk size, its counts become tokens."""
    path = tmp_path / "old.dat"
    path.write_bytes(struct.pack("<i", 2) + legacy_entry_bytes("blk.0.attn_q.weight", 2, [4.0, 8.0])
                     + legacy_entry_bytes("blk.0.ffn_up_exps.weight", 1, [1.0, 1.0, 3.0, 3.0]))
    legacy = read_imatrix(path)
    current = ImportanceMatrix(
        {"blk.0.attn_q.weight": ImatrixEntry(np.array([[512.0, 512.0]]), np.array([512])),
         "blk.0.ffn_up_exps.weight": ImatrixEntry(np.array([[512.0, 512.0], [0.0, 0.0]]), np.array([512, 0]))},
        ["new.txt"], 1, 512)
    merged = current.merged(legacy)
    q = merged.entries["blk.0.attn_q.weight"]
    np.testing.assert_array_equal(q.counts, [512 + 2 * 512])
    np.testing.assert_allclose(q.mean_squares(), [(512 + 4 * 512) / 1536, (512 + 8 * 512) / 1536])
    experts = merged.entries["blk.0.ffn_up_exps.weight"]  # the legacy row held both experts flattened
    assert (experts.n_mat, experts.n_in) == (2, 2)
    np.testing.assert_array_equal(experts.counts, [1024, 512])
    np.testing.assert_allclose(experts.mean_squares(), [1.0, 1.0, 3.0, 3.0])


def test_merging_different_models_is_refused() -> None:
    first = ImportanceMatrix({"blk.0.attn_q.weight": ImatrixEntry(np.ones((1, 8)), np.array([1]))})
    second = ImportanceMatrix({"blk.0.attn_q.weight": ImatrixEntry(np.ones((1, 16)), np.array([1]))})
    with pytest.raises(ImatrixError) as error:
        first.merged(second)
    assert_one_sentence(error, "blk.0.attn_q.weight", "1 × 8", "1 × 16", "same model")


# --- bad files -----------------------------------------------------------------------------------


def write_gguf(path: Path, tensors: dict[str, np.ndarray], keys: dict[str, tuple[object, GGUFValueType]],
               raw_dtypes: dict[str, GGMLQuantizationType] | None = None) -> Path:
    """A GGUF with exactly the given metadata and tensors (in the given order)."""
    writer = gguf.GGUFWriter(path, "")
    for key, (value, kind) in keys.items():
        sub_type = GGUFValueType.STRING if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, kind, sub_type=sub_type)
    for name, array in tensors.items():
        writer.add_tensor(name, array, raw_dtype=(raw_dtypes or {}).get(name))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


GOOD_KEYS: dict[str, tuple[object, GGUFValueType]] = {
    "general.type": ("imatrix", GGUFValueType.STRING),
    "imatrix.datasets": (["a.txt"], GGUFValueType.ARRAY),
    "imatrix.chunk_count": (1, GGUFValueType.UINT32),
    "imatrix.chunk_size": (512, GGUFValueType.UINT32),
}
GOOD_SUMS = np.ones((1, 8), np.float32)
GOOD_COUNTS = np.array([[4.0]], np.float32)


def bad_gguf(tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.gguf"
    keys = dict(GOOD_KEYS)
    tensors = {"t.weight.in_sum2": GOOD_SUMS, "t.weight.counts": GOOD_COUNTS}
    if case.startswith("no-"):
        del keys[case.removeprefix("no-")]
    elif case == "sums-without-counts":
        del tensors["t.weight.counts"]
    elif case == "counts-without-sums":
        del tensors["t.weight.in_sum2"]
    elif case == "f16-sums":
        tensors["t.weight.in_sum2"] = GOOD_SUMS.astype(np.float16)
    elif case == "counts-shape":
        tensors["t.weight.counts"] = np.array([[4.0, 4.0]], np.float32)
    elif case == "negative-sums":
        tensors["t.weight.in_sum2"] = -GOOD_SUMS
    elif case == "nan-sums":
        tensors["t.weight.in_sum2"] = np.full((1, 8), np.nan, np.float32)
    elif case == "negative-counts":
        tensors["t.weight.counts"] = -GOOD_COUNTS
    elif case == "infinite-counts":
        tensors["t.weight.counts"] = np.array([[np.inf]], np.float32)
    elif case == "u64-chunk-count":
        keys["imatrix.chunk_count"] = (1, GGUFValueType.UINT64)
    elif case == "without-tensors":
        tensors = {}
    return write_gguf(path, tensors, keys)


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("no-imatrix.datasets", ["missing importance-matrix metadata", "imatrix.datasets"]),
        ("no-imatrix.chunk_count", ["missing importance-matrix metadata", "imatrix.chunk_count"]),
        ("no-imatrix.chunk_size", ["missing importance-matrix metadata", "imatrix.chunk_size"]),
        ("sums-without-counts", ["t.weight.in_sum2 but no t.weight.counts"]),
        ("counts-without-sums", ["t.weight.counts but no t.weight.in_sum2"]),
        ("f16-sums", ["t.weight.in_sum2 is F16", "F32"]),
        ("counts-shape", ["shape", "[1, n_mat]"]),
        ("negative-sums", ["t.weight", "negative sums"]),
        ("nan-sums", ["t.weight", "not finite"]),
        ("negative-counts", ["t.weight", "negative counts"]),
        ("infinite-counts", ["t.weight.counts", "not finite"]),
        ("u64-chunk-count", ["imatrix.chunk_count", "UINT64", "UINT32"]),
        ("without-tensors", ["no entries"]),
    ],
)
def test_bad_gguf_imatrix(tmp_path: Path, case: str, fragments: list[str]) -> None:
    path = bad_gguf(tmp_path, case)
    with pytest.raises(ImatrixError) as error:
        read_imatrix(path)
    assert_one_sentence(error, str(path), *fragments)


def test_model_instead_of_imatrix(tmp_path: Path, starter_gguf: Path) -> None:
    with pytest.raises(ImatrixError) as error:
        read_imatrix(starter_gguf)
    assert_one_sentence(error, str(starter_gguf), "is a model, not an importance matrix", "qdesk calibrate")

    untyped = write_gguf(tmp_path / "untyped-model.gguf", {"token_embd.weight": np.zeros((4, 8), np.float32)},
                         {"general.architecture": ("llama", GGUFValueType.STRING)})
    with pytest.raises(ImatrixError) as error:
        read_imatrix(untyped)
    assert_one_sentence(error, "is a model, not an importance matrix")


def test_missing_folder_and_empty_paths(tmp_path: Path) -> None:
    with pytest.raises(ImatrixError) as error:
        read_imatrix(tmp_path / "nope.gguf")
    assert_one_sentence(error, "nope.gguf", "does not exist", "qdesk calibrate")

    with pytest.raises(ImatrixError) as error:
        read_imatrix(tmp_path)
    assert_one_sentence(error, "is a folder")

    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ImatrixError) as error:
        read_imatrix(tmp_path / "empty.gguf")
    assert_one_sentence(error, "is empty")


def test_truncated_gguf(tmp_path: Path) -> None:
    whole = tmp_path / "whole.gguf"
    write_imatrix(sample_matrix(), whole)
    content = whole.read_bytes()
    for cut in (6, 20, 90, 300, len(content) // 2, len(content) - 100):
        path = tmp_path / f"cut-{cut}.gguf"
        path.write_bytes(content[:cut])
        with pytest.raises(ImatrixError) as error:
            read_imatrix(path)
        assert_one_sentence(error, str(path))
        assert "truncated" in str(error.value), str(error.value)


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (struct.pack("<i", 0), ["holds 0 entries"]),
        (struct.pack("<i", -3), ["holds -3 entries"]),
        (b"\x01\x00", ["the entry count runs past the end"]),
        (struct.pack("<i", 2**31 - 1) + bytes(64), ["2,147,483,647 entries", "68 bytes"]),
        (struct.pack("<i", 1) + legacy_entry_bytes("w", 1, [1.0] * 4)[:-2], ["w's 4 values runs past the end"]),
        (struct.pack("<ii", 1, 40) + b"short name" + bytes(10), ["entry 1's name runs past the end"]),
        (struct.pack("<ii", 1, 2**30) + bytes(32), ["entry 1's name is said to be 1,073,741,824 bytes long"]),
        (struct.pack("<ii", 1, 1) + b"w" + struct.pack("<ii", 1, 0) + bytes(8), ["w is said to hold 0 values"]),
        (struct.pack("<ii", 1, 1) + b"w" + struct.pack("<ii", 1, 2**30) + bytes(8), ["w's 1,073,741,824 values"]),
        (struct.pack("<i", 1) + legacy_entry_bytes("w", 1, [-1.0]), ["w holds negative sums"]),
        (struct.pack("<i", 1) + legacy_entry_bytes("w", 1, [math.nan]), ["w holds values that are not finite"]),
        (struct.pack("<i", 1) + legacy_entry_bytes("w", -2, [1.0]), ["computed on -2 chunks"]),
        (struct.pack("<i", 2) + legacy_entry_bytes("w", 1, [1.0]) * 2, ["lists w twice"]),
        (struct.pack("<i", 1) + legacy_entry_bytes("w", 1, [1.0]) + struct.pack("<ii", 3, 50) + b"cut",
         ["the dataset name runs past the end"]),
        (struct.pack("<i", 1) + legacy_entry_bytes("w", 1, [1.0]) + b"\x03\x00", ["chunk count after the entries"]),
        (b"Hello, this is a text file and not an importance matrix at all.\n", ["neither GGUF nor"]),
    ],
    ids=[
        "zero-entries", "negative-entries", "short-header", "absurd-entries", "values-cut", "name-cut",
        "absurd-name", "zero-values", "absurd-values", "negative-value", "nan-value", "negative-ncall",
        "duplicate", "dataset-cut", "trailer-cut", "text-file",
    ],
)
def test_bad_legacy_file(tmp_path: Path, content: bytes, fragments: list[str]) -> None:
    path = tmp_path / "bad.dat"
    path.write_bytes(content)
    with pytest.raises(ImatrixError) as error:
        read_imatrix(path)
    assert_one_sentence(error, str(path), "qdesk calibrate", *fragments)


# --- writing failures leave nothing behind -------------------------------------------------------


@pytest.mark.parametrize("write", [write_imatrix, write_legacy_imatrix], ids=["gguf", "legacy"])
def test_write_into_missing_folder(tmp_path: Path, write: object) -> None:
    assert callable(write)
    with pytest.raises(OutputError) as error:
        write(sample_matrix(), tmp_path / "missing" / "imatrix.gguf")
    assert_one_sentence(error, "does not exist")
    assert files_in(tmp_path) == set()

    with pytest.raises(OutputError) as error:
        write(sample_matrix(), tmp_path)
    assert_one_sentence(error, "is a folder")
    assert files_in(tmp_path) == set()


@pytest.mark.parametrize("write", [write_imatrix, write_legacy_imatrix], ids=["gguf", "legacy"])
def test_unwritable_matrices_leave_old_file_alone(tmp_path: Path, write: object) -> None:
    assert callable(write)
    path = tmp_path / "imatrix.out"
    write(sample_matrix(), path)
    before = path.read_bytes()

    broken = sample_matrix()
    broken.entries["blk.0.attn_q.weight"].sums[0, 3] = np.nan
    with pytest.raises(ImatrixError) as error:
        write(broken, path)
    assert_one_sentence(error, "blk.0.attn_q.weight", "not finite", "calibrate again")

    with pytest.raises(ImatrixError) as error:
        write(ImportanceMatrix({}), path)
    assert_one_sentence(error, "no entries")

    assert path.read_bytes() == before
    assert files_in(tmp_path) == {"imatrix.out"}


# --- matching a model ----------------------------------------------------------------------------


def model_weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(int(n) for n in t.shape) for t in gguf.GGUFReader(path).tensors}


def matrix_for(shapes: dict[str, tuple[int, ...]]) -> ImportanceMatrix:
    """A matrix covering every 2-D weight but the embeddings (which llama.cpp's imatrix never sees)."""
    entries = {
        name: ImatrixEntry(np.ones((ne[2] if len(ne) > 2 else 1, ne[0])), np.full(ne[2] if len(ne) > 2 else 1, 10))
        for name, ne in shapes.items()
        if len(ne) >= 2 and name != "token_embd.weight"
    }
    return ImportanceMatrix(entries, ["t.txt"], 1, 512)


def test_check_matches_the_real_starter_model(starter_gguf: Path) -> None:
    shapes = model_weight_shapes(starter_gguf)
    matrix = matrix_for(shapes)
    assert len(matrix.entries) == 7 * 30  # SmolLM2-135M: 30 layers of q, k, v, output, gate, up, down
    matrix.entries["blk.30.attn_q.weight"] = ImatrixEntry(np.ones((1, 576)), np.array([1]))  # ignored
    check_matches_model(matrix, shapes, model=starter_gguf.name)


def test_check_refuses_a_matrix_of_another_model(starter_gguf: Path) -> None:
    shapes = model_weight_shapes(starter_gguf)
    other = ImportanceMatrix({f"model.layers.{i}.q_proj": ImatrixEntry(np.ones((1, 8)), np.array([1]))
                              for i in range(3)})
    with pytest.raises(ImatrixError) as error:
        check_matches_model(other, shapes, model=starter_gguf.name)
    assert_one_sentence(error, "another model", "none of its 3 tensors", starter_gguf.name, "qdesk calibrate")


def test_check_refuses_mismatched_sizes(starter_gguf: Path) -> None:
    shapes = model_weight_shapes(starter_gguf)
    matrix = matrix_for(shapes)
    matrix.entries["blk.2.ffn_down.weight"] = ImatrixEntry(np.ones((1, 576)), np.array([10]))
    matrix.entries["blk.5.ffn_down.weight"] = ImatrixEntry(np.ones((1, 576)), np.array([10]))
    with pytest.raises(ImatrixError) as error:
        check_matches_model(matrix, shapes, model=starter_gguf.name)
    assert_one_sentence(error, "blk.2.ffn_down.weight", "576 input columns × 1", "1536 × 1", "qdesk calibrate")
    assert "blk.5" not in str(error.value)


def test_check_experts() -> None:
    shapes = {"blk.0.ffn_up_exps.weight": (64, 96, 4), "blk.0.attn_q.weight": (64, 64)}
    fitting = ImportanceMatrix({"blk.0.ffn_up_exps.weight": ImatrixEntry(np.ones((4, 64)), np.ones(4))})
    check_matches_model(fitting, shapes)
    flattened = ImportanceMatrix({"blk.0.ffn_up_exps.weight": ImatrixEntry(np.ones((1, 256)), np.ones(1))})
    check_matches_model(flattened, shapes)  # a legacy file's experts in one row: llama.cpp accepts the size

    wrong = ImportanceMatrix({"blk.0.ffn_up_exps.weight": ImatrixEntry(np.ones((8, 64)), np.ones(8))})
    with pytest.raises(ImatrixError) as error:
        check_matches_model(wrong, shapes, model="mixtral.gguf")
    assert_one_sentence(error, "blk.0.ffn_up_exps.weight", "64 input columns × 8 matrices", "64 × 4 in mixtral.gguf")
