"""Models llama.cpp would stop on (issue 21, item 1): refused with one sentence before anything loads them, and an
abort inside llama.cpp that gets past the checks is one sentence from a child process, never the caller's death."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from converters.core.errors import GGUFFileError, WorkerDied
from converters.core.hyperparameters import check_model_gguf
from converters.core.isolation import run_isolated
from tests.builders.bad_gguf import IMPOSSIBLE_HYPERPARAMETERS, rewrite_metadata
from tests.builders.child_work import evaluate_first_chunk

FAST_CASES = ("no-layers", "eps-nan")
"""The cases every CLI command is tried on in the fast suite; the slow suite tries them all."""


def qdesk(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qdesk", *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ), cwd=cwd)


@pytest.fixture(scope="module")
def bad_models(kquant_f16: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad-models")
    return {name: rewrite_metadata(kquant_f16, folder / f"{name}.gguf", changes)
            for name, changes in IMPOSSIBLE_HYPERPARAMETERS.items()}


@pytest.mark.parametrize("case", sorted(IMPOSSIBLE_HYPERPARAMETERS))
def test_the_check_names_the_impossible_setting(case: str, bad_models: dict[str, Path]) -> None:
    key = next(iter(IMPOSSIBLE_HYPERPARAMETERS[case]))
    with pytest.raises(GGUFFileError) as raised:
        check_model_gguf(bad_models[case])
    message = str(raised.value)
    assert key in message and "impossible settings" in message and "\n" not in message


def test_real_models_pass_the_check(kquant_f16: Path, smollm2_f16: Path, starter_gguf: Path) -> None:
    for path in (kquant_f16, smollm2_f16, starter_gguf):
        check_model_gguf(path)


@pytest.mark.parametrize("case", [pytest.param(case, marks=[] if case in FAST_CASES else [pytest.mark.slow])
                                  for case in sorted(IMPOSSIBLE_HYPERPARAMETERS)])
def test_every_command_refuses_the_model_in_one_sentence(case: str, bad_models: dict[str, Path],
                                                         tmp_path: Path) -> None:
    model = bad_models[case]
    before = model.read_bytes()
    commands = [
        ["calibrate", str(model), "-o", str(tmp_path / "m.imatrix.gguf"), "--chunks", "1", "--ctx", "64"],
        ["quantize", str(model), "-o", str(tmp_path / "q.gguf"), "--preset", "Q4_K_M", "--chunks", "1", "--ctx", "64"],
        ["quantize", str(model), "-o", str(tmp_path / "q.gguf"), "--preset", "Q4_K_M", "--imatrix", "none"],
        ["eval", "--ref", str(model), "--chunks", "1", "--ctx", "64", "--json"],
        ["info", str(model), "--json"],
    ]
    for command in commands:
        result = qdesk(*command, cwd=tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1, (command, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("qdesk: ") and "impossible settings" in lines[0], command
        assert result.stdout == "", command
    assert list(tmp_path.iterdir()) == []
    assert model.read_bytes() == before


def test_a_checkpoint_with_a_negative_norm_epsilon_is_not_converted(tmp_path: Path) -> None:
    from tests.builders.checkpoints import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint(tmp_path / "hf", "llama")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "rms_norm_eps": -1}))
    before = sorted(path.name for path in checkpoint.iterdir())
    for command in (["convert", str(checkpoint), "-o", str(tmp_path / "m.gguf")],
                    ["quantize", str(checkpoint), "-o", str(tmp_path / "q.gguf"), "--preset", "Q8_0",
                     "--imatrix", "none"]):
        result = qdesk(*command)
        assert result.returncode == 1, result.stderr
        assert result.stderr.count("\n") == 1 and "rms_epsilon is -1.0" in result.stderr
        assert result.stdout == ""
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hf"]
    assert sorted(path.name for path in checkpoint.iterdir()) == before


def test_an_abort_inside_llama_cpp_is_one_sentence_from_the_child(bad_models: dict[str, Path]) -> None:
    """Past the checks (this evaluates the model without them), llama.cpp's GGML_ASSERT ends the child only."""
    with pytest.raises(WorkerDied) as raised:
        run_isolated(evaluate_first_chunk, {"path": bad_models["eps-nan"]}, what="the evaluation")
    message = str(raised.value)
    assert message.startswith("llama.cpp stopped the evaluation on an internal check")
    assert "GGML_ASSERT(eps >= 0.0f) failed" in message and "\n" not in message



def test_per_layer_head_counts_of_a_hybrid_model_pass_and_impossible_ones_do_not() -> None:
    from converters.core.hyperparameters import hyperparameter_problems

    shapes = {"token_embd.weight": (256, 640), "blk.0.attn_q.weight": (256, 256), "blk.1.ssm_in.weight": (256, 512)}
    hybrid = {"general.architecture": "x", "x.block_count": 2, "x.embedding_length": 256,
              "x.attention.head_count": [4, 0], "x.attention.head_count_kv": [2, 0]}
    assert hyperparameter_problems(hybrid, shapes) == []
    assert hyperparameter_problems({**hybrid, "x.attention.head_count": [0, 0]}, shapes)
    assert hyperparameter_problems({**hybrid, "x.attention.head_count_kv": [3, 0]}, shapes)
    assert hyperparameter_problems({**hybrid, "general.type": "imatrix", "x.block_count": 0}, shapes) == []
