"""`qdesk eval`: perplexity, KL divergence and top-1 agreement against a reference, with the real starter model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converters.core.jobs import CancelToken, Progress
from qdesk.app.errors import Cancelled, UserError
from qdesk.evaluation.evaluate import evaluate, prepare_chunks
from qdesk.evaluation.text import EvalError, EvalText, TokenChunks, builtin_eval_texts, chunk_tokens, read_eval_texts
from tests.conftest import _cached_gguf

CTX = 128
CHUNKS = 3


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("QDESK_CACHE_DIR", str(folder))
    return folder / "reference-logits"


@pytest.fixture(scope="module")
def smollm2_f32(test_cache: Path, smollm2_hf: Path) -> Path:
    from converters.writing.convert import convert_checkpoint

    return _cached_gguf(test_cache, "smollm2-135m-f32.gguf",
                        lambda out: convert_checkpoint(smollm2_hf, out, outtype="f32"))


def qdesk(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "qdesk", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_a_model_against_itself_diverges_by_nothing(smollm2_f16: Path) -> None:
    result = evaluate(smollm2_f16, [smollm2_f16], ctx=CTX, chunks=CHUNKS, memory_ctx=None)
    (same,) = result.candidates
    assert same.divergence is not None
    assert same.divergence.mean < 1e-5 and same.divergence.max < 1e-4
    assert same.divergence.top1_agreement == 1.0
    assert same.divergence.delta_p_mean == 0.0
    assert same.ppl == pytest.approx(result.reference.ppl, rel=1e-9)
    assert result.scored_tokens == CHUNKS * (CTX - 1 - CTX // 2)


def test_a_quantized_variant_diverges_and_a_worse_one_more(smollm2_f16: Path, starter_gguf: Path,
                                                           tmp_path: Path) -> None:
    from converters.quantization.quantize import quantize

    worse = tmp_path / "q2_k.gguf"
    quantize(smollm2_f16, worse, "Q2_K", imatrix="none")
    result = evaluate(smollm2_f16, [starter_gguf, worse], ctx=CTX, chunks=CHUNKS, memory_ctx=None)
    close, far = result.candidates
    assert close.divergence is not None and far.divergence is not None
    assert 0 < close.divergence.mean < far.divergence.mean
    assert close.divergence.median <= close.divergence.p99 <= close.divergence.max
    assert 0 < far.divergence.top1_agreement < close.divergence.top1_agreement < 1
    assert far.ppl > result.reference.ppl
    assert close.sample_kld is not None and len(close.sample_kld) == len(result.sample_tokens) > 0


def test_reference_perplexity_agrees_with_transformers(smollm2_f32: Path, smollm2_hf: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    chunks = prepare_chunks(smollm2_f32, ctx=CTX, chunks=2)
    result = evaluate(smollm2_f32, [], ctx=CTX, chunks=2, memory_ctx=None)

    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf, torch_dtype=torch.float32)
    nll = []
    with torch.no_grad():
        for row in chunks.ids:
            logits = model(torch.tensor(row, dtype=torch.long)[None]).logits[0].double()
            log_probabilities = torch.log_softmax(logits, dim=-1)
            positions = torch.arange(chunks.first_scored, chunks.ctx - 1)
            nll.append(-log_probabilities[positions, torch.tensor(row[positions.numpy() + 1])].numpy())
    independent = math.exp(float(np.concatenate(nll).mean()))
    assert result.reference.ppl == pytest.approx(independent, rel=0.01)


def test_the_reference_is_cached_and_reused(smollm2_f16: Path, starter_gguf: Path, private_cache: Path) -> None:
    first = evaluate(smollm2_f16, [starter_gguf], ctx=CTX, chunks=CHUNKS, memory_ctx=None)
    assert not first.reference.cached
    (entry,) = private_cache.iterdir()
    assert len(list(entry.glob("chunk-*.npz"))) == CHUNKS and (entry / "manifest.json").is_file()
    second = evaluate(smollm2_f16, [starter_gguf], ctx=CTX, chunks=CHUNKS, memory_ctx=None)
    assert second.reference.cached
    assert second.reference.ppl == first.reference.ppl
    assert second.candidates[0].divergence == first.candidates[0].divergence

    damaged = sorted(entry.glob("chunk-*.npz"))[1]
    damaged.write_bytes(damaged.read_bytes()[:100])
    third = evaluate(smollm2_f16, [starter_gguf], ctx=CTX, chunks=CHUNKS, memory_ctx=None)
    assert not third.reference.cached
    assert third.candidates[0].divergence == first.candidates[0].divergence


def test_without_the_cache_nothing_stays_behind(smollm2_f16: Path, private_cache: Path) -> None:
    evaluate(smollm2_f16, [smollm2_f16], ctx=CTX, chunks=1, memory_ctx=None, cache=False)
    assert not private_cache.exists() or not any(private_cache.iterdir())


def test_cancel_stops_the_evaluation_and_keeps_finished_chunks(smollm2_f16: Path, starter_gguf: Path,
                                                               private_cache: Path) -> None:
    cancel = CancelToken()

    def progress(report: Progress) -> None:
        if "chunk 2/" in report.message and "reference" not in report.message:
            cancel.cancel()

    with pytest.raises(Cancelled):
        evaluate(smollm2_f16, [starter_gguf], ctx=CTX, chunks=CHUNKS, memory_ctx=None, progress=progress,
                 cancel=cancel)
    (entry,) = private_cache.iterdir()
    assert len(list(entry.glob("chunk-*.npz"))) == CHUNKS
    assert not list(entry.glob("*.partial"))


def test_a_different_vocabulary_gets_perplexity_but_no_divergence(smollm2_f16: Path, kquant_f16: Path) -> None:
    result = evaluate(smollm2_f16, [kquant_f16], ctx=64, chunks=2, memory_ctx=None)
    (other,) = result.candidates
    assert other.divergence is None and not other.same_vocab
    assert math.isfinite(other.ppl) and other.ppl > 1
    assert "different vocabulary" in other.notes[0]
    document = result.to_json()["candidates"][0]
    assert document["kld_mean"] is None and document["top1_agreement"] is None and document["same_vocab"] is False


def test_chunks_interleave_the_sources_and_open_with_bos() -> None:
    sources = [list(range(100, 100 + 40)), list(range(200, 200 + 25)), list(range(300, 305)), list(range(400, 412))]
    chunks = chunk_tokens(sources, 16, None, bos=1)
    assert isinstance(chunks, TokenChunks)
    firsts = [int(row[1]) for row in chunks.ids]
    assert firsts == [101, 201, 301, 117]
    assert (chunks.ids[:, 0] == 1).all()
    assert chunks.first_scored == 8 and chunks.scored_per_chunk == 7
    assert list(chunks.next_tokens(0)) == list(range(109, 116))
    assert chunk_tokens(sources, 16, 2, bos=None).count == 2


def test_text_too_short_or_empty_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(EvalError, match="less than one chunk of 16"):
        chunk_tokens([[1, 2, 3]], 16, None, bos=None)
    with pytest.raises(EvalError, match="--ctx must be at least"):
        chunk_tokens([[1, 2, 3]], 4, None, bos=None)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(UserError, match="is empty"):
        read_eval_texts([empty])


def test_the_builtin_text_is_held_out_from_calibration() -> None:
    from converters.core.paths import resources_dir

    calibration = "\n".join(path.read_text(encoding="utf-8")
                            for path in (resources_dir() / "calibration").glob("*.*"))
    texts = builtin_eval_texts()
    assert [text.name for text in texts][:2] == ["qdesk-builtin:prose", "qdesk-builtin:dialogue"]
    for text in texts:
        paragraphs = [part.strip() for part in text.text.split("\n\n") if len(part.strip()) > 200]
        assert paragraphs
        assert not [part for part in paragraphs if part in calibration]


def test_cli_eval_json_follows_the_contract(smollm2_f16: Path, starter_gguf: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    result = qdesk("eval", "--ref", str(smollm2_f16), str(starter_gguf), "--ctx", "64", "--chunks", "2", "--json",
                   "--report", str(report), env={"QDESK_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document["reference"]) >= {"path", "ppl"}
    assert document["text"]["chunks"] == 2 and document["text"]["ctx"] == 64 and document["text"]["tokens"] == 128
    (candidate,) = document["candidates"]
    for key in ("path", "bytes", "bpw", "ppl", "kld_mean", "kld_median", "kld_p99", "kld_max", "top1_agreement",
                "delta_p_mean"):
        assert key in candidate
    assert 0 <= candidate["top1_agreement"] <= 1 and candidate["kld_mean"] > 0
    assert document["reference"]["memory"]["n_ctx"] == 4096
    assert report.is_file() and report.with_suffix(".json").is_file()
    assert "<svg" in report.read_text()


def test_cli_eval_text_table(smollm2_f16: Path, starter_gguf: Path, tmp_path: Path) -> None:
    result = qdesk("eval", "--ref", str(smollm2_f16), str(starter_gguf), "--ctx", "64", "--chunks", "1",
                   "--memory-ctx", "0", env={"QDESK_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    assert "KLD mean" in result.stdout and starter_gguf.name in result.stdout


@pytest.mark.parametrize("problem", ["missing candidate", "not a gguf", "short text", "empty text"])
def test_cli_eval_bad_input_is_one_sentence(problem: str, smollm2_f16: Path, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("Just a few words." if problem == "short text" else "" if problem == "empty text" else "x " * 500)
    candidate = tmp_path / "missing.gguf"
    if problem == "not a gguf":
        candidate.write_text("hello")
    elif problem != "missing candidate":
        candidate = smollm2_f16
    result = qdesk("eval", "--ref", str(smollm2_f16), str(candidate), "--text", str(text), "--ctx", "64",
                   env={"QDESK_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qdesk: ") and "Traceback" not in result.stderr


def test_a_text_shorter_than_one_chunk_is_refused(smollm2_f16: Path) -> None:
    with pytest.raises(EvalError, match="less than one chunk"):
        evaluate(smollm2_f16, [], texts=[EvalText("tiny", "Hello there.")], ctx=64, memory_ctx=None)


def _suite(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_tasks_speed_and_memory_join_the_evaluation(smollm2_f16: Path, starter_gguf: Path, tmp_path: Path) -> None:
    suite = _suite(tmp_path, [
        json.dumps({"id": "capital", "prompt": "What is the capital of France? Answer in one word.",
                    "checker": {"type": "regex", "pattern": "paris", "flags": "i"}, "max_tokens": 16}),
        json.dumps({"id": "sum", "prompt": "What is 2 + 2? Answer with the number only.",
                    "checker": {"type": "regex", "pattern": "\\b4\\b"}, "max_tokens": 16}),
        json.dumps({"id": "code", "prompt": "Write a Python function that returns 1.",
                    "checker": {"type": "python_compiles"}, "max_tokens": 48}),
    ])
    result = evaluate(smollm2_f16, [starter_gguf], ctx=64, chunks=1, tasks=[str(suite)], speed=True,
                      memory_ctx=1024)
    reference_tasks = result.reference.tasks
    assert reference_tasks is not None and reference_tasks.items == 3
    (candidate,) = result.candidates
    assert candidate.tasks is not None
    verdict = candidate.tasks.to_json()
    assert verdict["recommendation"] in ("deploy", "investigate")
    assert verdict["reference_score"] == reference_tasks.score
    if verdict["degradation_pct"] is not None:
        assert (verdict["recommendation"] == "deploy") == (verdict["degradation_pct"] <= 5.0)
    for model in (result.reference, candidate):
        assert model.speed is not None and model.speed.prompt_tps > 0 and model.speed.generation_tps > 0
        assert model.memory is not None and model.memory.to_json()["n_ctx"] == 1024
    assert candidate.memory.total_bytes < result.reference.memory.total_bytes


def test_cli_a_malformed_task_line_stops_before_any_model_runs(smollm2_f16: Path, tmp_path: Path) -> None:
    suite = _suite(tmp_path, [
        json.dumps({"id": "ok", "prompt": "Say hi.", "checker": {"type": "contains", "value": "hi"}}),
        '{"id": "broken", "prompt": "no closing brace"',
    ])
    result = qdesk("eval", "--ref", str(smollm2_f16), "--tasks", str(suite), "--ctx", "64",
                   env={"QDESK_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "line 2" in lines[0]
    assert not (tmp_path / "cache").exists()


def test_cli_an_unknown_suite_names_the_builtin_ones(smollm2_f16: Path, tmp_path: Path) -> None:
    result = qdesk("eval", "--ref", str(smollm2_f16), "--tasks", "poetry", env={"QDESK_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 1
    assert "arithmetic" in result.stderr and len(result.stderr.strip().splitlines()) == 1
