"""Side-by-side compare and the chat, compare and models commands, on the real starter model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from converters.core.errors import UserError
from qdesk.chat.compare import compare, first_divergence
from qdesk.chat.engine import ChatResult, GenerationStats, LoadOptions, SamplingOptions
from tests.starter_prompts import CAPITAL_QUESTION, SYSTEM

GREEDY = SamplingOptions(temperature=0.0, max_tokens=24, seed=0)


def qdesk(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qdesk", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def answer(text: str, ids: tuple[int, ...]) -> ChatResult:
    return ChatResult(text, ids, GenerationStats(3, len(ids), 0.1, 10.0, 0.5, "stop", 0))


def test_first_divergence() -> None:
    same = first_divergence(answer("Paris.", (1, 2, 3)), answer("Paris.", (1, 2, 3)))
    assert same is None
    split = first_divergence(answer("Paris is big.", (1, 2, 3, 4)), answer("Paris was old.", (1, 2, 7, 8)))
    assert split is not None and split.token_index == 2
    assert split.common_text == "Paris " and split.this_continues == "was old."
    longer = first_divergence(answer("Paris", (1,)), answer("Paris!", (1, 5)))
    assert longer is not None and longer.token_index == 1


def test_same_variant_twice_gives_the_same_answer(starter_gguf: Path, tmp_path: Path) -> None:
    twin = tmp_path / "twin.gguf"
    shutil.copyfile(starter_gguf, twin)
    result = compare([starter_gguf, twin], CAPITAL_QUESTION, system=SYSTEM, sampling=GREEDY,
                     load=LoadOptions(n_ctx=256))
    first, second = result.answers
    assert "Paris" in first.text and first.text == second.text
    assert second.divergence is None and first.result is not None and second.result is not None
    assert first.result.token_ids == second.result.token_ids
    document = result.to_json()
    assert [v["name"] for v in document["variants"]] == [starter_gguf.name, "twin.gguf"]
    assert document["variants"][0]["generated_tokens"] > 0


def test_a_broken_variant_fails_alone(starter_gguf: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(starter_gguf.read_bytes()[:4096])
    result = compare([starter_gguf, broken], "Say hi.", system=SYSTEM, sampling=GREEDY, load=LoadOptions(n_ctx=256))
    assert result.answers[0].result is not None and result.answers[0].error is None
    assert result.answers[1].result is None and "truncated" in (result.answers[1].error or "")


def test_compare_refuses_bad_requests(starter_gguf: Path) -> None:
    with pytest.raises(UserError, match="1 to 4"):
        compare([starter_gguf] * 5, "Hi")
    with pytest.raises(UserError, match="empty"):
        compare([starter_gguf], "  ")


@pytest.mark.slow
def test_cli_chat_compare_and_models(starter_gguf: Path, tmp_path: Path) -> None:
    chat = qdesk("chat", str(starter_gguf), "--prompt", CAPITAL_QUESTION, "--system", SYSTEM,
                 "--temp", "0", "--max-tokens", "24", "--ctx", "256")
    assert chat.returncode == 0, chat.stderr
    assert "Paris" in chat.stdout

    compared = qdesk("compare", str(starter_gguf), str(starter_gguf), "--prompt", CAPITAL_QUESTION,
                     "--system", SYSTEM, "--max-tokens", "16", "--ctx", "256", "--json")
    assert compared.returncode == 0, compared.stderr
    document = json.loads(compared.stdout)
    assert len(document["variants"]) == 2 and "Paris" in document["variants"][0]["answer"]
    assert qdesk("compare", str(starter_gguf), "--prompt", "Hi").returncode == 2

    models = {"QDESK_MODELS_DIR": str(tmp_path / "models")}
    listed = qdesk("models", "list", "--json", env=models)
    assert listed.returncode == 0, listed.stderr
    assert any(entry["path"] == str(starter_gguf) for entry in json.loads(listed.stdout))
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("hello")
    refused = qdesk("models", "import", str(not_gguf), env=models)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
