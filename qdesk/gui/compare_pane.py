"""One Compare pane: the model it is bound to, its figures, its own settings when it has them, and its transcript."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
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
from qdesk.chat.compare import Divergence
from qdesk.chat.engine import GenerationStats
from qdesk.gui.compare_runner import PaneRunner
from qdesk.gui.compare_settings import SamplingEditor
from qdesk.gui.theme import is_dark
from qdesk.library.store import LibraryEntry

NO_MODEL = "Choose a model…"
LIGHT_HIGHLIGHT, DARK_HIGHLIGHT = "#ffe58f", "#7a5c00"


@dataclass(frozen=True)
class TranscriptEntry:
    """One turn as a pane shows it."""

    prompt: str
    text: str
    diverge_at: int | None = None
    """Where `text` leaves the first pane's answer: `text[diverge_at:]` is highlighted."""
    note: str = ""
    streaming: bool = False


def transcript_html(entries: Sequence[TranscriptEntry], highlight: str) -> str:
    parts = ["<html><body>"]
    for entry in entries:
        parts.append(f'<p style="white-space: pre-wrap; margin-bottom: 2px;"><b>You:</b> {html.escape(entry.prompt)}'
                     "</p>")
        text = entry.text
        if entry.diverge_at is not None and entry.diverge_at < len(text):
            body = (html.escape(text[:entry.diverge_at]) + f'<span style="background-color: {highlight};">'
                    + html.escape(text[entry.diverge_at:]) + "</span>")
        else:
            body = html.escape(text)
        if entry.streaming:
            body += "▍"
        parts.append(f'<p style="white-space: pre-wrap; margin-top: 2px;">{body}</p>')
        if entry.note:
            parts.append(f'<p style="margin-top: 0px;"><i><small>{html.escape(entry.note)}</small></i></p>')
    parts.append("</body></html>")
    return "".join(parts)


def facts_text(file_type: str | None, size: int | None, stats: GenerationStats | None,
               divergence: Divergence | None, *, first: bool, answered: bool) -> str:
    """"Q4_K_M · 105 MB · 48.1 tokens/s · first token 0.21 s · memory 230 MB · differs from token 5"."""
    parts: list[str] = [file_type or "", format_size(size) if size is not None else "file missing"]
    if stats is not None:
        parts += [f"{stats.tokens_per_second:.1f} tokens/s", f"first token {stats.time_to_first_token_s:.2f} s"]
        if stats.memory_bytes:
            parts.append(f"memory {format_size(stats.memory_bytes)}")
    if not first and answered:
        parts.append("same as pane 1" if divergence is None else f"differs from token {divergence.token_index}")
    return " · ".join(part for part in parts if part)


class ComparePane(QFrame):
    model_chosen = Signal(object)  # Path | None, chosen by the user
    settings_edited = Signal()  # own settings switched on or off, or edited
    remove_requested = Signal()
    retry_requested = Signal()

    def __init__(self, runner: PaneRunner, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.runner = runner
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
        self.remove_button = QToolButton()
        self.remove_button.setObjectName("removePane")
        self.remove_button.setText("✕")
        self.remove_button.setToolTip("Remove this pane")
        self.remove_button.setAccessibleName("Remove this pane")
        header = QHBoxLayout()
        header.addWidget(self.title)
        header.addWidget(self.model_box, 1)
        header.addWidget(self.own_settings)
        header.addWidget(self.remove_button)

        self.facts = QLabel()
        self.facts.setObjectName("paneFacts")
        self.facts.setWordWrap(True)
        self.facts.setProperty("role", "hint")
        self.status = QLabel()
        self.status.setObjectName("paneStatus")
        self.status.setWordWrap(True)
        self.retry_button = QPushButton("Retry")
        self.retry_button.setObjectName("paneRetry")
        status_row = QHBoxLayout()
        status_row.addWidget(self.status, 1)
        status_row.addWidget(self.retry_button)

        self.override = SamplingEditor("pane", mnemonics=False, stacked=True)
        self.override.setObjectName("paneSettings")
        self.override.setVisible(False)
        self.transcript = QTextBrowser()
        self.transcript.setObjectName("paneTranscript")
        self.transcript.setOpenLinks(False)
        self.transcript.setPlaceholderText("Answers appear here.")

        column = QVBoxLayout(self)
        column.setContentsMargins(6, 6, 6, 6)
        column.addLayout(header)
        column.addWidget(self.facts)
        column.addLayout(status_row)
        column.addWidget(self.override)
        column.addWidget(self.transcript, 1)

        self.model_box.addItem(NO_MODEL, "")
        self.model_box.activated.connect(self._model_activated)
        self.own_settings.toggled.connect(self._own_settings_toggled)
        self.override.changed.connect(self.settings_edited)
        self.remove_button.clicked.connect(self.remove_requested)
        self.retry_button.clicked.connect(self.retry_requested)
        runner.state_changed.connect(self.show_runner_state)
        self.show_runner_state()

    # --- the model ---

    def set_entries(self, entries: Sequence[LibraryEntry]) -> None:
        """Offer the library's models, keeping the current choice (also when it is not in the library)."""
        current = self.runner.path
        self.model_box.blockSignals(True)
        self.model_box.clear()
        self.model_box.addItem(NO_MODEL, "")
        for entry in entries:
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
        else:
            text = "Loads when you send a prompt."
        self.status.setText(text)
        self.status.setProperty("role", "error" if failure is not None else "hint")
        self.status.setToolTip(failure.details[-2000:] if failure is not None and failure.details else "")
        self.status.style().unpolish(self.status)
        self.status.style().polish(self.status)
        self.retry_button.setVisible(failure is not None)

    def show_transcript(self, entries: Sequence[TranscriptEntry]) -> None:
        bar = self.transcript.verticalScrollBar()
        at_end = bar.value() >= bar.maximum() - 4
        self.transcript.setHtml(transcript_html(entries, DARK_HIGHLIGHT if is_dark() else LIGHT_HIGHLIGHT))
        if at_end:
            bar.setValue(bar.maximum())

    def set_editable(self, editable: bool) -> None:
        """While answering, the model and the settings stay as they are."""
        self.model_box.setEnabled(editable)
        self.own_settings.setEnabled(editable)
        self.override.setEnabled(editable)
