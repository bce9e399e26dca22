"""One download in the Discover section: progress (bytes, speed, time left), pause and resume, cancel, and where
the result went (the library, or a checkpoint folder ready to quantize)."""

from __future__ import annotations

import enum

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from converters.core.jobs import Progress
from converters.core.units import format_size
from qdesk.gui.background import Job, JobFailure, describe_failure
from qdesk.gui.context import AppContext
from qdesk.gui.discover_jobs import DownloadOutcome, discard_partial, download_group
from qdesk.gui.feedback import show_failure
from qdesk.hub import FileGroup, HubSettings, RepoListing
from qdesk.library.store import LibraryError


class State(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    PAUSED = "paused"  # by the user, or stopped by an error: Resume carries on from the partial file
    DISCARDING = "discarding"


class DownloadPanel(QWidget):
    """Shows the one download at a time; hidden until the first one starts."""

    changed = Signal()  # the state changed (running, paused, idle)

    def __init__(self, context: AppContext) -> None:
        super().__init__()
        self.context = context
        self.state = State.IDLE
        self.job: Job | None = None
        self.target: tuple[RepoListing, FileGroup, HubSettings] | None = None
        self.outcome: DownloadOutcome | None = None
        self.failure: JobFailure | None = None
        self._stopping: str | None = None  # "pause" or "cancel" while the job winds down
        self._done_bytes = 0

        self.label = QLabel()
        self.label.setObjectName("downloadLabel")
        self.label.setWordWrap(True)
        self.bar = QProgressBar()
        self.bar.setObjectName("downloadProgress")
        self.bar.setRange(0, 1000)
        self.pause_button = QPushButton("&Pause")
        self.pause_button.setObjectName("pauseDownload")
        self.pause_button.clicked.connect(self.toggle_pause)
        self.cancel_button = QPushButton("Cancel download")
        self.cancel_button.setObjectName("cancelDownload")
        self.cancel_button.clicked.connect(self.cancel)
        self.details_button = QPushButton("Details…")
        self.details_button.setObjectName("downloadDetails")
        self.details_button.clicked.connect(lambda: self.failure and show_failure(self, self.failure, "Download"))
        self.library_button = QPushButton("Show in &Library")
        self.library_button.setObjectName("showInLibrary")
        self.library_button.clicked.connect(lambda: self.context.show_section.emit("library"))
        self.quantize_button = QPushButton("&Quantize it")
        self.quantize_button.setObjectName("quantizeDownload")
        self.quantize_button.clicked.connect(self._open_in_quantize)

        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.bar, 1)
        for button in (self.pause_button, self.cancel_button, self.details_button, self.library_button,
                       self.quantize_button):
            row.addWidget(button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.label)
        layout.addLayout(row)
        self._show_state()
        self.hide()

    @property
    def busy(self) -> bool:
        """A download is running, paused, or being discarded: another cannot start."""
        return self.state != State.IDLE

    def start(self, listing: RepoListing, group: FileGroup, settings: HubSettings) -> None:
        if self.busy:
            return
        self.target = (listing, group, settings)
        self.outcome, self.failure, self._done_bytes = None, None, 0
        self.bar.setValue(0)
        self._run()

    def _run(self) -> None:
        assert self.target is not None
        listing, group, settings = self.target
        try:
            library = self.context.library()
        except LibraryError as error:
            self.state, self.failure = State.IDLE, describe_failure(error)
            self.label.setText(self.failure.sentence)
            self._show_state()
            self.show()
            return
        job = Job(f"Downloading {group.name}", lambda progress, cancel: download_group(
            listing, group, settings, library, progress, cancel), self)
        job.progressed.connect(self._progressed)
        job.succeeded.connect(self._downloaded)
        job.failed.connect(self._stopped)
        self.state, self._stopping, self.failure = State.RUNNING, None, None
        self.label.setText(f"Downloading {group.name} from {listing.repo_id}…")
        self.job = self.context.run(job)
        self._show_state()
        self.show()

    def toggle_pause(self) -> None:
        if self.state == State.RUNNING and self.job is not None:
            self._stopping = "pause"
            self.job.cancel()
        elif self.state == State.PAUSED:
            self._run()

    def cancel(self) -> None:
        """Stop the download and delete its partial file (files already complete stay in the cache)."""
        if self.state == State.RUNNING and self.job is not None:
            self._stopping = "cancel"
            self.job.cancel()
        elif self.state == State.PAUSED:
            self._discard()

    def shutdown(self) -> None:
        """The window is closing: pause, so the next start can resume."""
        if self.state == State.RUNNING and self.job is not None:
            self._stopping = "pause"
            self.job.cancel()

    # --- the job's reports ---

    def _progressed(self, progress: Progress) -> None:
        if self.state != State.RUNNING or self.target is None:
            return
        self._done_bytes = int(progress.done)
        self.bar.setValue(round(progress.fraction * 1000))
        text = f"{format_size(progress.done)} of {format_size(progress.total)}"
        if progress.message:
            text += f" — {progress.message}"
        self.label.setText(f"Downloading {self.target[1].name}: {text}")

    def _downloaded(self, outcome: DownloadOutcome) -> None:
        self.job, self.state, self.outcome = None, State.IDLE, outcome
        self.bar.setValue(1000)
        result = outcome.result
        text = f"Downloaded {self.target[1].name if self.target else result.repo_id}"
        if result.bytes_downloaded:
            text += f" ({format_size(result.bytes_downloaded)} fetched)"
        if outcome.entries:
            text += "; it is in the library as " + ", ".join(entry.id for entry in outcome.entries) + "."
        elif outcome.checkpoint_dir is not None:
            text += f" to {outcome.checkpoint_dir}; quantize it to run it."
        else:
            text += "."
        if result.offline_note:
            text += " " + result.offline_note
        self.label.setText(text)
        self._show_state()
        if outcome.entries:
            self.context.library_changed.emit()

    def _stopped(self, failure: JobFailure) -> None:
        self.job = None
        if failure.cancelled and self._stopping == "cancel":
            self._discard()
            return
        self.state = State.PAUSED
        name = self.target[1].name if self.target else "the file"
        if failure.cancelled:
            self.label.setText(f"Paused {name} at {format_size(self._done_bytes)}; the part downloaded is kept, "
                               "so Resume carries on from there.")
        else:
            self.failure = failure
            self.label.setText(failure.sentence)
        self._show_state()

    def _discard(self) -> None:
        assert self.target is not None
        listing, group, settings = self.target
        self.state = State.DISCARDING
        self._show_state()
        job = Job("Deleting the partial download", lambda _progress, _cancel: discard_partial(
            listing, group, settings), self)
        job.ended.connect(self._discarded)
        self.job = self.context.run(job)

    def _discarded(self) -> None:
        self.job, self.state = None, State.IDLE
        name = self.target[1].name if self.target else "the file"
        self.label.setText(f"Download of {name} cancelled; its partial file was deleted.")
        self.bar.setValue(0)
        self._show_state()

    def _open_in_quantize(self) -> None:
        if self.outcome is not None and self.outcome.checkpoint_dir is not None:
            self.context.open_in_quantize.emit(self.outcome.checkpoint_dir)

    def _show_state(self) -> None:
        running, paused = self.state == State.RUNNING, self.state == State.PAUSED
        self.pause_button.setText("&Resume" if paused else "&Pause")
        self.pause_button.setVisible(running or paused)
        self.cancel_button.setVisible(running or paused)
        self.details_button.setVisible(self.failure is not None)
        done = self.state == State.IDLE and self.outcome is not None
        self.library_button.setVisible(done and bool(self.outcome and self.outcome.entries))
        self.quantize_button.setVisible(done and self.outcome is not None and self.outcome.checkpoint_dir is not None)
        self.label.setProperty("role", "error" if self.failure is not None else "")
        self.label.style().unpolish(self.label)
        self.label.style().polish(self.label)
        self.changed.emit()
