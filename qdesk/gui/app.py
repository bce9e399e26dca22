"""Starting the desktop app: `qdesk` or `qdesk gui`."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from PySide6.QtCore import QTimer
from PySide6.QtGui import QIcon
from PySide6.QtWidgets import QApplication

from converters.core.paths import resources_dir
from qdesk.app.errors import UserError
from qdesk.gui.context import AppContext
from qdesk.gui.main_window import MainWindow
from qdesk.gui.platform_check import platform_problem
from qdesk.gui.theme import apply_theme

APP_NAME = "qdesk"
_DISPLAY_VARIABLES = ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")


def application(argv: Sequence[str] = ()) -> QApplication:
    """The running QApplication, made once with qdesk's name, icon and style."""
    app = QApplication.instance()
    if not isinstance(app, QApplication):
        app = QApplication([APP_NAME, *argv])
    app.setApplicationName(APP_NAME)
    app.setOrganizationName(APP_NAME)
    app.setDesktopFileName(APP_NAME)
    app.setStyle("Fusion")
    icon = resources_dir() / "icons" / "qdesk.svg"
    if icon.is_file():
        app.setWindowIcon(QIcon(str(icon)))
    return app


def open_main_window(context: AppContext | None = None) -> MainWindow:
    context = context or AppContext()
    apply_theme(context.settings.theme)
    window = MainWindow(context)
    window.show()
    return window


def check_display() -> None:
    """Refuse, in one sentence, to start where Qt would abort for want of a display or of its X11 libraries."""
    if sys.platform.startswith("linux") and not any(os.environ.get(name) for name in _DISPLAY_VARIABLES):
        raise UserError("There is no display to open the window on (DISPLAY and WAYLAND_DISPLAY are unset); run "
                        "qdesk on a desktop session, or use the command-line tools (`qdesk --help`).")
    problem = platform_problem()
    if problem is not None:
        raise UserError(problem)


def run_app(argv: Sequence[str] = (), *, quit_after_s: float | None = None) -> int:
    check_display()
    app = application(argv)
    window = open_main_window()
    window.raise_()
    if quit_after_s is not None:
        QTimer.singleShot(int(quit_after_s * 1000), window.close)
    return app.exec()


if __name__ == "__main__":
    sys.exit(run_app(sys.argv[1:]))
