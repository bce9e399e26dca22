"""The Library's tree: one branch per base model, one row per variant with its facts and status."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QTreeWidget, QTreeWidgetItem, QWidget

from converters.core.units import format_count, format_size
from qdesk.library.store import LibraryEntry

COLUMNS = ("Name", "Type", "Size", "Bits/weight", "Parameters", "Context", "Architecture", "Chat template",
           "Status")
NAME, TYPE, SIZE, BPW, PARAMETERS, CONTEXT, ARCHITECTURE, CHAT, STATUS = range(len(COLUMNS))
_RIGHT_ALIGNED = (SIZE, BPW, PARAMETERS, CONTEXT)
_PROBLEM_COLOUR = QColor("#c0392b")
ENTRY_ROLE = Qt.ItemDataRole.UserRole


def _status_text(entry: LibraryEntry) -> str:
    text = entry.status if entry.status != "ok" else "ready"
    if entry.read_only:
        text += " · read-only"
    return text


def _entry_cells(entry: LibraryEntry) -> list[str]:
    return [
        entry.id,
        entry.variant,
        format_size(entry.bytes),
        "" if entry.bpw is None else f"{entry.bpw:.2f}",
        format_count(entry.parameters) if entry.parameters else "",
        "" if entry.context_length is None else f"{entry.context_length:,}",
        entry.architecture or "",
        "yes" if entry.has_chat_template else "no",
        _status_text(entry),
    ]


class LibraryTree(QTreeWidget):
    """Models grouped by base model; several variants can be selected (a whole branch selects its variants)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("libraryTree")
        self.setColumnCount(len(COLUMNS))
        self.setHeaderLabels(list(COLUMNS))
        self.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.setAlternatingRowColors(True)
        self.setUniformRowHeights(True)
        self.setAllColumnsShowFocus(True)
        header = self.header()
        header.setStretchLastSection(True)
        header.setSectionResizeMode(NAME, QHeaderView.ResizeMode.Interactive)
        self.setColumnWidth(NAME, 300)
        self._collapsed: set[str] = set()
        self.itemCollapsed.connect(lambda item: self._collapsed.add(item.text(NAME)))
        self.itemExpanded.connect(lambda item: self._collapsed.discard(item.text(NAME)))

    def show_groups(self, groups: Mapping[str, list[LibraryEntry]]) -> None:
        """Replace the rows, keeping which models were selected and which branches were collapsed."""
        selected = {entry.path for entry in self.selected_entries()}
        collapsed = set(self._collapsed)
        self.clear()
        for base, variants in groups.items():
            branch = QTreeWidgetItem([base, ", ".join(entry.variant for entry in variants),
                                      format_size(sum(entry.bytes for entry in variants))])
            branch.setFlags(branch.flags() & ~Qt.ItemFlag.ItemIsDragEnabled)
            branch.setTextAlignment(SIZE, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            font = branch.font(NAME)
            font.setBold(True)
            branch.setFont(NAME, font)
            self.addTopLevelItem(branch)
            for entry in variants:
                row = QTreeWidgetItem(branch, _entry_cells(entry))
                row.setData(NAME, ENTRY_ROLE, entry)
                row.setToolTip(NAME, str(entry.path))
                for column in _RIGHT_ALIGNED:
                    row.setTextAlignment(column, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                if entry.problem:
                    row.setToolTip(STATUS, entry.problem)
                    row.setForeground(STATUS, QBrush(_PROBLEM_COLOUR))
                if entry.path in selected:
                    row.setSelected(True)
            branch.setExpanded(base not in collapsed)
        self._collapsed = collapsed & set(groups)
        for column in (TYPE, SIZE, BPW, PARAMETERS, CONTEXT, ARCHITECTURE, CHAT):
            self.resizeColumnToContents(column)

    def entries(self) -> list[LibraryEntry]:
        return [self.topLevelItem(i).child(j).data(NAME, ENTRY_ROLE)
                for i in range(self.topLevelItemCount()) for j in range(self.topLevelItem(i).childCount())]

    def selected_entries(self) -> list[LibraryEntry]:
        """The selected variants in the tree's order; a selected branch stands for all its variants."""
        chosen: list[LibraryEntry] = []
        for i in range(self.topLevelItemCount()):
            branch = self.topLevelItem(i)
            for j in range(branch.childCount()):
                row = branch.child(j)
                if branch.isSelected() or row.isSelected():
                    chosen.append(row.data(NAME, ENTRY_ROLE))
        return chosen

    def select_paths(self, paths: list[Path]) -> None:
        wanted = set(paths)
        self.clearSelection()
        for i in range(self.topLevelItemCount()):
            branch = self.topLevelItem(i)
            for j in range(branch.childCount()):
                row = branch.child(j)
                if row.data(NAME, ENTRY_ROLE).path in wanted:
                    row.setSelected(True)
                    self.scrollToItem(row)
