"""`calibrate` and `qdesk calibrate`: importance matrices from the built-in text or the user's, in llama.cpp's
format, usable by `quantize`, with one clear sentence for unusable text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from converters.calibration.calibrate import (
    BUILTIN_DATASET_PREFIX,
    CalibrationError,
    builtin_texts,
    calibrate,
    read_text_file,
    render_conversation,
)
from converters.calibration.imatrix import read_imatrix
from converters.core.errors import Cancelled
from converters.core.gguf_file import check_gguf
from converters.core.jobs import CancelToken


def qdesk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qdesk", *args], capture_output=True, text=True, timeout=600)


def blk_weights(model: Path) -> dict[str, int]:
    return {t.name: t.shape[0] for t in check_gguf(model).tensors if t.name.startswith("blk.") and len(t.shape) == 2}


def test_builtin_text_covers_every_domain() -> None:
    texts = {text.name.removeprefix(BUILTIN_DATASET_PREFIX): text for text in builtin_texts()}
    assert {"prose", "chat", "math", "code", "multilingual"} <= set(texts)
    assert len(texts["chat"].conversations) >= 20
    assert all(len(text.documents) >= 10 for name, text in texts.items() if name != "chat")
    folder = Path(__file__).resolve().parent.parent / "resources" / "calibration"
    total = sum(path.stat().st_size for path in folder.iterdir() if path.suffix in (".txt", ".jsonl"))
    assert 150_000 < total < 1_000_000


def test_calibrate_on_builtin_text(kquant_f16: Path, tmp_path: Path) -> None:
    result = calibrate(kquant_f16, tmp_path / "m.imatrix.gguf", chunks=5, ctx=64)
    matrix = read_imatrix(tmp_path / "m.imatrix.gguf")
    assert result.chunks == matrix.chunk_count == 5 and matrix.chunk_size == 64
    assert set(matrix.entries) == set(blk_weights(kquant_f16))
    assert all(entry.n_in == blk_weights(kquant_f16)[name] for name, entry in matrix.entries.items())
    assert all(int(entry.counts[0]) == 5 * 64 for entry in matrix.entries.values())
    assert [name.removeprefix(BUILTIN_DATASET_PREFIX) for name in matrix.datasets] == [
        text.name.removeprefix(BUILTIN_DATASET_PREFIX) for text in builtin_texts()]
    assert gguf.GGUFReader(tmp_path / "m.imatrix.gguf").fields["general.type"].contents() == "imatrix"


def test_each_domain_changes_the_matrix(kquant_f16: Path, tmp_path: Path) -> None:
    texts = {text.name.removeprefix(BUILTIN_DATASET_PREFIX): text for text in builtin_texts()}
    code = calibrate(kquant_f16, None, [texts["code"]], chunks=2, ctx=64).matrix
    prose = calibrate(kquant_f16, None, [texts["prose"]], chunks=2, ctx=64).matrix
    name = "blk.0.attn_q.weight"
    assert not (code.entries[name].sums == prose.entries[name].sums).all()


def test_user_text(kquant_f16: Path, tmp_path: Path) -> None:
    text = tmp_path / "task.txt"
    text.write_text("Invoice 2291: three crates of pears, delivered Tuesday.\n\n" * 40, encoding="utf-8")
    result = calibrate(kquant_f16, None, [read_text_file(text)], chunks=100, ctx=32)
    assert result.chunks >= 2 and result.matrix.datasets == [str(text)]


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty"), (b"\x00\x01\x02binary", "binary"), (b"\xff\xfe\x00bad", "UTF-8")],
)
def test_unusable_text_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "text.txt"
    path.write_bytes(content)
    with pytest.raises(CalibrationError, match=message):
        read_text_file(path)
    with pytest.raises(CalibrationError, match="does not exist"):
        read_text_file(tmp_path / "missing.txt")


def test_text_shorter_than_one_chunk(kquant_f16: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Too short.", encoding="utf-8")
    with pytest.raises(CalibrationError, match="fewer than one chunk"):
        calibrate(kquant_f16, tmp_path / "out.gguf", [read_text_file(short)], ctx=512)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]


def test_cancel_writes_nothing(kquant_f16: Path, tmp_path: Path) -> None:
    cancel = CancelToken()
    cancel.cancel()
    with pytest.raises(Cancelled):
        calibrate(kquant_f16, tmp_path / "out.gguf", chunks=2, ctx=64, cancel=cancel)
    assert list(tmp_path.iterdir()) == []


def test_conversations_use_the_model_template(smollm2_f16: Path) -> None:
    from native.activations import ModelEvaluator

    with ModelEvaluator(smollm2_f16, n_ctx=64, collect=False) as evaluator:
        template = evaluator.chat_template()
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    rendered = render_conversation(messages, template)
    assert "<|im_start|>user\nHi<|im_end|>" in rendered
    assert render_conversation(messages, None) == "user: Hi\nassistant: Hello!"
    assert render_conversation(messages, "{{ raise_exception('no') }}") == "user: Hi\nassistant: Hello!"


@pytest.mark.slow
def test_cli_calibrate_then_quantize_with_the_matrix(smollm2_f16: Path, tmp_path: Path) -> None:
    matrix_path = tmp_path / "smollm2.imatrix.gguf"
    calibrated = qdesk("calibrate", str(smollm2_f16), "-o", str(matrix_path), "--chunks", "4", "--ctx", "128")
    assert calibrated.returncode == 0, calibrated.stderr
    assert calibrated.stderr == "" and "wrote" in calibrated.stdout

    legacy = tmp_path / "smollm2.imatrix.dat"
    assert qdesk("calibrate", str(smollm2_f16), "-o", str(legacy), "--chunks", "2", "--ctx", "64",
                 "--legacy-dat").returncode == 0

    for matrix in (matrix_path, legacy):
        output = tmp_path / f"q4km-{matrix.suffix}.gguf"
        quantized = qdesk("quantize", str(smollm2_f16), "-o", str(output), "--preset", "Q4_K_M", "--imatrix",
                          str(matrix), "--plan-out", str(tmp_path / "plan.json"))
        assert quantized.returncode == 0, quantized.stderr
        fields = gguf.GGUFReader(output).fields
        assert fields["quantize.imatrix.entries_count"].contents() == 210
        assert fields["qdesk.imatrix"].contents() == str(matrix)
        assert json.loads((tmp_path / "plan.json").read_text())["base"] == "Q4_K_M"

    other_model = qdesk("quantize", str(smollm2_f16), "-o", str(tmp_path / "x.gguf"), "--preset", "Q4_K_M",
                        "--imatrix", str(tmp_path / "missing.gguf"))
    assert other_model.returncode == 1 and other_model.stderr.count("\n") == 1
    assert not (tmp_path / "x.gguf").exists()
