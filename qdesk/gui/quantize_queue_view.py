"""The job queue on screen: one panel per source, one row per step with progress, time left and Cancel."""

from __future__ import annotations

import html

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from qdesk.gui.elided_label import ElidedLabel
from qdesk.gui.feedback import show_failure
from qdesk.gui.job_queue import QuantizeQueue, QueuedBatch, QueuedStep, StepState

EMPTY_TEXT = "No jobs yet: choose a source and variants on the left, then Quantize."


class _StepRow:
    """The widgets of one step, kept so progress updates touch only them."""

    def __init__(self, grid: QGridLayout, row: int, step: QueuedStep) -> None:
        """Two lines per step, whatever the width: title, bar and buttons, then where it stands (one line, the rest
        in its tooltip), so a narrow panel never wraps a step into fragments."""
        key = step.step.key
        self.title = QLabel(step.step.title)
        self.bar = QProgressBar()
        self.bar.setObjectName(f"progress_{key}")
        self.bar.setRange(0, 1000)
        self.bar.setTextVisible(False)
        self.bar.setMinimumWidth(60)
        self.status = ElidedLabel()
        self.status.setObjectName(f"status_{key}")
        self.cancel = QPushButton("Cancel")
        self.cancel.setObjectName(f"cancel_{key}")
        self.cancel.setToolTip(f"Cancel: {step.step.title.lower()}")
        self.details = QPushButton("Details…")
        self.details.setObjectName(f"details_{key}")
        for column, widget in enumerate((self.title, self.bar, self.cancel, self.details)):
            grid.addWidget(widget, 2 * row, column)
        grid.addWidget(self.status, 2 * row + 1, 0, 1, 4)
        grid.setColumnStretch(1, 1)
        self.update(step)

    def update(self, step: QueuedStep) -> None:
        fraction = step.progress.fraction if step.progress is not None else 0.0
        if step.state is StepState.DONE:
            fraction = 1.0
        self.bar.setValue(round(fraction * 1000))
        self.bar.setEnabled(step.state in (StepState.RUNNING, StepState.DONE))
        self.status.setText(step.describe())
        self.status.setProperty("role", "error" if step.state is StepState.FAILED else "")
        self.status.style().unpolish(self.status)
        self.status.style().polish(self.status)
        self.cancel.setVisible(not step.state.over)
        self.details.setVisible(step.state is StepState.FAILED and bool(step.failure and step.failure.details))


class QueueWidget(QWidget):
    def __init__(self, queue: QuantizeQueue, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.queue = queue
        self._rows: dict[int, _StepRow] = {}

        heading = QLabel("<b>Jobs</b>")
        self.clear_button = QPushButton("C&lear finished")
        self.clear_button.setObjectName("clearFinished")
        self.clear_button.clicked.connect(queue.clear_finished)
        top = QHBoxLayout()
        top.addWidget(heading)
        top.addStretch(1)
        top.addWidget(self.clear_button)

        self.empty = QLabel(EMPTY_TEXT)
        self.empty.setProperty("role", "hint")
        self.panels = QVBoxLayout()
        self.panels.setContentsMargins(0, 0, 0, 0)
        inner = QWidget()
        column = QVBoxLayout(inner)
        column.addWidget(self.empty)
        column.addLayout(self.panels)
        column.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setWidget(inner)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(top)
        layout.addWidget(scroll, 1)

        queue.changed.connect(self.rebuild)
        queue.step_progressed.connect(self._progressed)
        self.rebuild()

    def rebuild(self) -> None:
        while self.panels.count():
            panel = self.panels.takeAt(0).widget()
            if panel is not None:
                panel.hide()
                panel.setParent(None)
                panel.deleteLater()
        self._rows.clear()
        for queued in self.queue.batches:
            self.panels.addWidget(self._panel(queued))
        self.empty.setVisible(not self.queue.batches)
        self.clear_button.setEnabled(any(queued.over for queued in self.queue.batches))

    def _panel(self, queued: QueuedBatch) -> QWidget:
        panel = QFrame()
        panel.setObjectName("jobPanel")
        panel.setFrameShape(QFrame.Shape.StyledPanel)
        title = QLabel(f"<b>{html.escape(queued.title)}</b>")
        title.setWordWrap(True)
        title.setObjectName("jobTitle")
        cancel_all = QPushButton("Cancel job")
        cancel_all.setObjectName("cancelJob")
        cancel_all.setVisible(not queued.over)
        cancel_all.clicked.connect(lambda: self.queue.cancel_batch(queued))
        header = QHBoxLayout()
        header.addWidget(title, 1)
        header.addWidget(cancel_all)
        grid = QGridLayout()
        for row, step in enumerate(queued.steps):
            widgets = _StepRow(grid, row, step)
            widgets.cancel.clicked.connect(lambda _=False, step=step: self.queue.cancel_step(queued, step))
            widgets.details.clicked.connect(lambda _=False, step=step: self._show_details(step))
            self._rows[id(step)] = widgets
        layout = QVBoxLayout(panel)
        layout.addLayout(header)
        layout.addLayout(grid)
        return panel

    def _progressed(self, step: QueuedStep) -> None:
        row = self._rows.get(id(step))
        if row is not None:
            row.update(step)

    def _show_details(self, step: QueuedStep) -> None:
        if step.failure is not None:
            show_failure(self, step.failure, title=step.step.title)

    def step_row(self, step: QueuedStep) -> _StepRow | None:
        return self._rows.get(id(step))
