"""The Library section: the user's models grouped by base model, imported, deleted, revealed and sent on."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from PySide6.QtCore import QPoint, QSettings, Qt, QTimer, QUrl, Signal
from PySide6.QtGui import QDesktopServices, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QMenu,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from converters.core.jobs import Progress
from converters.core.units import format_duration, format_size
from qdesk.evaluation.history import EvaluationHistory
from qdesk.gui.background import Job, JobFailure, describe_failure
from qdesk.gui.context import AppContext
from qdesk.gui.feedback import show_failure
from qdesk.gui.library_jobs import ImportOutcome, import_files, refresh_library, remove_models, scan_known_folders
from qdesk.gui.library_tree import LibraryTree
from qdesk.gui.type_map import TypeMapDialog
from qdesk.library.identity import ModelGroup, display_name
from qdesk.library.store import Library, LibraryEntry, LibraryError

MAX_COMPARE_PANES = 4
HINT = "Drop .gguf files anywhere on this window to import them (or press Import…)."
EMPTY = "No models yet. " + HINT


class LibraryView(QWidget):
    report_requested = Signal(object)  # Path: show the last evaluation that measured this model

    def __init__(self, context: AppContext) -> None:
        super().__init__()
        self.context = context
        self.refresh_job: Job | None = None
        self.task_job: Job | None = None  # an import, a removal or a scan: one at a time
        self.confirm_box: QMessageBox | None = None
        self._refresh_again = False
        self._offered_starter: set[Path] = set()  # models folders the starter model was offered to
        self._import_queue: list[Path] = []
        self._select_after: list[Path] = []

        heading = QLabel("Library")
        heading.setProperty("role", "heading")
        hint = QLabel(HINT)
        hint.setProperty("role", "hint")
        self.tree = LibraryTree()
        self.tree.itemSelectionChanged.connect(self._update_actions)
        self.tree.itemDoubleClicked.connect(lambda item, _column: item.childCount() or self.open_in_compare())
        self.tree.group_renamed.connect(self.rename_group)
        self.tree.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.tree.customContextMenuRequested.connect(self._context_menu)

        self.import_button = self._button("&Import…", "importButton", self.choose_files, "Copy .gguf files into "
                                          "the models folder (Ctrl+O)")
        self.delete_button = self._button("&Delete…", "deleteButton", self.delete_selected,
                                          "Remove the selected models (Delete)")
        self.reveal_button = self._button("&Reveal", "revealButton", self.reveal_selected,
                                          "Show the selected model's folder in the file manager")
        self.compare_button = self._button("Open in &Compare", "compareButton", self.open_in_compare,
                                           f"Chat with 1 to {MAX_COMPARE_PANES} selected models side by side")
        self.evaluate_button = self._button("&Evaluate", "evaluateButton", self.open_in_evaluate,
                                            "Measure the selected variants against the first (largest) one")
        self.types_button = self._button("&Tensor types…", "typesButton", self.show_types,
                                         "Bits per weight of every matrix, by tensor class and layer")
        self.report_button = self._button("Last e&valuation", "reportButton", self.open_last_evaluation,
                                          "Show the last evaluation that measured the selected model")
        self.history = EvaluationHistory()
        self.refresh_button = self._button("Re&fresh", "refreshButton", self.refresh,
                                           "Look for new, changed and missing files (F5)")
        self.scan_button = self._button("Find &other apps' models", "scanButton", self.scan_other_apps,
                                        "Add the Hugging Face cache, LM Studio's and Ollama's models, read-only")
        buttons = QHBoxLayout()
        for button in (self.import_button, self.delete_button, self.reveal_button, self.compare_button,
                       self.evaluate_button, self.report_button, self.types_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(self.scan_button)
        buttons.addWidget(self.refresh_button)

        self.progress_bar = QProgressBar()
        self.progress_bar.setObjectName("libraryProgress")
        self.progress_label = QLabel()
        self.progress_label.setObjectName("libraryProgressLabel")
        self.cancel_button = self._button("Cancel", "libraryCancel", self.cancel_task, "Stop (Esc)")
        self.progress_row = QWidget()
        progress_layout = QHBoxLayout(self.progress_row)
        progress_layout.setContentsMargins(0, 0, 0, 0)
        progress_layout.addWidget(self.progress_label, 1)
        progress_layout.addWidget(self.progress_bar, 1)
        progress_layout.addWidget(self.cancel_button)
        self.progress_row.hide()
        self.message = QLabel()
        self.message.setObjectName("libraryMessage")
        self.message.setWordWrap(True)

        layout = QVBoxLayout(self)
        layout.addWidget(heading)
        layout.addWidget(hint)
        layout.addLayout(buttons)
        layout.addWidget(self.tree, 1)
        layout.addWidget(self.progress_row)
        layout.addWidget(self.message)
        self.setTabOrder(self.tree, self.import_button)

        for keys, slot in ((QKeySequence.StandardKey.Delete, self.delete_selected),
                           (QKeySequence.StandardKey.Open, self.choose_files),
                           (QKeySequence.StandardKey.Refresh, self.refresh),
                           (QKeySequence(Qt.Key.Key_Escape), self.cancel_task),
                           (QKeySequence(Qt.Key.Key_F2), self.tree.rename_current_group)):
            shortcut = QShortcut(QKeySequence(keys), self)
            shortcut.setContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
            shortcut.activated.connect(slot)

        context.library_changed.connect(self.refresh)
        self._update_actions()
        QTimer.singleShot(0, self.refresh)

    def _button(self, text: str, name: str, slot: object, tip: str) -> QPushButton:
        button = QPushButton(text)
        button.setObjectName(name)
        button.setToolTip(tip)
        button.clicked.connect(slot)
        return button

    # --- the hooks the main window calls ---

    def activated(self) -> None:
        self.tree.setFocus()

    def save_state(self, state: QSettings) -> None:
        state.setValue("library/columns", self.tree.header().saveState())

    def restore_state(self, state: QSettings) -> None:
        header = state.value("library/columns")
        if header is not None:
            self.tree.header().restoreState(header)

    def shutdown(self) -> None:
        self._import_queue.clear()
        for job in (self.refresh_job, self.task_job):
            if job is not None:
                job.cancel()

    # --- reading the library ---

    def _library(self) -> Library | None:
        try:
            return self.context.library()
        except LibraryError as error:
            self._say(str(error), error=True)
            return None

    def refresh(self) -> None:
        """Rescan the library in the background (again after the running scan, if one is running)."""
        if self.refresh_job is not None:
            self._refresh_again = True
            return
        library = self._library()
        if library is None:
            return
        offer = library.root not in self._offered_starter
        self._offered_starter.add(library.root)
        job = Job("Refreshing the library", lambda progress, cancel: refresh_library(
            library, progress, cancel, offer_starter=offer), self)
        job.succeeded.connect(lambda groups: self._refreshed(library, groups))
        job.failed.connect(self._refresh_failed)
        job.ended.connect(self._refresh_ended)
        self.refresh_job = self.context.run(job)

    def _refreshed(self, library: Library, groups: list[ModelGroup]) -> None:
        if library.root != self.context.models_folder:
            self._refresh_again = True  # the models folder changed meanwhile
            return
        self.tree.show_groups(groups)
        if self._select_after:
            self.tree.select_paths(self._select_after)
            self._select_after = []
        if not groups:
            self._say(EMPTY)
        elif self.message.text() == EMPTY:
            self._say("")
        self._update_actions()

    def _refresh_failed(self, failure: JobFailure) -> None:
        if not failure.cancelled:
            self._say(failure.sentence, error=True)
            show_failure(self, failure, "Library")

    def _refresh_ended(self) -> None:
        self.refresh_job = None
        if self._refresh_again:
            self._refresh_again = False
            self.refresh()

    # --- importing ---

    def choose_files(self) -> None:
        names, _ = QFileDialog.getOpenFileNames(self, "Import models", str(Path.home()), "GGUF models (*.gguf)")
        if names:
            self.import_files([Path(name) for name in names])

    def import_files(self, paths: list[Path]) -> None:
        """Copy GGUF files into the library in the background (after the running task, if any)."""
        self._import_queue.extend(path for path in paths if path not in self._import_queue)
        self._start_next_import()

    def _start_next_import(self) -> None:
        if self.task_job is not None or not self._import_queue:
            return
        library = self._library()
        if library is None:
            self._import_queue.clear()
            return
        paths, self._import_queue = list(self._import_queue), []
        title = f"Importing {paths[0].name}" if len(paths) == 1 else f"Importing {len(paths)} models"
        job = Job(title, lambda progress, cancel: import_files(library, paths, progress, cancel), self)
        job.succeeded.connect(self._imported)
        self._start_task(job)

    def _imported(self, outcome: ImportOutcome) -> None:
        self._select_after = [entry.path for entry in outcome.imported]
        if outcome.failures:
            self._say(" ".join(outcome.failures), error=True)
        elif outcome.imported:
            self._say(f"Imported {', '.join(entry.id for entry in outcome.imported)}.")
        self.context.library_changed.emit()

    # --- removing ---

    def delete_selected(self) -> None:
        """Ask, then remove the selected models: imported files are deleted, others only leave the library."""
        entries = self.tree.selected_entries()
        if not entries or self.task_job is not None:
            return
        own = [entry for entry in entries if not entry.read_only]
        kept = [entry for entry in entries if entry.read_only]
        lines = []
        if own:
            lines.append("Delete " + _names(own) + "? " + ("Its file is" if len(own) == 1 else "Their files are")
                         + " deleted from the models folder.")
        if kept:
            lines.append("Remove " + _names(kept) + " from the library? " + ("It is" if len(kept) == 1 else
                         "They are") + " not the library's own copy, so the file stays where it is.")
        box = QMessageBox(QMessageBox.Icon.Question, "Delete models", "\n\n".join(lines),
                          QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.Cancel, self)
        box.setObjectName("confirmDelete")
        box.setDefaultButton(QMessageBox.StandardButton.Cancel)
        box.button(QMessageBox.StandardButton.Yes).setText("Delete" if own else "Remove")
        box.finished.connect(lambda answer: self._confirmed(answer, [entry.id for entry in entries]))
        self.confirm_box = box
        box.open()

    def _confirmed(self, answer: int, ids: list[str]) -> None:
        self.confirm_box = None
        if answer != QMessageBox.StandardButton.Yes or self.task_job is not None:
            return
        library = self._library()
        if library is None:
            return
        job = Job(f"Removing {len(ids)} models", lambda progress, cancel: remove_models(library, ids, progress,
                                                                                         cancel), self)
        job.succeeded.connect(lambda count: self._say(f"Removed {count} model{'s' if count != 1 else ''}."))
        job.ended.connect(self.context.library_changed.emit)
        self._start_task(job)

    # --- other apps' folders ---

    def scan_other_apps(self) -> None:
        library = self._library()
        if library is None or self.task_job is not None:
            return
        job = Job("Looking for other apps' models",
                  lambda progress, cancel: scan_known_folders(library, progress, cancel), self)
        job.succeeded.connect(lambda labels: self._say(
            f"Added the models of: {', '.join(labels)} (read-only)." if labels else
            "No Hugging Face cache, LM Studio or Ollama models folder was found."))
        job.ended.connect(self.context.library_changed.emit)
        self._start_task(job)

    # --- the running task ---

    def _start_task(self, job: Job) -> None:
        job.progressed.connect(lambda progress: self._show_progress(job, progress))
        job.failed.connect(self._task_failed)
        job.ended.connect(self._task_ended)
        self.progress_label.setText(job.title + "…")
        self.progress_bar.setRange(0, 0)
        self.progress_row.show()
        self._say("")
        self.task_job = self.context.run(job)
        self._update_actions()

    def _show_progress(self, job: Job, progress: Progress) -> None:
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setValue(round(progress.fraction * 1000))
        text = progress.message or job.title
        if progress.unit == "bytes" and progress.total:
            text += f" — {format_size(progress.done)} of {format_size(progress.total)}"
        left = format_duration(job.seconds_left())
        self.progress_label.setText(text + (f", {left} left" if left else ""))

    def _task_failed(self, failure: JobFailure) -> None:
        if failure.cancelled:
            self._say("Cancelled; nothing was left half-copied.")
        else:
            self._say(failure.sentence, error=True)
            show_failure(self, failure, "Library")

    def _task_ended(self) -> None:
        self.task_job = None
        self.progress_row.hide()
        self._update_actions()
        self._start_next_import()

    def cancel_task(self) -> None:
        self._import_queue.clear()
        if self.task_job is not None:
            self.task_job.cancel()

    # --- naming models ---

    def rename_group(self, group: ModelGroup, name: str) -> None:
        """Show `group` as `name` from now on ("" gives it back the name its files give)."""
        library = self._library()
        if library is None:
            return
        try:
            library.rename_group(group.key, name)
        except (LibraryError, sqlite3.Error) as error:
            self._say(f"The model could not be renamed: {error}", error=True)
        self.context.library_changed.emit()

    def _context_menu(self, position: QPoint) -> None:
        menu = QMenu(self)
        menu.setObjectName("libraryMenu")
        menu.addAction("Open in Compare", self.open_in_compare).setEnabled(self.compare_button.isEnabled())
        menu.addAction("Evaluate", self.open_in_evaluate).setEnabled(self.evaluate_button.isEnabled())
        menu.addAction("Tensor types…", self.show_types).setEnabled(self.types_button.isEnabled())
        menu.addAction("Last evaluation", self.open_last_evaluation).setEnabled(self.report_button.isEnabled())
        menu.addSeparator()
        menu.addAction("Rename model…\tF2", self.tree.rename_current_group).setEnabled(
            self.tree.currentItem() is not None)
        menu.addAction("Reveal", self.reveal_selected).setEnabled(self.reveal_button.isEnabled())
        menu.addAction("Delete…", self.delete_selected).setEnabled(self.delete_button.isEnabled())
        menu.popup(self.tree.viewport().mapToGlobal(position))

    def display_name(self, entry: LibraryEntry) -> str:
        group = self.tree.group_of(entry)
        return display_name(entry, group.name if group is not None else None)

    # --- sending models elsewhere ---

    def reveal_selected(self) -> None:
        entries = self.tree.selected_entries()
        if not entries:
            return
        folder = entries[0].path.parent
        if not QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder))):
            show_failure(self, describe_failure(LibraryError(f"No file manager could open {folder}; open it "
                                                             "yourself.")))

    def open_in_compare(self) -> None:
        entries = self.tree.selected_entries()
        if 1 <= len(entries) <= MAX_COMPARE_PANES:
            self.context.open_in_compare.emit([entry.path for entry in entries])
        elif entries:
            self._say(f"Select at most {MAX_COMPARE_PANES} models to compare.", error=True)

    def open_in_evaluate(self) -> None:
        entries = self.tree.selected_entries()
        if entries:
            self.context.open_in_evaluate.emit([entry.path for entry in entries])

    def open_last_evaluation(self) -> None:
        entries = self.tree.selected_entries()
        if len(entries) == 1 and self.history.latest(entries[0].path) is not None:
            self.report_requested.emit(entries[0].path)

    def show_types(self) -> TypeMapDialog | None:
        entries = self.tree.selected_entries()
        if len(entries) != 1:
            return None
        dialog = TypeMapDialog(entries[0].path, self.context, self, title=self.display_name(entries[0]))
        dialog.open()
        return dialog

    # --- small things ---

    def _update_actions(self) -> None:
        count = len(self.tree.selected_entries())
        busy = self.task_job is not None
        self.delete_button.setEnabled(count > 0 and not busy)
        self.reveal_button.setEnabled(count > 0)
        self.compare_button.setEnabled(1 <= count <= MAX_COMPARE_PANES)
        self.evaluate_button.setEnabled(count > 0)
        self.types_button.setEnabled(count == 1)
        entries = self.tree.selected_entries()
        evaluated = len(entries) == 1 and self.history.latest(entries[0].path) is not None
        self.report_button.setEnabled(evaluated)
        self.scan_button.setEnabled(not busy)

    def _say(self, text: str, *, error: bool = False) -> None:
        self.message.setText(text)
        self.message.setProperty("role", "error" if error else "hint")
        self.message.style().unpolish(self.message)
        self.message.style().polish(self.message)


def _names(entries: list[LibraryEntry]) -> str:
    names = [entry.id for entry in entries]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
