"""How the app tells the user that something failed: one sentence, with the details one click away."""

from __future__ import annotations

from PySide6.QtCore import QUrl
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import QMessageBox, QWidget

from qdesk.app.logs import log_failure
from qdesk.gui.background import JobFailure, describe_failure
from qdesk.memory import format_size


def show_failure(parent: QWidget, failure: JobFailure | BaseException, title: str = "qdesk") -> QMessageBox:
    """A non-blocking message box with the sentence; the details (a traceback) go to the log file
    (`qdesk.app.logs`), which "Open log" opens: a user never reads a traceback in a window."""
    if isinstance(failure, BaseException):
        failure = describe_failure(failure)
    box = QMessageBox(QMessageBox.Icon.Warning, title, failure.sentence, QMessageBox.StandardButton.Ok, parent)
    log = log_failure(failure.sentence, failure.details) if failure.details else None
    if log is not None:
        box.setInformativeText(f"The details are in qdesk's log ({log}).")
        opener = box.addButton("Open log", QMessageBox.ButtonRole.ActionRole)
        opener.setObjectName("openLog")
        opener.clicked.connect(lambda: QDesktopServices.openUrl(QUrl.fromLocalFile(str(log))))
    box.setObjectName("failureMessage")
    box.open()
    return box


def format_seconds(seconds: float | None) -> str:
    """"1 h 02 min", "3 min 05 s", "12 s", or "" when unknown."""
    if seconds is None:
        return ""
    seconds = max(0, round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def format_bytes(n: int | float | None) -> str:
    """`qdesk.memory.format_size`, or "" when the size is unknown."""
    return "" if n is None else format_size(int(n))
