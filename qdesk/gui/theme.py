"""Light and dark, following the system unless the user chose one; one style sheet for qdesk's own touches."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QApplication

_SCHEMES = {
    "system": Qt.ColorScheme.Unknown,
    "light": Qt.ColorScheme.Light,
    "dark": Qt.ColorScheme.Dark,
}

STYLE_SHEET = """
QListWidget#sidebar { border: none; font-size: 11pt; padding-top: 8px; }
QListWidget#sidebar::item { padding: 9px 14px; border-radius: 6px; margin: 1px 6px; }
QListWidget#sidebar::item:selected { background: palette(highlight); color: palette(highlighted-text); }
QWidget#guideBanner { background: palette(alternate-base); border-bottom: 1px solid palette(mid); }
QLabel[role="heading"] { font-size: 15pt; font-weight: 600; }
QLabel[role="hint"] { color: palette(placeholder-text); }
QLabel[role="error"] { color: #c0392b; }
"""


def apply_theme(theme: str) -> None:
    """Apply "system", "light" or "dark" to the running application."""
    app = QApplication.instance()
    if not isinstance(app, QApplication):
        return
    QGuiApplication.styleHints().setColorScheme(_SCHEMES.get(theme, Qt.ColorScheme.Unknown))
    app.setStyleSheet(STYLE_SHEET)


def is_dark() -> bool:
    return QGuiApplication.styleHints().colorScheme() == Qt.ColorScheme.Dark
