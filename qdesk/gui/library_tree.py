"""The Library's tree: one branch per base model, one row per variant with its facts and status."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QTreeWidget, QTreeWidgetItem, QWidget

from converters.core.units import format_count, format_size
from qdesk.library.identity import ModelGroup
from qdesk.library.store import LibraryEntry

COLUMNS = ("Name", "Type", "Size", "Bits/weight", "Parameters", "Context", "Architecture", "Chat", "Status")
NAME, TYPE, SIZE, BPW, PARAMETERS, CONTEXT, ARCHITECTURE, CHAT, STATUS = range(len(COLUMNS))
_RIGHT_ALIGNED = (SIZE, BPW, PARAMETERS, CONTEXT)
_PROBLEM_COLOUR = QColor("#c0392b")
ENTRY_ROLE = Qt.ItemDataRole.UserRole
GROUP_ROLE = Qt.ItemDataRole.UserRole + 1


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

    group_renamed = Signal(object, str)  # ModelGroup, the name the user typed ("" for the files' own name)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._filling = False
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)  # F2 and the menu rename groups
        self.itemChanged.connect(self._item_changed)
        self.setObjectName("libraryTree")
        self.setColumnCount(len(COLUMNS))
        self.setHeaderLabels(list(COLUMNS))
        self.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.setAlternatingRowColors(True)
        self.setUniformRowHeights(True)
        self.setAllColumnsShowFocus(True)
        header = self.header()  # the name takes the width left over, so every column shows at 1024 px and at 1920
        header.setStretchLastSection(False)
        header.setMinimumSectionSize(40)
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(NAME, QHeaderView.ResizeMode.Stretch)
        self.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self._collapsed: set[str] = set()
        self.itemCollapsed.connect(lambda item: self._collapsed.add(item.text(NAME)))
        self.itemExpanded.connect(lambda item: self._collapsed.discard(item.text(NAME)))

    def show_groups(self, groups: Sequence[ModelGroup]) -> None:
        """Replace the rows, keeping which models were selected and which branches were collapsed."""
        selected = {entry.path for entry in self.selected_entries()}
        collapsed = set(self._collapsed)
        self._filling = True
        self.clear()
        for group in groups:
            base, variants = group.name, group.entries
            branch = QTreeWidgetItem([base, ", ".join(entry.variant for entry in variants),
                                      format_size(sum(entry.bytes for entry in variants))])
            branch.setData(NAME, GROUP_ROLE, group)
            branch.setToolTip(NAME, f"{base}: one model ({group.entries[0].architecture or 'unknown architecture'}), "
                                    f"{len(variants)} file{'s' if len(variants) != 1 else ''}. Rename it with F2.")
            branch.setFlags((branch.flags() & ~Qt.ItemFlag.ItemIsDragEnabled) | Qt.ItemFlag.ItemIsEditable)
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
        self._collapsed = collapsed & {group.name for group in groups}
        self._filling = False

    def group_of(self, entry: LibraryEntry) -> ModelGroup | None:
        for i in range(self.topLevelItemCount()):
            group = self.topLevelItem(i).data(NAME, GROUP_ROLE)
            if group is not None and entry in group.entries:
                return group
        return None

    def rename_current_group(self) -> bool:
        """Start editing the name of the current row's group (F2); False when nothing is selected."""
        selected = self.selectedItems()
        item = selected[0] if selected else self.currentItem()
        if item is None:
            return False
        branch = item.parent() or item
        self.setCurrentItem(branch)
        self.editItem(branch, NAME)
        return True

    def _item_changed(self, item: QTreeWidgetItem, column: int) -> None:
        group = item.data(NAME, GROUP_ROLE)
        if self._filling or column != NAME or item.parent() is not None or group is None:
            return
        name = " ".join(item.text(NAME).split())
        if name != group.name:
            self.group_renamed.emit(group, name)

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
