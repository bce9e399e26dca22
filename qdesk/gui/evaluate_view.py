"""The Evaluate section: pick a reference and variants, run `qdesk.evaluation.evaluate.evaluate` in the background,
and read
the size-vs-KLD chart, the summary, the task verdicts, the memory estimates and the per-token heat map.

Everything shown is shaped from the evaluation's JSON document, the one `qdesk eval --json` prints and the HTML
report renders, so "Save HTML report" writes exactly what the window shows (`qdesk.evaluation.report.write_report`).
"""

from __future__ import annotations

import html
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PySide6.QtCore import QEvent, QSettings, Qt
from PySide6.QtGui import QBrush, QColor, QFont, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from converters.core.errors import UserError
from converters.core.jobs import CancelToken, Progress, ProgressFn
from converters.core.units import format_duration, format_size
from qdesk.evaluation.history import EvaluationHistory
from qdesk.gui.background import Job, JobFailure
from qdesk.gui.charts import SizeKldChart, chart_colours
from qdesk.gui.context import AppContext
from qdesk.gui.drops import is_float_gguf
from qdesk.gui.evaluate_heatmap import HeatMapView
from qdesk.gui.evaluate_tables import (
    GOOD,
    MUTED,
    WARN,
    Table,
    memory_table,
    notes,
    recommendations,
    summary_table,
    tasks_table,
    text_summary,
)
from qdesk.gui.feedback import show_failure
from qdesk.library.store import LibraryEntry

FLOAT_TYPES = ("F32", "F16", "BF16")
DEFAULT_CHUNKS = 8
MAX_CHUNKS = 256
BUILTIN_TASKS = "builtin"
HINT = ("Choose a float reference (F16, BF16 or F32) and the variants made from it; the evaluation measures how far "
        "each variant's predictions are from the reference's on held-out text, what it costs in memory and, "
        "optionally, task scores and speed.")
IDLE_TEXT = "Ready."
NEEDS_REFERENCE = "Choose the reference: a float GGUF (F16, BF16 or F32) the variants were made from."
NO_FLOAT_MODEL = ("The library has no float GGUF to use as the reference yet: drop a Hugging Face checkpoint on the "
                  "window to convert one, or import an F16 GGUF.")


def is_float_entry(entry: LibraryEntry) -> bool:
    return (entry.file_type or "").upper() in FLOAT_TYPES


def _entry_label(entry: LibraryEntry) -> str:
    return f"{entry.id}  ·  {entry.file_type or entry.variant}  ·  {format_size(entry.bytes)}"


class EvaluateView(QWidget):
    def __init__(self, context: AppContext) -> None:
        super().__init__()
        self.context = context
        self.history = EvaluationHistory()
        self.job: Job | None = None
        self.report: dict[str, Any] | None = None
        self.saved_paths: tuple[Path, Path] | None = None
        self._extra_paths: list[Path] = []
        """Models opened here that are not in the library (they still can be evaluated)."""

        heading = QLabel("Evaluate")
        heading.setProperty("role", "heading")
        hint = QLabel(HINT)
        hint.setProperty("role", "hint")
        hint.setWordWrap(True)

        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.setObjectName("evaluateSplitter")
        splitter.addWidget(self._setup_panel())
        splitter.addWidget(self._results_panel())
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([340, 900])
        splitter.setChildrenCollapsible(False)
        self.splitter = splitter

        layout = QVBoxLayout(self)
        layout.addWidget(heading)
        layout.addWidget(hint)
        layout.addWidget(splitter, 1)

        context.open_in_evaluate.connect(self.open_paths)
        context.library_changed.connect(self.reload_models)
        self.reload_models()
        self._set_running(False)
        self.show_report(None)
        self.show_saved()  # the last evaluation, kept across restarts

    # --- layout ---

    def _setup_panel(self) -> QWidget:
        panel = QWidget()
        panel.setMinimumWidth(280)
        self.reference_combo = QComboBox()
        self.reference_combo.setObjectName("referenceCombo")
        self.reference_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.reference_combo.setMinimumContentsLength(18)
        self.reference_combo.currentIndexChanged.connect(self._reference_changed)
        self.variant_list = QListWidget()
        self.variant_list.setObjectName("variantList")
        self.variant_list.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.variant_list.itemChanged.connect(lambda _item: self._update_actions())
        self.chunks_spin = QSpinBox()
        self.chunks_spin.setObjectName("chunksSpin")
        self.chunks_spin.setRange(1, MAX_CHUNKS)
        self.chunks_spin.setValue(DEFAULT_CHUNKS)
        self.chunks_spin.setSuffix(" × 512 tokens")
        self.chunks_spin.setToolTip("How much held-out text to score: more chunks, steadier figures, longer runs.")
        self.tasks_check = QCheckBox("&Task suites (JSON, arithmetic, facts, code)")
        self.tasks_check.setObjectName("tasksCheck")
        self.tasks_check.setToolTip("Answer the built-in task suites with every model and recommend deploy or "
                                    "investigate for each variant (takes minutes).")
        self.speed_check = QCheckBox("Measure s&peed")
        self.speed_check.setObjectName("speedCheck")
        self.speed_check.setToolTip("Measure prompt and generation tokens per second of every model.")

        reference_label = QLabel("&Reference")
        reference_label.setBuddy(self.reference_combo)
        variants_label = QLabel("&Variants")
        variants_label.setBuddy(self.variant_list)
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        chunks_label = QLabel("C&hunks")
        chunks_label.setBuddy(self.chunks_spin)
        form.addRow(chunks_label, self.chunks_spin)

        self.run_button = QPushButton("R&un evaluation")
        self.run_button.setObjectName("runButton")
        self.run_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("&Cancel")
        self.cancel_button.setObjectName("cancelButton")
        self.cancel_button.setToolTip("Stop the evaluation (Esc); nothing is kept from a stopped run.")
        self.cancel_button.clicked.connect(self.cancel)
        QShortcut(QKeySequence(Qt.Key.Key_Escape), self, self.cancel,
                  context=Qt.ShortcutContext.WidgetWithChildrenShortcut)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button, 1)
        buttons.addWidget(self.cancel_button)

        self.progress_bar = QProgressBar()
        self.progress_bar.setObjectName("progressBar")
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setTextVisible(False)
        self.status_label = QLabel(IDLE_TEXT)
        self.status_label.setObjectName("statusLabel")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.save_button = QPushButton("&Save HTML report…")
        self.save_button.setObjectName("saveButton")
        self.save_button.setToolTip("Write the report as one self-contained HTML page, with its JSON beside it.")
        self.save_button.clicked.connect(self._choose_report_path)

        column = QVBoxLayout(panel)
        column.setContentsMargins(0, 0, 8, 0)
        column.addWidget(reference_label)
        column.addWidget(self.reference_combo)
        column.addWidget(variants_label)
        column.addWidget(self.variant_list, 1)
        column.addLayout(form)
        column.addWidget(self.tasks_check)
        column.addWidget(self.speed_check)
        column.addLayout(buttons)
        column.addWidget(self.progress_bar)
        column.addWidget(self.status_label)
        column.addWidget(self.save_button)
        return panel

    def _results_panel(self) -> QWidget:
        self.tabs = QTabWidget()
        self.tabs.setObjectName("resultsTabs")
        self.chart = SizeKldChart()
        self.summary_table = _table_widget("summaryTable")
        self.summary_caption = QLabel()
        self.summary_caption.setObjectName("summaryCaption")
        self.summary_caption.setWordWrap(True)
        self.summary_caption.setProperty("role", "hint")
        overview = QWidget()
        overview_layout = QVBoxLayout(overview)
        overview_layout.addWidget(self.chart, 3)
        overview_layout.addWidget(self.summary_table, 2)
        overview_layout.addWidget(self.summary_caption)
        self.tabs.addTab(overview, "&Overview")

        self.recommendation_label = QLabel()
        self.recommendation_label.setObjectName("recommendationLabel")
        self.recommendation_label.setWordWrap(True)
        self.recommendation_label.setTextFormat(Qt.TextFormat.RichText)
        self.tasks_table = _table_widget("tasksTable")
        tasks_page = QWidget()
        tasks_layout = QVBoxLayout(tasks_page)
        tasks_layout.addWidget(self.recommendation_label)
        tasks_layout.addWidget(self.tasks_table, 1)
        self.tabs.addTab(tasks_page, "T&asks")

        self.memory_table = _table_widget("memoryTable")
        self.memory_caption = QLabel()
        self.memory_caption.setProperty("role", "hint")
        self.memory_caption.setWordWrap(True)
        memory_page = QWidget()
        memory_layout = QVBoxLayout(memory_page)
        memory_layout.addWidget(self.memory_caption)
        memory_layout.addWidget(self.memory_table, 1)
        self.tabs.addTab(memory_page, "&Memory")

        self.heat_map = HeatMapView()
        self.tabs.addTab(self.heat_map, "H&eat map")
        return self.tabs

    # --- choosing models ---

    def reload_models(self) -> None:
        """Fill the reference and variant choices from the library, keeping what was chosen."""
        reference = self.reference_path()
        checked = set(self.checked_variants())
        try:
            entries = [entry for entry in self.context.library().entries() if entry.status == "ok"
                       and not entry.is_adapter]
        except (UserError, OSError, sqlite3.Error) as error:  # the section opens all the same
            entries = []
            self.status_label.setText(f"Cannot read the model library: {error}")
        self._entries = entries
        self.reference_combo.blockSignals(True)
        self.reference_combo.clear()
        self.reference_combo.addItem("Choose a reference…", None)
        floats = [entry for entry in entries if is_float_entry(entry)]
        others = [entry for entry in entries if not is_float_entry(entry)]
        for entry in [*floats, *others]:
            self.reference_combo.addItem(_entry_label(entry), str(entry.path))
            self.reference_combo.setItemData(self.reference_combo.count() - 1, str(entry.path),
                                             Qt.ItemDataRole.ToolTipRole)
        known = {entry.path for entry in entries}
        for path in self._extra_paths:
            if path not in known:
                self.reference_combo.addItem(f"{path.name}  ·  not in the library", str(path))
        self.reference_combo.blockSignals(False)
        self._select_reference(reference)
        self._fill_variants(checked)
        if self.reference_path() is None and floats and not self.running:
            chosen = [entry for entry in entries if entry.path in checked]
            self._select_reference(_likeliest_reference(floats, chosen).path)
            self._reference_changed()
        if self.running:
            return
        if self.report is None and not floats and self.reference_path() is None:
            self.status_label.setText(NO_FLOAT_MODEL)
        elif self.status_label.text() in (NO_FLOAT_MODEL, NEEDS_REFERENCE) and self.reference_path() is not None:
            self.status_label.setText(IDLE_TEXT)

    def _select_reference(self, path: Path | None) -> None:
        index = 0 if path is None else self.reference_combo.findData(str(path))
        self.reference_combo.blockSignals(True)
        self.reference_combo.setCurrentIndex(max(0, index))
        self.reference_combo.blockSignals(False)

    def _fill_variants(self, checked: set[Path]) -> None:
        reference = self.reference_path()
        self.variant_list.blockSignals(True)
        self.variant_list.clear()
        known = {entry.path for entry in self._entries}
        rows = [(_entry_label(entry), entry.path) for entry in self._entries if entry.path != reference]
        rows += [(f"{path.name}  ·  not in the library", path) for path in self._extra_paths
                 if path not in known and path != reference]
        for label, path in rows:
            item = QListWidgetItem(label)
            item.setData(Qt.ItemDataRole.UserRole, str(path))
            item.setToolTip(str(path))
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked if path in checked else Qt.CheckState.Unchecked)
            self.variant_list.addItem(item)
        self.variant_list.blockSignals(False)
        self._update_actions()

    def _reference_changed(self) -> None:
        checked = set(self.checked_variants())
        reference = self.reference_path()
        if not checked and reference is not None:
            base = next((entry.base_model for entry in self._entries if entry.path == reference), None)
            checked = {entry.path for entry in self._entries
                       if base is not None and entry.base_model == base and not is_float_entry(entry)}
        self._fill_variants(checked)

    def reference_path(self) -> Path | None:
        data = self.reference_combo.currentData()
        return Path(data) if data else None

    def checked_variants(self) -> list[Path]:
        return [Path(self.variant_list.item(row).data(Qt.ItemDataRole.UserRole))
                for row in range(self.variant_list.count())
                if self.variant_list.item(row).checkState() == Qt.CheckState.Checked]

    def open_paths(self, paths: list[Path]) -> None:
        """Models sent here from elsewhere: the first is the reference when it is a float GGUF, the rest (or all of
        them) become the checked variants."""
        paths = [Path(path) for path in paths]
        if not paths:
            return
        reference = paths[0] if is_float_gguf(paths[0]) else None
        variants = paths[1:] if reference is not None else paths
        for path in paths:
            if path not in self._extra_paths:
                self._extra_paths.append(path)
        self.reload_models()
        if reference is not None:
            self._select_reference(reference)
        self._fill_variants(set(variants))
        if not self.running:
            self.status_label.setText(NEEDS_REFERENCE if reference is None else IDLE_TEXT)

    # --- running ---

    @property
    def running(self) -> bool:
        return self.job is not None

    def _update_actions(self) -> None:
        ready = self.reference_path() is not None and bool(self.checked_variants())
        self.run_button.setEnabled(ready and not self.running)
        self.save_button.setEnabled(self.report is not None and not self.running)

    def _set_running(self, running: bool) -> None:
        for widget in (self.reference_combo, self.variant_list, self.chunks_spin, self.tasks_check,
                       self.speed_check):
            widget.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        self.cancel_button.setText("&Cancel")
        self.progress_bar.setVisible(running)
        self._update_actions()

    def start(self) -> None:
        """Run the evaluation of the checked variants against the reference, off the GUI thread."""
        reference, candidates = self.reference_path(), self.checked_variants()
        if self.running or reference is None or not candidates:
            if reference is None:
                self.status_label.setText(NEEDS_REFERENCE)
            return
        chunks = self.chunks_spin.value()
        tasks = (BUILTIN_TASKS,) if self.tasks_check.isChecked() else ()
        speed = self.speed_check.isChecked()
        settings = self.context.settings
        threads = settings.threads or None
        gpu_layers = settings.gpu_layers

        def work(progress: ProgressFn, cancel: CancelToken) -> dict[str, Any]:
            from qdesk.evaluation.evaluate import evaluate

            evaluation = evaluate(reference, candidates, chunks=chunks, tasks=tasks, speed=speed, n_threads=threads,
                                  n_gpu_layers=gpu_layers, progress=progress, cancel=cancel)
            return evaluation.to_json()

        self.saved_paths = None
        self.show_report(None)
        self.job = Job(f"Evaluating {len(candidates)} variant{'s' if len(candidates) > 1 else ''} against "
                       f"{reference.name}", work, self)
        self.job.progressed.connect(self._progressed)
        self.job.succeeded.connect(self._succeeded)
        self.job.failed.connect(self._failed)
        self.job.ended.connect(self._ended)
        self.progress_bar.setValue(0)
        self.status_label.setText("Starting…")
        self._set_running(True)
        self.context.run(self.job)

    def cancel(self) -> None:
        if self.job is not None and not self.job.cancelled:
            self.job.cancel()
            self.cancel_button.setEnabled(False)
            self.cancel_button.setText("Cancelling…")
            self.status_label.setText("Cancelling…")

    def _progressed(self, progress: Progress) -> None:
        self.progress_bar.setValue(int(progress.fraction * 1000))
        if self.job is not None and self.job.cancelled:
            return
        left = format_duration(self.job.seconds_left()) if self.job is not None else ""
        message = progress.message[:1].upper() + progress.message[1:]  # file names keep their case
        self.status_label.setText(message + (f" · about {left} left" if left else ""))

    def _succeeded(self, report: dict[str, Any]) -> None:
        self.show_report(report)
        self.status_label.setText("Done: " + text_summary(report) + ".")
        self.tabs.setCurrentIndex(0)
        try:
            self.history.save(report, text_summary(report))
        except UserError as error:
            self.status_label.setText(f"Done, but not kept for next time: {error}")
        self.context.library_changed.emit()  # the Library offers this evaluation for the models it measured

    # --- evaluations kept across restarts ---

    def show_saved(self, model: Path | None = None) -> bool:
        """Show the newest kept evaluation (that measured `model`, when given); False when there is none."""
        saved = self.history.latest(model)
        if saved is None or self.running:
            return False
        try:
            report = self.history.load(saved)
        except UserError as error:
            self.status_label.setText(str(error))
            return False
        self.show_report(report)
        when = saved.created[:16].replace("T", " ")
        self.status_label.setText(f"Evaluation of {when}: " + text_summary(report) + ".")
        self.tabs.setCurrentIndex(0)
        return True

    def _failed(self, failure: JobFailure) -> None:
        if failure.cancelled:
            self.status_label.setText("Cancelled; nothing was kept from this run.")
            return
        self.status_label.setText(failure.sentence)
        show_failure(self, failure, "Evaluation failed")

    def _ended(self) -> None:
        self.job = None
        self._set_running(False)

    def shutdown(self) -> None:
        if self.job is not None:
            self.job.cancel()

    # --- results ---

    def show_report(self, report: Mapping[str, Any] | None) -> None:
        """Fill the chart, tables and heat map from an evaluation document (None: empty them); it becomes the
        report "Save HTML report" writes."""
        self.report = None if report is None else dict(report)
        self.chart.set_report(report)
        self.heat_map.set_report(report)
        empty = report is None
        _fill_table(self.summary_table, Table((), ()) if empty else summary_table(report), self)
        _fit_rows(self.summary_table)
        _fill_table(self.tasks_table, Table((), ()) if empty else tasks_table(report), self)
        _fill_table(self.memory_table, Table((), ()) if empty else memory_table(report), self)
        if report is None:
            self.summary_caption.setText("")
            self.recommendation_label.setText("Turn on <i>Task suites</i> before running to get a deploy or "
                                              "investigate recommendation for each variant.")
            self.memory_caption.setText("")
            self._update_actions()
            return
        captions = [text_summary(report) + ". Drift (KLD, the KL divergence): how far each variant's next-token "
                    "predictions are from the reference's, in nats per token; lower and further left on the chart is "
                    "better."]
        captions += notes(report)
        self.summary_caption.setText("\n".join(captions))
        verdicts = recommendations(report)
        colours = chart_colours(self.palette())
        if verdicts:
            lines = []
            for name, verdict, reason in verdicts:
                colour = colours.deploy if verdict == "deploy" else colours.investigate
                lines.append(f"<b>{_html(name)}</b>: <b style='color:{colour.name()}'>{_html(verdict)}</b>"
                             + (f" — {_html(reason)}" if reason else ""))
            self.recommendation_label.setText("<br>".join(lines))
        else:
            self.recommendation_label.setText("No task suites were run; turn on <i>Task suites</i> and run again "
                                              "for a deploy or investigate recommendation.")
        memory = ((report.get("reference") or {}).get("memory") or {})
        self.memory_caption.setText(f"Estimated memory to run each model with a context of "
                                    f"{memory.get('n_ctx', '?')} tokens." if memory else "")
        self._update_actions()

    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        if event.type() == QEvent.Type.PaletteChange and self.report is not None:
            self.show_report(self.report)  # the verdict colours follow the theme

    # --- saving ---

    def _choose_report_path(self) -> None:
        if self.report is None:
            return
        reference = (self.report.get("reference") or {}).get("name") or "evaluation"
        suggested = str(Path.home() / (Path(str(reference)).stem + "-eval.html"))
        path, _filter = QFileDialog.getSaveFileName(self, "Save the evaluation report", suggested,
                                                    "HTML page (*.html)")
        if path:
            self.save_report(Path(path))

    def save_report(self, path: Path) -> Job | None:
        """Write the HTML report and its JSON beside it, off the GUI thread."""
        if self.report is None:
            return None
        report = self.report
        target = path if path.suffix.lower() == ".html" else path.with_suffix(".html")

        def work(progress: ProgressFn, cancel: CancelToken) -> tuple[Path, Path]:
            del progress, cancel
            from qdesk.evaluation.report import write_report

            return write_report(report, target)

        job = Job(f"Saving {target.name}", work, self)
        job.succeeded.connect(self._saved)
        job.failed.connect(lambda failure: show_failure(self, failure, "Report not saved"))
        self.status_label.setText(f"Saving {target.name}…")
        return self.context.run(job)

    def _saved(self, paths: tuple[Path, Path]) -> None:
        self.saved_paths = paths
        self.status_label.setText(f"Saved {paths[0]} and {paths[1].name} beside it.")

    # --- window state ---

    def save_state(self, state: QSettings) -> None:
        state.setValue("evaluate/chunks", self.chunks_spin.value())
        state.setValue("evaluate/tasks", self.tasks_check.isChecked())
        state.setValue("evaluate/speed", self.speed_check.isChecked())
        reference = self.reference_path()
        state.setValue("evaluate/reference", "" if reference is None else str(reference))

    def restore_state(self, state: QSettings) -> None:
        try:
            self.chunks_spin.setValue(int(state.value("evaluate/chunks", DEFAULT_CHUNKS)))
        except (TypeError, ValueError):
            self.chunks_spin.setValue(DEFAULT_CHUNKS)
        self.tasks_check.setChecked(str(state.value("evaluate/tasks", False)).lower() in ("true", "1"))
        self.speed_check.setChecked(str(state.value("evaluate/speed", False)).lower() in ("true", "1"))
        reference = str(state.value("evaluate/reference", "") or "")
        if reference and self.reference_combo.findData(reference) > 0:
            self.reference_combo.setCurrentIndex(self.reference_combo.findData(reference))


def _likeliest_reference(floats: list[LibraryEntry], checked: list[LibraryEntry]) -> LibraryEntry:
    """The float GGUF to offer as the reference: one of the same base model as a checked variant, else the first."""
    bases = {entry.base_model for entry in checked}
    return next((entry for entry in floats if entry.base_model in bases), floats[0])


def _table_widget(name: str) -> QTableWidget:
    table = QTableWidget()
    table.setObjectName(name)
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.setAlternatingRowColors(True)
    table.verticalHeader().setVisible(False)
    table.setWordWrap(False)
    return table


def _fill_table(widget: QTableWidget, table: Table, owner: QWidget) -> None:
    colours = chart_colours(owner.palette())
    tones = {GOOD: colours.deploy, WARN: colours.investigate, MUTED: colours.muted}
    widget.clear()
    widget.setColumnCount(len(table.headers))
    widget.setRowCount(len(table.rows))
    widget.setHorizontalHeaderLabels(list(table.headers))
    for column, tip in enumerate(table.header_tooltips):
        header = widget.horizontalHeaderItem(column)
        if header is not None and tip:
            header.setToolTip(tip)
    for row, cells in enumerate(table.rows):
        for column, cell in enumerate(cells):
            item = QTableWidgetItem(cell.text)
            if cell.tooltip:
                item.setToolTip(cell.tooltip)
            alignment = Qt.AlignmentFlag.AlignRight if cell.numeric else Qt.AlignmentFlag.AlignLeft
            item.setTextAlignment(alignment | Qt.AlignmentFlag.AlignVCenter)
            if cell.tone in tones:
                item.setForeground(QBrush(QColor(tones[cell.tone])))
            if cell.bold:
                font = QFont(item.font())
                font.setBold(True)
                item.setFont(font)
            widget.setItem(row, column, item)
    header = widget.horizontalHeader()
    header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
    if table.headers:
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)  # long names elide; the tooltip has them
    widget.setVisible(not table.empty)


def _fit_rows(widget: QTableWidget) -> None:
    """No taller than its rows (and a scroll bar), so the chart above gets the rest of the height."""
    widget.resizeRowsToContents()
    rows = sum(widget.rowHeight(row) for row in range(widget.rowCount()))
    widget.setMaximumHeight(widget.horizontalHeader().sizeHint().height() + rows + 2 * widget.frameWidth()
                            + widget.horizontalScrollBar().sizeHint().height())


def _html(text: str) -> str:
    return html.escape(text, quote=True)
