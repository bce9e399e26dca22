"""Starting the desktop app: `qdesk` or `qdesk gui`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from PySide6.QtCore import QTimer
from PySide6.QtGui import QIcon
from PySide6.QtWidgets import QApplication

from converters.calibration import resources_folder
from qdesk.gui.context import AppContext
from qdesk.gui.main_window import MainWindow
from qdesk.gui.theme import apply_theme

APP_NAME = "qdesk"


def application(argv: Sequence[str] = ()) -> QApplication:
    """The running QApplication, made once with qdesk's name, icon and style."""
    app = QApplication.instance()
    if not isinstance(app, QApplication):
        app = QApplication([APP_NAME, *argv])
    app.setApplicationName(APP_NAME)
    app.setOrganizationName(APP_NAME)
    app.setDesktopFileName(APP_NAME)
    app.setStyle("Fusion")
    icon = resources_folder() / "icons" / "qdesk.svg"
    if icon.is_file():
        app.setWindowIcon(QIcon(str(icon)))
    return app


def open_main_window(context: AppContext | None = None) -> MainWindow:
    context = context or AppContext()
    apply_theme(context.settings.theme)
    window = MainWindow(context)
    window.show()
    return window


def run_app(argv: Sequence[str] = (), *, quit_after_s: float | None = None) -> int:
    app = application(argv)
    window = open_main_window()
    window.raise_()
    if quit_after_s is not None:
        QTimer.singleShot(int(quit_after_s * 1000), window.close)
    return app.exec()


if __name__ == "__main__":
    sys.exit(run_app(sys.argv[1:]))
