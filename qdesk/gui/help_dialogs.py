"""The Help menu's windows: the keyboard shortcuts, and About (versions, backends, and where qdesk keeps things)."""

from __future__ import annotations

import html

import PySide6
from PySide6.QtCore import Qt, QUrl, qVersion
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QGridLayout,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from qdesk.app.about import About, about
from qdesk.gui.background import Job, JobFailure
from qdesk.gui.context import AppContext
from qdesk.gui.shortcuts import SHORTCUTS


class ShortcutsDialog(QDialog):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("shortcutsDialog")
        self.setWindowTitle("Keyboard shortcuts")
        self.resize(640, 460)
        self.table = QTableWidget(len(SHORTCUTS), 3)
        self.table.setObjectName("shortcutsTable")
        self.table.setHorizontalHeaderLabels(["Where", "Keys", "Does"])
        self.table.verticalHeader().hide()
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        for row, cells in enumerate(SHORTCUTS):
            for column, text in enumerate(cells):
                self.table.setItem(row, column, QTableWidgetItem(text))
        self.table.resizeColumnsToContents()
        self.table.horizontalHeader().setStretchLastSection(True)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(self.table)
        layout.addWidget(buttons)


def qt_versions() -> dict[str, str]:
    return {"Qt": qVersion(), "PySide6": PySide6.__version__}


class AboutDialog(QDialog):
    """Versions and places at once; the backends once llama.cpp has been asked (in the background)."""

    def __init__(self, context: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("aboutDialog")
        self.setWindowTitle("About qdesk")
        self.info: About = about(qt_versions(), models_folder=context.models_folder, backends=False)
        self.versions = QLabel()
        self.versions.setObjectName("aboutVersions")
        self.versions.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.backends = QLabel("Looking for compute backends…")
        self.backends.setObjectName("aboutBackends")
        self.backends.setWordWrap(True)
        self.backends.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        places = QGridLayout()
        for row, place in enumerate(self.info.places):
            what = QLabel(f"<b>{html.escape(place.what)}</b>")
            where = QLabel(html.escape(str(place.path)))
            where.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            where.setToolTip(f"Moved by: {place.setting}")
            opener = QPushButton("Open")
            opener.setToolTip(f"Open {place.path if place.path.is_dir() else place.path.parent}")
            folder = place.path if place.path.is_dir() else place.path.parent
            opener.clicked.connect(lambda _=False, folder=folder: QDesktopServices.openUrl(
                QUrl.fromLocalFile(str(folder))))
            places.addWidget(what, row, 0)
            places.addWidget(where, row, 1)
            places.addWidget(opener, row, 2)
        places.setColumnStretch(1, 1)
        heading = QLabel("<h3>qdesk</h3>Convert, quantize, measure and chat with local LLMs as GGUF files.")
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(heading)
        layout.addWidget(self.versions)
        layout.addWidget(QLabel("<b>Compute backends</b>"))
        layout.addWidget(self.backends)
        layout.addWidget(QLabel("<b>Where qdesk keeps things</b>"))
        layout.addLayout(places)
        layout.addWidget(buttons)
        self._show_versions()
        self.job = Job("Looking for compute backends", lambda _progress, _cancel: about(qt_versions(), backends=True),
                       self)
        self.job.succeeded.connect(self._found)
        self.job.failed.connect(self._failed)
        context.run(self.job)

    def _show_versions(self) -> None:
        rows = "".join(f"<tr><td>{html.escape(name)}</td><td>&nbsp;&nbsp;{html.escape(value)}</td></tr>"
                       for name, value in self.info.versions.items())
        self.versions.setText(f"<table>{rows}</table>")

    def _found(self, found: About) -> None:
        self.info = About(found.versions, found.backends, self.info.places)
        self._show_versions()
        self.backends.setText("\n".join(found.backends))

    def _failed(self, failure: JobFailure) -> None:
        self.backends.setText(f"The backends could not be listed: {failure.sentence}")
