"""The Discover section (placeholder until its view lands)."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

from qdesk.gui.context import AppContext


class DiscoverView(QWidget):
    def __init__(self, context: AppContext) -> None:
        super().__init__()
        self.context = context
        layout = QVBoxLayout(self)
        heading = QLabel("Discover")
        heading.setProperty("role", "heading")
        layout.addWidget(heading)
        layout.addStretch(1)

    def import_files(self, paths: list[Path]) -> None:
        del paths

    def set_source(self, path: Path) -> None:
        del path
