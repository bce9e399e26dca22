"""Error feedback at any size: the inputs' rows spilled to disk, covariances formed one input at a time, results
cached; files that do not match, cancels at every stage and crashed jobs leave nothing behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import psutil
import pytest

from converters.calibration.calibrate import builtin_texts, calibration_chunks
from converters.core.errors import Cancelled, UserError
from converters.core.jobs import CancelToken, Progress
from converters.mix.allocate import MixBudget
from converters.mix.feedback import (
    FEEDBACK_METHOD,
    RATIO_SAMPLE_ROWS,
    FeedbackError,
    collect_input_covariances,
    feedback_sensitivity,
)
from converters.mix.feedback_cache import FeedbackCache
from converters.mix.feedback_inputs import SPILL_PREFIX, CalibrationInputs, spill_bytes
from converters.mix.sensitivity import Sensitivity, TensorSensitivity, TypeCost
from converters.quantization.plan import QuantPlan
from converters.quantization.quantize import quantize
from native.activations import ModelEvaluator
from native.errors import Stopped
from native.input_spill import InputSpillWriter, SpilledInputs, SpillMismatch, spill_tag

PREVIOUS = b"the previous output, which must survive"


@pytest.fixture
def own_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty `QDESK_CACHE_DIR`, so that nothing is reused from other tests."""
    folder = tmp_path_factory.mktemp("qdesk-cache")
    monkeypatch.setenv("QDESK_CACHE_DIR", str(folder))
    return folder


def _spills(folder: Path) -> list[Path]:
    return [entry for entry in folder.iterdir() if entry.name.startswith(SPILL_PREFIX)]


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    return {t.name: bytes(t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


def test_spilled_rows_keep_float16_precision_at_any_magnitude(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    rows = rng.standard_normal((40, 96)).astype(np.float32)
    rows[0] *= 1e6  # would overflow float16
    rows[1] *= 1e-7  # would vanish into float16's subnormals
    rows[2] = 0
    rows[3, 5] = 3e5
    writer = InputSpillWriter(tmp_path, spill_tag("model a"))
    writer.add("input", rows[:30])
    writer.commit()
    writer.add("input", rows[30:])
    writer.add("input", rng.standard_normal((7, 96)).astype(np.float32))
    writer.discard()  # a stopped chunk: its rows leave no trace
    writer.add("input", rows[30:])
    writer.commit()
    writer.close({"blk.0.attn_q.weight": "input", "blk.0.attn_k.weight": "input"}, chunks=2, tokens=40)

    spilled = SpilledInputs(tmp_path, spill_tag("model a"))
    (entry,) = spilled.inputs
    assert entry.rows == 40 and entry.weights == ("blk.0.attn_k.weight", "blk.0.attn_q.weight")
    read = np.concatenate([block.numpy() for block in spilled.row_blocks(entry)])
    largest = np.abs(rows).max(axis=1, keepdims=True)
    assert np.all(np.abs(read - rows) <= 2.0**-11 * np.maximum(np.abs(rows), largest * 2.0**-14))
    assert np.all(read[2] == 0) and np.isfinite(read).all()
    exact = rows.astype(np.float64).T @ rows.astype(np.float64)
    np.testing.assert_allclose(spilled.covariance(entry), exact, rtol=2e-3, atol=1e-3 * np.abs(exact).max())


def test_spill_files_of_another_model_or_damaged_are_refused(tmp_path: Path) -> None:
    writer = InputSpillWriter(tmp_path, spill_tag("model a"))
    writer.add("input", np.ones((4, 32), dtype=np.float32))
    writer.commit()
    writer.close({"w": "input"}, chunks=1, tokens=4)
    with pytest.raises(SpillMismatch, match="another model"):
        SpilledInputs(tmp_path, spill_tag("model b"))
    spilled = SpilledInputs(tmp_path, spill_tag("model a"))
    (entry,) = spilled.inputs
    with entry.path.open("r+b") as file:
        file.truncate(entry.path.stat().st_size - 2)
    with pytest.raises(SpillMismatch, match="promises"):
        spilled.covariance(entry)
    other = tmp_path / "other"
    other.mkdir()
    writer = InputSpillWriter(other, spill_tag("model b"))
    writer.add("input", np.ones((4, 32), dtype=np.float32))
    writer.commit()
    writer.close({"w": "input"}, chunks=1, tokens=4)
    shutil.copy(other / entry.path.name, entry.path)  # the manifest is model a's, the file model b's
    with pytest.raises(SpillMismatch, match="another model or input"):
        spilled.covariance(entry)


def test_the_starter_models_spill_gives_the_covariances_collected_in_memory(smollm2_f16: Path, tmp_path: Path) -> None:
    tag = spill_tag("starter")
    writer = InputSpillWriter(tmp_path, tag)
    stop = {"now": False}
    with ModelEvaluator(smollm2_f16, n_ctx=128, covariance_chunks=2, spill=writer,
                        should_stop=lambda: stop["now"]) as evaluator:
        chunks = calibration_chunks(evaluator, builtin_texts(), 128, 3)
        evaluator.evaluate_chunk(chunks[0])
        stop["now"] = True
        with pytest.raises(Stopped):
            evaluator.evaluate_chunk(chunks[1])  # stopped: its rows are cut away again
        stop["now"] = False
        evaluator.evaluate_chunk(chunks[1])
        evaluator.evaluate_chunk(chunks[2])  # past covariance_chunks: not spilled
        evaluator.finish_spill()
    with ModelEvaluator(smollm2_f16, n_ctx=128, covariance_chunks=2) as evaluator:
        for chunk in chunks[:2]:
            evaluator.evaluate_chunk(chunk)
        in_memory = evaluator.stats().covariances

    spilled = SpilledInputs(tmp_path, tag)
    assert spilled.chunks == 2 and spilled.tokens == 2 * 128
    assert len(spilled.inputs) == 30 * 4 + 1  # per layer: q/k/v, attn_output, gate/up, down; and the output's
    assert set(spilled.weights()) == set(in_memory)
    assert spilled.input_of("blk.3.attn_q.weight") is spilled.input_of("blk.3.attn_v.weight")
    assert spilled.input_of("blk.3.ffn_gate.weight") is spilled.input_of("blk.3.ffn_up.weight")
    assert spilled.input_of("token_embd.weight").n_in == 576  # the tied output product's input: the final norm's
    for name in ("blk.0.attn_q.weight", "blk.29.ffn_down.weight", "token_embd.weight", "blk.3.attn_output.weight"):
        entry = spilled.input_of(name)
        assert entry.rows == 256
        expected = in_memory[name]
        np.testing.assert_allclose(spilled.covariance(entry), expected, atol=2e-3 * np.abs(expected).max(),
                                   err_msg=name)


def _carrier(reference: Path, types: tuple[str, ...]) -> Sensitivity:
    """A sensitivity whose every matrix may take `types` (unit damage): what the ratios scale."""
    reader = gguf.GGUFReader(reference)
    tensors = tuple(
        TensorSensitivity(t.name, tuple(int(d) for d in t.shape), "f16", "all", 1.0,
                          tuple(TypeCost(type_, 1, 1.0) for type_ in types))
        for t in reader.tensors if len(t.shape) == 2 and not t.name.endswith("norm.weight"))
    return Sensitivity(tensors, {}, {}, 0.0, 0, 0.0)


def test_ratios_from_the_spill_are_measured_on_held_out_rows_and_never_promise_more_than_ggml(
        kquant_f16: Path, tmp_path: Path, own_cache: Path) -> None:
    carrier = _carrier(kquant_f16, ("q4_K", "q8_0"))
    with ModelEvaluator(kquant_f16, n_ctx=128, covariance_chunks=2) as evaluator:
        for chunk in calibration_chunks(evaluator, builtin_texts(), 128, 2):
            evaluator.evaluate_chunk(chunk)
        in_memory = evaluator.stats().covariances
    in_sample = feedback_sensitivity(carrier, kquant_f16, in_memory, None)

    stages: list[str] = []
    with collect_input_covariances(kquant_f16, chunks=2, ctx=128, scratch=tmp_path) as inputs:
        spilled = feedback_sensitivity(carrier, kquant_f16, inputs, None,
                                       progress=lambda step: stages.append(step.message))
        assert len(_spills(tmp_path)) == 1
    assert _spills(tmp_path) == []
    assert stages.count("collecting inputs") == 3 and "forming input covariances" in stages
    held = {(t.name, o.type): o.damage for t in spilled.tensors for o in t.options}
    fitted = {(t.name, o.type): o.damage for t in in_sample.tensors for o in t.options}
    assert held.keys() == fitted.keys()
    assert all(ratio <= 1.0 for ratio in held.values())  # where feedback does not pay, ggml's bytes are kept
    assert np.mean(list(held.values())) > 1.5 * np.mean(list(fitted.values()))  # in-sample promises too much
    attention = [ratio for (name, _), ratio in held.items() if "attn_q" in name]
    assert np.median(attention) < 0.9  # 256-wide inputs on 192 fitted tokens: feedback still pays on new text
    assert all(held[(f"blk.{layer}.ffn_down.weight", "q4_K")] > 0.9 for layer in range(1, 8))  # 512 wide: barely

    again: list[str] = []  # a second measurement is read from the cache: no pass over the text
    with collect_input_covariances(kquant_f16, chunks=2, ctx=128, scratch=tmp_path) as inputs:
        cached = feedback_sensitivity(carrier, kquant_f16, inputs, None, progress=lambda s: again.append(s.message))
    assert cached == spilled and "collecting inputs" not in again


def test_a_mix_uses_feedback_by_default_and_leaves_no_scratch(kquant_f16: Path, tmp_path: Path) -> None:
    stages: list[str] = []
    result = quantize(kquant_f16, tmp_path / "mix.gguf", MixBudget(like="Q4_K_M"), imatrix="auto", chunks=2, ctx=128,
                      mix_effort="fast", progress=lambda step: stages.append(step.message))
    assert result.plan.encoder == "feedback"
    assert gguf.GGUFReader(result.path).fields["qdesk.encoder"].contents() == "error-feedback/2"
    assert "calibrating" in stages and "collecting inputs" not in stages  # one pass for the matrix and the inputs
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["mix.gguf"]


def test_a_saved_plan_with_feedback_copies_its_cached_encodings(kquant_f16: Path, tmp_path: Path,
                                                                own_cache: Path) -> None:
    first = quantize(kquant_f16, tmp_path / "first.gguf", "Q4_K_M", imatrix="none", encoder="feedback", chunks=2,
                     ctx=128, plan_out=tmp_path / "plan.json")
    plan = QuantPlan.load(tmp_path / "plan.json")
    assert plan.encoder == "feedback"
    stages: list[str] = []
    second = quantize(kquant_f16, tmp_path / "second.gguf", plan, imatrix="none", chunks=2, ctx=128,
                      progress=lambda step: stages.append(step.message))
    assert _tensor_bytes(second.path) == _tensor_bytes(first.path)
    assert "collecting inputs" not in stages and "forming input covariances" not in stages
    assert stages.count("error feedback") > 10


def test_cache_entries_of_another_key_or_damaged_are_never_used(kquant_f16: Path, tmp_path: Path,
                                                                own_cache: Path) -> None:
    def run(name: str, chunks: int) -> dict[str, bytes]:
        return _tensor_bytes(quantize(kquant_f16, tmp_path / name, "Q4_K_M", imatrix="none", encoder="feedback",
                                      chunks=chunks, ctx=128).path)

    fresh_three = run("three.gguf", 3)
    shutil.rmtree(own_cache / "feedback")
    fresh_two = run("two.gguf", 2)
    (folder_two,) = (own_cache / "feedback").iterdir()
    assert fresh_two != fresh_three
    folder_three = own_cache / "feedback" / "planted"  # the chunks=2 entries planted where chunks=3 looks
    with CalibrationInputs(kquant_f16, chunks=3, ctx=128) as inputs:
        folder_three = FeedbackCache(inputs.fingerprint, None, (*inputs.provenance, FEEDBACK_METHOD)).folder
    shutil.copytree(folder_two, folder_three)
    assert run("planted.gguf", 3) == fresh_three

    entries = sorted(folder_two.glob("*.bin"))
    for entry in entries:  # damage every payload's last byte
        data = bytearray(entry.read_bytes())
        data[-1] ^= 0xFF
        entry.write_bytes(bytes(data))
    assert run("damaged.gguf", 2) == fresh_two


def test_a_tensor_feedback_does_not_help_on_held_out_text_keeps_llama_cpps_bytes(kquant_f16: Path, tmp_path: Path,
                                                                                own_cache: Path) -> None:
    ggml = _tensor_bytes(quantize(kquant_f16, tmp_path / "ggml.gguf", "Q4_K_M", imatrix="none", encoder="ggml").path)
    with CalibrationInputs(kquant_f16, chunks=2, ctx=128) as inputs:
        cache = FeedbackCache(inputs.fingerprint, None, (*inputs.provenance, FEEDBACK_METHOD))
    planted = {"blk.2.attn_q.weight": {"q4_K": 1.02}, "blk.2.attn_k.weight": {"q4_K": 0.5}}
    cache.save_ratios(RATIO_SAMPLE_ROWS, planted)
    fed = _tensor_bytes(quantize(kquant_f16, tmp_path / "fed.gguf", "Q4_K_M", imatrix="none", encoder="feedback",
                                 chunks=2, ctx=128).path)
    assert fed["blk.2.attn_q.weight"] == ggml["blk.2.attn_q.weight"]
    assert fed["blk.2.attn_k.weight"] != ggml["blk.2.attn_k.weight"]
    measured = cache.ratios(RATIO_SAMPLE_ROWS)  # the preset's other types were measured by the job and kept
    assert measured["blk.2.attn_q.weight"] == {"q4_K": 1.02} and len(measured) > 40
    assert fed.keys() == ggml.keys()
    for name, ratios in measured.items():
        if name in planted:
            continue
        (ratio,) = ratios.values()
        assert (fed[name] == ggml[name]) == (ratio >= 1.0), name


CANCEL_STAGES = {
    "calibrating": "auto",
    "collecting inputs": "none",
    "forming input covariances": "none",
    "factoring input covariances": "none",
    "quantizing": "none",
    "error feedback": "none",
}


@pytest.mark.parametrize("stage", sorted(CANCEL_STAGES))
def test_a_cancel_at_any_stage_leaves_the_previous_output_and_no_scratch(stage: str, kquant_f16: Path,
                                                                         tmp_path: Path, own_cache: Path) -> None:
    output = tmp_path / "out.gguf"
    output.write_bytes(PREVIOUS)
    cancel = CancelToken()
    seen: list[str] = []

    def cancel_at_the_stage(step: Progress) -> None:
        seen.append(step.message)
        if step.message == stage:
            assert _spills(tmp_path) or stage in ("calibrating", "quantizing")
            cancel.cancel()

    with pytest.raises(Cancelled):
        quantize(kquant_f16, output, "Q4_K_M", imatrix=CANCEL_STAGES[stage], encoder="feedback", chunks=2, ctx=128,
                 progress=cancel_at_the_stage, cancel=cancel)
    assert stage in seen
    assert output.read_bytes() == PREVIOUS
    assert [entry.name for entry in tmp_path.iterdir()] == ["out.gguf"]


def test_a_cancel_while_measuring_ratios_leaves_nothing(kquant_f16: Path, tmp_path: Path, own_cache: Path) -> None:
    output = tmp_path / "mix.gguf"
    output.write_bytes(PREVIOUS)
    cancel = CancelToken()

    def cancel_while_measuring(step: Progress) -> None:
        if step.message == "measuring what error feedback saves" and step.done >= 1:
            cancel.cancel()

    with pytest.raises(Cancelled):
        quantize(kquant_f16, output, MixBudget(like="Q4_K_M"), imatrix="none", chunks=2, ctx=128, mix_effort="fast",
                 progress=cancel_while_measuring, cancel=cancel)
    assert output.read_bytes() == PREVIOUS
    assert [entry.name for entry in tmp_path.iterdir()] == ["mix.gguf"]


def test_a_spill_changed_under_the_job_is_refused_in_one_sentence(kquant_f16: Path, tmp_path: Path,
                                                                  own_cache: Path) -> None:
    output = tmp_path / "out.gguf"
    output.write_bytes(PREVIOUS)

    def tamper(step: Progress) -> None:
        if step.message == "forming input covariances":  # every input file now claims another model
            (spill,) = _spills(tmp_path)
            for rows in spill.glob("*.rows"):
                with rows.open("r+b") as file:
                    file.seek(12)
                    file.write(spill_tag("some other model"))

    with pytest.raises(FeedbackError) as raised:
        quantize(kquant_f16, output, "Q4_K_M", imatrix="none", encoder="feedback", chunks=2, ctx=128,
                 progress=tamper)
    assert "another model" in str(raised.value) and len(str(raised.value).splitlines()) == 1
    assert output.read_bytes() == PREVIOUS
    assert [entry.name for entry in tmp_path.iterdir()] == ["out.gguf"]


def _finished_process() -> tuple[int, int]:
    child = psutil.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    started = int(child.create_time())
    child.wait()
    return child.pid, started


def test_the_next_job_removes_the_spill_of_a_dead_process_but_not_of_a_live_one(kquant_f16: Path,
                                                                              tmp_path: Path) -> None:
    dead_pid, dead_start = _finished_process()
    dead = tmp_path / f"{SPILL_PREFIX}{dead_pid}-{dead_start}-x1"
    live_process = psutil.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        live = tmp_path / f"{SPILL_PREFIX}{live_process.pid}-{int(live_process.create_time())}-x2"
        reused = tmp_path / f"{SPILL_PREFIX}{live_process.pid}-{int(live_process.create_time()) - 1000}-x3"
        for folder in (dead, live, reused):  # reused: a live pid, but not the process that made the folder
            folder.mkdir()
            (folder / "input-0000.rows").write_bytes(b"rows")
        quantize(kquant_f16, tmp_path / "out.gguf", "Q4_K_M", imatrix="none", encoder="feedback", chunks=2, ctx=128)
        assert sorted(entry.name for entry in tmp_path.iterdir()) == sorted(["out.gguf", live.name])
    finally:
        live_process.kill()
        live_process.wait()


def test_a_killed_quantization_leaves_a_spill_the_next_one_removes(kquant_f16: Path, tmp_path: Path,
                                                                   own_cache: Path) -> None:
    script = ("import sys; from converters.quantization.quantize import quantize\n"
              "def stall(step):\n"
              "    if step.message == 'forming input covariances':\n"
              "        print('spilled', flush=True); import time; time.sleep(60)\n"
              f"quantize({str(kquant_f16)!r}, {str(tmp_path / 'out.gguf')!r}, 'Q4_K_M', imatrix='none', "
              "encoder='feedback', chunks=2, ctx=128, progress=stall)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "spilled"
        assert len(_spills(tmp_path)) == 1
    finally:
        child.kill()
        child.wait()
    time.sleep(0.1)
    assert len(_spills(tmp_path)) == 1  # killed: nothing could clean up
    quantize(kquant_f16, tmp_path / "next.gguf", "Q4_K_M", imatrix="none", encoder="feedback", chunks=2, ctx=128)
    assert _spills(tmp_path) == []


def test_the_spill_needs_disk_and_says_how_much(smollm2_f16: Path) -> None:
    from converters.core.gguf_file import check_gguf

    needed = spill_bytes(check_gguf(smollm2_f16), 32 * 512)
    assert 2.5e9 < needed < 4e9  # 16384 tokens × (30 × (3 × 576 + 1536) + 576) float16 values
    assert spill_bytes(check_gguf(smollm2_f16), 2 * 512) == needed // 16


@pytest.fixture
def small_disk(tmp_path: Path):
    """A tmpfs of 200 MB: room for the starter's quantized output, not for its spilled inputs."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(mount_point)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_not_enough_disk_for_the_spill_is_one_sentence_before_any_work(smollm2_f16: Path, small_disk: Path) -> None:
    output = small_disk / "out.gguf"
    result = subprocess.run([sys.executable, "-m", "qdesk", "quantize", str(smollm2_f16), "-o", str(output),
                             "--preset", "Q4_K_M", "--encoder", "feedback"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 1, result.stderr
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "scratch space" in message and "GB" in message
    assert list(small_disk.iterdir()) == []


def test_a_plan_for_another_model_is_refused_before_any_work(kquant_f16: Path, smollm2_f16: Path,
                                                             tmp_path: Path) -> None:
    quantize(kquant_f16, tmp_path / "kquant.gguf", "Q4_K_M", imatrix="none", encoder="feedback", chunks=2, ctx=128,
             plan_out=tmp_path / "plan.json")
    output = tmp_path / "starter.gguf"
    result = subprocess.run([sys.executable, "-m", "qdesk", "quantize", str(smollm2_f16), "-o", str(output), "--plan",
                             str(tmp_path / "plan.json")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "another model" in result.stderr
    assert not output.exists() and _spills(tmp_path) == []


def test_inputs_collected_for_one_model_are_refused_for_another(kquant_f16: Path, smollm2_f16: Path,
                                                                tmp_path: Path) -> None:
    carrier = _carrier(smollm2_f16, ("q8_0",))
    with collect_input_covariances(kquant_f16, chunks=1, ctx=64, scratch=tmp_path) as inputs, \
            pytest.raises(UserError, match="collected for"):
        feedback_sensitivity(carrier, smollm2_f16, inputs, None)
