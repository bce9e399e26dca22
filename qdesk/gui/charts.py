"""The size-vs-KLD chart, painted with QPainter from the same axes and label placement as the HTML report's SVG.

The chart is drawn from `qdesk.evaluation.report_model.chart_layout`, in the report's own coordinate system
(`CHART_WIDTH` × `CHART_HEIGHT`, plot area `PLOT_*`) scaled uniformly into the widget, so points and labels sit
where they sit on the page. Colours come from the widget's palette, so the chart reads in light and dark themes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import QPointF, QRectF, QSize, Qt
from PySide6.QtGui import QColor, QFont, QPainter, QPaintEvent, QPalette, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

from qdesk.evaluation.report_model import (
    CHART_HEIGHT,
    CHART_WIDTH,
    PLOT_BOTTOM,
    PLOT_LEFT,
    PLOT_RIGHT,
    PLOT_TOP,
    ChartLayout,
    ChartPoint,
    chart_layout,
    is_decade,
    tick_label,
)

EMPTY_TEXT = "Run an evaluation to see each variant's file size against its divergence from the reference."


@dataclass(frozen=True)
class ChartColours:
    text: QColor
    muted: QColor
    grid: QColor
    background: QColor
    point: QColor
    deploy: QColor
    investigate: QColor


def is_dark_palette(palette: QPalette) -> bool:
    return palette.color(QPalette.ColorRole.Window).lightness() < 128


def chart_colours(palette: QPalette) -> ChartColours:
    """The report's accent, good and warning colours, in their light or dark variant to suit `palette`."""
    dark = is_dark_palette(palette)
    return ChartColours(
        text=palette.color(QPalette.ColorRole.WindowText),
        muted=palette.color(QPalette.ColorRole.PlaceholderText),
        grid=palette.color(QPalette.ColorRole.Mid) if not dark else palette.color(QPalette.ColorRole.Midlight),
        background=palette.color(QPalette.ColorRole.Base),
        point=QColor("#7aa7ff" if dark else "#2a64c9"),
        deploy=QColor("#5fd08a" if dark else "#17803d"),
        investigate=QColor("#ffad5c" if dark else "#a94e00"),
    )


class SizeKldChart(QWidget):
    """File size across, mean KLD up, one labelled point per variant; hover a point for its figures."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("sizeKldChart")
        self.setMinimumSize(380, 190)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setMouseTracking(True)
        self.layout_: ChartLayout | None = None
        self.setAccessibleName("Size against mean KLD chart")

    def sizeHint(self) -> QSize:
        return QSize(CHART_WIDTH, CHART_HEIGHT)

    def set_report(self, report: Mapping[str, Any] | None) -> None:
        self.layout_ = None if report is None else chart_layout(report)
        points = self.layout_.points if self.layout_ else ()
        self.setToolTip("\n".join(point.tooltip for point in points))
        self.update()

    @property
    def points(self) -> Sequence[ChartPoint]:
        return self.layout_.points if self.layout_ else ()

    def _scale(self) -> tuple[float, float, float]:
        scale = min(self.width() / CHART_WIDTH, self.height() / CHART_HEIGHT)
        return scale, (self.width() - CHART_WIDTH * scale) / 2, (self.height() - CHART_HEIGHT * scale) / 2

    def paintEvent(self, event: QPaintEvent) -> None:
        del event
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        colours = chart_colours(self.palette())
        painter.fillRect(self.rect(), colours.background)
        if self.layout_ is None:
            painter.setPen(colours.muted)
            painter.drawText(self.rect().adjusted(24, 0, -24, 0), Qt.AlignmentFlag.AlignCenter
                             | Qt.TextFlag.TextWordWrap, EMPTY_TEXT)
            return
        scale, dx, dy = self._scale()
        painter.translate(dx, dy)
        painter.scale(scale, scale)
        font = QFont(self.font())
        font.setPixelSize(12)
        painter.setFont(font)
        self._paint_grid(painter, self.layout_, colours)
        self._paint_reference(painter, self.layout_, colours)
        self._paint_points(painter, self.layout_, colours)
        self._paint_titles(painter, self.layout_, colours)
        painter.end()

    @staticmethod
    def _paint_grid(painter: QPainter, layout: ChartLayout, colours: ChartColours) -> None:
        for tick in layout.x_axis.ticks:
            x = layout.x_pixel(tick)
            painter.setPen(QPen(colours.grid, 1))
            painter.drawLine(QPointF(x, PLOT_TOP), QPointF(x, PLOT_BOTTOM))
            painter.setPen(colours.muted)
            _text(painter, x, PLOT_BOTTOM + 18, tick_label(tick), "middle")
        for tick in layout.y_axis.ticks:
            y = layout.y_pixel(tick)
            minor = layout.y_axis.log and not is_decade(tick)
            painter.setPen(QPen(colours.grid, 1, Qt.PenStyle.DotLine if minor else Qt.PenStyle.SolidLine))
            painter.drawLine(QPointF(PLOT_LEFT, y), QPointF(PLOT_RIGHT, y))
            painter.setPen(colours.muted)
            _text(painter, PLOT_LEFT - 8, y + 4, tick_label(tick), "end")
        painter.setPen(QPen(colours.muted, 1))
        painter.setBrush(Qt.BrushStyle.NoBrush)
        painter.drawRect(QRectF(PLOT_LEFT, PLOT_TOP, PLOT_RIGHT - PLOT_LEFT, PLOT_BOTTOM - PLOT_TOP))

    @staticmethod
    def _paint_reference(painter: QPainter, layout: ChartLayout, colours: ChartColours) -> None:
        if layout.reference_x is None:
            return
        x = layout.reference_x
        painter.setPen(QPen(colours.muted, 1, Qt.PenStyle.DashLine))
        painter.drawLine(QPointF(x, PLOT_TOP), QPointF(x, PLOT_BOTTOM))
        font = painter.font()
        small = QFont(font)
        small.setPixelSize(11)
        painter.setFont(small)
        _text(painter, x - 4, PLOT_TOP + 12, "reference size", "end")
        painter.setFont(font)

    @staticmethod
    def _paint_points(painter: QPainter, layout: ChartLayout, colours: ChartColours) -> None:
        fills = {"deploy": colours.deploy, "investigate": colours.investigate}
        for point in layout.points:
            fill = fills.get(point.verdict, colours.point)
            if point.hollow:
                painter.setPen(QPen(fill, 2))
                painter.setBrush(colours.background)
            else:
                painter.setPen(QPen(colours.background, 1.5))
                painter.setBrush(fill)
            painter.drawEllipse(QPointF(point.x, point.y), 5, 5)
            bold = QFont(painter.font())
            bold.setBold(True)
            font = painter.font()
            painter.setFont(bold)
            painter.setPen(colours.text)
            _text(painter, point.label_x, point.label_y, point.label, point.label_anchor)
            painter.setFont(font)

    @staticmethod
    def _paint_titles(painter: QPainter, layout: ChartLayout, colours: ChartColours) -> None:
        font = painter.font()
        title = QFont(font)
        title.setPixelSize(13)
        painter.setFont(title)
        painter.setPen(colours.muted)
        _text(painter, (PLOT_LEFT + PLOT_RIGHT) / 2, CHART_HEIGHT - 12, "file size (MB)", "middle")
        painter.save()
        painter.translate(16, (PLOT_TOP + PLOT_BOTTOM) / 2)
        painter.rotate(-90)
        _text(painter, 0, 0, layout.drift_title, "middle")
        painter.restore()
        painter.setFont(font)


def _text(painter: QPainter, x: float, baseline: float, text: str, anchor: str) -> None:
    """Draw `text` with its baseline at `baseline`, anchored like SVG's text-anchor (start, middle, end)."""
    width = painter.fontMetrics().horizontalAdvance(text)
    left = x if anchor == "start" else x - width if anchor == "end" else x - width / 2
    painter.drawText(QPointF(left, baseline), text)
