"""The Quantize section: a source, the variants to make with their sizes and fit, calibration text, the job queue."""

from __future__ import annotations

import contextlib
from pathlib import Path

from PySide6.QtCore import QSettings, Qt
from PySide6.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QFileDialog,
    QFrame,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QPushButton,
    QRadioButton,
    QScrollArea,
    QSlider,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from converters.calibration.calibrate import DEFAULT_CHUNKS
from converters.core.units import format_duration, format_size
from converters.quantization.presets import preset_named
from qdesk.app.logs import log_failure
from qdesk.gui.background import Job, JobFailure
from qdesk.gui.context import AppContext
from qdesk.gui.feedback import show_failure
from qdesk.gui.job_queue import QuantizeQueue
from qdesk.gui.quantize_queue_view import QueueWidget
from qdesk.quantization.batch import BatchRequest, VariantBatch, VariantChoice
from qdesk.quantization.sizes import PRESET_CHOICES, ChoiceSize, SizePreview, preview_sizes
from qdesk.quantization.timing import calibration_chunks, estimate_steps, step_kind, step_units

SOURCE_HINT = ("Drop a Hugging Face checkpoint folder (or a .safetensors file inside one) or an F16/BF16 GGUF "
               "anywhere on this window, or browse for one.")
DEFAULT_PRESETS = ("Q4_K_M", "Q8_0")
SLIDER_STEPS = 1000
CALIBRATION_MODES = ("builtin", "files", "none")
STATE_PREFIX = "quantize/"


class QuantizeView(QWidget):
    def __init__(self, context: AppContext) -> None:
        super().__init__()
        self.context = context
        self.source: Path | None = None
        self.preview: SizePreview | None = None
        self.preview_job: Job | None = None
        self.text_files: list[Path] = []
        self.queue = QuantizeQueue(context, self)
        self._status_shown = False

        heading = QLabel("Quantize")
        heading.setProperty("role", "heading")
        options = QVBoxLayout()
        options.addWidget(heading)
        options.addWidget(self._source_box())
        options.addWidget(self._presets_box())
        options.addWidget(self._mix_box())
        options.addWidget(self._calibration_box())
        self.keep_reference = QCheckBox("&Keep the converted F16/BF16 reference in the library (for Evaluate)")
        self.keep_reference.setObjectName("keepReference")
        self.keep_reference.setChecked(True)
        options.addWidget(self.keep_reference)
        options.addWidget(self._rounding_box())
        self.start_button = QPushButton("&Quantize")
        self.start_button.setObjectName("startButton")
        self.start_button.setDefault(True)
        self.start_button.setToolTip("Add a job for this source and the checked variants to the queue (Ctrl+Enter)")
        self.start_button.setShortcut("Ctrl+Return")
        self.start_button.clicked.connect(self.start)
        self.start_hint = QLabel()
        self.start_hint.setObjectName("startHint")
        self.start_hint.setProperty("role", "hint")
        start_row = QHBoxLayout()
        start_row.addWidget(self.start_button)
        start_row.addWidget(self.start_hint, 1)
        options.addLayout(start_row)
        self.time_estimate = QLabel()
        self.time_estimate.setObjectName("timeEstimate")
        self.time_estimate.setProperty("role", "hint")
        self.time_estimate.setWordWrap(True)
        options.addWidget(self.time_estimate)
        options.addStretch(1)

        self.queue_widget = QueueWidget(self.queue)
        self.queue_widget.setObjectName("jobQueue")
        left = QWidget()
        options.setContentsMargins(0, 0, 8, 0)
        left.setLayout(options)
        scroll = QScrollArea()  # at 700 px high the form scrolls rather than squeezing its boxes
        scroll.setObjectName("quantizeOptions")
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setWidget(left)
        scroll.setMinimumWidth(left.minimumSizeHint().width() + scroll.verticalScrollBar().sizeHint().width())
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.setObjectName("quantizeSplitter")
        self.splitter.setChildrenCollapsible(False)
        self.splitter.addWidget(scroll)
        self.splitter.addWidget(self.queue_widget)
        self.splitter.setStretchFactor(0, 1)
        self.splitter.setStretchFactor(1, 1)
        layout = QHBoxLayout(self)
        layout.addWidget(self.splitter)

        self.queue.changed.connect(self._show_queue_status)
        self.queue.step_progressed.connect(lambda _step: self._show_queue_status())
        self._update_start()

    # --- building the form ---

    def _source_box(self) -> QGroupBox:
        box = QGroupBox("Source")
        self.source_label = QLabel(SOURCE_HINT)
        self.source_label.setObjectName("sourceLabel")
        self.source_label.setWordWrap(True)
        self.source_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.source_info = QLabel()
        self.source_info.setObjectName("sourceInfo")
        self.source_info.setWordWrap(True)
        browse_folder = QPushButton("&Browse folder…")
        browse_folder.setObjectName("browseFolder")
        browse_folder.setToolTip("Choose a Hugging Face checkpoint folder")
        browse_folder.clicked.connect(self.choose_folder)
        browse_gguf = QPushButton("Browse &GGUF…")
        browse_gguf.setObjectName("browseGguf")
        browse_gguf.setToolTip("Choose an F16, BF16 or F32 GGUF file")
        browse_gguf.clicked.connect(self.choose_gguf)
        buttons = QHBoxLayout()
        buttons.addWidget(browse_folder)
        buttons.addWidget(browse_gguf)
        buttons.addStretch(1)
        layout = QVBoxLayout(box)
        layout.addWidget(self.source_label)
        layout.addWidget(self.source_info)
        layout.addLayout(buttons)
        return box

    def _rounding_box(self) -> QGroupBox:
        box = QGroupBox("Rounding")
        self.feedback_presets = QCheckBox("Round the presets with error &feedback too (slower; the mix always is)")
        self.feedback_presets.setObjectName("feedbackPresets")
        self.feedback_presets.setToolTip("The preset's types, each weight rounded so that its error is compensated "
                                         "by the rest of its row (a pass over the calibration text and a "
                                         "re-encoding of every matrix; docs/mix.md). Off: llama.cpp's own rounding.")
        self.awq_check = QCheckBox("&Activation-aware scaling before rounding (AWQ)")
        self.awq_check.setObjectName("awqCheck")
        self.awq_check.setToolTip("Scale each matrix's input channels by their measured activations before "
                                  "rounding and fold the inverse into the norms before them (the function is "
                                  "unchanged). Needs calibration; variants without an importance matrix (Q8_0) "
                                  "are made without it.")
        self.awq_check.toggled.connect(lambda _on: self._update_start())
        layout = QVBoxLayout(box)
        layout.addWidget(self.feedback_presets)
        layout.addWidget(self.awq_check)
        return box

    def _presets_box(self) -> QGroupBox:
        box = QGroupBox("&Presets (file size · fits this machine?)")
        grid = QGridLayout(box)
        self.preset_checks: dict[str, QCheckBox] = {}
        self.size_labels: dict[str, QLabel] = {}
        self.fit_labels: dict[str, QLabel] = {}
        for index, name in enumerate(PRESET_CHOICES):
            row, column = index % 6, (index // 6) * 3
            check = QCheckBox(name)
            check.setObjectName(f"preset_{name}")
            check.setToolTip(preset_named(name).summary)
            check.setChecked(name in DEFAULT_PRESETS)
            check.toggled.connect(self._update_start)
            size = QLabel()
            size.setObjectName(f"size_{name}")
            fit = QLabel()
            fit.setObjectName(f"fit_{name}")
            grid.addWidget(check, row, column)
            grid.addWidget(size, row, column + 1)
            grid.addWidget(fit, row, column + 2)
            self.preset_checks[name], self.size_labels[name], self.fit_labels[name] = check, size, fit
        return box

    def _mix_box(self) -> QGroupBox:
        box = QGroupBox("Target size")
        self.mix_check = QCheckBox("Sensitivity &mix of at most this size")
        self.mix_check.setObjectName("mixCheck")
        self.mix_check.setToolTip("Measure which tensors this model needs most and spend the size budget there "
                                  "(docs/mix.md); takes longer than a preset.")
        self.mix_check.toggled.connect(self._update_start)
        self.mix_slider = QSlider(Qt.Orientation.Horizontal)
        self.mix_slider.setObjectName("mixSlider")
        self.mix_slider.setRange(0, SLIDER_STEPS)
        self.mix_slider.setValue(SLIDER_STEPS // 2)
        self.mix_slider.setEnabled(False)
        self.mix_slider.valueChanged.connect(self._update_mix_label)
        self.mix_slider.setAccessibleName("Target size")
        self.mix_label = QLabel()
        self.mix_label.setObjectName("mixSize")
        self.mix_label.setMinimumWidth(150)
        row = QHBoxLayout()
        row.addWidget(self.mix_slider, 1)
        row.addWidget(self.mix_label)
        layout = QVBoxLayout(box)
        layout.addWidget(self.mix_check)
        layout.addLayout(row)
        return box

    def _calibration_box(self) -> QGroupBox:
        box = QGroupBox("Calibration text (importance matrix)")
        self.calibration = QButtonGroup(self)
        self.calibration_buttons: dict[str, QRadioButton] = {}
        labels = {"builtin": "Bu&ilt-in text (prose, chat, code, maths, languages)",
                  "files": "&Your text files:", "none": "&None (no importance matrix)"}
        layout = QVBoxLayout(box)
        for mode in CALIBRATION_MODES:
            button = QRadioButton(labels[mode])
            button.setObjectName(f"calibration_{mode}")
            self.calibration.addButton(button)
            self.calibration_buttons[mode] = button
        self.calibration_buttons["builtin"].setChecked(True)
        for button in self.calibration_buttons.values():
            button.toggled.connect(self._update_start)
        self.add_files_button = QPushButton("&Add files…")
        self.add_files_button.setObjectName("addTextFiles")
        self.add_files_button.clicked.connect(self.choose_text_files)
        self.files_label = QLabel("no files chosen")
        self.files_label.setObjectName("textFiles")
        self.files_label.setProperty("role", "hint")
        self.files_label.setWordWrap(True)
        files_row = QHBoxLayout()
        files_row.addWidget(self.calibration_buttons["files"])
        files_row.addWidget(self.add_files_button)
        files_row.addWidget(self.files_label, 1)
        layout.addWidget(self.calibration_buttons["builtin"])
        layout.addLayout(files_row)
        layout.addWidget(self.calibration_buttons["none"])
        return box

    # --- the source ---

    def set_source(self, path: Path) -> None:
        """Quantize `path` next: an HF checkpoint folder, a file inside one, or a float GGUF. Sizes follow."""
        path = Path(path)
        if path.is_file() and path.suffix.lower() != ".gguf":
            path = path.parent
        self.source = path
        self.source_label.setText(str(path))
        self.source_info.setText("Reading the model's headers for the sizes…")
        self.source_info.setProperty("role", "hint")
        self._repolish(self.source_info)
        self.keep_reference.setEnabled(path.is_dir())
        self.preview = None
        for name in PRESET_CHOICES:
            self.size_labels[name].setText("…")
            self.fit_labels[name].setText("")
        self.mix_slider.setEnabled(False)
        self.mix_label.setText("")
        if self.preview_job is not None:
            self.preview_job.cancel()
        job = Job(f"Sizing variants of {path.name}",
                  lambda progress, cancel: preview_sizes(path, progress=progress, cancel=cancel), self)
        job.succeeded.connect(lambda preview: self._preview_ready(job, preview))
        job.failed.connect(lambda failure: self._preview_failed(job, failure))
        self.preview_job = job
        self.context.run(job)
        self._update_start()

    def choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a Hugging Face checkpoint folder")
        if folder:
            self.set_source(Path(folder))

    def choose_gguf(self) -> None:
        name, _ = QFileDialog.getOpenFileName(self, "Choose a float GGUF to quantize", "", "GGUF files (*.gguf)")
        if name:
            self.set_source(Path(name))

    def choose_text_files(self) -> None:
        names, _ = QFileDialog.getOpenFileNames(self, "Choose calibration text", "", "Text files (*.txt *.md);;"
                                                "All files (*)")
        if names:
            self.set_text_files([Path(name) for name in names])

    def set_text_files(self, paths: list[Path]) -> None:
        self.text_files = list(paths)
        self.files_label.setText(", ".join(path.name for path in paths) if paths else "no files chosen")
        if paths:
            self.calibration_buttons["files"].setChecked(True)
        self._update_start()

    def _preview_ready(self, job: Job, preview: SizePreview) -> None:
        if job is not self.preview_job:
            return
        self.preview_job = None
        self.preview = preview
        source = preview.source
        kind = ("Hugging Face checkpoint: sizes from llama.cpp's own plan for each preset, as it will quantize the "
                "converted GGUF" if source.is_checkpoint else "GGUF: sizes from llama.cpp's own plan for each preset")
        parameters = _parameters(preview)
        self.source_info.setText(f"{kind}. {parameters / 1e6:,.1f} M parameters; reference "
                                 f"{format_size(source.reference_bytes)}; {_machine_text(preview)}.")
        self.source_info.setProperty("role", "hint")
        self._repolish(self.source_info)
        for name, choice in preview.presets.items():
            self._show_size(self.size_labels[name], self.fit_labels[name], choice)
        self.mix_slider.setEnabled(True)
        self._update_mix_label()
        self._update_start()

    def _preview_failed(self, job: Job, failure: JobFailure) -> None:
        if job is not self.preview_job:
            return
        self.preview_job = None
        if failure.cancelled:
            return
        self.source_info.setText(failure.sentence)
        self.source_info.setProperty("role", "error")
        log = log_failure(failure.sentence, failure.details) if failure.details else None
        self.source_info.setToolTip(f"The details are in qdesk's log ({log})." if log else "")
        self._repolish(self.source_info)
        for name in PRESET_CHOICES:
            self.size_labels[name].setText("?")
        self._update_start()

    def _show_size(self, size_label: QLabel, fit_label: QLabel, choice: ChoiceSize) -> None:
        size_label.setText(("" if choice.exact else "≈ ") + format_size(choice.file_bytes))
        size_label.setToolTip(f"{choice.file_bytes:,} bytes" + ("" if choice.exact else " (an estimate)"))
        fit_label.setText("fits" if choice.fit.fits else "too big")
        fit_label.setProperty("role", "" if choice.fit.fits else "error")
        fit_label.setToolTip(choice.fit.summary)
        self._repolish(fit_label)

    # --- the mix ---

    def mix_bytes(self) -> int | None:
        """The target size the slider stands at (None until the sizes are known)."""
        if self.preview is None:
            return None
        low, high = self.preview.mix_range()
        return low + (high - low) * self.mix_slider.value() // SLIDER_STEPS

    def _update_mix_label(self) -> None:
        size = self.mix_bytes()
        if size is None or self.preview is None:
            self.mix_label.setText("")
            return
        choice = self.preview.mix(size)
        self.mix_label.setText(f"{format_size(size)} · {'fits' if choice.fit.fits else 'too big'}")
        self.mix_label.setToolTip(choice.fit.summary)

    # --- starting a job ---

    def choices(self) -> list[VariantChoice]:
        chosen = [VariantChoice(preset=name) for name in PRESET_CHOICES if self.preset_checks[name].isChecked()]
        size = self.mix_bytes()
        if self.mix_check.isChecked() and size is not None:
            chosen.append(VariantChoice(size_bytes=size))
        return chosen

    def calibration_mode(self) -> str:
        return next(mode for mode, button in self.calibration_buttons.items() if button.isChecked())

    def _problem(self) -> str:
        """Why Quantize cannot start now ("" when it can)."""
        if self.source is None:
            return "Choose a source first."
        if self.mix_check.isChecked() and self.preview is None:
            return "Waiting for the sizes before a target size can be used…"
        if not self.choices():
            return "Check at least one preset or the target size."
        if self.calibration_mode() == "files" and not self.text_files:
            return "Add your calibration text files, or choose the built-in text."
        if self.awq_check.isChecked() and self.calibration_mode() == "none":
            return "Activation-aware scaling needs calibration: choose the built-in text or your files."
        return ""

    def _update_start(self) -> None:
        self.mix_slider.setEnabled(self.preview is not None)
        problem = self._problem()
        self.start_button.setEnabled(not problem)
        self.start_hint.setText(problem)
        self._show_time_estimate()

    def _show_time_estimate(self) -> None:
        """Each step's expected time before anything runs, the importance matrix's share, and what it buys."""
        request = None if self.preview is None or self._problem() else self.request()
        if request is None or self.preview is None:
            self.time_estimate.setText("")
            return
        source = self.preview.source
        times = estimate_steps(request, is_checkpoint=source.is_checkpoint, reference_bytes=source.reference_bytes,
                               parameters=_parameters(self.preview))
        total = sum(step.seconds for step in times)
        names = {"convert": "convert", "calibrate": "importance matrix"}
        parts = []
        for step in times:
            share = f" ({step.seconds / total:.0%} of it)" if step.key == "calibrate" else ""
            parts.append(f"{names.get(step.key, step.key)} {format_duration(step.seconds)}{share}")
        text = f"Expected: about {format_duration(total)} in all: " + " · ".join(parts) + "."
        if any(step.key == "calibrate" for step in times):
            text += (f" The importance matrix ({request.chunks} × {request.ctx} tokens of text) pays off most below "
                     "5 bits per weight; Q5_K and up barely need it (a shorter text is used for them), Q8_0 not at "
                     "all, and Calibration: None skips it.")
        self.time_estimate.setText(text)
        measured = all(step.measured for step in times)
        self.time_estimate.setToolTip("From this machine's own earlier steps." if measured else
                                      "From typical rates of a 2-core machine until a step of each kind has run "
                                      "here; then from this machine's own.")

    def request(self) -> BatchRequest | None:
        """The job the form describes now (None without a source)."""
        if self.source is None:
            return None
        mode = self.calibration_mode()
        choices = tuple(self.choices())
        return BatchRequest(
            source=self.source,
            choices=choices,
            output_folder=self.context.models_folder,
            use_imatrix=mode != "none",
            text_files=tuple(self.text_files) if mode == "files" else (),
            keep_reference=self.keep_reference.isChecked(),
            chunks=calibration_chunks(choices) or DEFAULT_CHUNKS,
            gpu_layers=self.context.settings.gpu_layers,
            threads=self.context.settings.threads,
            feedback_presets=self.feedback_presets.isChecked(),
            awq=self.awq_check.isChecked(),
        )

    def start(self) -> None:
        """Queue a job for the current source and choices."""
        request = None if self._problem() else self.request()
        if request is None or self.source is None:
            return
        try:
            batch = VariantBatch(request, self.context.library())
        except Exception as error:  # a library that cannot be opened: one sentence, details on demand
            show_failure(self, error)
            return
        work = {}
        if self.preview is not None:
            source = self.preview.source
            work = {step.key: step_units(step_kind(step.key, request), reference_bytes=source.reference_bytes,
                                         parameters=_parameters(self.preview), chunks=request.chunks, ctx=request.ctx)
                    for step in batch.steps()}
        self.queue.add(batch, job_title(request), work)

    # --- queue state everywhere ---

    def _show_queue_status(self) -> None:
        window = self.window()
        if not isinstance(window, QMainWindow):
            return
        summary = self.queue.summary()
        if summary:
            window.statusBar().showMessage(summary)
            self._status_shown = True
        elif self._status_shown:
            outcome = self.queue.outcome_summary()
            window.statusBar().showMessage(f"Quantize: the queue is done ({outcome})." if outcome else
                                           "Quantize: the queue is done.", 8000)
            self._status_shown = False

    # --- hooks the main window calls ---

    def save_state(self, state: QSettings) -> None:
        state.setValue(STATE_PREFIX + "presets", [name for name, check in self.preset_checks.items()
                                                  if check.isChecked()])
        state.setValue(STATE_PREFIX + "mix", self.mix_check.isChecked())
        state.setValue(STATE_PREFIX + "mix_position", self.mix_slider.value())
        state.setValue(STATE_PREFIX + "calibration", self.calibration_mode())
        state.setValue(STATE_PREFIX + "keep_reference", self.keep_reference.isChecked())
        state.setValue(STATE_PREFIX + "feedback_presets", self.feedback_presets.isChecked())
        state.setValue(STATE_PREFIX + "awq", self.awq_check.isChecked())
        state.setValue(STATE_PREFIX + "splitter", self.splitter.saveState())

    def restore_state(self, state: QSettings) -> None:
        presets = state.value(STATE_PREFIX + "presets")
        if presets is not None:
            chosen = {presets} if isinstance(presets, str) else set(presets)
            for name, check in self.preset_checks.items():
                check.setChecked(name in chosen)
        self.mix_check.setChecked(_truthy(state.value(STATE_PREFIX + "mix", False)))
        with contextlib.suppress(TypeError, ValueError):
            self.mix_slider.setValue(int(state.value(STATE_PREFIX + "mix_position", SLIDER_STEPS // 2)))
        mode = str(state.value(STATE_PREFIX + "calibration", "builtin"))
        self.calibration_buttons["builtin" if mode == "files" or mode not in CALIBRATION_MODES else mode].setChecked(
            True)
        self.keep_reference.setChecked(_truthy(state.value(STATE_PREFIX + "keep_reference", True)))
        self.feedback_presets.setChecked(_truthy(state.value(STATE_PREFIX + "feedback_presets", False)))
        self.awq_check.setChecked(_truthy(state.value(STATE_PREFIX + "awq", False)))
        splitter = state.value(STATE_PREFIX + "splitter")
        if splitter is not None:
            self.splitter.restoreState(splitter)
        self._update_start()

    def shutdown(self) -> None:
        """Window closing: stop the size preview and every queued step; remove temporary files."""
        if self.preview_job is not None:
            self.preview_job.cancel()
        self.queue.shutdown()

    @staticmethod
    def _repolish(widget: QWidget) -> None:
        widget.style().unpolish(widget)
        widget.style().polish(widget)


def job_title(request: BatchRequest) -> str:
    """"Model → Q4_K_M, Q8_0 · built-in calibration text": what is made and from what text, so jobs differ."""
    labels = ", ".join(choice.label for choice in request.choices)
    if not request.use_imatrix or not any(choice.uses_imatrix for choice in request.choices):
        calibration = "no importance matrix"
    elif request.text_files:
        names = ", ".join(path.name for path in request.text_files[:2])
        more = f" and {len(request.text_files) - 2} more" if len(request.text_files) > 2 else ""
        calibration = f"calibrated on {names}{more}"
    else:
        calibration = "built-in calibration text"
    return f"{Path(request.source).name} → {labels} · {calibration}"


def _parameters(preview: SizePreview) -> int:
    return sum(_elements(tensor.shape) for tensor in preview.source.tensors)


def _elements(shape: tuple[int, ...]) -> int:
    count = 1
    for dimension in shape:
        count *= dimension
    return count


def _machine_text(preview: SizePreview) -> str:
    machine = preview.machine
    ram = f"{format_size(machine.ram_bytes)} RAM available"
    return ram + (f", {format_size(machine.vram_bytes)} VRAM free" if machine.vram_bytes is not None else ", no GPU")


def _truthy(value: object) -> bool:
    return value is True or str(value).lower() in ("true", "1")
