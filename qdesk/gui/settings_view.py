"""The Settings section: models folder, the Hugging Face Hub (endpoint, cache folder, token), threads, GPU layers,
theme and font size, sampling defaults and the system prompt.

Every change is saved at once (`AppContext.update_settings` writes settings.json and tells the other views); the
theme is applied at once, the models folder only once it is a folder qdesk can write to.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from urllib.parse import urlsplit

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
from qdesk.app.errors import UserError
from qdesk.app.logs import log_failure
from qdesk.app.settings import THEMES, Settings
from qdesk.chat.engine import SamplingOptions
from qdesk.display.backends import describe_backends
from qdesk.gui.background import Job, JobFailure
from qdesk.gui.context import AppContext
from qdesk.gui.theme import apply_theme
from qdesk.hub.account import account, log_in, log_out
from qdesk.hub.settings import hub_cache_dir

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
        column.addWidget(self._hub_group())
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

    def _hub_group(self) -> QGroupBox:
        group = QGroupBox("Hugging Face Hub")
        self.hf_endpoint = QLineEdit()
        self.hf_endpoint.setObjectName("hfEndpoint")
        self.hf_endpoint.setPlaceholderText("https://huggingface.co (the default; or a mirror that speaks its API)")
        self.hf_endpoint.setToolTip("Where Discover searches and downloads. HF_ENDPOINT set outside qdesk wins.")
        self.hf_cache = QLineEdit()
        self.hf_cache.setObjectName("hfCache")
        self.hf_cache.setPlaceholderText(f"{hub_cache_dir()} (the default)")
        self.hf_cache.setToolTip("Where downloads go (the Hugging Face cache, shared with other tools). "
                                 "HF_HUB_CACHE set outside qdesk wins.")
        choose_cache = QPushButton("Choo&se…")
        choose_cache.setObjectName("chooseHfCache")
        choose_cache.clicked.connect(self.choose_hf_cache)
        cache_row = QHBoxLayout()
        cache_row.addWidget(self.hf_cache, 1)
        cache_row.addWidget(choose_cache)
        self.hub_problem = QLabel()
        self.hub_problem.setObjectName("hubProblem")
        self.hub_problem.setProperty("role", "error")
        self.hub_problem.setWordWrap(True)
        self.hub_problem.hide()
        self.token = QLineEdit()
        self.token.setObjectName("hfToken")
        self.token.setEchoMode(QLineEdit.EchoMode.Password)
        self.token.setPlaceholderText("hf_… (from your account's Access Tokens page, for gated models)")
        self.log_in_button = QPushButton("&Log in")
        self.log_in_button.setObjectName("hfLogIn")
        self.log_in_button.clicked.connect(self.log_in)
        self.log_out_button = QPushButton("Log o&ut")
        self.log_out_button.setObjectName("hfLogOut")
        self.log_out_button.clicked.connect(self.log_out)
        token_row = QHBoxLayout()
        token_row.addWidget(self.token, 1)
        token_row.addWidget(self.log_in_button)
        token_row.addWidget(self.log_out_button)
        self.account_label = QLabel()
        self.account_label.setObjectName("hfAccount")
        self.account_label.setProperty("role", "hint")
        self.account_label.setWordWrap(True)
        form = QFormLayout(group)
        form.addRow("&Endpoint:", self.hf_endpoint)
        form.addRow("&Cache folder:", cache_row)
        form.labelForField(cache_row).setBuddy(self.hf_cache)
        form.addRow("", self.hub_problem)
        form.addRow("To&ken:", token_row)
        form.labelForField(token_row).setBuddy(self.token)
        form.addRow("", self.account_label)
        self.account_job: Job | None = None
        self.account_label.setText("")  # told when the section is first shown (reading it loads huggingface_hub)
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
        self.font_size = _spin_box("fontSize", 0, 32)
        self.font_size.setSpecialValueText("The system's")
        self.font_size.setSuffix(" pt")
        self.font_size.setToolTip("The size of all text in the window, in points.")
        form = _compact_form(group)
        form.addRow("T&heme:", self.theme)
        form.addRow("&Font size:", self.font_size)
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
        self.seed.setSpecialValueText("0 (random)")
        self.seed.setToolTip("0: a new random seed for each turn (Compare shares it between its panes); any other "
                             "seed gives the same answer to the same prompt and settings.")
        sampling_hint = QLabel("Compare answers deterministically (temperature 0) so that its panes differ only where "
                               "the models do; these settings apply when you turn on <i>Free sampling</i> there.")
        sampling_hint.setObjectName("samplingHint")
        sampling_hint.setProperty("role", "hint")
        sampling_hint.setWordWrap(True)
        self.reset_sampling = QPushButton("Reset to &defaults")
        self.reset_sampling.setObjectName("resetSampling")
        self.reset_sampling.clicked.connect(self.reset_sampling_defaults)
        form = _compact_form(group)
        form.addRow(sampling_hint)
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
        self.hf_endpoint.editingFinished.connect(self.save)
        self.hf_cache.editingFinished.connect(self.save)
        self.token.returnPressed.connect(self.log_in)
        self.font_size.valueChanged.connect(self.save)
        for box in (self.threads, self.gpu_layers, self.temperature, self.top_p, self.top_k, self.repeat_penalty,
                    self.max_tokens, self.seed):
            box.valueChanged.connect(self.save)
        self.theme.currentIndexChanged.connect(self.save)
        self.system_prompt.textChanged.connect(self._prompt_timer.start)

    # --- the hooks the main window calls ---

    def activated(self) -> None:
        if self.backends is None and self.backends_job is None:
            self.find_backends()
        if not self.account_label.text() and self.account_job is None:
            self._show_account()

    def shutdown(self) -> None:
        if self._prompt_timer.isActive():
            self._prompt_timer.stop()
            self.save()

    # --- showing and saving ---

    def show_settings(self, settings: Settings) -> None:
        """Show `settings` in the widgets without saving them again."""
        widgets = (self.models_folder, self.threads, self.gpu_layers, self.theme, self.temperature, self.top_p,
                   self.top_k, self.repeat_penalty, self.max_tokens, self.seed, self.system_prompt, self.hf_endpoint,
                   self.hf_cache, self.font_size)
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
        self.font_size.setValue(settings.font_size)
        if self.hf_endpoint.text() != settings.hf_endpoint:
            self.hf_endpoint.setText(settings.hf_endpoint)
        if self.hf_cache.text() != settings.hf_cache_dir:
            self.hf_cache.setText(settings.hf_cache_dir)
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
        endpoint, cache = self.hf_endpoint.text().strip(), self.hf_cache.text().strip()
        endpoint_problem, cache_problem = _endpoint_problem(endpoint), _models_folder_problem(cache)
        hub_problem = endpoint_problem or cache_problem
        self.hub_problem.setText(hub_problem or "")
        self.hub_problem.setVisible(hub_problem is not None)
        return dataclasses.replace(
            current,
            hf_endpoint=current.hf_endpoint if endpoint_problem else endpoint,
            hf_cache_dir=current.hf_cache_dir if cache_problem else cache,
            font_size=self.font_size.value(),
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

    def choose_hf_cache(self) -> None:
        start = self.hf_cache.text().strip() or str(hub_cache_dir())
        folder = QFileDialog.getExistingDirectory(self, "Hugging Face cache folder", start)
        if folder:
            self.hf_cache.setText(folder)
            self.save()

    # --- the Hub account ---

    def _show_account(self, note: str = "") -> None:
        state = account()
        if state.from_environment:
            text = "A token is set in HF_TOKEN (the environment): it is the one used."
        elif state.has_token:
            text = "Logged in: a saved token is sent to the Hub (gated models you were granted download)."
        else:
            text = "Not logged in: public models only."
        self.account_label.setText(" ".join(part for part in (note, text) if part))
        self.log_out_button.setEnabled(state.has_token and not state.from_environment)

    def log_in(self) -> None:
        """Check the pasted token with the Hub in the background and keep it (`qdesk.hub.account.log_in`)."""
        token = self.token.text()
        if self.account_job is not None:
            return
        self.save()
        self.account_label.setText("Checking the token with the Hub…")
        job = Job("Logging in to the Hub", lambda _progress, _cancel: log_in(token), self)
        job.succeeded.connect(lambda name: (self.token.clear(), self._show_account(f"Logged in as {name}.")))
        job.failed.connect(lambda failure: self._show_account(failure.sentence))
        job.ended.connect(lambda: setattr(self, "account_job", None))
        self.account_job = self.context.run(job)

    def log_out(self) -> None:
        try:
            log_out()
        except UserError as error:
            self._show_account(str(error))
            return
        self._show_account("Logged out.")

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
        log = log_failure(failure.sentence, failure.details) if failure.details else None
        self.backend_summary.setToolTip(f"The details are in qdesk's log ({log})." if log else "")


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


def _endpoint_problem(text: str) -> str | None:
    """Why `text` cannot be the Hub's address, or None ("" means the default)."""
    if not text:
        return None
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f"{text} is not a web address; give one such as https://huggingface.co."
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
