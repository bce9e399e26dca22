"""What each matrix of a model was quantized to: bits per weight by tensor class and layer, as a coloured grid."""

from __future__ import annotations

import html
from pathlib import Path

from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import QDialog, QDialogButtonBox, QLabel, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget

from converters.mix.report import Cell, PlanHeatmap, summary_lines
from qdesk.gui.background import Job, JobFailure
from qdesk.gui.context import AppContext
from qdesk.gui.feedback import show_failure
from qdesk.library.info import tensor_type_heatmap

LOW_BITS, HIGH_BITS = 1.5, 8.5
"""The colour scale's ends: iq1_s-like cells (1.56 bits) are the coolest, q8_0 and above the warmest, so that a
mix's i-quants below q2_K's 2.6 bits stay apart."""


def cell_colour(bpw: float) -> QColor:
    """Blue for few bits through green to orange for many, legible behind dark text in either theme."""
    position = min(1.0, max(0.0, (bpw - LOW_BITS) / (HIGH_BITS - LOW_BITS)))
    return QColor.fromHsvF(0.62 - 0.55 * position, 0.45, 0.95)


def _cell_item(cell: Cell | None) -> QTableWidgetItem:
    if cell is None:
        return QTableWidgetItem("")
    item = QTableWidgetItem(f"{cell.bpw:.1f}")
    item.setBackground(QBrush(cell_colour(cell.bpw)))
    item.setForeground(QBrush(QColor("#111111")))
    kld = "" if cell.predicted_kld is None else f"\npredicted KLD {cell.predicted_kld:.2e}"
    item.setToolTip(f"{cell.type}, {cell.bpw:.2f} bits per weight{kld}")
    return item


class TypeMap(QTableWidget):
    """Rows: tensor classes (attn_q … ffn_down); columns: layers; each cell the matrix's bits per weight."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("typeMap")
        self.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.horizontalHeader().setMinimumSectionSize(34)
        self.horizontalHeader().setDefaultSectionSize(38)

    def show_heatmap(self, heatmap: PlanHeatmap) -> None:
        self.clear()
        self.setRowCount(len(heatmap.grid))
        self.setColumnCount(heatmap.n_layers)
        self.setHorizontalHeaderLabels([str(layer) for layer in range(heatmap.n_layers)])
        self.setVerticalHeaderLabels(list(heatmap.grid))
        for row, cells in enumerate(heatmap.grid.values()):
            for column, cell in enumerate(cells):
                self.setItem(row, column, _cell_item(cell))


class TypeMapDialog(QDialog):
    """The grid for one GGUF file, read in the background, with a line per class and the matrices outside blocks."""

    def __init__(self, path: Path, context: AppContext, parent: QWidget | None = None, *,
                 title: str | None = None) -> None:
        super().__init__(parent)
        self.title = title or path.name
        """The model's display name (`qdesk.library.identity.display_name`), not its raw `general.name`."""
        self.setObjectName("typeMapDialog")
        self.setWindowTitle(f"Tensor types — {self.title}")
        self.resize(1000, 420)
        self.heatmap: PlanHeatmap | None = None
        self.heading = QLabel(f"Reading {path.name}…")
        self.heading.setWordWrap(True)
        self.grid = TypeMap()
        self.details = QLabel()
        self.details.setObjectName("typeMapDetails")
        self.details.setProperty("role", "hint")
        self.details.setWordWrap(True)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(self.heading)
        layout.addWidget(self.grid, 1)
        layout.addWidget(self.details)
        layout.addWidget(buttons)
        self.job = Job(f"types of {path.name}", lambda _progress, _cancel: tensor_type_heatmap(path), self)
        self.job.succeeded.connect(self._show)
        self.job.failed.connect(self._failed)
        context.run(self.job)

    def _show(self, heatmap: PlanHeatmap) -> None:
        self.heatmap = heatmap
        predicted = "" if heatmap.predicted_kld is None else f"; predicted KLD {heatmap.predicted_kld:.4f}"
        self.heading.setText(f"<b>{html.escape(self.title)}</b>: {heatmap.bpw:.2f} bits per weight{predicted}. Each "
                             "cell is one matrix's bits per weight (hover for its type); bluer is fewer bits.")
        self.grid.show_heatmap(heatmap)
        self.details.setText("\n".join(line.strip() for line in summary_lines(heatmap)))

    def _failed(self, failure: JobFailure) -> None:
        self.heading.setText(failure.sentence)
        show_failure(self, failure, "Tensor types")
