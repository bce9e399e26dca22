"""Activation-aware scaling: the scaled model computes the same function, no input's damage grows, and
`qdesk quantize --awq` writes an ordinary GGUF or refuses in one sentence."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from converters.calibration.calibrate import calibrate
from converters.calibration.imatrix import ImportanceMatrix, read_imatrix
from converters.core.gguf_file import check_gguf
from converters.quantization.awq import (
    AwqError,
    scaled_matrix,
    scaling_groups,
    search_scales,
    write_scaled,
)
from converters.quantization.quantize import preset_plan
from native.activations import ModelEvaluator


def _matrix(reference: Path, folder: Path) -> ImportanceMatrix:
    path = folder / "model.imatrix.gguf"
    calibrate(reference, path, chunks=2, ctx=64)
    return read_imatrix(path)


def _logits(model: Path) -> np.ndarray:
    rows: list[np.ndarray] = []
    with ModelEvaluator(model, n_ctx=64, collect=False) as evaluator:
        evaluator.evaluate_logits(list(range(100, 164)), 32, lambda _position, logits: rows.append(logits.copy()))
    return np.concatenate(rows)


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2 (biases on q, k and v; grouped-query attention) as F32 GGUF."""
    from converters.writing.convert import convert_checkpoint
    from tests.builders.checkpoints import build_tiny_checkpoint

    folder = tmp_path_factory.mktemp("qwen2")
    checkpoint = build_tiny_checkpoint(folder / "hf", "qwen2", tied=False, sizes={"hidden_size": 256})
    return convert_checkpoint(checkpoint, folder / "qwen2-f32.gguf", outtype="f32").path


@pytest.mark.parametrize("model", ["smollm2_f16", "tiny_qwen2"])
def test_the_scaled_model_computes_the_same_function_and_no_damage_grows(model: str, request: pytest.FixtureRequest,
                                                                         tmp_path: Path) -> None:
    reference: Path = request.getfixturevalue(model)
    matrix = _matrix(reference, tmp_path)
    header = check_gguf(reference)
    groups = scaling_groups(header, reference.name)
    assert {group.name.split(".")[-1] for group in groups} == {"attn_norm", "ffn_norm", "ffn_up", "attn_v"}
    scales = search_scales(reference, matrix, preset_plan(reference, "Q4_0", matrix).types())
    assert all(scale.damage_after <= scale.damage_before for scale in scales)
    assert any(scale.alpha > 0 for scale in scales)
    assert sum(scale.damage_after for scale in scales) < sum(scale.damage_before for scale in scales)

    scaled = tmp_path / "scaled.gguf"
    write_scaled(reference, scaled, scales)
    before, after = _logits(reference), _logits(scaled)
    assert np.abs(after - before).max() <= 5e-3 * np.abs(before).max()
    assert (after.argmax(axis=1) == before.argmax(axis=1)).mean() >= 0.95

    reader = gguf.GGUFReader(scaled)
    changed = next(scale for scale in scales if scale.alpha > 0)
    consumer = changed.group.consumers[0]
    stored = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors if t.name == consumer}[consumer]
    original = {t.name: np.asarray(t.data, dtype=np.float32)
                for t in gguf.GGUFReader(reference).tensors if t.name == consumer}[consumer]
    columns = changed.group.columns(changed.scales)
    np.testing.assert_allclose(stored, original * columns, rtol=2e-3, atol=1e-6)
    rescaled = scaled_matrix(matrix, scales).entries[consumer].mean_squares()
    np.testing.assert_allclose(rescaled, matrix.entries[consumer].mean_squares() / columns**2, rtol=1e-5)


def qdesk(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qdesk", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_cli_awq_writes_an_ordinary_gguf_and_leaves_nothing_else(smollm2_f16: Path, tmp_path: Path) -> None:
    output = tmp_path / "awq.gguf"
    result = qdesk("quantize", smollm2_f16, "-o", output, "--preset", "Q4_0", "--awq", "--chunks", "2", "--ctx", "64")
    assert result.returncode == 0, result.stderr
    assert "activation-aware scaling" in result.stdout
    reader = gguf.GGUFReader(output)
    assert "inputs scaled" in str(reader.fields["qdesk.awq"].contents())
    assert sorted(t.name for t in reader.tensors) == sorted(t.name for t in gguf.GGUFReader(smollm2_f16).tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["awq.gguf"]


def test_cli_awq_without_an_importance_matrix_or_on_another_architecture_is_one_sentence(
        smollm2_f16: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    output = tmp_path / "never.gguf"
    result = qdesk("quantize", smollm2_f16, "-o", output, "--preset", "Q4_0", "--awq", "--imatrix", "none")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "--awq needs an importance matrix" in result.stderr
    assert list(tmp_path.iterdir()) == []

    from converters.writing.convert import convert_checkpoint
    from tests.builders.checkpoints import build_tiny_checkpoint

    folder = tmp_path_factory.mktemp("phi3")
    phi3 = convert_checkpoint(build_tiny_checkpoint(folder / "hf", "phi3"), folder / "phi3.gguf").path
    with pytest.raises(AwqError, match=r"is a phi3 model; quantize it without --awq\.$"):
        scaling_groups(check_gguf(phi3), phi3.name)
