"""What every view shares: the settings, the library, the running jobs, and the signals that connect views."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QObject, QSettings, Signal

from converters.core.paths import config_dir
from qdesk.app.settings import Settings, apply_hub_settings, load_settings, save_settings
from qdesk.gui.background import Job, start_job, wait_for_jobs
from qdesk.library.store import Library

WINDOW_STATE_NAME = "window.ini"


class AppContext(QObject):
    settings_changed = Signal(object)  # Settings
    library_changed = Signal()
    jobs_changed = Signal()
    open_in_compare = Signal(list)  # [Path, ...]: variants to put in the Compare panes
    open_in_quantize = Signal(object)  # Path: a checkpoint folder, a .safetensors file or a GGUF
    open_in_evaluate = Signal(list)  # [Path, ...]: the reference first, then candidates
    show_section = Signal(str)  # a section key, see main_window.SECTIONS

    def __init__(self, settings: Settings | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.settings = settings if settings is not None else load_settings()
        apply_hub_settings(self.settings)
        self._library: Library | None = None
        self.jobs: list[Job] = []

    # --- settings and state ---

    def update_settings(self, settings: Settings) -> None:
        models_moved = settings.models_path() != self.settings.models_path()
        self.settings = settings
        save_settings(settings)
        apply_hub_settings(settings)
        if models_moved:
            self._library = None
            self.library_changed.emit()
        self.settings_changed.emit(settings)

    def window_state(self) -> QSettings:
        """Window geometry, last section, open panes: Qt's own format, beside settings.json."""
        folder = config_dir()
        folder.mkdir(parents=True, exist_ok=True)
        return QSettings(str(folder / WINDOW_STATE_NAME), QSettings.Format.IniFormat)

    def library(self) -> Library:
        if self._library is None or self._library.root != self.settings.models_path():
            self._library = Library(self.settings.models_path())
        return self._library

    @property
    def models_folder(self) -> Path:
        return self.settings.models_path()

    # --- jobs ---

    def run(self, job: Job) -> Job:
        """Start `job` and list it among the running jobs until it ends."""
        self.jobs.append(job)
        job.ended.connect(lambda: self._forget(job))
        self.jobs_changed.emit()
        return start_job(job)

    def _forget(self, job: Job) -> None:
        if job in self.jobs:
            self.jobs.remove(job)
        self.jobs_changed.emit()

    def shutdown(self, timeout_ms: int = 15_000) -> None:
        """Cancel every running job and wait for them (their outputs are temporary files until complete)."""
        for job in list(self.jobs):
            job.cancel()
        wait_for_jobs(timeout_ms)
