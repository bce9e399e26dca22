"""Bad input to `qdesk convert`: one clear sentence, exit status 1, nothing left behind."""

from __future__ import annotations

import json
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from converters.core.errors import Cancelled, CheckpointError, OutputError, UnsupportedModelError
from converters.core.jobs import CancelToken, Progress
from converters.writing.convert import convert_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def run_cli(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qdesk", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def assert_user_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_nothing_left(folder: Path, before: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == before


def tiny_checkpoint_like(smollm2_hf: Path, folder: Path, tensors: dict[str, np.ndarray] | None = None) -> Path:
    """A folder with SmolLM2's config and tokenizer and the given weights (default: none written)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", *TOKENIZER_FILES):
        shutil.copy(smollm2_hf / name, folder / name)
    if tensors is not None:
        safetensors.numpy.save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_missing_folder(tmp_path: Path) -> None:
    result = run_cli("convert", tmp_path / "nope", "-o", tmp_path / "out.gguf")
    assert_user_error(result, "does not exist")
    assert_nothing_left(tmp_path, set())


def test_missing_config(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    result = run_cli("convert", tmp_path / "model", "-o", tmp_path / "out.gguf")
    assert_user_error(result, "config.json")
    assert_nothing_left(tmp_path, {"model"})


def test_malformed_config(tmp_path: Path, smollm2_hf: Path) -> None:
    model = tiny_checkpoint_like(smollm2_hf, tmp_path / "model")
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    result = run_cli("convert", model, "-o", tmp_path / "out.gguf")
    assert_user_error(result, "not valid JSON")
    assert_nothing_left(tmp_path, {"model"})


def test_unknown_architecture_lists_supported(tmp_path: Path, smollm2_hf: Path) -> None:
    model = tiny_checkpoint_like(smollm2_hf, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    result = run_cli("convert", model, "-o", tmp_path / "out.gguf")
    assert_user_error(result, "FalconForCausalLM", "LlamaForCausalLM")
    assert_nothing_left(tmp_path, {"model"})


def test_no_weights(tmp_path: Path, smollm2_hf: Path) -> None:
    model = tiny_checkpoint_like(smollm2_hf, tmp_path / "model")
    with pytest.raises(CheckpointError, match="no weights"):
        convert_checkpoint(model, tmp_path / "out.gguf")


def _safetensors_bytes(header: dict, data: bytes, declared_length: int | None = None) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded) if declared_length is None else declared_length) + encoded + data


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x01\x02", "shorter than"),
        (_safetensors_bytes({}, b"", declared_length=10**9), "header claims"),
        (struct.pack("<Q", 5) + b"{nope", "not JSON"),
        (
            _safetensors_bytes(
                {"model.embed_tokens.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, b"\0" * 10
            ),
            "past the end",
        ),
        (
            _safetensors_bytes(
                {"model.embed_tokens.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}, b"\0" * 32
            ),
            "shape needs",
        ),
    ],
    ids=["too-short", "bad-header-length", "header-not-json", "offsets-past-end", "size-mismatch"],
)
def test_corrupt_safetensors(tmp_path: Path, smollm2_hf: Path, content: bytes, expected: str) -> None:
    model = tiny_checkpoint_like(smollm2_hf, tmp_path / "model")
    (model / "model.safetensors").write_bytes(content)
    result = run_cli("convert", model, "-o", tmp_path / "out.gguf")
    assert_user_error(result, "model.safetensors", expected)
    assert_nothing_left(tmp_path, {"model"})


def test_truncated_real_checkpoint(tmp_path: Path, smollm2_hf: Path) -> None:
    model = tiny_checkpoint_like(smollm2_hf, tmp_path / "model")
    with open(smollm2_hf / "model.safetensors", "rb") as source, open(model / "model.safetensors", "wb") as out:
        out.write(source.read(50_000_000))
    result = run_cli("convert", model, "-o", tmp_path / "out.gguf")
    assert_user_error(result, "past the end")
    assert_nothing_left(tmp_path, {"model"})


def test_missing_shard(tmp_path: Path, smollm2_hf: Path) -> None:
    model = tiny_checkpoint_like(smollm2_hf, tmp_path / "model")
    (model / "model-00001-of-00002.safetensors").symlink_to(smollm2_hf / "model.safetensors")
    index = {
        "metadata": {},
        "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.norm.weight": "model-00002-of-00002.safetensors",
        },
    }
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    result = run_cli("convert", model, "-o", tmp_path / "out.gguf")
    assert_user_error(result, "model-00002-of-00002.safetensors", "missing")
    assert_nothing_left(tmp_path, {"model"})


def test_unsupported_dtype(tmp_path: Path, smollm2_hf: Path) -> None:
    model = tiny_checkpoint_like(
        smollm2_hf, tmp_path / "model", {"model.embed_tokens.weight": np.zeros((8, 8), dtype=np.int8)}
    )
    with pytest.raises(UnsupportedModelError, match="I8"):
        convert_checkpoint(model, tmp_path / "out.gguf")
    result = run_cli("convert", model, "-o", tmp_path / "out.gguf")
    assert_user_error(result, "I8", "F32, F16 and BF16")
    assert_nothing_left(tmp_path, {"model"})


def test_unmappable_tensor(tmp_path: Path, smollm2_hf: Path) -> None:
    model = tiny_checkpoint_like(
        smollm2_hf, tmp_path / "model", {"vision_tower.patch_embed.weight": np.zeros((8, 8), dtype=np.float32)}
    )
    with pytest.raises(UnsupportedModelError, match=r"vision_tower\.patch_embed\.weight"):
        convert_checkpoint(model, tmp_path / "out.gguf")


def test_output_folder_missing(tmp_path: Path, smollm2_hf: Path) -> None:
    result = run_cli("convert", smollm2_hf, "-o", tmp_path / "missing" / "out.gguf")
    assert_user_error(result, "does not exist")
    assert_nothing_left(tmp_path, set())


def test_output_under_a_file(tmp_path: Path, smollm2_hf: Path) -> None:
    (tmp_path / "plain.txt").write_text("x")
    result = run_cli("convert", smollm2_hf, "-o", tmp_path / "plain.txt" / "out.gguf")
    assert_user_error(result, "Cannot write")
    assert_nothing_left(tmp_path, {"plain.txt"})


def test_output_is_a_folder(tmp_path: Path, smollm2_hf: Path) -> None:
    (tmp_path / "out.gguf").mkdir()
    result = run_cli("convert", smollm2_hf, "-o", tmp_path / "out.gguf")
    assert_user_error(result, "is a folder")


@pytest.fixture
def small_disk(tmp_path: Path, request: pytest.FixtureRequest):
    """A tmpfs of `request.param` megabytes (default 40): a disk that really fills up."""
    megabytes = getattr(request, "param", 40)
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_not_enough_disk_before_start(small_disk: Path, smollm2_hf: Path) -> None:
    result = run_cli("convert", smollm2_hf, "-o", small_disk / "out.gguf")
    assert_user_error(result, "Not enough disk space")
    assert list(small_disk.iterdir()) == []


@pytest.mark.parametrize("small_disk", [400], indirect=True)
def test_disk_fills_during_conversion(small_disk: Path, smollm2_hf: Path) -> None:
    """Another program fills the disk after the free-space check: the error is clear and nothing remains."""
    filler = small_disk / "other-program.bin"

    def fill_disk_once(progress: Progress) -> None:
        if progress.done > 0 and not filler.exists():
            with open(filler, "wb") as handle:
                try:
                    while True:
                        handle.write(b"\0" * 1_000_000)
                except OSError:
                    pass

    with pytest.raises(OutputError, match="disk is full"):
        convert_checkpoint(smollm2_hf, small_disk / "out.gguf", outtype="q8_0", progress=fill_disk_once)
    assert [p.name for p in small_disk.iterdir()] == [filler.name]


def test_cancel_leaves_nothing(tmp_path: Path, smollm2_hf: Path) -> None:
    token = CancelToken()
    seen: list[Progress] = []

    def cancel_after_a_few(progress: Progress) -> None:
        seen.append(progress)
        if len(seen) == 5:
            token.cancel()

    with pytest.raises(Cancelled):
        convert_checkpoint(smollm2_hf, tmp_path / "out.gguf", progress=cancel_after_a_few, cancel=token)
    assert list(tmp_path.iterdir()) == []
    assert len(seen) == 5


def test_ctrl_c_in_cli_exits_130_and_leaves_nothing(tmp_path: Path, smollm2_hf: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "qdesk", "convert", str(smollm2_hf), "-o", str(tmp_path / "out.gguf"),
         "--outtype", "f32"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".partial") for p in tmp_path.iterdir()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert (process.returncode, left) == (130, []), stderr
    assert "cancelled" in stderr
    assert "Traceback" not in stderr


def _two_tensors(first: tuple[int, int], second: tuple[int, int], data_bytes: int) -> bytes:
    """A safetensors file of two F32 [2, 2] tensors at the given data offsets over `data_bytes` of data."""
    header = {"model.embed_tokens.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": list(first)},
              "model.norm.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": list(second)}}
    return _safetensors_bytes(header, b"\0" * data_bytes)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (_two_tensors((0, 16), (8, 24), 24), "overlap"),
        (_two_tensors((0, 16), (0, 16), 16), "overlap"),
        (_two_tensors((0, 16), (24, 40), 40), "unused"),
        (_two_tensors((8, 24), (24, 40), 40), "unused before the first tensor"),
        (_two_tensors((0, 16), (16, 32), 48), "follow the last tensor"),
        (_safetensors_bytes({"model.norm.weight": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}},
                            b"\0" * 16), "counts"),
        (_safetensors_bytes({"model.norm.weight": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 10]}},
                            b"\0" * 10), "counts"),
    ],
    ids=["overlap", "same-bytes", "gap", "gap-at-start", "trailing-bytes", "negative-dimensions", "fractional"],
)
def test_safetensors_layout_the_library_refuses_is_refused(tmp_path: Path, smollm2_hf: Path, content: bytes,
                                                           expected: str) -> None:
    from safetensors import SafetensorError, safe_open

    model = tiny_checkpoint_like(smollm2_hf, tmp_path / "model")
    (model / "model.safetensors").write_bytes(content)
    with pytest.raises(SafetensorError):  # the reference library refuses it too
        safe_open(str(model / "model.safetensors"), "np")
    before = (model / "model.safetensors").read_bytes()
    result = run_cli("convert", model, "-o", tmp_path / "out.gguf")
    assert_user_error(result, "model.safetensors", expected)
    assert "internal error" not in result.stderr
    assert_nothing_left(tmp_path, {"model"})
    assert (model / "model.safetensors").read_bytes() == before


def _index_naming(model: Path, shard: str) -> None:
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("where", ["parent", "absolute", "nested-parent"])
def test_index_shard_names_outside_the_folder_are_refused(tmp_path: Path, smollm2_hf: Path, where: str) -> None:
    """A downloaded index must not make qdesk read (and embed) any file on the machine."""
    secret = tmp_path / "secret.safetensors"
    safetensors.numpy.save_file({"model.embed_tokens.weight": np.ones((2, 2), dtype=np.float32)}, str(secret))
    model = tiny_checkpoint_like(smollm2_hf, tmp_path / "model")
    shard = {"parent": "../secret.safetensors", "absolute": str(secret),
             "nested-parent": "sub/../../secret.safetensors"}[where]
    (model / "sub").mkdir()
    _index_naming(model, shard)
    result = run_cli("convert", model, "-o", tmp_path / "out.gguf")
    assert_user_error(result, "model.safetensors.index.json", "not a file name inside the checkpoint folder")
    assert_nothing_left(tmp_path, {"model", "secret.safetensors"})


def test_weight_files_that_link_outside_the_folder_are_refused(tmp_path: Path, smollm2_hf: Path) -> None:
    secret = tmp_path / "elsewhere" / "weights.safetensors"
    secret.parent.mkdir()
    shutil.copyfile(smollm2_hf / "model.safetensors", secret)
    model = tiny_checkpoint_like(smollm2_hf, tmp_path / "model")
    (model / "model-00001-of-00001.safetensors").symlink_to(secret)
    _index_naming(model, "model-00001-of-00001.safetensors")
    result = run_cli("convert", model, "-o", tmp_path / "out.gguf")
    assert_user_error(result, "model-00001-of-00001.safetensors", "outside the checkpoint folder")
    (model / "model.safetensors.index.json").unlink()
    (model / "model-00001-of-00001.safetensors").unlink()
    (model / "model.safetensors").symlink_to(secret)  # a single weights file, found without an index
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        convert_checkpoint(model, tmp_path / "out.gguf")
    (model / "model.safetensors").unlink()
    shutil.copyfile(smollm2_hf / "model.safetensors", model / "model.safetensors")
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to(smollm2_hf / "tokenizer.json")  # the tokenizer, too
    with pytest.raises(CheckpointError, match=r"tokenizer\.json .* outside the checkpoint folder"):
        convert_checkpoint(model, tmp_path / "out.gguf")
    assert_nothing_left(tmp_path, {"model", "elsewhere"})


def test_a_hugging_face_cache_snapshot_links_into_its_blobs(tmp_path: Path) -> None:
    """The cache's own layout (snapshot files linking to ../../blobs/HASH) is inside the checkpoint."""
    from tests.builders.checkpoints import build_tiny_checkpoint

    built = build_tiny_checkpoint(tmp_path / "built", "llama")
    repo = tmp_path / "hub" / "models--someone--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in built.iterdir():
        blob = repo / "blobs" / f"blob-{file.name}"
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    result = convert_checkpoint(snapshot, tmp_path / "out.gguf")
    assert result.tensor_count > 0
    nested = snapshot / "language-model"  # a repository that keeps its checkpoint in a subfolder
    nested.mkdir()
    for file in built.iterdir():
        (nested / file.name).symlink_to(Path("..", "..", "..", "blobs", f"blob-{file.name}"))
    assert convert_checkpoint(nested, tmp_path / "nested.gguf").tensor_count == result.tensor_count


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"hidden_size": 65}, "config.json implies"),
        ({"intermediate_size": 100}, "config.json implies"),
        ({"num_key_value_heads": 1}, "config.json implies"),
        ({"vocab_size": 7}, "config.json implies"),
        ({"num_hidden_layers": 3}, "lack layer 2"),
        ({"num_hidden_layers": 1}, "hold a layer 1"),
        ({"num_hidden_layers": "two"}, "not a positive whole number"),
        ({"hidden_size": -1}, "not a positive whole number"),
    ],
    ids=["hidden", "intermediate", "kv-heads", "vocab", "more-layers", "fewer-layers", "layers-text", "negative"],
)
def test_a_config_that_contradicts_its_weights_is_refused(tmp_path: Path, change: dict, expected: str) -> None:
    from tests.builders.checkpoints import build_tiny_checkpoint

    model = build_tiny_checkpoint(tmp_path / "model", "llama")
    config = json.loads((model / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    (model / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=expected):
        convert_checkpoint(model, tmp_path / "out.gguf")
    assert_nothing_left(tmp_path, {"model"})
