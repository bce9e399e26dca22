"""The Evaluate section: a real evaluation fills the chart, the tables and the heat map; cancelling leaves nothing."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from PySide6.QtCore import Qt

from qdesk.gui.context import AppContext
from qdesk.gui.evaluate_view import EvaluateView

EVALUATION_TIMEOUT_MS = 240_000


@pytest.fixture
def view(qtbot, gui_context: AppContext) -> EvaluateView:
    widget = EvaluateView(gui_context)
    qtbot.addWidget(widget)
    widget.resize(1200, 800)
    widget.show()
    return widget


def test_opened_models_choose_reference_and_variants(view: EvaluateView, gui_context: AppContext,
                                                    smollm2_f16: Path, starter_gguf: Path) -> None:
    assert not view.run_button.isEnabled()
    gui_context.open_in_evaluate.emit([starter_gguf])
    assert view.reference_path() is None and view.checked_variants() == [starter_gguf]
    assert "reference" in view.status_label.text()
    gui_context.open_in_evaluate.emit([smollm2_f16, starter_gguf])
    assert view.reference_path() == smollm2_f16
    assert view.checked_variants() == [starter_gguf]
    assert view.run_button.isEnabled()


@pytest.mark.slow
def test_a_real_evaluation_fills_chart_tables_and_heat_map(qtbot, view: EvaluateView, gui_context: AppContext,
                                                           smollm2_f16: Path, starter_gguf: Path,
                                                           tmp_path: Path) -> None:
    gui_context.open_in_evaluate.emit([smollm2_f16, starter_gguf])
    view.chunks_spin.setValue(1)
    view.tasks_check.setChecked(False)
    view.speed_check.setChecked(False)
    qtbot.mouseClick(view.run_button, Qt.MouseButton.LeftButton)
    assert view.running and view.cancel_button.isEnabled() and not view.run_button.isEnabled()
    qtbot.waitUntil(lambda: not view.running, timeout=EVALUATION_TIMEOUT_MS)

    assert view.report is not None, view.status_label.text()
    assert [point.name for point in view.chart.points] == [starter_gguf.name]
    assert view.summary_table.rowCount() == 2 and "(reference)" in view.summary_table.item(0, 0).text()
    assert view.summary_table.item(1, 5).text() not in ("", "—")  # the candidate's mean KLD
    assert view.memory_table.rowCount() == 2
    assert view.tasks_table.rowCount() == 0
    assert view.heat_map.token_spans == len(view.report["sample"]["tokens"]) > 0
    assert view.heat_map.coloured_tokens() > 0

    job = view.save_report(tmp_path / "report")
    assert job is not None
    qtbot.waitUntil(lambda: view.saved_paths is not None, timeout=30_000)
    html_path, json_path = view.saved_paths
    assert html_path == tmp_path / "report.html" and json_path.is_file()
    assert starter_gguf.name in html_path.read_text(encoding="utf-8")


@pytest.mark.slow
def test_cancelling_returns_to_idle_and_writes_nothing(qtbot, view: EvaluateView, gui_context: AppContext,
                                                       gui_folders: dict[str, Path], smollm2_f16: Path,
                                                       starter_gguf: Path, tmp_path: Path) -> None:
    gui_context.open_in_evaluate.emit([smollm2_f16, starter_gguf])
    view.chunks_spin.setValue(4)
    view.run_button.click()
    qtbot.waitUntil(lambda: "chunk 1/4" in view.status_label.text(), timeout=EVALUATION_TIMEOUT_MS)
    view.cancel_button.setFocus()
    qtbot.keyClick(view.cancel_button, Qt.Key.Key_Escape)  # mid-way through the reference's chunks
    assert view.status_label.text() == "Cancelling…"
    qtbot.waitUntil(lambda: not view.running, timeout=60_000)

    assert view.report is None and "Cancelled" in view.status_label.text()
    assert view.run_button.isEnabled() and not view.cancel_button.isEnabled() and not view.save_button.isEnabled()
    assert view.progress_bar.isHidden()
    assert len(view.chart.points) == 0
    assert list(tmp_path.rglob("*.partial")) == [] and list(tmp_path.rglob("*.html")) == []



@pytest.fixture
def no_llama_cpp_in_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the GUI process loaded a model in llama.cpp")

    monkeypatch.setattr("native.activations.ModelEvaluator.__init__", refuse)


@pytest.mark.usefixtures("no_llama_cpp_in_this_process")
def test_the_window_never_loads_a_model_in_llama_cpp_itself(qtbot, view: EvaluateView, gui_context: AppContext,
                                                             kquant_f16: Path, tmp_path: Path) -> None:
    candidate = tmp_path / "copy.gguf"
    shutil.copyfile(kquant_f16, candidate)
    gui_context.open_in_evaluate.emit([kquant_f16, candidate])
    view.chunks_spin.setValue(1)
    view.tasks_check.setChecked(False)
    view.speed_check.setChecked(False)
    view.run_button.click()
    qtbot.waitUntil(lambda: not view.running, timeout=EVALUATION_TIMEOUT_MS)
    assert view.report is not None, view.status_label.text()


@pytest.mark.usefixtures("no_llama_cpp_in_this_process")
def test_a_model_llama_cpp_would_stop_on_is_a_sentence_and_the_window_stays(
        qtbot, view: EvaluateView, gui_context: AppContext, kquant_f16: Path, tmp_path: Path) -> None:
    from tests.builders.bad_gguf import rewrite_metadata

    bad = rewrite_metadata(kquant_f16, tmp_path / "eps-nan.gguf", {"llama.attention.layer_norm_rms_epsilon": math.nan})
    gui_context.open_in_evaluate.emit([kquant_f16, bad])
    assert view.reference_path() == kquant_f16 and view.checked_variants() == [bad]
    view.chunks_spin.setValue(1)
    view.tasks_check.setChecked(False)
    view.speed_check.setChecked(False)
    view.run_button.click()
    qtbot.waitUntil(lambda: not view.running, timeout=EVALUATION_TIMEOUT_MS)

    assert "eps-nan.gguf has impossible settings" in view.status_label.text()
    assert view.report is None and view.run_button.isEnabled() and view.isVisible()


def test_a_float_gguf_made_later_becomes_the_reference(view: EvaluateView, gui_context: AppContext,
                                                        kquant_f16: Path) -> None:
    from qdesk.gui.evaluate_view import NO_FLOAT_MODEL

    assert view.reference_path() is None and view.status_label.text() == NO_FLOAT_MODEL
    gui_context.library().import_model(kquant_f16, link=True)
    gui_context.library_changed.emit()
    assert view.reference_path() is not None and view.reference_path().name == kquant_f16.name
    assert view.status_label.text() != NO_FLOAT_MODEL


def test_progress_keeps_file_names_as_they_are(view: EvaluateView) -> None:
    from converters.core.jobs import Progress

    view._progressed(Progress(1, 4, "chunks", "scoring SmolLM2-135M-Q8_0.gguf"))
    assert view.status_label.text() == "Scoring SmolLM2-135M-Q8_0.gguf"


def test_table_headers_are_plain_words_with_the_exact_terms_in_tooltips() -> None:
    from qdesk.gui.evaluate_tables import summary_table

    report = {"reference": {"name": "ref-F16.gguf", "bytes": 2_000_000, "bpw": 16.0, "ppl": 10.0},
              "candidates": [{"name": "ref-Q4_K_M.gguf", "bytes": 1_000_000, "bpw": 4.8, "ppl": 10.5,
                              "kld_mean": 0.02, "kld_p99": 0.3, "top1_agreement": 0.9}]}
    table = summary_table(report)
    tips = dict(zip(table.headers, table.header_tooltips, strict=True))
    for jargon in ("PPL", "ΔPPL", "KLD", "p99", "bpw"):
        assert not any(jargon in header for header in table.headers), table.headers
    assert tips["Perplexity"].startswith("Perplexity (PPL)") and tips["Perplexity change"].startswith("ΔPPL")
    assert tips["Drift (worst 1%)"].startswith("p99 KLD") and "Mean KLD" in tips["Drift (mean)"]


def test_compare_facts_say_where_answers_differ_in_words() -> None:
    from qdesk.chat.compare import Divergence
    from qdesk.gui.compare_pane import facts_text

    assert facts_text("Q8_0", 1_000, None, Divergence(0, "", "a", "b"), first=False,
                      answered=True).endswith("differs from pane 1 from the start")
    assert facts_text("Q8_0", 1_000, None, Divergence(5, "", "a", "b"), first=False,
                      answered=True).endswith("differs from pane 1 after 5 tokens")


def test_the_last_evaluation_comes_back_and_opens_from_the_library(qtbot, main_window, gui_context: AppContext,
                                                                   starter_gguf: Path) -> None:
    from qdesk.evaluation.history import EvaluationHistory
    from qdesk.gui.main_window import MainWindow

    document = {"reference": {"path": "/refs/SmolLM2-F16.gguf", "name": "SmolLM2-F16.gguf", "bytes": 270_000_000,
                              "bpw": 16.0, "ppl": 10.0},
                "candidates": [{"path": str(starter_gguf), "name": starter_gguf.name, "bytes": 98_000_000,
                                "bpw": 5.7, "ppl": 10.6, "kld_mean": 0.03, "kld_p99": 0.4, "top1_agreement": 0.9}]}
    EvaluationHistory().save(document)
    window = MainWindow(gui_context)  # a restart: the last evaluation is on show again
    qtbot.addWidget(window)
    assert window.views["evaluate"].report == document
    assert window.views["evaluate"].status_label.text().startswith("Evaluation of ")

    library = main_window.views["library"]
    qtbot.waitUntil(lambda: bool(library.tree.entries()), timeout=60_000)
    main_window.views["evaluate"].show_report(None)
    library.tree.select_paths([starter_gguf])
    assert library.report_button.isEnabled()
    qtbot.mouseClick(library.report_button, Qt.MouseButton.LeftButton)
    assert main_window.current_section() == "evaluate" and main_window.views["evaluate"].report == document
