"""The Settings section: models folder, threads, GPU layers, theme, sampling defaults and the system prompt.

Every change is saved at once (`AppContext.update_settings` writes settings.json and tells the other views); the
theme is applied at once, the models folder only once it is a folder qdesk can write to.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from PySide6.QtCore import QSignalBlocker, Qt, QTimer
from PySide6.QtWidgets import (
    QAbstractSpinBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from converters.core.paths import models_dir
from native.backends import SystemInfo, discover
from qdesk.app.settings import THEMES, Settings
from qdesk.chat.engine import SamplingOptions
from qdesk.gui.background import Job, JobFailure
from qdesk.gui.context import AppContext
from qdesk.gui.settings_backends import describe_backends
from qdesk.gui.theme import apply_theme

THEME_TITLES = {"system": "Follow the system", "light": "Light", "dark": "Dark"}
PROMPT_SAVE_DELAY_MS = 600
MAX_SEED = 2**31 - 1
FIELD_WIDTH = 180


class SettingsView(QWidget):
    def __init__(self, context: AppContext) -> None:
        super().__init__()
        self.context = context
        self.backends_job: Job | None = None
        self.backends: SystemInfo | None = None

        heading = QLabel("Settings")
        heading.setProperty("role", "heading")
        page = QWidget()
        column = QVBoxLayout(page)
        column.addWidget(heading)
        column.addWidget(self._models_group())
        column.addWidget(self._hardware_group())
        column.addWidget(self._appearance_group())
        column.addWidget(self._sampling_group())
        column.addWidget(self._prompt_group())
        column.addStretch(1)
        scroll = QScrollArea()
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setWidgetResizable(True)
        scroll.setWidget(page)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(scroll)

        self._prompt_timer = QTimer(self)
        self._prompt_timer.setSingleShot(True)
        self._prompt_timer.setInterval(PROMPT_SAVE_DELAY_MS)
        self._prompt_timer.timeout.connect(self.save)

        self.show_settings(context.settings)
        context.settings_changed.connect(self.show_settings)
        self._connect_edits()

    # --- the groups ---

    def _models_group(self) -> QGroupBox:
        group = QGroupBox("Models")
        self.models_folder = QLineEdit()
        self.models_folder.setObjectName("modelsFolder")
        self.models_folder.setPlaceholderText(f"{models_dir()} (the default)")
        self.choose_folder = QPushButton("Ch&oose…")
        self.choose_folder.setObjectName("chooseModelsFolder")
        self.choose_folder.clicked.connect(self.choose_models_folder)
        row = QHBoxLayout()
        row.addWidget(self.models_folder, 1)
        row.addWidget(self.choose_folder)
        self.folder_problem = QLabel()
        self.folder_problem.setObjectName("modelsFolderProblem")
        self.folder_problem.setProperty("role", "error")
        self.folder_problem.setWordWrap(True)
        self.folder_problem.hide()
        form = QFormLayout(group)
        form.addRow("&Models folder:", row)
        form.labelForField(row).setBuddy(self.models_folder)
        form.addRow("", self.folder_problem)
        return group

    def _hardware_group(self) -> QGroupBox:
        group = QGroupBox("Hardware")
        cores = os.cpu_count() or 1
        self.threads = _spin_box("threads", 0, max(256, cores * 4))
        self.threads.setSpecialValueText(f"Automatic ({cores} cores)")
        self.gpu_layers = _spin_box("gpuLayers", -1, 999)
        self.gpu_layers.setSpecialValueText("All layers")
        self.gpu_layers.setToolTip("Layers of each model to run on the GPU: 0 runs on the CPU only.")
        self.backend_summary = QLabel()
        self.backend_summary.setObjectName("backendSummary")
        self.backend_summary.setProperty("role", "hint")
        self.backend_summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        form = _compact_form(group)
        form.addRow("&Threads:", self.threads)
        form.addRow("&GPU layers:", self.gpu_layers)
        form.addRow("Backends found:", self.backend_summary)
        return group

    def _appearance_group(self) -> QGroupBox:
        group = QGroupBox("Appearance")
        self.theme = QComboBox()
        self.theme.setObjectName("theme")
        self.theme.setMinimumWidth(FIELD_WIDTH)
        for key in THEMES:
            self.theme.addItem(THEME_TITLES[key], key)
        form = _compact_form(group)
        form.addRow("T&heme:", self.theme)
        return group

    def _sampling_group(self) -> QGroupBox:
        group = QGroupBox("Sampling defaults (new conversations)")
        self.temperature = _double_box("temperature", 0.0, 2.0, 0.05)
        self.temperature.setToolTip("0 always picks the likeliest token; higher is more varied.")
        self.top_p = _double_box("topP", 0.01, 1.0, 0.05)
        self.top_k = _spin_box("topK", 0, 1000)
        self.top_k.setSpecialValueText("Off")
        self.repeat_penalty = _double_box("repeatPenalty", 0.5, 2.0, 0.05)
        self.max_tokens = _spin_box("maxTokens", 1, 131_072)
        self.seed = _spin_box("seed", 0, MAX_SEED)
        self.reset_sampling = QPushButton("Reset to &defaults")
        self.reset_sampling.setObjectName("resetSampling")
        self.reset_sampling.clicked.connect(self.reset_sampling_defaults)
        form = _compact_form(group)
        form.addRow("Temperat&ure:", self.temperature)
        form.addRow("Top-&p:", self.top_p)
        form.addRow("Top-&k:", self.top_k)
        form.addRow("&Repeat penalty:", self.repeat_penalty)
        form.addRow("Ma&x tokens:", self.max_tokens)
        form.addRow("S&eed:", self.seed)
        form.addRow("", self.reset_sampling)
        return group

    def _prompt_group(self) -> QGroupBox:
        group = QGroupBox("Default system prompt")
        self.system_prompt = QPlainTextEdit()
        self.system_prompt.setObjectName("systemPrompt")
        self.system_prompt.setPlaceholderText("Empty: the model's own default.")
        self.system_prompt.setTabChangesFocus(True)
        self.system_prompt.setFixedHeight(90)
        layout = QVBoxLayout(group)
        layout.addWidget(self.system_prompt)
        return group

    def _connect_edits(self) -> None:
        self.models_folder.editingFinished.connect(self.save)
        for box in (self.threads, self.gpu_layers, self.temperature, self.top_p, self.top_k, self.repeat_penalty,
                    self.max_tokens, self.seed):
            box.valueChanged.connect(self.save)
        self.theme.currentIndexChanged.connect(self.save)
        self.system_prompt.textChanged.connect(self._prompt_timer.start)

    # --- the hooks the main window calls ---

    def activated(self) -> None:
        if self.backends is None and self.backends_job is None:
            self.find_backends()

    def shutdown(self) -> None:
        if self._prompt_timer.isActive():
            self._prompt_timer.stop()
            self.save()

    # --- showing and saving ---

    def show_settings(self, settings: Settings) -> None:
        """Show `settings` in the widgets without saving them again."""
        widgets = (self.models_folder, self.threads, self.gpu_layers, self.theme, self.temperature, self.top_p,
                   self.top_k, self.repeat_penalty, self.max_tokens, self.seed, self.system_prompt)
        blockers = [QSignalBlocker(widget) for widget in widgets]
        try:
            self._show_values(settings)
        finally:
            for blocker in blockers:
                blocker.unblock()

    def _show_values(self, settings: Settings) -> None:
        if self.models_folder.text() != settings.models_dir:
            self.models_folder.setText(settings.models_dir)
        self.threads.setValue(settings.threads)
        self.gpu_layers.setValue(settings.gpu_layers)
        self.theme.setCurrentIndex(max(0, self.theme.findData(settings.theme)))
        self._show_sampling(settings.sampling)
        typing = self._prompt_timer.isActive()  # the user's unsaved words win
        if not typing and self.system_prompt.toPlainText() != settings.system_prompt:
            self.system_prompt.setPlainText(settings.system_prompt)

    def _show_sampling(self, sampling: SamplingOptions) -> None:
        self.temperature.setValue(sampling.temperature)
        self.top_p.setValue(sampling.top_p)
        self.top_k.setValue(sampling.top_k)
        self.repeat_penalty.setValue(sampling.repeat_penalty)
        self.max_tokens.setValue(sampling.max_tokens)
        self.seed.setValue(sampling.seed)

    def edited_settings(self) -> Settings:
        """The settings as the widgets show them (the models folder as saved while it has a problem)."""
        current = self.context.settings
        folder = self.models_folder.text().strip()
        problem = _models_folder_problem(folder)
        self.folder_problem.setText(problem or "")
        self.folder_problem.setVisible(problem is not None)
        return dataclasses.replace(
            current,
            models_dir=current.models_dir if problem else folder,
            threads=self.threads.value(),
            gpu_layers=self.gpu_layers.value(),
            theme=str(self.theme.currentData()),
            sampling=SamplingOptions(
                temperature=round(self.temperature.value(), 4),
                top_p=round(self.top_p.value(), 4),
                top_k=self.top_k.value(),
                repeat_penalty=round(self.repeat_penalty.value(), 4),
                max_tokens=self.max_tokens.value(),
                seed=self.seed.value(),
            ),
            system_prompt=self.system_prompt.toPlainText(),
        )

    def save(self) -> None:
        """Save what the widgets show, if it differs from the current settings, and apply the theme."""
        settings = self.edited_settings()
        if settings == self.context.settings:
            return
        theme_changed = settings.theme != self.context.settings.theme
        self.context.update_settings(settings)
        if theme_changed:
            apply_theme(settings.theme)

    def choose_models_folder(self) -> None:
        start = self.models_folder.text().strip() or str(self.context.models_folder)
        folder = QFileDialog.getExistingDirectory(self, "Models folder", start)
        if folder:
            self.models_folder.setText(folder)
            self.save()

    def reset_sampling_defaults(self) -> None:
        blockers = [QSignalBlocker(box) for box in (self.temperature, self.top_p, self.top_k, self.repeat_penalty,
                                                    self.max_tokens, self.seed)]
        try:
            self._show_sampling(SamplingOptions())
        finally:
            for blocker in blockers:
                blocker.unblock()
        self.save()

    # --- the backends ---

    def find_backends(self) -> None:
        self.backend_summary.setText("Looking for compute backends…")
        job = Job("Looking for compute backends", lambda _progress, _cancel: discover(), self)
        job.succeeded.connect(self._show_backends)
        job.failed.connect(self._backends_failed)
        job.ended.connect(lambda: setattr(self, "backends_job", None))
        self.backends_job = self.context.run(job)

    def _show_backends(self, info: SystemInfo) -> None:
        self.backends = info
        self.backend_summary.setText("\n".join(describe_backends(info)))

    def _backends_failed(self, failure: JobFailure) -> None:
        self.backend_summary.setText(f"The backends could not be listed: {failure.sentence}")
        self.backend_summary.setToolTip(failure.details[-2000:])


def _models_folder_problem(text: str) -> str | None:
    """Why `text` cannot be the models folder, or None ("" means the default folder)."""
    if not text:
        return None
    folder = Path(text).expanduser()
    if not folder.is_absolute():
        return f"{text} is not a full path; choose the folder with Choose…."
    if folder.exists() and not folder.is_dir():
        return f"{folder} is a file, not a folder; choose a folder."
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{folder} cannot be written to; choose a folder of your own."
    return None


def _compact_form(group: QGroupBox) -> QFormLayout:
    """A form whose fields keep their natural width instead of spanning the window."""
    form = QFormLayout(group)
    form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.FieldsStayAtSizeHint)
    return form


def _spin_box(name: str, low: int, high: int) -> QSpinBox:
    box = QSpinBox()
    box.setObjectName(name)
    box.setMinimumWidth(FIELD_WIDTH)
    box.setRange(low, high)
    box.setKeyboardTracking(False)
    box.setAccelerated(True)
    box.setCorrectionMode(QAbstractSpinBox.CorrectionMode.CorrectToNearestValue)
    return box


def _double_box(name: str, low: float, high: float, step: float) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setObjectName(name)
    box.setMinimumWidth(FIELD_WIDTH)
    box.setRange(low, high)
    box.setSingleStep(step)
    box.setDecimals(2)
    box.setKeyboardTracking(False)
    return box
