"""The Settings section: edits are saved at once and read back by a new context; the theme applies at once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QAbstractSpinBox

from qdesk.app.settings import Settings, load_settings
from qdesk.gui.context import AppContext
from qdesk.gui.settings_view import SettingsView
from qdesk.gui.theme import is_dark


def settings_view(qtbot, context: AppContext) -> SettingsView:
    view = SettingsView(context)
    qtbot.addWidget(view)
    view.show()
    return view


def type_into(qtbot, box: QAbstractSpinBox, text: str) -> None:
    box.setFocus()
    box.selectAll()
    qtbot.keyClicks(box, text)
    qtbot.keyClick(box, Qt.Key.Key_Return)


def test_edits_are_saved_and_read_back_by_a_new_context(qtbot, gui_context: AppContext, tmp_path: Path) -> None:
    view = settings_view(qtbot, gui_context)
    type_into(qtbot, view.threads, "3")
    type_into(qtbot, view.gpu_layers, "12")
    type_into(qtbot, view.temperature, "0.2")
    type_into(qtbot, view.top_p, "0.9")
    type_into(qtbot, view.top_k, "20")
    type_into(qtbot, view.repeat_penalty, "1.3")
    type_into(qtbot, view.max_tokens, "64")
    type_into(qtbot, view.seed, "7")
    view.system_prompt.setFocus()
    qtbot.keyClicks(view.system_prompt, "Answer briefly.")
    qtbot.waitUntil(lambda: gui_context.settings.system_prompt == "Answer briefly.", timeout=5_000)

    models = tmp_path / "elsewhere" / "models"
    with qtbot.waitSignal(gui_context.library_changed, timeout=5_000):
        view.models_folder.setFocus()
        view.models_folder.selectAll()
        qtbot.keyClicks(view.models_folder, str(models))
        qtbot.keyClick(view.models_folder, Qt.Key.Key_Return)
    assert gui_context.models_folder == models

    saved = AppContext().settings
    assert saved == load_settings() == gui_context.settings
    assert (saved.threads, saved.gpu_layers, saved.models_dir) == (3, 12, str(models))
    sampling = saved.sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.repeat_penalty, sampling.max_tokens,
            sampling.seed) == (0.2, 0.9, 20, 1.3, 64, 7)

    qtbot.mouseClick(view.reset_sampling, Qt.MouseButton.LeftButton)
    assert load_settings().sampling == Settings().sampling and load_settings().threads == 3


def test_a_models_folder_that_cannot_be_used_is_refused(qtbot, gui_context: AppContext, tmp_path: Path) -> None:
    view = settings_view(qtbot, gui_context)
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    for text in ("relative/models", str(a_file)):
        view.models_folder.setText(text)
        view.save()
        assert view.folder_problem.isVisible() and "\n" not in view.folder_problem.text()
        assert load_settings().models_dir == ""


def test_the_theme_applies_at_once_and_persists(qtbot, gui_context: AppContext) -> None:
    view = settings_view(qtbot, gui_context)
    try:
        view.theme.setCurrentIndex(view.theme.findData("dark"))
        assert is_dark() and load_settings().theme == "dark"
        view.theme.setCurrentIndex(view.theme.findData("light"))
        assert not is_dark() and load_settings().theme == "light"
    finally:
        view.theme.setCurrentIndex(view.theme.findData("system"))
    assert not is_dark() and load_settings().theme == "system"


def test_settings_changed_elsewhere_are_shown(qtbot, gui_context: AppContext) -> None:
    view = settings_view(qtbot, gui_context)
    changed = dataclasses.replace(gui_context.settings, threads=5, system_prompt="Be kind.")
    gui_context.update_settings(changed)
    assert view.threads.value() == 5 and view.system_prompt.toPlainText() == "Be kind."
    assert gui_context.settings == changed  # showing them saved nothing else


def test_the_backends_found_are_shown(qtbot, gui_context: AppContext) -> None:
    view = settings_view(qtbot, gui_context)
    view.activated()
    qtbot.waitUntil(lambda: view.backends is not None, timeout=30_000)
    text = view.backend_summary.text()
    assert text.startswith("CPU:")
    assert ("No GPU was found" in text) == (not view.backends.gpu_devices)


def test_gpu_backends_are_described_with_their_memory() -> None:
    from converters.core.units import GIB
    from native.backends import Backend, Device, SystemInfo
    from qdesk.display.backends import describe_backends

    gpu = Device("CUDA", "CUDA0", "NVIDIA H100 80GB HBM3", "gpu", 70 * GIB, 80 * GIB)
    info = SystemInfo("0.3.36", "", (Backend("CPU", (), (("AVX2", "1"), ("OPENMP", "1"))),
                                     Backend("CUDA", (gpu,), ())))
    assert describe_backends(info) == ["CPU: AVX2", "CUDA: NVIDIA H100 80GB HBM3 (70.0 of 80.0 GiB free)",
                                       "GPU layers are offloaded to CUDA0."]


def test_hub_endpoint_cache_and_font_size_apply_at_once(qtbot, gui_context: AppContext, tmp_path: Path,
                                                        monkeypatch) -> None:
    from PySide6.QtWidgets import QApplication

    from qdesk.hub.settings import HubSettings

    for name in ("HF_ENDPOINT", "HF_HUB_CACHE", "HF_HOME", "QDESK_HUB_VARIABLES"):
        monkeypatch.delenv(name, raising=False)
    view = settings_view(qtbot, gui_context)
    view.hf_endpoint.setText("ftp://mirror")
    view.hf_endpoint.editingFinished.emit()
    assert view.hub_problem.isVisibleTo(view) and load_settings().hf_endpoint == ""
    view.hf_endpoint.setText("https://mirror.example/")
    view.hf_endpoint.editingFinished.emit()
    view.hf_cache.setText(str(tmp_path / "hf-cache"))
    view.hf_cache.editingFinished.emit()
    hub = HubSettings.from_environment(token=False)
    assert (hub.endpoint, hub.cache_dir) == ("https://mirror.example", tmp_path / "hf-cache")
    assert load_settings().hf_endpoint == "https://mirror.example/"

    from qdesk.app.settings import apply_hub_settings

    outside = {"HF_ENDPOINT": "https://set-outside"}  # the environment the user started qdesk with wins
    assert apply_hub_settings(load_settings(), outside) == {"HF_HUB_CACHE": str(tmp_path / "hf-cache")}
    assert outside["HF_ENDPOINT"] == "https://set-outside"

    view.hf_endpoint.setText("")
    view.hf_endpoint.editingFinished.emit()
    assert HubSettings.from_environment(token=False).endpoint == "https://huggingface.co"
    type_into(qtbot, view.font_size, "15")
    assert load_settings().font_size == 15
    from qdesk.gui.theme import apply_font_size

    apply_font_size(15)
    assert QApplication.font().pointSize() == 15
    apply_font_size(0)
    assert QApplication.font().pointSize() != 15


def test_logging_in_checks_the_token_with_the_hub_and_keeps_it(qtbot, gui_context: AppContext, tmp_path: Path,
                                                               monkeypatch) -> None:
    from huggingface_hub import constants, get_token

    from tests.builders.hub_server import HubServer

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored_tokens"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        view = settings_view(qtbot, gui_context)
        view.activated()
        assert view.account_label.text().startswith("Not logged in")
        view.token.setText("hf_wrong")
        view.log_in()
        qtbot.waitUntil(lambda: view.account_job is None, timeout=30_000)
        assert "does not accept this token" in view.account_label.text() and get_token() is None
        view.token.setText(server.token)
        qtbot.mouseClick(view.log_in_button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: view.account_job is None, timeout=30_000)
        assert view.account_label.text().startswith("Logged in as tester.")
        assert get_token() == server.token and view.token.text() == ""
        assert (tmp_path / "hf" / "token").stat().st_mode & 0o077 == 0
        qtbot.mouseClick(view.log_out_button, Qt.MouseButton.LeftButton)
        assert get_token() is None and "Logged out." in view.account_label.text()
        server.release()
