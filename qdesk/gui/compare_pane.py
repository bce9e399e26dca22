"""One Compare pane: the model it is bound to, its figures, its own settings when it has them, and its transcript."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QEvent, Qt, QUrl, Signal
from PySide6.QtGui import QDesktopServices, QTextCursor, QTextDocument
from PySide6.QtWidgets import (
    QApplication,
    QComboBox,
    QFrame,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QTextBrowser,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from converters.core.units import format_size
from qdesk.app.logs import log_failure
from qdesk.chat.compare import Divergence
from qdesk.chat.engine import GenerationStats
from qdesk.chat.load_settings import ModelLoadSettings
from qdesk.chat.lora import LoraChoice
from qdesk.chat.markdown import CODE_LINK, render_answer
from qdesk.gui.background import Job, JobFailure
from qdesk.gui.compare_load import LoadPanel
from qdesk.gui.compare_runner import PaneRunner
from qdesk.gui.compare_settings import SamplingEditor
from qdesk.gui.elided_label import ElidedLabel
from qdesk.gui.theme import is_dark
from qdesk.library.store import LibraryEntry

NO_MODEL = "Choose a model…"
LIGHT_HIGHLIGHT, DARK_HIGHLIGHT = "#ffe58f", "#7a5c00"
"""Behind the part of an answer that leaves the first pane's: pale yellow under dark text, dark amber under light."""


@dataclass(frozen=True)
class TranscriptEntry:
    """One turn as a pane shows it."""

    prompt: str
    text: str
    diverge_at: int | None = None
    """Where `text` leaves the first pane's answer: `text[diverge_at:]` is highlighted."""
    note: str = ""
    streaming: bool = False
    turn: int = -1
    """The turn's index in the conversation (-1: not one of its turns; no actions then)."""


ACTIONS = ("edit", "delete", "regenerate", "copy-answer")
"""Links under each turn: the prompt's Edit and Delete, the answer's Copy and Regenerate."""
_LINK_STYLE = "text-decoration: none;"


def _links(*pairs: tuple[str, str]) -> str:
    return " · ".join(f'<a style="{_LINK_STYLE}" href="{href}">{html.escape(text)}</a>' for text, href in pairs)


def transcript_html(entries: Sequence[TranscriptEntry], highlight: str, *, dark: bool = False,
                    actions: bool = True, block_offset: int = 0) -> tuple[str, tuple[str, ...]]:
    """The transcript as HTML (answers rendered as Markdown, `qdesk.chat.markdown`) and every code block's text
    (their "Copy code" links count from `block_offset`)."""
    parts = ["<html><body>"]
    blocks: list[str] = []
    for entry in entries:
        tools = (f'<small>&nbsp;&nbsp;{_links(("Edit", f"edit:{entry.turn}"), ("Delete", f"delete:{entry.turn}"))}'
                 "</small>" if actions and entry.turn >= 0 and not entry.streaming else "")
        parts.append(f'<p style="white-space: pre-wrap; margin-bottom: 2px;"><b>You:</b> {html.escape(entry.prompt)}'
                     f"{tools}</p>")
        text = entry.text + ("▍" if entry.streaming else "")
        rendered = render_answer(text, diverge_at=entry.diverge_at, highlight=highlight, dark=dark,
                                 block_offset=block_offset + len(blocks), colour_code=not entry.streaming)
        blocks += rendered.code_blocks
        parts.append(rendered.html)
        if entry.note:
            parts.append(f'<p style="margin-top: 0px;"><i><small>{html.escape(entry.note)}</small></i></p>')
        if actions and entry.turn >= 0 and not entry.streaming and entry.text:
            links = _links(("Copy answer", f"copy-answer:{entry.turn}"), ("Regenerate", f"regenerate:{entry.turn}"))
            parts.append(f'<p style="margin-top: 0px;"><small>{links}</small></p>')
    parts.append("</body></html>")
    return "".join(parts), tuple(blocks)


def facts_text(file_type: str | None, size: int | None, stats: GenerationStats | None,
               divergence: Divergence | None, *, first: bool, answered: bool) -> str:
    """"Q4_K_M · 105 MB · 48.1 tokens/s · first token 0.21 s · memory 230 MB · differs from pane 1 after 5 tokens"."""
    parts: list[str] = [file_type or "", format_size(size) if size is not None else "file missing"]
    if stats is not None:
        parts += [f"{stats.tokens_per_second:.1f} tokens/s", f"first token {stats.time_to_first_token_s:.2f} s"]
        if stats.memory_bytes:
            parts.append(f"memory {format_size(stats.memory_bytes)}")
    if not first and answered:
        parts.append("same as pane 1" if divergence is None else _differs(divergence.token_index))
    return " · ".join(part for part in parts if part)


def _differs(token_index: int) -> str:
    """Where an answer leaves pane 1's, in words: tokens are the pieces of text the model writes one at a time."""
    if token_index == 0:
        return "differs from pane 1 from the start"
    return f"differs from pane 1 after {token_index} token{'s' if token_index != 1 else ''}"


FACTS_TIP = ("Type and size of the model file; for the last answer, its speed (tokens per second; a token is a word "
             "or a piece of one), the time to its first token, the memory of the model's process, and where it "
             "first differs from pane 1's answer (the first divergent token; the rest is highlighted).")


class ComparePane(QFrame):
    model_chosen = Signal(object)  # Path | None, chosen by the user
    turn_action = Signal(str, int)  # "edit", "delete" or "regenerate", and the turn's index
    copied = Signal(str)  # "code" or "answer": put on the clipboard
    load_applied = Signal(object)  # ModelLoadSettings from the load panel's Apply
    unload_requested = Signal()
    settings_edited = Signal()  # own settings switched on or off, or edited
    remove_requested = Signal()
    retry_requested = Signal()

    def __init__(self, runner: PaneRunner, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.runner = runner
        self._shown: tuple[TranscriptEntry, ...] = ()
        self._head: tuple[tuple[TranscriptEntry, ...], bool] | None = None
        """The entries before the last, as the document holds them (see `show_transcript`), and the theme."""
        self._head_blocks: tuple[str, ...] = ()
        self._tail_start = 0
        self._logged: JobFailure | None = None
        self._log: Path | None = None
        self.setObjectName("comparePane")
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.setMinimumWidth(220)

        self.title = QLabel()
        self.title.setObjectName("paneTitle")
        self.model_box = QComboBox()
        self.model_box.setObjectName("paneModel")
        self.model_box.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.model_box.setMinimumContentsLength(12)
        self.model_box.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.model_box.setToolTip("The model this pane answers with")
        self.own_settings = QToolButton()
        self.own_settings.setObjectName("paneOwnSettings")
        self.own_settings.setText("Own settings")
        self.own_settings.setCheckable(True)
        self.own_settings.setToolTip("Give this pane its own system prompt and sampling settings instead of the "
                                     "shared ones")
        self.load_settings = QToolButton()
        self.load_settings.setObjectName("paneLoadButton")
        self.load_settings.setText("Load…")
        self.load_settings.setCheckable(True)
        self.load_settings.setToolTip("How this model file is loaded (context length, GPU layers, KV cache, threads) "
                                      "and what that costs in memory; Unload")
        self.remove_button = QToolButton()
        self.remove_button.setObjectName("removePane")
        self.remove_button.setText("✕")
        self.remove_button.setToolTip("Remove this pane")
        self.remove_button.setAccessibleName("Remove this pane")
        header = QHBoxLayout()
        header.addWidget(self.title)
        header.addWidget(self.model_box, 1)
        header.addWidget(self.own_settings)
        header.addWidget(self.load_settings)
        header.addWidget(self.remove_button)

        self.facts = ElidedLabel(explanation=FACTS_TIP)  # one line in every pane, so the transcripts line up
        self.facts.setObjectName("paneFacts")
        self.facts.setProperty("role", "hint")
        self.status = ElidedLabel()
        self.status.setObjectName("paneStatus")
        self.retry_button = QPushButton("Retry")
        self.retry_button.setObjectName("paneRetry")
        status_row = QHBoxLayout()
        status_row.addWidget(self.status, 1)
        status_row.addWidget(self.retry_button)

        self._load_panel: LoadPanel | None = None  # made when first shown (Load…): most panes never need it
        self.lora: LoraChoice | None = None
        """The LoRA adapter this pane applies on top of its model (chosen in the load panel)."""
        self._adapters: list[LibraryEntry] = []
        self.adapter_label = QLabel()
        self.adapter_label.setObjectName("paneAdapter")
        self.adapter_label.setProperty("role", "hint")
        self.adapter_label.setVisible(False)
        self._load_shown: tuple[Path | None, ModelLoadSettings, int] = (None, ModelLoadSettings(), 0)
        self._editable = True
        self.override = SamplingEditor("pane", mnemonics=False, stacked=True)
        self.override.setObjectName("paneSettings")
        self.override.setVisible(False)
        self.transcript = QTextBrowser()
        self.transcript.setObjectName("paneTranscript")
        self.transcript.setOpenLinks(False)
        self.transcript.anchorClicked.connect(self._link_clicked)
        self.code_blocks: tuple[str, ...] = ()
        self.transcript.setPlaceholderText("Answers appear here.")

        column = QVBoxLayout(self)
        column.setContentsMargins(6, 6, 6, 6)
        column.addLayout(header)
        column.addWidget(self.facts)
        column.addWidget(self.adapter_label)
        column.addLayout(status_row)
        self._column = column
        column.addWidget(self.override)
        column.addWidget(self.transcript, 1)

        self.model_box.addItem(NO_MODEL, "")
        self.model_box.activated.connect(self._model_activated)
        self.own_settings.toggled.connect(self._own_settings_toggled)
        self.load_settings.toggled.connect(lambda shown: self.load_panel.setVisible(shown))
        self.override.changed.connect(self.settings_edited)
        self.remove_button.clicked.connect(self.remove_requested)
        self.retry_button.clicked.connect(self.retry_requested)
        runner.state_changed.connect(self.show_runner_state)
        self.show_runner_state()

    # --- the model ---

    def set_entries(self, entries: Sequence[LibraryEntry]) -> None:
        """Offer the library's models, keeping the current choice (also when it is not in the library), and its
        LoRA adapters to the load panel."""
        current = self.runner.path
        self._adapters = [entry for entry in entries if entry.is_adapter and entry.status == "ok"]
        if self._load_panel is not None:
            self._load_panel.set_adapters(self._adapters, self.lora)
        self.model_box.blockSignals(True)
        self.model_box.clear()
        self.model_box.addItem(NO_MODEL, "")
        for entry in (entry for entry in entries if not entry.is_adapter):
            label = f"{entry.base_model} · {entry.variant}"
            if entry.status != "ok":
                label += f" ({entry.status})"
            self.model_box.addItem(label, str(entry.path))
            self.model_box.setItemData(self.model_box.count() - 1, str(entry.path), Qt.ItemDataRole.ToolTipRole)
        self.model_box.blockSignals(False)
        self.show_model(current)

    def show_model(self, path: Path | None) -> None:
        """Select `path` in the model box, adding it when the library does not list it."""
        if path is None:
            self.model_box.setCurrentIndex(0)
            return
        index = self.model_box.findData(str(path))
        if index < 0:
            self.model_box.addItem(path.name, str(path))
            index = self.model_box.count() - 1
        self.model_box.setCurrentIndex(index)

    def _model_activated(self, index: int) -> None:
        data = self.model_box.itemData(index)
        self.model_chosen.emit(Path(data) if data else None)

    # --- load settings ---

    @property
    def load_panel(self) -> LoadPanel:
        """The load settings panel, made on first use, under the header."""
        if self._load_panel is None:
            panel = LoadPanel(self.runner.context)
            panel.setVisible(False)
            panel.applied.connect(self.load_applied)
            panel.unload_requested.connect(self.unload_requested)
            panel.apply_button.setEnabled(self._editable)
            panel.unload_button.setEnabled(self._editable)
            self._column.insertWidget(self._column.indexOf(self.override), panel)
            self._load_panel = panel
            panel.show_model(*self._load_shown)
            panel.set_adapters(self._adapters, self.lora)
        return self._load_panel

    def set_lora(self, lora: LoraChoice | None) -> None:
        """Apply `lora` in this pane from its next load on, and say so under the model's facts."""
        self.lora = lora
        self.adapter_label.setText(f"with LoRA adapter {lora.label}" if lora is not None else "")
        self.adapter_label.setVisible(lora is not None)
        if self._load_panel is not None:
            self._load_panel.set_adapters(self._adapters, lora)

    def show_load_settings(self, path: Path | None, settings: ModelLoadSettings, default_gpu_layers: int) -> None:
        self._load_shown = (path, settings, default_gpu_layers)
        if self._load_panel is not None:
            self._load_panel.show_model(path, settings, default_gpu_layers)

    # --- own settings ---

    def _own_settings_toggled(self, checked: bool) -> None:
        self.override.setVisible(checked)
        self.settings_edited.emit()

    def set_own_settings(self, enabled: bool) -> None:
        self.own_settings.blockSignals(True)
        self.own_settings.setChecked(enabled)
        self.own_settings.blockSignals(False)
        self.override.setVisible(enabled)

    # --- what it shows ---

    def set_title(self, number: int) -> None:
        self.title.setText(f"<b>{number}</b>")
        self.model_box.setAccessibleName(f"Model of pane {number}")

    def show_runner_state(self) -> None:
        runner = self.runner
        failure = runner.load_failure
        if runner.path is None:
            text = "Choose a model from the library for this pane."
        elif failure is not None:
            text = failure.sentence
        elif runner.loading:
            text = f"Loading {runner.path.name}…"
        elif runner.busy:
            text = "Answering…"
        elif runner.model is not None:
            text = "Ready."
        elif runner.unloaded:
            text = "Unloaded; it loads again when you send a prompt."
        else:
            text = "Loads when you send a prompt."
        self.status.setText(text)
        self.status.setProperty("role", "error" if failure is not None else "hint")
        if failure is not None and failure.details and failure is not self._logged:
            self._logged, self._log = failure, log_failure(failure.sentence, failure.details)
        log = self._log if failure is not None and failure is self._logged else None
        self.status.setToolTip(text + (f"\n\nThe details are in qdesk's log ({log})." if log else ""))
        self.status.style().unpolish(self.status)
        self.status.style().polish(self.status)
        self.retry_button.setVisible(failure is not None)

    def show_transcript(self, entries: Sequence[TranscriptEntry]) -> None:
        """Show `entries`. While an answer streams only the last entry changes, so the turns before it stay in the
        document and only the last is replaced: Qt's HTML parsing then costs one answer, not the conversation."""
        self._shown = tuple(entries)
        bar = self.transcript.verticalScrollBar()
        at_end = bar.value() >= bar.maximum() - 4
        dark = is_dark()
        highlight = DARK_HIGHLIGHT if dark else LIGHT_HIGHLIGHT
        head, tail = self._shown[:-1], self._shown[-1:]
        document = self.transcript.document()
        kept = self._head[0] if self._head is not None and self._head[1] == dark else None
        if kept is not None and head != kept and head[:len(kept)] == kept:
            added, added_blocks = transcript_html(head[len(kept):], highlight, dark=dark,
                                                  block_offset=len(self._head_blocks))
            self._cut_tail(document).insertHtml(added)  # an answer finished: it joins the turns that stay
            self._head, self._head_blocks = (head, dark), self._head_blocks + added_blocks
            self._tail_start = document.characterCount() - 1
        elif head != kept:
            page, self._head_blocks = transcript_html(head, highlight, dark=dark)
            self.transcript.setHtml(page if head else "")
            self._head = (head, dark)
            self._tail_start = document.characterCount() - 1
        cursor = self._cut_tail(document)
        page, tail_blocks = transcript_html(tail, highlight, dark=dark, block_offset=len(self._head_blocks))
        if tail:
            cursor.insertHtml(page)
        self.code_blocks = self._head_blocks + tail_blocks
        if at_end:
            bar.setValue(bar.maximum())

    def _cut_tail(self, document: QTextDocument) -> QTextCursor:
        """Remove what follows the kept turns; the cursor stands where it was."""
        cursor = QTextCursor(document)
        cursor.setPosition(min(self._tail_start, document.characterCount() - 1))
        cursor.movePosition(QTextCursor.MoveOperation.End, QTextCursor.MoveMode.KeepAnchor)
        cursor.removeSelectedText()
        return cursor

    def warm_up(self) -> None:
        """Load the Markdown and code colouring libraries off the GUI thread, before the first answer needs them."""
        dark = is_dark()
        self.runner.context.run(Job("Preparing the answer renderer", lambda _progress, _cancel: render_answer(
            "```python\nprint(1)\n```", dark=dark), self))

    def _link_clicked(self, url: QUrl) -> None:
        """Copy a code block or an answer here; edits, deletions and regenerations go to the view."""
        link = url.toString()
        kind, _, argument = link.partition(":")
        if kind in ("http", "https"):
            QDesktopServices.openUrl(url)
            return
        if not argument.lstrip("-").isdigit():
            return
        number = int(argument)
        if kind + ":" == CODE_LINK and 0 <= number < len(self.code_blocks):
            QApplication.clipboard().setText(self.code_blocks[number])
            self.copied.emit("code")
        elif kind == "copy-answer":
            entry = next((entry for entry in self._shown if entry.turn == number), None)
            if entry is not None:
                QApplication.clipboard().setText(entry.text)
                self.copied.emit("answer")
        elif kind in ACTIONS:
            self.turn_action.emit(kind, number)

    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        if event.type() == QEvent.Type.PaletteChange and self._shown:
            self._head = None
            self.show_transcript(self._shown)  # the highlight's colours follow the theme

    def set_editable(self, editable: bool) -> None:
        """While answering, the model and the settings stay as they are."""
        self.model_box.setEnabled(editable)
        self.own_settings.setEnabled(editable)
        self._editable = editable
        if self._load_panel is not None:
            self._load_panel.apply_button.setEnabled(editable)
            self._load_panel.unload_button.setEnabled(editable)
        self.override.setEnabled(editable)
