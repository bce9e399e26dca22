"""The Compare section: 1 to 4 panes side by side, each bound to a model, one prompt box sending to all of them (one
pane is a plain chat), and the list of saved conversations beside them.

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
    QApplication,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QMessageBox,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from converters.core.errors import UserError
from qdesk.app.settings import Settings
from qdesk.chat.compare import MAX_VARIANTS, RANDOM_SEED, SEED_LIMIT, deterministic, fits_together, turn_seed
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
from qdesk.chat.load_settings import LoadSettingsStore, ModelLoadSettings
from qdesk.gui.background import Job, JobFailure
from qdesk.gui.compare_pane import ComparePane, TranscriptEntry, facts_text
from qdesk.gui.compare_prompt import PromptBox
from qdesk.gui.compare_runner import PaneRunner
from qdesk.gui.compare_settings import SamplingEditor
from qdesk.gui.compare_sidebar import ConversationList
from qdesk.gui.context import AppContext
from qdesk.gui.feedback import show_failure
from qdesk.library.info import read_model_info
from qdesk.library.store import LibraryEntry

MIN_PANES = 1
"""One pane is a plain chat; Compare is the same thing with more panes."""
INITIAL_PANES = 2
MAX_PANES = MAX_VARIANTS
WARM_UP_MS = 3000
"""After the window is up, the answer renderer's libraries are loaded in the background."""
RENDER_INTERVAL_MS = 40
"""Streamed text is drawn at most this often, however fast the models answer."""
STATE_PANES, STATE_CONVERSATION, STATE_SPLITTER = "compare/panes", "compare/conversation", "compare/splitter"


class CompareView(QWidget):
    def __init__(self, context: AppContext) -> None:
        super().__init__()
        self.context = context
        self.store = ConversationStore()
        self.load_store = LoadSettingsStore()
        settings = context.settings
        self.conversation: Conversation = new_conversation(system=settings.system_prompt,
                                                           sampling=deterministic(settings.sampling))
        self.panes: list[ComparePane] = []
        self._retired: list[PaneRunner] = []
        self._entries: list[LibraryEntry] = []
        self._file_types: dict[Path, str | None] = {}
        self._live: dict[ComparePane, str] = {}
        self._used: dict[ComparePane, tuple[SamplingOptions, str]] = {}
        self._running: set[ComparePane] = set()
        self._turn_index: int | None = None
        self._panes_restored = False
        self._editing: int | None = None
        """The turn whose prompt is being edited in the prompt box (see `edit_turn`)."""
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
        self.history_button.setCheckable(True)
        self.history_button.setChecked(True)
        self.history_button.setToolTip("Show or hide the list of saved conversations")
        self.sidebar = ConversationList()
        self.sidebar.setMinimumWidth(160)
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
        self.shared.set_free_temperature(settings.sampling.temperature)
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
            button.setFocusPolicy(Qt.FocusPolicy.TabFocus)  # a click leaves the focus in the prompt box
            buttons.addWidget(button)
        buttons.addStretch(1)
        prompt_row = QHBoxLayout()
        prompt_row.addWidget(self.prompt, 1)
        prompt_row.addLayout(buttons)

        main = QWidget()
        column = QVBoxLayout(main)
        column.setContentsMargins(0, 0, 0, 0)
        column.addLayout(top)
        column.addLayout(shared_row)
        column.addWidget(self.memory_warning)
        column.addWidget(self.splitter, 1)
        column.addWidget(self.notice)
        column.addLayout(prompt_row)
        self.outer = QSplitter(Qt.Orientation.Horizontal)
        self.outer.setObjectName("compareOuterSplitter")
        self.outer.setChildrenCollapsible(False)
        self.outer.addWidget(self.sidebar)
        self.outer.addWidget(main)
        self.outer.setStretchFactor(1, 1)
        self.outer.setSizes([220, 1000])
        outer_layout = QHBoxLayout(self)
        outer_layout.addWidget(self.outer)
        self.setFocusProxy(self.prompt)

        self._render_timer = QTimer(self)
        self._render_timer.setSingleShot(True)
        self._render_timer.setInterval(RENDER_INTERVAL_MS)
        self._render_timer.timeout.connect(self._render)

        self.new_button.clicked.connect(self.new_conversation)
        self.history_button.toggled.connect(self.sidebar.setVisible)
        self.sidebar.open_requested.connect(self.open_conversation)
        self.sidebar.rename_requested.connect(self.rename_conversation)
        self.sidebar.delete_requested.connect(self.delete_conversation)
        self.sidebar.search_changed.connect(lambda _text: self.refresh_list())
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
        new = QShortcut(QKeySequence(QKeySequence.StandardKey.New), self)
        new.setContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
        new.activated.connect(self.new_conversation)
        context.library_changed.connect(self.refresh_library)
        context.open_in_compare.connect(self.open_models)
        context.settings_changed.connect(self._settings_changed)

        for _ in range(INITIAL_PANES):
            self._make_pane()
            self.conversation.add_pane()
        self._after_panes_changed()
        self.refresh_library()
        self.confirm_box: QMessageBox | None = None
        self.refresh_list()
        self._warm_up = QTimer(self)  # owned by the view: it goes when the view goes
        self._warm_up.setSingleShot(True)
        self._warm_up.timeout.connect(lambda: self.panes[0].warm_up() if self.panes else None)
        self._warm_up.start(WARM_UP_MS)

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
        state.setValue("compare/list", self.history_button.isChecked())
        state.setValue("compare/outer", self.outer.saveState())

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
        outer = state.value("compare/outer")
        if outer is not None:
            self.outer.restoreState(outer)
        self.history_button.setChecked(str(state.value("compare/list", True)).lower() in ("true", "1"))
        self.refresh_list()

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
        pane.show_load_settings(path, self._load_settings(path), self.context.settings.gpu_layers)
        self._check_memory()
        self._update_facts()
        if path is not None and self.isVisible():
            pane.runner.ensure_loaded(self._load_options(pane))

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
        pane.turn_action.connect(lambda kind, turn, pane=pane: self.turn_action(pane, kind, turn))
        pane.copied.connect(lambda what: self._say(f"Copied the {what}."))
        pane.retry_requested.connect(lambda pane=pane: pane.runner.retry(self._load_options(pane)))
        pane.load_applied.connect(lambda settings, pane=pane: self.apply_load_settings(pane, settings))
        pane.unload_requested.connect(lambda pane=pane: self.unload(pane))
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
            chain += [pane.model_box, pane.own_settings, pane.load_settings, *pane.override.fields(),
                      pane.remove_button, pane.transcript]
        chain += [self.prompt, self.send_button, self.stop_button, self.regenerate_button]
        for before, after in itertools.pairwise(chain):
            QWidget.setTabOrder(before, after)

    def _load_bound(self) -> None:
        for pane in self.panes:
            pane.runner.ensure_loaded(self._load_options(pane))

    def _load_settings(self, path: Path | None) -> ModelLoadSettings:
        return self.load_store.get(path) if path is not None else ModelLoadSettings()

    def _load_options(self, pane: ComparePane) -> LoadOptions:
        """How `pane`'s model loads: its file's own load settings, the app's Settings where they defer to them."""
        settings = self.context.settings
        bound = max(1, sum(other.runner.path is not None for other in self.panes))
        threads = settings.threads or max(1, (os.cpu_count() or 1) // bound)
        options = self._load_settings(pane.runner.path).options(default_threads=threads,
                                                                 default_gpu_layers=settings.gpu_layers)
        return replace(options, loras=(pane.lora,)) if pane.lora is not None else options

    def apply_load_settings(self, pane: ComparePane, settings: ModelLoadSettings) -> None:
        """Remember `settings` for the pane's model file and reload it with them (every pane on that file); the
        adapter chosen in the panel applies to this pane alone."""
        path = pane.runner.path
        if path is None or self.busy:
            return
        pane.set_lora(pane.load_panel.lora())
        try:
            self.load_store.set(path, settings)
        except UserError as error:
            self._show_notice(str(error))
            return
        for other in self.panes:
            if other.runner.path == path:
                other.show_load_settings(path, settings, self.context.settings.gpu_layers)
                if other.runner.model is not None or other.runner.loading or self.isVisible():
                    other.runner.reload(self._load_options(other))

    def unload(self, pane: ComparePane) -> None:
        """Free the pane's model now; it loads again with the next prompt."""
        if pane in self._running:
            return
        pane.runner.unload()
        self._check_memory()

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
        self.shared.set_free_temperature(settings.sampling.temperature)
        sampling, system = settings.sampling, settings.system_prompt
        if not self.shared.free_sampling:
            sampling = deterministic(sampling)
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
        """Send the prompt box's text to every pane with a model (in place of the prompt being edited, if any)."""
        prompt = self.prompt.toPlainText().strip()
        if self.busy or not prompt:
            return
        targets = self._panes_with_models()
        if not targets:
            return
        if self._editing is not None and self._editing < len(self.conversation.turns):
            self.conversation.edit_turn(self._editing, prompt)
        else:
            self.conversation.add_turn(prompt)
        self._editing = None
        self.prompt.clear()
        self._start_turn(len(self.conversation.turns) - 1, targets, seed=None)

    # --- one turn's actions: edit, delete, regenerate in one pane ---

    def turn_action(self, pane: ComparePane, kind: str, turn: int) -> None:
        if self.busy or not 0 <= turn < len(self.conversation.turns):
            return
        if kind == "edit":
            self.edit_turn(turn)
        elif kind == "delete":
            self.delete_turn(turn)
        elif kind == "regenerate" and pane in self.panes and pane.runner.path is not None:
            self.regenerate_turn(pane, turn)

    def edit_turn(self, turn: int) -> None:
        """Put turn `turn`'s prompt in the box: sending replaces it, and drops its answers and the turns after it."""
        self._editing = turn
        self.prompt.setPlainText(self.conversation.turns[turn].prompt)
        self.prompt.setFocus()
        later = len(self.conversation.turns) - turn - 1
        self._show_notice(f"Editing prompt {turn + 1}: Send replaces it and its answers"
                          + (f", and the {later} turn{'s' if later != 1 else ''} after it" if later else "")
                          + "; Esc cancels the edit.")

    def cancel_edit(self) -> None:
        if self._editing is not None:
            self._editing = None
            self.prompt.clear()
            self._show_notice("")

    def delete_turn(self, turn: int) -> None:
        """Forget turn `turn` in every pane (the turns after it stay)."""
        self.conversation.delete_turn(turn)
        if self._editing is not None:
            self.cancel_edit()
        self._save()
        self._update_controls()
        self._update_facts()
        self._schedule_render()

    def regenerate_turn(self, pane: ComparePane, turn: int) -> None:
        """Ask turn `turn` again in `pane` alone (its history up to that turn), replacing its answer there."""
        index = self.panes.index(pane)
        self.conversation.turns[turn].set_answer(index, None)
        sampling = self.conversation.settings_for(index)[0]
        self._start_turn(turn, [pane], seed=1 + random.randrange(SEED_LIMIT - 1) if sampling.temperature > 0
                         else None)

    def _say(self, text: str) -> None:
        window = self.window()
        if isinstance(window, QMainWindow):
            window.statusBar().showMessage(text, 3000)

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
        self._start_turn(index, targets, seed=1 + random.randrange(SEED_LIMIT - 1) if random_sampling else None)

    def stop_all(self) -> None:
        """Stop every answer; each keeps what it has said so far (Esc while nothing runs cancels an edit)."""
        if not self.busy:
            self.cancel_edit()
        for pane in self.panes:
            pane.runner.stop()

    def _start_turn(self, index: int, targets: list[ComparePane], seed: int | None) -> None:
        """Ask turn `index` in `targets`; `seed` replaces every pane's (None: one new seed shared by the panes that
        sample with seed 0, see `qdesk.chat.compare.turn_seed`)."""
        self._turn_index = index
        prompt = self.conversation.turns[index].prompt
        chosen = {pane: self.conversation.settings_for(self.panes.index(pane)) for pane in targets}
        shared_seed = turn_seed([sampling for sampling, _system in chosen.values()], random.randrange)
        for pane in targets:
            sampling, system = chosen[pane]
            if seed is not None:
                sampling = replace(sampling, seed=seed)
            elif shared_seed is not None and sampling.temperature > 0 and sampling.seed == RANDOM_SEED:
                sampling = replace(sampling, seed=shared_seed)
            self._live[pane] = ""
            self._used[pane] = (sampling, system)
            self._running.add(pane)
        for pane in targets:
            pane_index = self.panes.index(pane)
            sampling, system = self._used[pane]
            messages = [*self.conversation.messages(pane_index, turns=index), {"role": "user", "content": prompt}]
            pane.runner.ask(messages, sampling, system or None, self._load_options(pane))
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
        self._editing = None
        self.refresh_list()
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
        self.refresh_list()

    def _apply_conversation(self, conversation: Conversation) -> None:
        while len(conversation.panes) < MIN_PANES:
            conversation.add_pane()
        while len(conversation.panes) > MAX_PANES:
            conversation.remove_pane(len(conversation.panes) - 1)
        self.conversation = conversation
        self._editing = None
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

    # --- the conversation list ---

    def refresh_list(self) -> None:
        """The saved conversations (those matching the search), the current one selected."""
        self.sidebar.show_summaries(self.store.summaries(self.sidebar.search.text()), self.conversation.id)

    def rename_conversation(self, identifier: str, title: str) -> None:
        try:
            renamed = self.store.rename(identifier, title)
        except UserError as error:
            self._show_notice(str(error))
        else:
            if identifier == self.conversation.id:
                self.conversation.title = renamed.title
                self._update_controls()
        self.refresh_list()

    def delete_conversation(self, identifier: str) -> QMessageBox | None:
        """Ask, then delete the saved conversation (the current one gives way to a new, empty one)."""
        if self.busy:
            return None
        item = self.sidebar.item_of(identifier)
        title = item.text() if item is not None else identifier
        box = QMessageBox(QMessageBox.Icon.Question, "Delete conversation",
                          f"Delete the conversation “{title}”? Its prompts and answers are gone for good.",
                          QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.Cancel, self)
        box.setObjectName("confirmDeleteConversation")
        box.setDefaultButton(QMessageBox.StandardButton.Cancel)
        box.button(QMessageBox.StandardButton.Yes).setText("Delete")
        box.finished.connect(lambda answer: self._delete_confirmed(answer, identifier))
        box.open()
        self.confirm_box = box
        return box

    def _delete_confirmed(self, answer: int, identifier: str) -> None:
        self.confirm_box = None
        if answer != QMessageBox.StandardButton.Yes or self.busy:
            return
        try:
            self.store.delete(identifier)
        except (UserError, OSError) as error:
            self._show_notice(f"The conversation could not be deleted: {error}")
        if identifier == self.conversation.id:
            self.conversation.turns.clear()  # nothing left to keep: a new one starts with the same panes
            self.new_conversation()
        self.refresh_list()

    def _save(self) -> None:
        if not self.conversation.turns:
            return
        try:
            self.store.save(self.conversation)
        except UserError as error:
            self._show_notice(f"The conversation could not be saved: {error}")
        self.refresh_list()

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
        focus = QApplication.focusWidget()
        had_focus = focus is not None and (focus is self or self.isAncestorOf(focus))
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
        focus = QApplication.focusWidget()
        if had_focus and (focus is None or not focus.isEnabled() or not self.isAncestorOf(focus)):
            self.prompt.setFocus()  # a button that was disabled must not send the focus out of the section

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
                                           streaming, number))
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
