"""The Compare section: 2 to 4 panes side by side, each bound to a model, one prompt box sending to all of them.

Answers stream into every pane at once; where a pane's answer leaves the first pane's, the rest of it is
highlighted. The conversation (`qdesk.chat.conversations`) is saved after every turn and reopened from the
Conversations menu; the open panes and conversation come back on restart through `save_state`/`restore_state`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
from dataclasses import replace
from pathlib import Path

from PySide6.QtCore import QSettings, Qt, QTimer
from PySide6.QtGui import QKeySequence, QShortcut, QShowEvent
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QMenu,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from converters.core.errors import UserError
from qdesk.app.settings import Settings
from qdesk.chat.compare import MAX_VARIANTS, fits_together
from qdesk.chat.conversations import (
    Answer,
    Conversation,
    ConversationStore,
    PaneRecord,
    conversation_json,
    diverging_offset,
    export_conversation,
    new_conversation,
)
from qdesk.chat.engine import ChatResult, LoadOptions, SamplingOptions
from qdesk.gui.background import Job, JobFailure
from qdesk.gui.compare_pane import ComparePane, TranscriptEntry, facts_text
from qdesk.gui.compare_prompt import PromptBox
from qdesk.gui.compare_runner import PaneRunner
from qdesk.gui.compare_settings import SEED_LIMIT, SamplingEditor
from qdesk.gui.context import AppContext
from qdesk.gui.feedback import show_failure
from qdesk.library.info import read_model_info
from qdesk.library.store import LibraryEntry

MIN_PANES = 2
MAX_PANES = MAX_VARIANTS
CHAT_CONTEXT = 4096
"""Tokens of context each pane's model is loaded with: room for a few turns of conversation."""
RENDER_INTERVAL_MS = 40
"""Streamed text is drawn at most this often, however fast the models answer."""
MENU_CONVERSATIONS = 30
STATE_PANES, STATE_CONVERSATION, STATE_SPLITTER = "compare/panes", "compare/conversation", "compare/splitter"


class CompareView(QWidget):
    def __init__(self, context: AppContext) -> None:
        super().__init__()
        self.context = context
        self.store = ConversationStore()
        settings = context.settings
        self.conversation: Conversation = new_conversation(system=settings.system_prompt, sampling=settings.sampling)
        self.panes: list[ComparePane] = []
        self._retired: list[PaneRunner] = []
        self._entries: list[LibraryEntry] = []
        self._file_types: dict[Path, str | None] = {}
        self._live: dict[ComparePane, str] = {}
        self._used: dict[ComparePane, tuple[SamplingOptions, str]] = {}
        self._running: set[ComparePane] = set()
        self._turn_index: int | None = None
        self._panes_restored = False
        self._defaults_offered = False
        self._library_job: object | None = None
        self._library_again = False

        heading = QLabel("Compare")
        heading.setProperty("role", "heading")
        self.title = QLabel()
        self.title.setObjectName("conversationTitle")
        self.title.setProperty("role", "hint")
        self.new_button = QPushButton("&New conversation")
        self.new_button.setObjectName("newConversation")
        self.history_button = QPushButton("&Conversations")
        self.history_button.setObjectName("conversationsButton")
        self.history_menu = QMenu(self.history_button)
        self.history_menu.setObjectName("conversationsMenu")
        self.history_button.setMenu(self.history_menu)
        self.export_button = QPushButton("E&xport…")
        self.export_button.setObjectName("exportConversation")
        self.export_button.setToolTip("Save this conversation as Markdown or JSON")
        self.add_button = QPushButton("&Add pane")
        self.add_button.setObjectName("addPane")
        top = QHBoxLayout()
        top.addWidget(heading)
        top.addWidget(self.title, 1)
        for widget in (self.new_button, self.history_button, self.export_button, self.add_button):
            top.addWidget(widget)

        self.shared = SamplingEditor("shared")
        self.shared.setObjectName("sharedSettings")
        self.shared.set_values(self.conversation.sampling, self.conversation.system)
        shared_label = QLabel("Shared:")
        shared_label.setToolTip("System prompt and sampling settings for every pane without its own")
        shared_row = QHBoxLayout()
        shared_row.addWidget(shared_label)
        shared_row.addWidget(self.shared, 1)

        self.memory_warning = QLabel()
        self.memory_warning.setObjectName("memoryWarning")
        self.memory_warning.setWordWrap(True)
        self.memory_warning.setProperty("role", "error")
        self.memory_warning.hide()
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.setObjectName("paneSplitter")
        self.splitter.setChildrenCollapsible(False)
        self.notice = QLabel()
        self.notice.setObjectName("compareNotice")
        self.notice.setWordWrap(True)
        self.notice.setProperty("role", "error")
        self.notice.hide()

        self.prompt = PromptBox()
        self.send_button = QPushButton("&Send")
        self.send_button.setObjectName("sendButton")
        self.send_button.setDefault(False)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setObjectName("stopButton")
        self.stop_button.setToolTip("Stop every answer (Esc)")
        self.regenerate_button = QPushButton("&Regenerate")
        self.regenerate_button.setObjectName("regenerateButton")
        self.regenerate_button.setToolTip("Ask the last prompt again (with a new seed when sampling is random)")
        buttons = QVBoxLayout()
        for button in (self.send_button, self.stop_button, self.regenerate_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        prompt_row = QHBoxLayout()
        prompt_row.addWidget(self.prompt, 1)
        prompt_row.addLayout(buttons)

        column = QVBoxLayout(self)
        column.addLayout(top)
        column.addLayout(shared_row)
        column.addWidget(self.memory_warning)
        column.addWidget(self.splitter, 1)
        column.addWidget(self.notice)
        column.addLayout(prompt_row)
        self.setFocusProxy(self.prompt)

        self._render_timer = QTimer(self)
        self._render_timer.setSingleShot(True)
        self._render_timer.setInterval(RENDER_INTERVAL_MS)
        self._render_timer.timeout.connect(self._render)

        self.new_button.clicked.connect(self.new_conversation)
        self.history_menu.aboutToShow.connect(self._fill_history_menu)
        self.export_button.clicked.connect(self.export_dialog)
        self.add_button.clicked.connect(lambda: self.add_pane())
        self.shared.changed.connect(self._shared_settings_edited)
        self.prompt.submitted.connect(self.send)
        self.prompt.stop_requested.connect(self.stop_all)
        self.send_button.clicked.connect(self.send)
        self.stop_button.clicked.connect(self.stop_all)
        self.regenerate_button.clicked.connect(self.regenerate)
        escape = QShortcut(QKeySequence(Qt.Key.Key_Escape), self)
        escape.setContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
        escape.activated.connect(self.stop_all)
        context.library_changed.connect(self.refresh_library)
        context.open_in_compare.connect(self.open_models)
        context.settings_changed.connect(self._settings_changed)

        for _ in range(MIN_PANES):
            self._make_pane()
            self.conversation.add_pane()
        self._after_panes_changed()
        self.refresh_library()

    # --- hooks the main window calls ---

    def activated(self) -> None:
        self.prompt.setFocus()
        self._load_bound()

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        self._load_bound()

    def save_state(self, state: QSettings) -> None:
        state.setValue(STATE_PANES, json.dumps([_path_text(pane.runner.path) for pane in self.panes]))
        state.setValue(STATE_CONVERSATION, self.conversation.id if self.conversation.turns else "")
        state.setValue(STATE_SPLITTER, self.splitter.saveState())

    def restore_state(self, state: QSettings) -> None:
        identifier = str(state.value(STATE_CONVERSATION, "") or "")
        if identifier:
            with contextlib.suppress(UserError):  # a conversation deleted or damaged since: start afresh
                self._apply_conversation(self.store.load(identifier))
        saved = state.value(STATE_PANES)
        if saved:
            try:
                paths = [Path(text) if text else None for text in json.loads(str(saved))]
            except (ValueError, TypeError):
                paths = []
            if paths:
                self._panes_restored = True
                self._set_pane_count(len(paths))
                for pane, path in zip(self.panes, paths, strict=False):
                    self.bind_pane(pane, path)
        splitter = state.value(STATE_SPLITTER)
        if splitter is not None:
            self.splitter.restoreState(splitter)

    def shutdown(self) -> None:
        for pane in list(self._running):
            self._record(pane, self._stopped_answer(pane, "stopped when qdesk closed"))
        self._save()
        for runner in [pane.runner for pane in self.panes] + self._retired:
            runner.release(close_now=True)

    # --- panes ---

    @property
    def busy(self) -> bool:
        return bool(self._running)

    def add_pane(self, path: Path | None = None) -> ComparePane | None:
        """Add a pane (up to four), bound to `path` when given."""
        if len(self.panes) >= MAX_PANES or self.busy:
            return None
        pane = self._make_pane()
        self.conversation.add_pane(PaneRecord())
        self._after_panes_changed()
        if path is not None:
            self.bind_pane(pane, path)
        return pane

    def remove_pane(self, pane: ComparePane) -> None:
        """Remove `pane` and its answers (at least two panes stay)."""
        if len(self.panes) <= MIN_PANES or self.busy or pane not in self.panes:
            return
        self.conversation.remove_pane(self.panes.index(pane))
        self._discard_pane(pane)
        self._after_panes_changed()
        self._save()

    def bind_pane(self, pane: ComparePane, path: Path | None) -> None:
        """Bind `pane` to the model at `path` (None: no model); it loads when the section is on show."""
        if pane in self._running:
            self._record(pane, self._stopped_answer(pane, "stopped: the pane was given another model"))
        index = self.panes.index(pane)
        self.conversation.panes[index].model = path
        pane.runner.bind(path)
        pane.show_model(path)
        self._check_memory()
        self._update_facts()
        if path is not None and self.isVisible():
            pane.runner.ensure_loaded(self._load_options())

    def open_models(self, paths: list[Path]) -> None:
        """Bind the panes to `paths` (context.open_in_compare); a conversation already under way is kept in the list
        and a new one starts."""
        paths = [Path(path) for path in paths][:MAX_PANES]
        if not paths:
            return
        if self.busy:
            self.stop_all()
            for pane in list(self._running):
                self._record(pane, self._stopped_answer(pane, "stopped"))
        if self.conversation.turns:
            self.new_conversation()
        self._panes_restored = True
        self._set_pane_count(max(len(paths), len(self.panes)))
        for pane, path in zip(self.panes, paths, strict=False):
            self.bind_pane(pane, path)

    def _make_pane(self) -> ComparePane:
        runner = PaneRunner(self.context, self)
        pane = ComparePane(runner)
        pane.set_entries(self._entries)
        runner.streamed.connect(lambda text, pane=pane: self._streamed(pane, text))
        runner.answered.connect(lambda result, pane=pane: self._answered(pane, result))
        runner.failed.connect(lambda failure, pane=pane: self._failed(pane, failure))
        runner.state_changed.connect(self._update_controls)
        runner.state_changed.connect(self._schedule_render)
        pane.model_chosen.connect(lambda path, pane=pane: self.bind_pane(pane, path))
        pane.settings_edited.connect(lambda pane=pane: self._pane_settings_edited(pane))
        pane.remove_requested.connect(lambda pane=pane: self.remove_pane(pane))
        pane.retry_requested.connect(lambda pane=pane: pane.runner.retry(self._load_options()))
        self.panes.append(pane)
        self.splitter.addWidget(pane)
        return pane

    def _discard_pane(self, pane: ComparePane) -> None:
        runner = pane.runner
        runner.release()
        for signal in (runner.streamed, runner.answered, runner.failed, runner.state_changed):
            signal.disconnect()
        self._retired = [old for old in self._retired if not old.idle] + [runner]
        self.panes.remove(pane)
        self._running.discard(pane)
        self._live.pop(pane, None)
        pane.hide()
        pane.setParent(None)
        pane.deleteLater()

    def _set_pane_count(self, count: int) -> None:
        """Make or drop panes (without touching the conversation's record) to have `count`, within 2 to 4."""
        count = max(MIN_PANES, min(MAX_PANES, count))
        while len(self.panes) < count:
            self._make_pane()
            if len(self.conversation.panes) < len(self.panes):
                self.conversation.add_pane()
        while len(self.panes) > count:
            pane = self.panes[-1]
            if len(self.conversation.panes) >= len(self.panes):
                self.conversation.remove_pane(len(self.panes) - 1)
            self._discard_pane(pane)
        self._after_panes_changed()

    def _after_panes_changed(self) -> None:
        for number, pane in enumerate(self.panes, start=1):
            pane.set_title(number)
        self._order_tabs()
        self.splitter.setSizes([1000] * len(self.panes))
        self._check_memory()
        self._update_controls()
        self._update_facts()
        self._schedule_render()

    def _order_tabs(self) -> None:
        """Tab goes through the toolbar, the shared settings, each pane from left to right, then the prompt."""
        chain: list[QWidget] = [self.new_button, self.history_button, self.export_button, self.add_button,
                                *self.shared.fields()]
        for pane in self.panes:
            chain += [pane.model_box, pane.own_settings, *pane.override.fields(), pane.remove_button,
                      pane.transcript]
        chain += [self.prompt, self.send_button, self.stop_button, self.regenerate_button]
        for before, after in itertools.pairwise(chain):
            QWidget.setTabOrder(before, after)

    def _load_bound(self) -> None:
        options = self._load_options()
        for pane in self.panes:
            pane.runner.ensure_loaded(options)

    def _load_options(self) -> LoadOptions:
        settings = self.context.settings
        bound = max(1, sum(pane.runner.path is not None for pane in self.panes))
        threads = settings.threads or max(1, (os.cpu_count() or 1) // bound)
        return LoadOptions(n_ctx=CHAT_CONTEXT, n_threads=threads, n_gpu_layers=settings.gpu_layers)

    def _check_memory(self) -> None:
        paths = [pane.runner.path for pane in self.panes if pane.runner.path is not None]
        crowded = len(paths) > 1 and not fits_together(paths)
        self.memory_warning.setText("These models may not fit in memory together: answers can be slow, or a model "
                                    "may fail to load. Remove a pane or choose smaller variants." if crowded else "")
        self.memory_warning.setVisible(crowded)

    # --- the library ---

    def refresh_library(self) -> None:
        """Read the library's models in the background (registering the starter model on first run)."""
        if self._library_job is not None:
            self._library_again = True
            return
        try:
            library = self.context.library()
        except UserError as error:
            self._show_notice(str(error))
            return

        def work(_progress: object, _cancel: object) -> tuple[LibraryEntry | None, list[LibraryEntry]]:
            return library.ensure_starter(), library.entries()

        self._library_job = Job("Reading the library", work, self)
        self._library_job.succeeded.connect(self._library_read)
        self._library_job.failed.connect(self._library_failed)
        self.context.run(self._library_job)

    def _library_read(self, found: tuple[LibraryEntry | None, list[LibraryEntry]]) -> None:
        starter, entries = found
        self._library_done()
        self._entries = entries
        for pane in self.panes:
            pane.set_entries(entries)
        self._update_facts()
        if not self._defaults_offered:
            self._defaults_offered = True
            self._offer_starter(starter, entries)

    def _library_failed(self, failure: JobFailure) -> None:
        self._library_done()
        self._show_notice(failure.sentence)

    def _library_done(self) -> None:
        self._library_job = None
        if self._library_again:
            self._library_again = False
            QTimer.singleShot(0, self.refresh_library)

    def _offer_starter(self, starter: LibraryEntry | None, entries: list[LibraryEntry]) -> None:
        """First run: the first pane gets the starter model, the second another variant of it if there is one."""
        if starter is None or self._panes_restored or any(pane.runner.path is not None for pane in self.panes):
            return
        self.bind_pane(self.panes[0], starter.path)
        sibling = next((entry for entry in entries if entry.path != starter.path and entry.status == "ok"
                        and entry.base_model.casefold() == starter.base_model.casefold()), None)
        if sibling is not None:
            self.bind_pane(self.panes[1], sibling.path)

    def _entry_for(self, path: Path | None) -> LibraryEntry | None:
        return next((entry for entry in self._entries if entry.path == path), None)

    # --- settings ---

    def _settings_changed(self, settings: Settings) -> None:
        if self.conversation.turns or self.busy:
            return  # a conversation under way keeps the settings it started with
        sampling, system = settings.sampling, settings.system_prompt
        self.conversation.sampling, self.conversation.system = sampling, system
        self.shared.set_values(sampling, system)

    def _shared_settings_edited(self) -> None:
        self.conversation.sampling = self.shared.sampling()
        self.conversation.system = self.shared.system_prompt()

    def _pane_settings_edited(self, pane: ComparePane) -> None:
        record = self.conversation.panes[self.panes.index(pane)]
        record.own_settings = pane.own_settings.isChecked()
        if record.own_settings and record.sampling is None:
            pane.override.set_values(self.conversation.sampling, self.conversation.system)
        if record.own_settings:
            record.sampling, record.system = pane.override.sampling(), pane.override.system_prompt()

    # --- asking ---

    def _panes_with_models(self) -> list[ComparePane]:
        """The panes bound to a model; none says so in the notice line."""
        targets = [pane for pane in self.panes if pane.runner.path is not None]
        self._show_notice("" if targets else "Choose a model in at least one pane first.")
        return targets

    def send(self) -> None:
        """Send the prompt box's text to every pane with a model."""
        prompt = self.prompt.toPlainText().strip()
        if self.busy or not prompt:
            return
        targets = self._panes_with_models()
        if not targets:
            return
        self.conversation.add_turn(prompt)
        self.prompt.clear()
        self._start_turn(len(self.conversation.turns) - 1, targets, seed=None)

    def regenerate(self) -> None:
        """Ask the last prompt again in every pane with a model, replacing its answers."""
        if self.busy or not self.conversation.turns:
            return
        targets = self._panes_with_models()
        if not targets:
            return
        index = len(self.conversation.turns) - 1
        turn = self.conversation.turns[index]
        for pane in targets:
            turn.set_answer(self.panes.index(pane), None)
        random_sampling = any(self.conversation.settings_for(i)[0].temperature > 0 for i in range(len(self.panes)))
        self._start_turn(index, targets, seed=random.randrange(SEED_LIMIT) if random_sampling else None)

    def stop_all(self) -> None:
        """Stop every answer; each keeps what it has said so far."""
        for pane in self.panes:
            pane.runner.stop()

    def _start_turn(self, index: int, targets: list[ComparePane], seed: int | None) -> None:
        self._turn_index = index
        prompt = self.conversation.turns[index].prompt
        options = self._load_options()
        for pane in targets:
            pane_index = self.panes.index(pane)
            sampling, system = self.conversation.settings_for(pane_index)
            if seed is not None:
                sampling = replace(sampling, seed=seed)
            self._live[pane] = ""
            self._used[pane] = (sampling, system)
            self._running.add(pane)
        for pane in targets:
            pane_index = self.panes.index(pane)
            sampling, system = self._used[pane]
            messages = [*self.conversation.messages(pane_index, turns=index), {"role": "user", "content": prompt}]
            pane.runner.ask(messages, sampling, system or None, options)
        self._save()
        self._update_controls()
        self._update_facts()
        self._schedule_render()

    def _streamed(self, pane: ComparePane, text: str) -> None:
        if pane in self._running:
            self._live[pane] = self._live.get(pane, "") + text
            self._schedule_render()

    def _answered(self, pane: ComparePane, result: ChatResult) -> None:
        if pane in self._running and pane.runner.path is not None:
            sampling, system = self._used.get(pane, (self.conversation.sampling, self.conversation.system))
            self._record(pane, Answer.from_result(pane.runner.path, result, sampling, system or None))

    def _failed(self, pane: ComparePane, failure: JobFailure) -> None:
        if pane in self._running:
            self._record(pane, self._stopped_answer(pane, failure.sentence))

    def _stopped_answer(self, pane: ComparePane, why: str) -> Answer:
        sampling, system = self._used.get(pane, (self.conversation.sampling, self.conversation.system))
        return Answer(pane.runner.path or Path(), self._live.get(pane, ""), error=why, sampling=sampling,
                      system=system or None)

    def _record(self, pane: ComparePane, answer: Answer) -> None:
        self._running.discard(pane)
        self._used.pop(pane, None)
        if self._turn_index is not None and pane in self.panes:
            self.conversation.turns[self._turn_index].set_answer(self.panes.index(pane), answer)
        self._live.pop(pane, None)
        if not self._running:
            self._turn_index = None
            self.conversation.touch()
            self._save()
        self._update_controls()
        self._update_facts()
        self._schedule_render()

    # --- conversations ---

    def new_conversation(self) -> None:
        """Keep the current conversation in the list and start an empty one with the same panes and settings."""
        if self.busy:
            return
        self._save()
        panes = [replace(record) for record in self.conversation.panes]
        fresh = new_conversation(system=self.conversation.system, sampling=self.conversation.sampling)
        fresh.panes = panes
        self.conversation = fresh
        self._show_notice("")
        self._update_controls()
        self._update_facts()
        self._schedule_render()

    def open_conversation(self, identifier: str) -> None:
        """Reopen a saved conversation: its panes, their models and settings, and its turns."""
        if self.busy:
            return
        try:
            conversation = self.store.load(identifier)
        except UserError as error:
            self._show_notice(str(error))
            return
        self._save()
        self._apply_conversation(conversation)

    def _apply_conversation(self, conversation: Conversation) -> None:
        while len(conversation.panes) < MIN_PANES:
            conversation.add_pane()
        while len(conversation.panes) > MAX_PANES:
            conversation.remove_pane(len(conversation.panes) - 1)
        self.conversation = conversation
        self._set_pane_count(len(conversation.panes))
        self.shared.set_values(conversation.sampling, conversation.system)
        for pane, record in zip(self.panes, conversation.panes, strict=True):
            pane.set_own_settings(record.own_settings)
            if record.sampling is not None:
                pane.override.set_values(record.sampling, record.system or "")
            self.bind_pane(pane, record.model)
        self._show_notice("")
        self._update_controls()
        self._update_facts()
        self._schedule_render()

    def _fill_history_menu(self) -> None:
        menu = self.history_menu
        menu.clear()
        menu.addAction("New conversation", self.new_conversation).setEnabled(not self.busy)
        menu.addSeparator()
        summaries = self.store.summaries()
        if not summaries:
            menu.addAction("No saved conversations").setEnabled(False)
        for summary in summaries[:MENU_CONVERSATIONS]:
            when = summary.updated[:16].replace("T", " ")
            action = menu.addAction(f"{summary.title} — {when}, {summary.turns} turns",
                                    lambda identifier=summary.id: self.open_conversation(identifier))
            action.setToolTip(", ".join(summary.models))
            action.setEnabled(not self.busy and summary.id != self.conversation.id)

    def _save(self) -> None:
        if not self.conversation.turns:
            return
        try:
            self.store.save(self.conversation)
        except UserError as error:
            self._show_notice(f"The conversation could not be saved: {error}")

    # --- export ---

    def export_dialog(self) -> None:
        if not self.conversation.turns:
            self._show_notice("Nothing to export yet: send a prompt first.")
            return
        markdown, json_filter = "Markdown (*.md)", "JSON (*.json)"
        suggested = Path.home() / f"{_file_stem(self.conversation.display_title)}.md"
        chosen, selected = QFileDialog.getSaveFileName(self, "Export conversation", str(suggested),
                                                       f"{markdown};;{json_filter}")
        if not chosen:
            return
        path = Path(chosen)
        if path.suffix.lower() not in (".md", ".markdown", ".json"):
            path = path.with_name(path.name + (".json" if selected == json_filter else ".md"))
        self.export_to(path)

    def export_to(self, path: Path) -> bool:
        """Write the conversation to `path` (.md or .json); a failure is shown and returns False."""
        labels = {entry.path: f"{entry.path.name} ({entry.file_type or entry.variant})" for entry in self._entries}
        try:
            export_conversation(self.conversation, path, labels)
        except UserError as error:
            show_failure(self, error, "Export")
            return False
        return True

    def exported_json(self) -> dict[str, object]:
        return conversation_json(self.conversation)

    # --- showing ---

    def _show_notice(self, text: str) -> None:
        self.notice.setText(text)
        self.notice.setVisible(bool(text))

    def _update_controls(self) -> None:
        busy = self.busy
        turns = bool(self.conversation.turns)
        self.send_button.setEnabled(not busy)
        self.stop_button.setEnabled(busy)
        self.regenerate_button.setEnabled(not busy and turns)
        self.add_button.setEnabled(not busy and len(self.panes) < MAX_PANES)
        self.new_button.setEnabled(not busy and turns)
        self.history_button.setEnabled(not busy)
        self.export_button.setEnabled(not busy and turns)
        for pane in self.panes:
            pane.remove_button.setEnabled(not busy and len(self.panes) > MIN_PANES)
            pane.set_editable(not busy)
        self.title.setText(self.conversation.display_title)

    def _update_facts(self) -> None:
        last = self.conversation.turns[-1] if self.conversation.turns else None
        for index, pane in enumerate(self.panes):
            answer = last.answer(index) if last is not None else None
            reference = last.answer(0) if last is not None else None
            stats = answer.stats if answer is not None else None
            divergence = last.divergence(index) if last is not None else None
            answered = answer is not None and reference is not None and not answer.error and not reference.error
            path = pane.runner.path
            file_type, size = self._file_facts(path) if path is not None else (None, None)
            pane.facts.setText("" if path is None else facts_text(file_type, size, stats, divergence,
                                                                  first=index == 0, answered=answered))

    def _file_facts(self, path: Path) -> tuple[str | None, int | None]:
        """Quantization type and size: the library's, else the file's own (its type read once in the background)."""
        entry = self._entry_for(path)
        if entry is not None:
            return entry.file_type or entry.variant, entry.bytes
        if path not in self._file_types:
            self._read_file_type(path)
        try:
            size: int | None = path.stat().st_size
        except OSError:
            size = None
        return self._file_types.get(path), size

    def _read_file_type(self, path: Path) -> None:
        self._file_types[path] = None

        def work(_progress: object, _cancel: object) -> str | None:
            info = read_model_info(path)
            return info.file_type or info.dominant_type

        def learned(file_type: str | None) -> None:
            self._file_types[path] = file_type
            self._update_facts()

        job = Job(f"Reading {path.name}", work, self)
        job.succeeded.connect(learned)
        self.context.run(job)

    def _schedule_render(self) -> None:
        if not self._render_timer.isActive():
            self._render_timer.start()

    def _render(self) -> None:
        for index, pane in enumerate(self.panes):
            pane.show_transcript(self.transcript(index))

    def transcript(self, index: int) -> list[TranscriptEntry]:
        """What pane `index` shows: each turn it answered (or is answering), its answer's tail highlighted where it
        leaves the first pane's."""
        pane = self.panes[index]
        first = self.panes[0]
        entries: list[TranscriptEntry] = []
        for number, turn in enumerate(self.conversation.turns):
            live = number == self._turn_index
            streaming = live and pane in self._running
            answer = turn.answer(index)
            if not streaming and answer is None:
                continue
            text = self._live.get(pane, "") if streaming else answer.text if answer is not None else ""
            diverge_at = None
            if index > 0:
                reference_streaming = live and first in self._running
                reference = turn.answer(0)
                if reference_streaming or (reference is not None and not reference.error):
                    reference_text = self._live.get(first, "") if reference_streaming else reference.text
                    diverge_at = diverging_offset(reference_text, text, reference_done=not reference_streaming,
                                                  done=not streaming)
            entries.append(TranscriptEntry(turn.prompt, text, diverge_at, self._note(pane, answer, streaming, text),
                                           streaming))
        return entries

    @staticmethod
    def _note(pane: ComparePane, answer: Answer | None, streaming: bool, text: str) -> str:
        if streaming:
            if text:
                return ""
            return "Loading the model…" if pane.runner.loading else "Thinking…"
        if answer is None:
            return ""
        if answer.error:
            return answer.error
        reason = answer.stats.stop_reason if answer.stats is not None else "stop"
        return {"length": "Cut at the token limit.", "cancelled": "Stopped."}.get(reason, "")


def _path_text(path: Path | None) -> str:
    return "" if path is None else str(path)


def _file_stem(title: str) -> str:
    cleaned = "".join(char if char.isalnum() or char in " -_" else " " for char in title).strip()
    return "-".join(cleaned.split())[:50] or "conversation"
