"""The per-token divergence heat map: the sample paragraph once per variant, each token coloured by its KLD.

The tokens, runs, colour steps and their cap come from `qdesk.evaluation.report_model.heat_map`, as in the HTML
report; hovering a token shows its index, its text and its KLD.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from PySide6.QtCore import QEvent, QObject, Qt
from PySide6.QtGui import QColor, QFont, QFontDatabase, QHelpEvent, QTextBlockFormat, QTextCharFormat, QTextCursor
from PySide6.QtWidgets import QTextBrowser, QToolTip, QWidget

from qdesk.evaluation.report_model import HeatMap, HeatRun, HeatScale, heat_map, significant, token_title, visible
from qdesk.gui.charts import is_dark_palette

# Step 0 is uncoloured; steps 1-7 run from pale to strong (the report's YlOrRd ramp, and its dark counterpart).
LIGHT_STEPS = ((None, None), ("#ffeda0", "#1c2026"), ("#fed976", "#1c2026"), ("#feb24c", "#1c2026"),
               ("#fd8d3c", "#1c2026"), ("#f03b20", "#ffffff"), ("#c8141e", "#ffffff"), ("#8c0026", "#ffffff"))
DARK_STEPS = ((None, None), ("#3b1d5e", "#e4e7eb"), ("#5c2073", "#e4e7eb"), ("#84287e", "#ffffff"),
              ("#ad3576", "#ffffff"), ("#d64d66", "#ffffff"), ("#f1775c", "#15181c"), ("#fcb17e", "#15181c"))
EMPTY_TEXT = "Run an evaluation to see, token by token, where each variant's predictions part from the reference's."


class HeatMapView(QTextBrowser):
    """Read-only text: a legend, then per variant a heading and the paragraph as coloured token spans."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("heatMap")
        self.setOpenLinks(False)
        self.setAccessibleName("Per-token divergence heat map")
        self.map: HeatMap | None = None
        self.token_spans = 0
        self.viewport().installEventFilter(self)
        self.set_report(None)

    def set_report(self, report: Mapping[str, Any] | None) -> None:
        self.map = None if report is None else heat_map(report)
        self._render()

    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        if event.type() == QEvent.Type.PaletteChange:
            self._render()

    def _render(self) -> None:
        self.clear()
        self.token_spans = 0
        cursor = QTextCursor(self.document())
        muted = QTextCharFormat()
        muted.setForeground(self.palette().color(self.palette().ColorRole.PlaceholderText))
        if self.map is None:
            cursor.insertText(EMPTY_TEXT, muted)
            return
        steps = DARK_STEPS if is_dark_palette(self.palette()) else LIGHT_STEPS
        self._legend(cursor, self.map.scale, steps, muted)
        mono = QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont)
        for run in self.map.runs:
            self._heading(cursor, run, len(self.map.tokens), muted)
            block = QTextBlockFormat()
            block.setLineHeight(150, QTextBlockFormat.LineHeightTypes.ProportionalHeight.value)
            block.setBottomMargin(10)
            cursor.insertBlock(block)
            for index, token in enumerate(self.map.tokens):
                kld = run.kld_at(index)
                cursor.insertText(visible(token) or "∅",
                                  _token_format(index, token, kld, self.map.scale, steps, mono))
                self.token_spans += 1
                for _ in range(token.count("\n")):
                    cursor.insertText("\u2028", QTextCharFormat())  # a line break inside the block
        self.moveCursor(QTextCursor.MoveOperation.Start)

    def _legend(self, cursor: QTextCursor, scale: HeatScale, steps: Sequence[tuple[str | None, str | None]],
                muted: QTextCharFormat) -> None:
        cursor.insertText("KLD (nats)  ", muted)
        for step, text in enumerate(scale.legend()):
            cursor.insertText(f" {text} ", _step_format(steps[step]))
            cursor.insertText(" ", QTextCharFormat())
        cursor.insertBlock()
        cursor.insertText(f"Full colour at {significant(scale.cap)} nats: {scale.basis}. "
                          "Hover a token to read its value.", muted)

    @staticmethod
    def _heading(cursor: QTextCursor, run: HeatRun, token_count: int, muted: QTextCharFormat) -> None:
        heading = QTextBlockFormat()
        heading.setTopMargin(14)
        cursor.insertBlock(heading)
        bold = QTextCharFormat()
        bold.setFontWeight(QFont.Weight.Bold)
        bold.setToolTip(run.name)
        cursor.insertText(run.label, bold)
        cursor.insertText("   " + run.stats(token_count), muted)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if watched is self.viewport() and event.type() == QEvent.Type.ToolTip and isinstance(event, QHelpEvent):
            tip = self.cursorForPosition(event.pos()).charFormat().toolTip()
            if tip:
                QToolTip.showText(event.globalPos(), tip, self.viewport())
            else:
                QToolTip.hideText()
            return True
        return super().eventFilter(watched, event)

    def coloured_tokens(self) -> int:
        """How many token spans carry a colour step above 0 (for tests and the accessibility summary)."""
        count = 0
        block = self.document().begin()
        while block.isValid():
            iterator = block.begin()
            while not iterator.atEnd():
                step = iterator.fragment().charFormat().property(QTextCharFormat.Property.UserProperty)
                if isinstance(step, int) and step > 0:
                    count += 1
                iterator += 1
            block = block.next()
        return count


def _token_format(index: int, token: str, kld: float | None, scale: HeatScale,
                  steps: Sequence[tuple[str | None, str | None]], font: QFont) -> QTextCharFormat:
    """A token's colours, its monospaced font, its hover text, and its colour step as a property for tests."""
    step = 0 if kld is None else scale.step(kld)
    text_format = _step_format(steps[step])
    text_format.setFont(font)
    text_format.setToolTip(token_title(index, token, kld))
    text_format.setProperty(QTextCharFormat.Property.UserProperty, step)
    return text_format


def _step_format(colours: tuple[str | None, str | None]) -> QTextCharFormat:
    text_format = QTextCharFormat()
    background, foreground = colours
    if background is not None and foreground is not None:
        text_format.setBackground(QColor(background))
        text_format.setForeground(QColor(foreground))
    else:
        text_format.setBackground(Qt.GlobalColor.transparent)
    return text_format
