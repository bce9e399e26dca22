"""The Quantize section: sizes before anything runs, a dropped checkpoint becoming variants, cancel leaving nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from PySide6.QtCore import Qt

from converters.core.units import format_size
from converters.quantization.quantize import preset_plan
from qdesk.gui.job_queue import StepState
from qdesk.gui.main_window import MainWindow
from qdesk.gui.quantize_view import QuantizeView
from qdesk.quantization.sizes import read_source
from tests.gui_support import drop

TIMEOUT_MS = 180_000


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.builders.checkpoints import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("checkpoints") / "TinyLlama", "llama")


def _view(window: MainWindow) -> QuantizeView:
    view = window.views["quantize"]
    assert isinstance(view, QuantizeView)
    return view


def _choose(view: QuantizeView, presets: set[str], calibration: str) -> None:
    for name, check in view.preset_checks.items():
        check.setChecked(name in presets)
    view.mix_check.setChecked(False)
    view.calibration_buttons[calibration].setChecked(True)


def _leftovers(models: Path) -> list[str]:
    """What a job must never leave in the models folder: partial files and temporary folders."""
    return sorted(path.name for path in models.iterdir() if path.name.startswith(".") or path.suffix == ".partial")


def _library_files(context) -> list[str]:
    """The library's models that live in the models folder (the starter model is registered where it is)."""
    folder = context.models_folder.absolute()
    return sorted(entry.path.name for entry in context.library().entries() if entry.path.parent == folder)


def test_size_preview_shows_exact_sizes_for_a_float_gguf(qtbot, main_window: MainWindow, kquant_f16: Path) -> None:
    view = _view(main_window)
    view.set_source(kquant_f16)
    qtbot.waitUntil(lambda: view.preview is not None, timeout=TIMEOUT_MS)
    header_bytes = read_source(kquant_f16).header_bytes
    expected = header_bytes + preset_plan(kquant_f16, "Q4_K_M").n_bytes
    assert view.findChild(type(view.size_labels["Q4_K_M"]), "size_Q4_K_M").text() == format_size(expected)
    assert view.fit_labels["Q4_K_M"].text() == "fits"
    assert "RAM" in view.fit_labels["Q4_K_M"].toolTip()
    view.mix_check.setChecked(True)
    view.mix_slider.setValue(view.mix_slider.maximum())
    assert view.mix_bytes() == view.preview.presets["Q8_0"].file_bytes
    assert "fits" in view.mix_label.text()
    view.mix_slider.setValue(view.mix_slider.minimum())  # rows of 256: the i-quants reach below Q2_K's size
    assert view.mix_bytes() < 0.8 * view.preview.presets["Q2_K"].file_bytes
    assert view.mix_label.text().startswith(format_size(view.mix_bytes()))
    assert view.start_button.isEnabled()


@pytest.mark.slow
def test_a_dropped_checkpoint_becomes_variants_in_the_library(qtbot, main_window: MainWindow, gui_context,
                                                              tiny_checkpoint: Path) -> None:
    assert drop(main_window, [tiny_checkpoint / "model.safetensors"])
    assert main_window.current_section() == "quantize"
    view = _view(main_window)
    assert view.source == tiny_checkpoint
    qtbot.waitUntil(lambda: view.preview is not None, timeout=TIMEOUT_MS)
    assert view.size_labels["Q8_0"].text()[0].isdigit()  # llama.cpp's plan of the checkpoint's skeleton: exact
    _choose(view, {"Q8_0", "Q4_0"}, "builtin")
    view.calibration_buttons["builtin"].setChecked(True)
    view.keep_reference.setChecked(True)

    with qtbot.waitSignal(gui_context.library_changed, timeout=TIMEOUT_MS):
        qtbot.mouseClick(view.start_button, Qt.MouseButton.LeftButton)
    main_window.show_section("library")  # the queue keeps running while another section is on show
    queued = view.queue.batches[0]
    qtbot.waitUntil(lambda: queued.over, timeout=TIMEOUT_MS)

    assert [step.step.key for step in queued.steps] == ["convert", "calibrate", "Q4_0", "Q8_0"]
    assert [step.state for step in queued.steps] == [StepState.DONE] * 4, [s.describe() for s in queued.steps]
    names = _library_files(gui_context)
    assert names == ["TinyLlama-115K-F16.gguf", "TinyLlama-115K-Q4_0.gguf", "TinyLlama-115K-Q8_0.gguf"]
    assert _leftovers(gui_context.models_folder) == []
    q4 = queued.steps[2].outcome.result
    assert q4.imatrix is not None  # calibrated once, shared by the variants that use a matrix


@pytest.mark.slow
def test_cancelling_a_running_job_leaves_no_file(qtbot, main_window: MainWindow, gui_context,
                                                 smollm2_hf: Path) -> None:
    main_window.show_section("quantize")
    view = _view(main_window)
    view.set_source(smollm2_hf)
    _choose(view, {"Q8_0"}, "none")
    view.keep_reference.setChecked(True)
    qtbot.mouseClick(view.start_button, Qt.MouseButton.LeftButton)
    queued = view.queue.batches[0]
    convert = queued.steps[0]
    assert convert.step.key == "convert"
    qtbot.waitUntil(lambda: convert.progress is not None and convert.progress.fraction > 0, timeout=TIMEOUT_MS)
    assert "Quantize" in main_window.statusBar().currentMessage()
    row = view.queue_widget.step_row(convert)
    assert row is not None and row.cancel.isVisible()
    qtbot.mouseClick(row.cancel, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: queued.over and queued.closed, timeout=TIMEOUT_MS)

    assert convert.state is StepState.CANCELLED
    assert queued.steps[1].state is StepState.SKIPPED
    models = gui_context.models_folder
    assert sorted(path.name for path in models.glob("*.gguf")) == []
    assert _leftovers(models) == []
    assert _library_files(gui_context) == []


@pytest.mark.slow
def test_closing_the_window_cancels_running_jobs(qtbot, main_window: MainWindow, gui_context,
                                                 smollm2_hf: Path) -> None:
    view = _view(main_window)
    view.set_source(smollm2_hf)
    _choose(view, {"Q8_0"}, "none")
    view.keep_reference.setChecked(False)  # the reference then lives in a temporary folder until the job ends
    view.start()
    convert = view.queue.batches[0].steps[0]
    qtbot.waitUntil(lambda: convert.progress is not None and convert.progress.fraction > 0, timeout=TIMEOUT_MS)
    main_window.close()
    models = gui_context.models_folder
    assert list(models.glob("*.gguf")) == []
    assert _leftovers(models) == []


def test_cancelling_the_importance_matrix_skips_only_the_presets_that_need_it(qtbot, main_window: MainWindow,
                                                                             gui_context, kquant_f16: Path) -> None:
    main_window.show_section("quantize")
    view = _view(main_window)
    view.set_source(kquant_f16)
    _choose(view, {"Q4_K_M", "Q8_0"}, "builtin")
    qtbot.waitUntil(lambda: view.start_button.isEnabled(), timeout=TIMEOUT_MS)
    view.start()
    queued = view.queue.batches[0]
    calibrate = queued.steps[0]
    assert [step.step.key for step in queued.steps] == ["calibrate", "Q4_K_M", "Q8_0"]
    assert calibrate.state is StepState.RUNNING
    view.queue.cancel_step(queued, calibrate)
    qtbot.waitUntil(lambda: queued.over, timeout=TIMEOUT_MS)

    states = {step.step.key: step.state for step in queued.steps}
    assert states == {"calibrate": StepState.CANCELLED, "Q4_K_M": StepState.SKIPPED, "Q8_0": StepState.DONE}
    assert "Importance matrix" in queued.steps[1].describe()
    made = _library_files(gui_context)
    assert len(made) == 1 and made[0].endswith("-Q8_0.gguf"), made
    assert main_window.statusBar().currentMessage() == "Quantize: the queue is done (1 made, 1 skipped)."


def test_presets_can_be_rounded_with_feedback_and_scaled_activation_aware(qtbot, main_window: MainWindow,
                                                                          gui_context, kquant_f16: Path) -> None:
    import gguf

    main_window.show_section("quantize")
    view = _view(main_window)
    view.set_source(kquant_f16)
    _choose(view, {"Q4_K_M", "Q8_0"}, "none")
    view.feedback_presets.setChecked(True)
    view.awq_check.setChecked(True)
    assert not view.start_button.isEnabled() and "needs calibration" in view.start_hint.text()
    view.calibration_buttons["builtin"].setChecked(True)
    qtbot.waitUntil(lambda: view.start_button.isEnabled(), timeout=TIMEOUT_MS)
    view.start()
    queued = view.queue.batches[-1]
    qtbot.waitUntil(lambda: queued.over, timeout=TIMEOUT_MS)
    assert [step.state for step in queued.steps] == [StepState.DONE] * 3, [s.describe() for s in queued.steps]
    made = {path.name.rsplit("-", 1)[-1]: path for path in gui_context.models_folder.glob("*.gguf")}
    q4, q8 = gguf.GGUFReader(made["Q4_K_M.gguf"]).fields, gguf.GGUFReader(made["Q8_0.gguf"]).fields
    assert q4["qdesk.encoder"].contents() == q8["qdesk.encoder"].contents() == "error-feedback/2"
    assert "qdesk.awq" in q4 and "qdesk.awq" not in q8  # Q8_0 uses no importance matrix: no scales to take
    assert _leftovers(gui_context.models_folder) == []
    view.feedback_presets.setChecked(False)
    view.awq_check.setChecked(False)


def test_job_titles_say_which_calibration_each_uses(tmp_path: Path) -> None:
    from qdesk.gui.quantize_queue_view import EMPTY_TEXT
    from qdesk.gui.quantize_view import job_title
    from qdesk.quantization.batch import BatchRequest, VariantChoice

    choices = (VariantChoice(preset="Q4_K_M"), VariantChoice(preset="Q8_0"))
    titles = {job_title(BatchRequest(tmp_path / "Model", choices, tmp_path, use_imatrix=use, text_files=files))
              for use, files in ((True, ()), (False, ()), (True, (tmp_path / "mine.txt",)))}
    assert titles == {"Model → Q4_K_M, Q8_0 · built-in calibration text", "Model → Q4_K_M, Q8_0 · no importance matrix",
                      "Model → Q4_K_M, Q8_0 · calibrated on mine.txt"}
    assert job_title(BatchRequest(tmp_path / "Model", (VariantChoice(preset="Q8_0"),), tmp_path)) == (
        "Model → Q8_0 · no importance matrix")
    assert "on the left" in EMPTY_TEXT


def test_expected_times_show_before_starting(qtbot, main_window: MainWindow, kquant_f16: Path) -> None:
    from qdesk.quantization.timing import QUICK_CHUNKS

    view = _view(main_window)
    view.set_source(kquant_f16)
    _choose(view, {"Q4_K_M", "Q8_0"}, "builtin")
    qtbot.waitUntil(lambda: view.preview is not None, timeout=TIMEOUT_MS)
    text = view.time_estimate.text()
    assert text.startswith("Expected: about ") and "importance matrix" in text and "% of it" in text
    assert "Q8_0" in text and "Q4_K_M" in text
    _choose(view, {"Q5_K_M"}, "builtin")
    assert view.request().chunks == QUICK_CHUNKS and f"{QUICK_CHUNKS} × 512" in view.time_estimate.text()
    _choose(view, {"Q4_K_M"}, "none")
    assert "importance matrix" not in view.time_estimate.text()


def test_the_form_and_the_queue_share_the_width(qtbot, main_window: MainWindow) -> None:
    main_window.show_section("quantize")
    view = _view(main_window)
    main_window.resize(1920, 1080)
    qtbot.wait(100)
    form, queue = view.splitter.sizes()
    assert form > 700 and queue > 700  # no longer kept to the left half's first 580 pixels
    main_window.resize(1024, 700)
    qtbot.wait(100)
    assert all(size > 300 for size in view.splitter.sizes())
