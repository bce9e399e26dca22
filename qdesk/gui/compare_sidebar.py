"""Compare's conversation list: every saved conversation, newest first, with search, rename and delete."""

from __future__ import annotations

from collections.abc import Sequence

from PySide6.QtCore import QPoint, Qt, QTimer, Signal
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QAbstractItemView,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMenu,
    QVBoxLayout,
    QWidget,
)

from qdesk.chat.conversations import ConversationSummary

ID_ROLE = Qt.ItemDataRole.UserRole
SEARCH_DELAY_MS = 200


class ConversationList(QWidget):
    open_requested = Signal(str)
    rename_requested = Signal(str, str)  # id, the new title ("" gives back the first prompt)
    delete_requested = Signal(str)
    search_changed = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("conversationList")
        self._filling = False
        self.search = QLineEdit()
        self.search.setObjectName("conversationSearch")
        self.search.setPlaceholderText("Search conversations")
        self.search.setClearButtonEnabled(True)
        self.list = QListWidget()
        self.list.setObjectName("conversationItems")
        self.list.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.list.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.list.setWordWrap(True)
        self.list.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.list.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.search)
        layout.addWidget(self.list, 1)

        self._search_timer = QTimer(self)
        self._search_timer.setSingleShot(True)
        self._search_timer.setInterval(SEARCH_DELAY_MS)
        self._search_timer.timeout.connect(lambda: self.search_changed.emit(self.search.text()))
        self.search.textChanged.connect(self._search_timer.start)
        self.list.itemActivated.connect(self._activated)
        self.list.itemClicked.connect(self._activated)
        self.list.itemChanged.connect(self._renamed)
        self.list.customContextMenuRequested.connect(self._menu)
        for keys, slot in ((QKeySequence(Qt.Key.Key_F2), self.rename_current),
                           (QKeySequence(QKeySequence.StandardKey.Delete), self.delete_current)):
            shortcut = QShortcut(keys, self.list)
            shortcut.setContext(Qt.ShortcutContext.WidgetShortcut)
            shortcut.activated.connect(slot)

    def show_summaries(self, summaries: Sequence[ConversationSummary], current: str | None) -> None:
        self._filling = True
        self.list.clear()
        for summary in summaries:
            when = summary.updated[:16].replace("T", " ")
            item = QListWidgetItem(summary.title)
            item.setData(ID_ROLE, summary.id)
            item.setToolTip(f"{summary.title}\n{when} · {summary.turns} turn{'s' if summary.turns != 1 else ''}"
                            + (f"\n{', '.join(summary.models)}" if summary.models else ""))
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsEditable)
            self.list.addItem(item)
            if summary.id == current:
                item.setSelected(True)
                self.list.setCurrentItem(item)
        if not summaries:
            empty = QListWidgetItem("No conversations match." if self.search.text().strip() else
                                    "No saved conversations yet.")
            empty.setFlags(Qt.ItemFlag.NoItemFlags)
            self.list.addItem(empty)
        self._filling = False

    def ids(self) -> list[str]:
        return [self.list.item(row).data(ID_ROLE) for row in range(self.list.count())
                if self.list.item(row).data(ID_ROLE)]

    def item_of(self, identifier: str) -> QListWidgetItem | None:
        return next((self.list.item(row) for row in range(self.list.count())
                     if self.list.item(row).data(ID_ROLE) == identifier), None)

    def rename_current(self) -> None:
        item = self.list.currentItem()
        if item is not None and item.data(ID_ROLE):
            self.list.editItem(item)

    def delete_current(self) -> None:
        item = self.list.currentItem()
        if item is not None and item.data(ID_ROLE):
            self.delete_requested.emit(item.data(ID_ROLE))

    def _activated(self, item: QListWidgetItem) -> None:
        if item.data(ID_ROLE):
            self.open_requested.emit(item.data(ID_ROLE))

    def _renamed(self, item: QListWidgetItem) -> None:
        if not self._filling and item.data(ID_ROLE):
            self.rename_requested.emit(item.data(ID_ROLE), item.text())

    def _menu(self, position: QPoint) -> None:
        item = self.list.itemAt(position)
        if item is None or not item.data(ID_ROLE):
            return
        self.list.setCurrentItem(item)
        menu = QMenu(self)
        menu.addAction("Open", lambda: self.open_requested.emit(item.data(ID_ROLE)))
        menu.addAction("Rename\tF2", self.rename_current)
        menu.addAction("Delete…\tDel", self.delete_current)
        menu.popup(self.list.viewport().mapToGlobal(position))
