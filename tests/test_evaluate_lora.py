"""`qdesk eval --lora`: LoRA adapters applied to the reference and to every candidate, with the real starter model
and an adapter PEFT made for it (`smollm2_lora` in tests/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qdesk.chat.lora import AdapterError, LoraChoice
from qdesk.evaluation.evaluate import Evaluation, evaluate
from qdesk.evaluation.table import render_evaluation

CTX = 128
CHUNKS = 1


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("QDESK_CACHE_DIR", str(folder))
    return folder / "reference-logits"


def qdesk(*args: str | Path, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qdesk", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "QDESK_CACHE_DIR": str(cache)})


def measured(reference: Path, candidates: list[Path], *loras: LoraChoice, cache: bool = True) -> Evaluation:
    return evaluate(reference, candidates, ctx=CTX, chunks=CHUNKS, memory_ctx=None, cache=cache, loras=loras)


@pytest.mark.slow
def test_an_adapter_at_scale_zero_changes_nothing_and_at_one_changes_reference_and_candidate(
        smollm2_f16: Path, starter_gguf: Path, smollm2_lora: Path) -> None:
    plain = measured(smollm2_f16, [starter_gguf], cache=False)
    switched_off = measured(smollm2_f16, [starter_gguf], LoraChoice(smollm2_lora, 0.0), cache=False)
    assert switched_off.reference.ppl == plain.reference.ppl
    assert switched_off.candidates[0].ppl == plain.candidates[0].ppl
    assert switched_off.candidates[0].divergence == plain.candidates[0].divergence

    adapted = measured(smollm2_f16, [starter_gguf], LoraChoice(smollm2_lora), cache=False)
    (candidate,), (plain_candidate,) = adapted.candidates, plain.candidates
    assert adapted.reference.ppl != pytest.approx(plain.reference.ppl, rel=0.01)
    assert candidate.ppl != pytest.approx(plain_candidate.ppl, rel=0.01)
    assert candidate.divergence is not None and plain_candidate.divergence is not None
    # Both sides adapted: quantization's cost stays of the same order. Had only the reference been adapted, the
    # candidate would be as far from it as the adapter moves the model.
    assert 0 < candidate.divergence.mean < 3 * plain_candidate.divergence.mean
    assert adapted.to_json()["loras"] == [{"path": str(smollm2_lora), "scale": 1.0}]
    assert f"LoRA adapters on every model: {smollm2_lora.name}\n" in render_evaluation(adapted)
    assert plain.to_json()["loras"] == [] and "LoRA" not in render_evaluation(plain)


def test_the_reference_cache_keeps_adapted_and_plain_references_apart(smollm2_f16: Path, smollm2_lora: Path,
                                                                      private_cache: Path) -> None:
    plain = measured(smollm2_f16, [])
    adapted = measured(smollm2_f16, [], LoraChoice(smollm2_lora))
    assert not adapted.reference.cached and adapted.reference.ppl != plain.reference.ppl
    again = measured(smollm2_f16, [], LoraChoice(smollm2_lora))
    assert again.reference.cached and again.reference.ppl == adapted.reference.ppl
    halved = measured(smollm2_f16, [], LoraChoice(smollm2_lora, 0.5))
    assert not halved.reference.cached and halved.reference.ppl not in (plain.reference.ppl, adapted.reference.ppl)
    plain_again = measured(smollm2_f16, [])
    assert plain_again.reference.cached and plain_again.reference.ppl == plain.reference.ppl
    manifests = [json.loads((entry / "manifest.json").read_text()) for entry in private_cache.iterdir()]
    assert sorted(str(manifest["loras"]) for manifest in manifests) == sorted(
        str(loras) for loras in ([], [[str(smollm2_lora), 1.0]], [[str(smollm2_lora), 0.5]]))


def test_cli_eval_applies_the_adapter_and_reports_it(smollm2_f16: Path, starter_gguf: Path, smollm2_lora: Path,
                                                     tmp_path: Path) -> None:
    run = qdesk("eval", "--ref", smollm2_f16, starter_gguf, "--lora", f"{smollm2_lora}:0.5", "--ctx", CTX,
                "--chunks", CHUNKS, "--memory-ctx", "0", "--json", cache=tmp_path / "cli-cache")
    assert run.returncode == 0, run.stderr
    document = json.loads(run.stdout)
    assert document["loras"] == [{"path": str(smollm2_lora), "scale": 0.5}]
    (candidate,) = document["candidates"]
    assert candidate["kld_mean"] > 0 and 0 < candidate["top1_agreement"] < 1
    assert document["reference"]["ppl"] != pytest.approx(measured(smollm2_f16, []).reference.ppl, rel=0.01)


def test_cli_eval_refuses_an_adapter_of_another_shape_before_loading_anything(
        smollm2_f16: Path, starter_gguf: Path, tiny_llama_lora: Path, tmp_path: Path) -> None:
    report = tmp_path / "out" / "report.html"
    report.parent.mkdir()
    run = qdesk("eval", "--ref", smollm2_f16, starter_gguf, "--lora", tiny_llama_lora, "--report", report,
                cache=tmp_path / "cli-cache")
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.startswith(f"qdesk: {tiny_llama_lora.name} does not fit {smollm2_f16.name}: it adapts blk.0.")
    assert run.stderr.endswith("; choose the adapter made for this base.\n") and run.stderr.count("\n") == 1
    assert list(report.parent.iterdir()) == []
    assert not (tmp_path / "cli-cache").exists()


def test_an_adapter_is_checked_against_every_candidate(smollm2_f16: Path, kquant_f16: Path, smollm2_lora: Path,
                                                       private_cache: Path) -> None:
    with pytest.raises(AdapterError, match=rf"^{smollm2_lora.name} does not fit {kquant_f16.name}: "):
        measured(smollm2_f16, [kquant_f16], LoraChoice(smollm2_lora))
    assert not private_cache.exists()


def test_speed_is_measured_with_the_adapters(starter_gguf: Path) -> None:
    from native.errors import EvaluationFailed
    from native.speed import measure_speed

    with pytest.raises(EvaluationFailed, match=f"could not load the LoRA adapter {starter_gguf.name}"):
        measure_speed(starter_gguf, prompt_tokens=8, generated_tokens=2, repetitions=1, loras=((starter_gguf, 1.0),))


def test_tasks_are_answered_with_the_adapters(starter_gguf: Path, smollm2_lora: Path, tmp_path: Path) -> None:
    from qdesk.evaluation.tasks import run_tasks

    suite = tmp_path / "story.jsonl"
    suite.write_text(json.dumps({"id": "story", "prompt": "Tell me a story about a lighthouse.", "max_tokens": 12,
                                 "checker": {"type": "contains", "value": "lighthouse"}}) + "\n")

    def answer(*loras: LoraChoice) -> str:
        return run_tasks(starter_gguf, [suite], n_ctx=256, n_threads=2, loras=loras).results[0].answer

    assert answer(LoraChoice(smollm2_lora)) != answer()
