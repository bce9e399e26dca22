"""The engine with the real starter model: workers, streaming, stop, concurrency, crashes and bad input."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from converters.core.errors import GGUFFileError
from converters.core.jobs import CancelToken
from qdesk.chat.engine import (
    EngineError,
    LoadedModel,
    LoadOptions,
    ModelCrashed,
    ModelFileError,
    SamplingOptions,
    TokenEvent,
    load_model,
)
from tests.starter_prompts import CAPITAL_QUESTION, SYSTEM

CAPITAL = [{"role": "user", "content": CAPITAL_QUESTION}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
GREEDY = SamplingOptions(temperature=0.0, max_tokens=24)
STOP_DEADLINE_S = 5.0
"""A working stop ends a 900-token answer at once; the bound only catches a stop that is ignored until the end.
The latencies (about 10 ms on a quiet machine) are printed, not judged: shared CI machines are too noisy."""


def worker_children() -> list[int]:
    """Live engine workers started by this test process (read from /proc: no extra dependency)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == os.getpid() and b"qdesk.chat.engine_worker" in cmdline and " Z " not in stat[stat.rfind(")"):][:4]:
            found.append(int(entry.name))
    return found


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def no_leftover_workers():
    before = set(worker_children())
    yield
    assert set(worker_children()) <= before, "a worker process outlived its test"


@pytest.fixture(scope="module")
def starter_model(starter_gguf: Path):
    with load_model(starter_gguf, LoadOptions(n_ctx=1024)) as model:
        yield model


def test_greedy_answer_is_sensible_and_reproducible(starter_gguf: Path, starter_model: LoadedModel) -> None:
    first = starter_model.chat(CAPITAL, GREEDY, system=SYSTEM)
    again = starter_model.chat(CAPITAL, GREEDY, system=SYSTEM)
    assert "Paris" in first.text
    assert first.token_ids == again.token_ids and first.text == again.text
    with load_model(starter_gguf, LoadOptions(n_ctx=1024)) as fresh:
        assert fresh.chat(CAPITAL, GREEDY, system=SYSTEM).token_ids == first.token_ids


def test_seeded_sampling_is_reproducible(starter_model: LoadedModel) -> None:
    warm = SamplingOptions(temperature=1.0, max_tokens=16, seed=7)
    assert starter_model.chat(STORY, warm).token_ids == starter_model.chat(STORY, warm).token_ids


def test_streamed_events_match_the_result_and_stats_are_consistent(starter_model: LoadedModel) -> None:
    events: list[TokenEvent] = []
    result = starter_model.chat(STORY, SamplingOptions(temperature=0.0, max_tokens=20), system=SYSTEM,
                                on_token=events.append)
    stats = result.stats
    assert "".join(event.text for event in events) == result.text
    assert [event.index for event in events] == list(range(len(events)))
    assert stats.generated_tokens == len(events) == len(result.token_ids) == 20
    assert stats.stop_reason == "length"
    assert stats.prompt_tokens > 0
    assert 0 < stats.time_to_first_token_s < stats.total_s
    assert stats.tokens_per_second > 0
    assert stats.memory_bytes > 10_000_000


def test_end_of_turn_stops_with_reason_stop(starter_model: LoadedModel) -> None:
    result = starter_model.chat(CAPITAL, SamplingOptions(temperature=0.0, max_tokens=200), system=SYSTEM)
    assert result.stats.stop_reason == "stop"
    assert 0 < result.stats.generated_tokens < 200


def _stop_after_tokens(model: LoadedModel, request_stop, tokens_before_stop: int = 5) -> tuple[float, object]:
    """Start a long answer on a thread, call `request_stop` after a few tokens; seconds until chat() returned."""
    started = threading.Event()
    outcome: dict[str, object] = {}

    def on_token(event: TokenEvent) -> None:
        if event.index + 1 == tokens_before_stop:
            started.set()

    def run() -> None:
        outcome["result"] = model.chat(STORY, SamplingOptions(temperature=0.0, max_tokens=900), on_token=on_token)
        outcome["returned_at"] = time.perf_counter()

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(30)
    stop_at = time.perf_counter()
    request_stop()
    thread.join(10)
    assert not thread.is_alive()
    return float(outcome["returned_at"]) - stop_at, outcome["result"]  # type: ignore[arg-type]


def test_stop_ends_the_answer_promptly(starter_model: LoadedModel) -> None:
    latencies = []
    for tokens_before_stop in (1, 5, 17, 40):
        latency, result = _stop_after_tokens(starter_model, starter_model.stop, tokens_before_stop)
        assert result.stats.stop_reason == "cancelled"  # type: ignore[attr-defined]
        assert result.stats.generated_tokens < 900  # type: ignore[attr-defined]
        latencies.append(latency)
    print(f"stop latencies: {', '.join(f'{latency * 1000:.1f}' for latency in latencies)} ms")
    assert max(latencies) < STOP_DEADLINE_S
    assert starter_model.chat(CAPITAL, GREEDY, system=SYSTEM).stats.stop_reason != "cancelled"


def test_cancel_token_ends_the_answer_promptly(starter_model: LoadedModel) -> None:
    cancel = CancelToken()
    started = threading.Event()
    outcome: dict[str, object] = {}

    def run() -> None:
        outcome["result"] = starter_model.chat(STORY, SamplingOptions(temperature=0.0, max_tokens=900), cancel=cancel,
                                               on_token=lambda event: started.set())
        outcome["returned_at"] = time.perf_counter()

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(30)
    stop_at = time.perf_counter()
    cancel.cancel()
    thread.join(10)
    latency = float(outcome["returned_at"]) - stop_at  # type: ignore[arg-type]
    print(f"cancel-token latency: {latency * 1000:.1f} ms")
    assert outcome["result"].stats.stop_reason == "cancelled"  # type: ignore[attr-defined]
    assert latency < STOP_DEADLINE_S


def test_stop_without_a_generation_is_harmless(starter_model: LoadedModel) -> None:
    starter_model.stop()
    assert starter_model.chat(CAPITAL, GREEDY, system=SYSTEM).stats.stop_reason != "cancelled"


def test_two_models_generate_at_the_same_time(starter_gguf: Path, no_leftover_workers: None) -> None:
    sampling = SamplingOptions(temperature=0.0, max_tokens=48)
    options = LoadOptions(n_ctx=512, n_threads=1)
    windows: dict[int, list[float]] = {0: [], 1: []}
    results: dict[int, object] = {}
    with load_model(starter_gguf, options) as first, load_model(starter_gguf, options) as second:
        assert first.pid != second.pid

        def run(index: int, model: LoadedModel) -> None:
            results[index] = model.chat(STORY, sampling, on_token=lambda _: windows[index].append(time.perf_counter()))

        threads = [threading.Thread(target=run, args=(i, m)) for i, m in enumerate((first, second))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert len(results) == 2
    assert results[0].token_ids == results[1].token_ids  # type: ignore[attr-defined]
    assert all(len(times) == 48 for times in windows.values())
    overlap = min(windows[0][-1], windows[1][-1]) - max(windows[0][0], windows[1][0])
    print(f"concurrent generation overlap: {overlap:.3f} s of {windows[0][-1] - windows[0][0]:.3f} s")
    assert overlap > 0, "the two answers were generated one after the other"


def test_close_ends_the_worker_and_is_idempotent(starter_gguf: Path, no_leftover_workers: None) -> None:
    model = load_model(starter_gguf, LoadOptions(n_ctx=256))
    pid = model.pid
    assert model.alive
    model.close()
    model.close()
    assert not model.alive and process_gone(pid)
    with pytest.raises(EngineError, match="closed"):
        model.chat(CAPITAL, GREEDY)


def test_auto_gpu_layers_loads_on_this_machine(starter_gguf: Path, no_leftover_workers: None) -> None:
    with load_model(starter_gguf, LoadOptions(n_ctx=256, n_gpu_layers="auto")) as model:
        assert "Paris" in model.chat(CAPITAL, GREEDY, system=SYSTEM).text


def test_killed_worker_is_reported_and_others_keep_working(starter_gguf: Path, starter_model: LoadedModel,
                                                           no_leftover_workers: None) -> None:
    victim = load_model(starter_gguf, LoadOptions(n_ctx=512))
    pid = victim.pid

    def kill_once(event: TokenEvent) -> None:
        if event.index == 3:
            os.kill(pid, signal.SIGKILL)

    with pytest.raises(ModelCrashed, match="SIGKILL"):
        victim.chat(STORY, SamplingOptions(temperature=0.0, max_tokens=500), on_token=kill_once)
    assert not victim.alive and process_gone(pid)
    with pytest.raises(EngineError, match="load it again"):
        victim.chat(CAPITAL, GREEDY)
    victim.close()
    assert "Paris" in starter_model.chat(CAPITAL, GREEDY, system=SYSTEM).text


def test_abort_inside_the_worker_is_reported(starter_gguf: Path, no_leftover_workers: None) -> None:
    victim = load_model(starter_gguf, LoadOptions(n_ctx=512))
    os.kill(victim.pid, signal.SIGABRT)
    with pytest.raises(ModelCrashed, match="SIGABRT"):
        victim.chat(CAPITAL, GREEDY)
    victim.close()


def test_a_file_that_is_not_gguf_is_refused_before_any_worker(tmp_path: Path, no_leftover_workers: None) -> None:
    bogus = tmp_path / "notes.gguf"
    bogus.write_text("just some text, not a model\n" * 10)
    with pytest.raises(ModelFileError, match="not a GGUF") as caught:
        load_model(bogus)
    assert isinstance(caught.value, GGUFFileError) and isinstance(caught.value, EngineError)


def test_a_truncated_gguf_is_refused(tmp_path: Path, starter_gguf: Path, no_leftover_workers: None) -> None:
    truncated = tmp_path / "half.gguf"
    with starter_gguf.open("rb") as source:
        truncated.write_bytes(source.read(starter_gguf.stat().st_size // 2))
    with pytest.raises(ModelFileError, match=r"truncated|ends|damaged"):
        load_model(truncated)


def test_an_unknown_architecture_is_a_clear_error(tmp_path: Path, no_leftover_workers: None) -> None:
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "unknown-arch.gguf"
    writer = GGUFWriter(path, "qdesk-unknown")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(EngineError, match=r"cannot run this model's architecture \(qdesk-unknown\)") as caught:
        load_model(path)
    assert not isinstance(caught.value, ModelCrashed)


def test_a_context_too_large_for_memory_asks_to_lower_it(starter_gguf: Path, no_leftover_workers: None) -> None:
    with pytest.raises(EngineError, match="lower the context length"):
        load_model(starter_gguf, LoadOptions(n_ctx=200_000_000))


def test_a_model_removed_while_loaded_keeps_answering(tmp_path: Path, starter_gguf: Path,
                                                      no_leftover_workers: None) -> None:
    copy = tmp_path / "doomed.gguf"
    shutil.copyfile(starter_gguf, copy)
    with load_model(copy, LoadOptions(n_ctx=256)) as model:
        copy.unlink()
        assert "Paris" in model.chat(CAPITAL, GREEDY, system=SYSTEM).text
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(copy)


def test_bad_options_are_refused_before_any_worker(starter_gguf: Path, no_leftover_workers: None) -> None:
    with pytest.raises(EngineError, match="GPU layers"):
        load_model(starter_gguf, LoadOptions(n_gpu_layers="most"))
    with pytest.raises(EngineError, match="context length"):
        load_model(starter_gguf, LoadOptions(n_ctx=0))
    with pytest.raises(EngineError, match="KV cache type"):
        load_model(starter_gguf, LoadOptions(kv_type="q3_k"))


@pytest.mark.parametrize("kv_type", ["q8_0", "q4_0"])
def test_a_quantized_kv_cache_answers_and_takes_less_memory(starter_gguf: Path, kv_type: str,
                                                            no_leftover_workers: None) -> None:
    answers = {}
    for cache in ("f16", kv_type):
        with load_model(starter_gguf, LoadOptions(n_ctx=8192, kv_type=cache)) as model:
            answers[cache] = model.chat(CAPITAL, GREEDY, system=SYSTEM)
    assert answers[kv_type].text.strip()
    if kv_type == "q8_0":  # a 4-bit cache visibly hurts a model this small; an 8-bit one should not
        assert "Paris" in answers[kv_type].text
    assert answers[kv_type].stats.memory_bytes < answers["f16"].stats.memory_bytes


def test_a_conversation_longer_than_the_context_is_an_error(starter_gguf: Path, no_leftover_workers: None) -> None:
    with load_model(starter_gguf, LoadOptions(n_ctx=32)) as model:
        with pytest.raises(EngineError, match="longer context"):
            model.chat([{"role": "user", "content": "bread " * 100}], GREEDY)
        assert model.alive


def test_inconsistent_hyperparameters_are_a_clear_error(tmp_path: Path, starter_gguf: Path,
                                                        no_leftover_workers: None) -> None:
    import struct

    key = b"llama.attention.head_count"
    data = bytearray(starter_gguf.read_bytes())
    value_at = data.find(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 4  # after the key and its u32 type
    struct.pack_into("<I", data, value_at, 7)  # 576 / 7 heads: the rotary size no longer matches
    damaged = tmp_path / "seven-heads.gguf"
    damaged.write_bytes(data)
    with pytest.raises(ModelFileError, match=r"seven-heads\.gguf has impossible settings: .*\(7\)") as caught:
        load_model(damaged)
    assert not isinstance(caught.value, ModelCrashed)


@pytest.mark.parametrize("line", [b"\n", b"[1]\n", b'{"id": 3}\n'])
def test_a_worker_given_a_broken_command_exits_instead_of_hanging(line: bytes) -> None:
    result = subprocess.run([sys.executable, "-m", "qdesk.chat.engine_worker"], input=line, capture_output=True,
                            timeout=60)
    assert result.returncode == 2
    assert b"not a command" in result.stderr


def test_plain_completion_and_next_token_logits(starter_model: LoadedModel) -> None:
    result = starter_model.complete("The capital of France is", GREEDY)
    assert result.stats.prompt_tokens >= 5 and result.token_ids and result.stats.stop_reason in ("stop", "length")
    logits = starter_model.next_token_logits(list(result.token_ids[:4]))
    assert logits.dtype.name == "float32" and logits.ndim == 1 and logits.size > 1000
    assert float(abs(logits).max()) > 1.0
    with pytest.raises(EngineError, match="do not fit"):
        starter_model.next_token_logits([1] * 5000)
