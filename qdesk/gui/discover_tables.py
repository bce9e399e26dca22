"""The Discover section's two tables: search results, and the model files of one repository with fit marks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem, QWidget

from converters.core.units import format_size
from qdesk.hub import FileGroup, FitMark, ModelSummary, RepoListing

DATA_ROLE = Qt.ItemDataRole.UserRole
_RIGHT = Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
_FITS, _DOES_NOT_FIT = QColor("#2e8b57"), QColor("#c0392b")


class _Table(QTableWidget):
    def __init__(self, name: str, columns: Sequence[str], parent: QWidget | None = None) -> None:
        super().__init__(0, len(columns), parent)
        self.setObjectName(name)
        self.setHorizontalHeaderLabels(list(columns))
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setAlternatingRowColors(True)
        self.setTabKeyNavigation(False)
        self.verticalHeader().hide()
        self.verticalHeader().setDefaultSectionSize(self.fontMetrics().height() + 10)
        header = self.horizontalHeader()  # the name takes what the other columns leave, so they always show
        header.setStretchLastSection(False)
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.setTextElideMode(Qt.TextElideMode.ElideMiddle)

    def _add_row(self, cells: Sequence[str], data: Any, right: Sequence[int] = ()) -> list[QTableWidgetItem]:
        row = self.rowCount()
        self.insertRow(row)
        items = []
        for column, text in enumerate(cells):
            item = QTableWidgetItem(text)
            if column in right:
                item.setTextAlignment(_RIGHT)
            item.setData(DATA_ROLE, data)
            self.setItem(row, column, item)
            items.append(item)
        return items

    def current_data(self) -> Any:
        item = self.item(self.currentRow(), 0) if self.currentRow() >= 0 else None
        return None if item is None or not item.isSelected() else item.data(DATA_ROLE)


class ResultsTable(_Table):
    """One row per repository: name, downloads, likes, last update, formats."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("searchResults", ("Repository", "Downloads", "Likes", "Updated", "Formats"), parent)

    def show_results(self, results: Sequence[ModelSummary]) -> None:
        self.setRowCount(0)
        for result in results:
            formats = ", ".join(result.formats) + (" · gated" if result.gated else "")
            updated = result.last_modified.date().isoformat() if result.last_modified else ""
            items = self._add_row((result.repo_id, f"{result.downloads:,}", f"{result.likes:,}", updated, formats),
                                  result, right=(1, 2))
            if result.gated:
                items[0].setToolTip("Gated: accept its licence on the Hub and log in with `hf auth login` first.")

    def current_result(self) -> ModelSummary | None:
        return self.current_data()


def fit_text(fit: FitMark | None) -> str:
    if fit is None or fit.fits is None:
        return "?"
    return ("✓ " if fit.fits else "✗ ") + fit.label


def _kind(group: FileGroup) -> str:
    if group.projector:
        return "projector"
    kind = group.quant_type or ("checkpoint" if group.kind == "safetensors" else "GGUF")
    return kind + (f", {len(group.files)}/{group.shard_count} shards" if group.shard_count > 1 else "")


class FilesTable(_Table):
    """One row per model file (a GGUF variant, a shard set, a checkpoint) with its type, size and fit mark."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("repoFiles", ("File", "Type", "Size", "Fits here"), parent)
        self.horizontalHeaderItem(3).setToolTip("Whether it fits this machine's memory: ✓ fits, ✓ ~fits (an "
                                                "estimate), ✗ does not fit, ? unknown; hover a mark for why")

    def show_listing(self, listing: RepoListing | None) -> None:
        self.setRowCount(0)
        for group in listing.groups if listing is not None else ():
            items = self._add_row((group.name, _kind(group), format_size(group.size), fit_text(group.fit)), group,
                                  right=(2,))
            if group.fit is not None:
                items[3].setToolTip(group.fit.summary)
                if group.fit.fits is not None:
                    items[3].setForeground(QBrush(_FITS if group.fit.fits else _DOES_NOT_FIT))

    def current_group(self) -> FileGroup | None:
        return self.current_data()

    def select_group(self, name: str) -> None:
        for row in range(self.rowCount()):
            if self.item(row, 0).text() == name:
                self.selectRow(row)
                return
