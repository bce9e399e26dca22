"""The main window: sections by sidebar and keyboard, drops routed by kind, state kept across restarts."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

from PySide6.QtCore import Qt

from qdesk.app.settings import Settings, load_settings, save_settings
from qdesk.gui.background import Job
from qdesk.gui.context import AppContext
from qdesk.gui.drops import route_drop
from qdesk.gui.main_window import SECTIONS, MainWindow
from tests.gui_support import drop


def test_ctrl_digits_switch_sections(qtbot, main_window: MainWindow) -> None:
    for number, section in enumerate(SECTIONS, start=1):
        qtbot.keyClick(main_window, getattr(Qt.Key, f"Key_{number}"), Qt.KeyboardModifier.ControlModifier)
        assert main_window.current_section() == section.key


def test_section_and_guide_are_restored(qtbot, gui_context: AppContext) -> None:
    first = MainWindow(gui_context)
    qtbot.addWidget(first)
    assert first.guide.isVisibleTo(first)
    first.show_section("evaluate")
    first.dismiss_guide()
    first.close()
    second = MainWindow(gui_context)
    qtbot.addWidget(second)
    assert second.current_section() == "evaluate"
    assert not second.guide.isVisibleTo(second)


def test_drops_are_routed_by_kind(starter_gguf: Path, smollm2_f16: Path, tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    note = tmp_path / "notes.txt"
    note.write_text("hello")
    assert route_drop([starter_gguf]).quantize_source is None
    assert route_drop([starter_gguf]).library_imports == [starter_gguf]
    assert route_drop([smollm2_f16]).quantize_source == smollm2_f16
    assert route_drop([folder / "model.safetensors"]).quantize_source == folder
    rejected = route_drop([note]).rejected
    assert len(rejected) == 1 and "notes.txt" in rejected[0]


def test_a_dropped_checkpoint_opens_quantize(qtbot, main_window: MainWindow, smollm2_hf: Path, tmp_path: Path) -> None:
    copy = tmp_path / "dropped"
    shutil.copytree(smollm2_hf, copy)
    drop(main_window, [copy])
    assert main_window.current_section() == "quantize"


def test_jobs_report_progress_results_failures_and_cancellation(qtbot, gui_context: AppContext) -> None:
    from converters.core.jobs import Progress
    from qdesk.app.errors import UserError

    def counting(progress, cancel) -> int:
        for step in range(5):
            progress(Progress(step + 1, 5, "steps"))
        return 42

    job = Job("count", counting)
    with qtbot.waitSignal(job.succeeded, timeout=10_000) as done:
        gui_context.run(job)
    assert done.args == [42]
    assert job.last_progress is not None and job.last_progress.fraction == 1.0

    def failing(progress, cancel) -> None:
        raise UserError("The file is broken; choose another.")

    job = Job("fail", failing)
    with qtbot.waitSignal(job.failed, timeout=10_000) as failed:
        gui_context.run(job)
    assert failed.args[0].sentence == "The file is broken; choose another."
    assert "Traceback" in failed.args[0].details

    def waiting(progress, cancel) -> None:
        while True:
            cancel.raise_if_cancelled()

    job = Job("wait", waiting)
    with qtbot.waitSignal(job.failed, timeout=10_000) as cancelled:
        gui_context.run(job)
        job.cancel()
    assert cancelled.args[0].cancelled


def test_llama_cpp_failures_read_as_one_sentence_like_the_cli(qtbot, gui_context: AppContext, tmp_path: Path) -> None:
    """A real NativeError (llama.cpp refusing a file) is shown as its sentence, not as an internal error."""
    from native.activations import ModelEvaluator

    not_a_model = tmp_path / "notes.gguf"
    not_a_model.write_text("these are notes, not a model\n", encoding="utf-8")
    job = Job("load", lambda _progress, _cancel: ModelEvaluator(not_a_model))
    with qtbot.waitSignal(job.failed, timeout=30_000) as failed:
        gui_context.run(job)
    failure = failed.args[0]
    assert failure.sentence.startswith("llama.cpp could not load notes.gguf") and not failure.cancelled
    assert "EvaluationFailed" in failure.details and "Traceback" in failure.details


def test_closing_the_window_cancels_every_background_job(qtbot, gui_context: AppContext) -> None:
    started = threading.Event()

    def waiting(progress, cancel) -> None:
        started.set()
        while True:
            cancel.raise_if_cancelled()
            time.sleep(0.01)

    closed: list[str] = []
    cancellable = Job("wait", waiting)
    keeps_going = Job("close a model", lambda _progress, _cancel: closed.append("closed"), cancellable=False)
    with qtbot.waitSignal(cancellable.failed, timeout=10_000) as cancelled:
        gui_context.run(cancellable)
        assert started.wait(10)
        gui_context.run(keeps_going)
        assert gui_context.jobs == [cancellable, keeps_going] or closed
        gui_context.shutdown()
    assert cancelled.args[0].cancelled
    assert closed == ["closed"] and not keeps_going.cancelled
    qtbot.waitUntil(lambda: not gui_context.jobs, timeout=10_000)


def test_settings_survive_a_bad_file(gui_folders: dict[str, Path]) -> None:
    settings = Settings(threads=3, theme="dark")
    save_settings(settings)
    assert load_settings() == settings
    path = gui_folders["config"] / "settings.json"
    path.write_text('{"threads": "many", "theme": "purple", "sampling": {"temperature": 0.2, "top_k": "x"}}')
    loaded = load_settings()
    assert loaded.threads == 0 and loaded.theme == "system"
    assert loaded.sampling.temperature == 0.2 and loaded.sampling.top_k == Settings().sampling.top_k
    path.write_text("{not json")
    assert load_settings() == Settings()


def test_the_menu_bar_quits_lists_shortcuts_and_tells_versions_and_places(qtbot, main_window: MainWindow,
                                                                           gui_folders: dict[str, Path]) -> None:
    menus = [action.text().replace("&", "") for action in main_window.menuBar().actions()]
    assert menus == ["File", "View", "Help"]
    shortcuts = main_window.show_shortcuts()
    keys = {shortcuts.table.item(row, 1).text() for row in range(shortcuts.table.rowCount())}
    assert {"Ctrl+Q", "Ctrl+1 … Ctrl+7", "Esc"} <= keys
    shortcuts.close()

    about = main_window.show_about()
    versions = about.versions.text()
    assert "qdesk" in versions and "llama-cpp-python" in versions and "Qt" in versions
    places = {place.what: place.path for place in about.info.places}
    assert places["Settings"] == gui_folders["config"] / "settings.json"
    assert places["Models folder"] == gui_folders["models"]
    assert places["Log file"].is_relative_to(gui_folders["cache"])
    qtbot.waitUntil(lambda: "CPU" in about.backends.text(), timeout=30_000)
    about.close()

    main_window.set_theme("dark")
    assert load_settings().theme == "dark"
    assert [action.data() for action in main_window.theme_actions.actions() if action.isChecked()] == ["dark"]
    main_window.set_theme("light")

    file_menu = main_window.menuBar().actions()[0].menu()
    (quit_action,) = [action for action in file_menu.actions() if action.text() == "&Quit"]
    assert quit_action.shortcut().toString() == "Ctrl+Q"
    quit_action.trigger()
    assert not main_window.isVisible()


def test_qdesk_about_prints_versions_and_places(gui_folders: dict[str, Path], capsys) -> None:
    import json

    from qdesk.cli import main

    assert main(["about", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["versions"]["qdesk"] and any("CPU" in line for line in document["backends"])
    assert {"what": "Models folder", "path": str(gui_folders["models"]),
            "setting": "Settings, or QDESK_MODELS_DIR"} in document["places"]
