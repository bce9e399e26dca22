"""Step times told before a quantization job starts, learnt from this machine's own runs; calibration sized to need."""

from __future__ import annotations

from pathlib import Path

import pytest

from converters.calibration.calibrate import DEFAULT_CHUNKS
from qdesk.quantization.batch import BatchRequest, VariantChoice
from qdesk.quantization.timing import (
    QUICK_CHUNKS,
    calibration_chunks,
    estimate_steps,
    rate_of,
    record_step,
    step_kind,
    step_units,
)

Q4, Q5, Q8 = VariantChoice(preset="Q4_K_M"), VariantChoice(preset="Q5_K_M"), VariantChoice(preset="Q8_0")


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QDESK_CACHE_DIR", str(tmp_path / "cache"))


def test_the_importance_matrix_is_most_of_a_default_job(tmp_path: Path) -> None:
    request = BatchRequest(tmp_path / "SmolLM2", (Q4, Q8), tmp_path)
    times = estimate_steps(request, is_checkpoint=True, reference_bytes=271_000_000, parameters=134_515_008)
    assert [step.key for step in times] == ["convert", "calibrate", "Q4_K_M", "Q8_0"]
    seconds = {step.key: step.seconds for step in times}
    assert seconds["calibrate"] > sum(seconds.values()) / 2
    assert not any(step.measured for step in times)
    without = estimate_steps(BatchRequest(tmp_path / "SmolLM2", (Q4, Q8), tmp_path, use_imatrix=False),
                             is_checkpoint=True, reference_bytes=271_000_000, parameters=134_515_008)
    assert "calibrate" not in [step.key for step in without]


def test_presets_rounded_with_feedback_are_timed_as_such(tmp_path: Path) -> None:
    def seconds(feedback: bool) -> dict[str, float]:
        request = BatchRequest(tmp_path / "m.gguf", (Q4, Q8), tmp_path, feedback_presets=feedback)
        times = estimate_steps(request, is_checkpoint=False, reference_bytes=271_000_000, parameters=134_515_008)
        return {step.key: step.seconds for step in times}

    plain, fed = seconds(False), seconds(True)
    assert fed["calibrate"] == plain["calibrate"] and fed["Q4_K_M"] > 10 * plain["Q4_K_M"]
    record_step(step_kind("Q4_K_M", BatchRequest(tmp_path / "m.gguf", (Q4,), tmp_path, feedback_presets=True)),
                271_000_000, 3.0 + 10.0)  # a fed-back preset teaches the feedback rate, not the plain one
    assert rate_of("feedback") == (pytest.approx(27_100_000), True) and not rate_of("quantize")[1]


def test_a_finished_step_teaches_this_machines_rate(tmp_path: Path) -> None:
    units = step_units("calibrate", reference_bytes=1, parameters=100_000_000, chunks=10, ctx=500)
    before, measured = rate_of("calibrate")
    assert not measured
    record_step("calibrate", units, 3.0 + units / (before / 4))  # four times slower than the default rate
    after, measured = rate_of("calibrate")
    assert measured and after == pytest.approx(before / 4)
    request = BatchRequest(tmp_path / "m.gguf", (Q4,), tmp_path, chunks=10, ctx=500)
    (calibrate, _quantize) = estimate_steps(request, is_checkpoint=False, reference_bytes=1, parameters=100_000_000)
    assert calibrate.measured and calibrate.seconds == pytest.approx(3.0 + units / after)


def test_presets_that_barely_need_a_matrix_get_a_shorter_text() -> None:
    assert calibration_chunks([Q4, Q8]) == DEFAULT_CHUNKS
    assert calibration_chunks([Q5, Q8]) == QUICK_CHUNKS < DEFAULT_CHUNKS
    assert calibration_chunks([Q8]) == 0
    assert calibration_chunks([VariantChoice(size_bytes=100_000_000)]) == DEFAULT_CHUNKS
