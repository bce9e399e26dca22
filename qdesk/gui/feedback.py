"""How the app tells the user that something failed: one sentence, with the details one click away."""

from __future__ import annotations

from PySide6.QtCore import QUrl
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import QMessageBox, QWidget

from qdesk.app.logs import log_failure
from qdesk.gui.background import JobFailure, describe_failure


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
