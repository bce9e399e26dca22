"""Light and dark, following the system unless the user chose one; one style sheet for qdesk's own touches."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QFont, QGuiApplication, QPalette
from PySide6.QtWidgets import QApplication

_SCHEMES = {
    "system": Qt.ColorScheme.Unknown,
    "light": Qt.ColorScheme.Light,
    "dark": Qt.ColorScheme.Dark,
}

STYLE_SHEET = """
QListWidget#sidebar { border: none; background: palette(base); font-size: 11pt; padding-top: 8px; }
QListWidget#sidebar::item { padding: 9px 14px; border-radius: 6px; margin: 1px 6px; }
QListWidget#sidebar::item:selected { background: palette(highlight); color: palette(highlighted-text); }
QWidget#guideBanner { background: palette(alternate-base); border-bottom: 1px solid palette(mid); }
QLabel[role="heading"] { font-size: 15pt; font-weight: 600; }
QLabel[role="hint"] { color: palette(placeholder-text); }
QLabel[role="error"] { color: #c0392b; }
"""


_DARK_COLOURS = {
    QPalette.ColorRole.Window: "#2b2b2b",
    QPalette.ColorRole.WindowText: "#e6e6e6",
    QPalette.ColorRole.Base: "#3a3a3a",  # lighter than the window, so fields and check boxes stand out
    QPalette.ColorRole.AlternateBase: "#333333",
    QPalette.ColorRole.ToolTipBase: "#3a3a3a",
    QPalette.ColorRole.ToolTipText: "#e6e6e6",
    QPalette.ColorRole.PlaceholderText: "#8c8c8c",
    QPalette.ColorRole.Text: "#e6e6e6",
    QPalette.ColorRole.Button: "#353535",
    QPalette.ColorRole.ButtonText: "#e6e6e6",
    QPalette.ColorRole.BrightText: "#ff6b6b",
    QPalette.ColorRole.Light: "#4a4a4a",
    QPalette.ColorRole.Midlight: "#404040",
    QPalette.ColorRole.Mid: "#555555",
    QPalette.ColorRole.Dark: "#1a1a1a",
    QPalette.ColorRole.Shadow: "#000000",
    QPalette.ColorRole.Highlight: "#3d7cc9",
    QPalette.ColorRole.HighlightedText: "#ffffff",
    QPalette.ColorRole.Link: "#6aa9ff",
    QPalette.ColorRole.LinkVisited: "#b48cff",
}
_DARK_DISABLED = {
    QPalette.ColorRole.WindowText: "#7a7a7a",
    QPalette.ColorRole.Text: "#7a7a7a",
    QPalette.ColorRole.ButtonText: "#7a7a7a",
}


def _dark_palette() -> QPalette:
    palette = QPalette()
    for role, colour in _DARK_COLOURS.items():
        palette.setColor(role, QColor(colour))
    for role, colour in _DARK_DISABLED.items():
        palette.setColor(QPalette.ColorGroup.Disabled, role, QColor(colour))
    return palette


def apply_theme(theme: str) -> None:
    """Apply "system", "light" or "dark" to the running application.

    The platform is asked for the colour scheme first; where it cannot switch (many Linux desktops, offscreen),
    the application's palette is set instead: Fusion's light one, or qdesk's dark one.
    """
    app = QApplication.instance()
    if not isinstance(app, QApplication):
        return
    wanted = _SCHEMES.get(theme, Qt.ColorScheme.Unknown)
    hints = QGuiApplication.styleHints()
    hints.setColorScheme(wanted)
    if wanted == Qt.ColorScheme.Unknown or hints.colorScheme() == wanted:
        app.setPalette(QPalette())  # the platform's own
    else:
        app.setPalette(_dark_palette() if wanted == Qt.ColorScheme.Dark else app.style().standardPalette())
    app.setStyleSheet(STYLE_SHEET)


def is_dark() -> bool:
    return QApplication.palette().color(QPalette.ColorRole.Window).lightness() < 128


_SYSTEM_FONT: QFont | None = None


def apply_font_size(points: int) -> None:
    """Every widget's text at `points` (0: the system's size)."""
    global _SYSTEM_FONT
    app = QApplication.instance()
    if not isinstance(app, QApplication):
        return
    if _SYSTEM_FONT is None:
        _SYSTEM_FONT = QFont(app.font())
    font = QFont(_SYSTEM_FONT)
    if points > 0:
        font.setPointSize(points)
    if app.font() != font:
        app.setFont(font)
