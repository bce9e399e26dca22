"""How the app tells the user that something failed: one sentence, with the details one click away."""

from __future__ import annotations

from PySide6.QtWidgets import QMessageBox, QWidget

from qdesk.gui.background import JobFailure, describe_failure


def show_failure(parent: QWidget, failure: JobFailure | BaseException, title: str = "qdesk") -> QMessageBox:
    """A non-blocking message box with the sentence and, under "Show Details…", the traceback."""
    if isinstance(failure, BaseException):
        failure = describe_failure(failure)
    box = QMessageBox(QMessageBox.Icon.Warning, title, failure.sentence, QMessageBox.StandardButton.Ok, parent)
    if failure.details:
        box.setDetailedText(failure.details)
    box.setObjectName("failureMessage")
    box.open()
    return box
