"""Fixtures for the desktop app's tests: an isolated config and models folder, a context, the main window."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from PySide6.QtCore import QMimeData, QPoint, QPointF, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QApplication, QWidget

from qdesk.gui.background import wait_for_jobs
from qdesk.gui.context import AppContext


@pytest.fixture
def gui_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Empty config and models folders of the test's own, so nothing the user has is read or changed."""
    folders = {"config": tmp_path / "config", "models": tmp_path / "models", "cache": tmp_path / "cache"}
    monkeypatch.setenv("QDESK_CONFIG_DIR", str(folders["config"]))
    monkeypatch.setenv("QDESK_MODELS_DIR", str(folders["models"]))
    monkeypatch.setenv("QDESK_CACHE_DIR", str(folders["cache"]))
    return folders


@pytest.fixture
def gui_context(qapp: object, gui_folders: dict[str, Path]) -> Iterator[AppContext]:
    context = AppContext()
    yield context
    context.shutdown()
    wait_for_jobs()


@pytest.fixture
def main_window(qtbot: object, gui_context: AppContext) -> Iterator[object]:
    from qdesk.gui.main_window import MainWindow

    window = MainWindow(gui_context)
    qtbot.addWidget(window)  # type: ignore[attr-defined]
    window.show()
    yield window
    window.close()


def drop(target: QWidget, paths: list[Path]) -> bool:
    """Drag `paths` onto `target` and drop them, as a file manager does: a drag-enter event, then the drop.
    Returns whether the drop was accepted."""
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(path)) for path in paths])
    centre = target.rect().center()
    with warnings.catch_warnings():  # Qt 6 marks the only constructor PySide offers as deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        enter = QDragEnterEvent(QPoint(centre), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                                Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(target, enter)
    if not enter.isAccepted():
        return False
    dropped = QDropEvent(QPointF(centre), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                         Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(target, dropped)
    return dropped.isAccepted()
