"""The Compare prompt box: Enter sends, Shift+Enter starts a new line, Esc stops every answer."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QKeyEvent
from PySide6.QtWidgets import QPlainTextEdit, QWidget

SEND_KEYS = (Qt.Key.Key_Return, Qt.Key.Key_Enter)


class PromptBox(QPlainTextEdit):
    submitted = Signal()
    stop_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("promptBox")
        self.setPlaceholderText("Ask every pane… (Enter sends, Shift+Enter for a new line, Esc stops)")
        self.setTabChangesFocus(True)
        self.setMaximumHeight(110)

    def keyPressEvent(self, event: QKeyEvent) -> None:
        modifiers = event.modifiers() & ~Qt.KeyboardModifier.KeypadModifier
        if event.key() in SEND_KEYS:
            if modifiers & Qt.KeyboardModifier.ShiftModifier:
                self.insertPlainText("\n")
            elif modifiers == Qt.KeyboardModifier.NoModifier:
                self.submitted.emit()
            else:
                super().keyPressEvent(event)
            return
        if event.key() == Qt.Key.Key_Escape:
            self.stop_requested.emit()
            return
        super().keyPressEvent(event)
