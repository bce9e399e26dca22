"""The Discover section: search the Hugging Face Hub, see a repository's model files with fit marks, download one.

Every request runs off the GUI thread; without network (or in offline mode) the section says so in one sentence.
"""

from __future__ import annotations

from PySide6.QtCore import QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from converters.core.units import format_size
from qdesk.gui.background import Job, JobFailure
from qdesk.gui.context import AppContext
from qdesk.gui.discover_download import DownloadPanel
from qdesk.gui.discover_tables import FilesTable, ResultsTable
from qdesk.gui.feedback import show_failure
from qdesk.hub import HubSettings, ModelSummary, RepoListing, list_repo, search_models
from qdesk.hub.status import HubStatus, hub_status

SEARCH_LIMIT = 50
LISTING_DELAY_MS = 250
FORMAT_CHOICES = (("GGUF files", "gguf"), ("Checkpoints (safetensors)", "safetensors"), ("Both", "any"))
SORT_CHOICES = (("Most downloaded", "downloads"), ("Recently updated", "recent"))


def _search(text: str, formats: str, sort: str) -> list[ModelSummary]:
    return search_models(text, formats=formats, sort=sort, limit=SEARCH_LIMIT,  # type: ignore[arg-type]
                         settings=HubSettings.from_environment())


def _listing(repo_id: str) -> tuple[RepoListing, HubSettings]:
    settings = HubSettings.from_environment()
    return list_repo(repo_id, settings=settings), settings


class DiscoverView(QWidget):
    import_requested = Signal()  # "Import…" while offline: the Library's import dialog
    scan_requested = Signal()  # "Find other apps' models" while offline: the Library's scan

    def __init__(self, context: AppContext) -> None:
        super().__init__()
        self.context = context
        self.status_job: Job | None = None
        self.hub_status: HubStatus | None = None
        self.search_job: Job | None = None
        self.listing_job: Job | None = None
        self.listing: RepoListing | None = None
        self.hub_settings: HubSettings | None = None
        self.failure: JobFailure | None = None

        heading = QLabel("Discover")
        heading.setProperty("role", "heading")
        hint = QLabel("Find GGUF models and checkpoints on the Hugging Face Hub; downloads go to its cache and "
                      "into your library.")
        hint.setProperty("role", "hint")

        self.search_box = QLineEdit()
        self.search_box.setObjectName("searchBox")
        self.search_box.setPlaceholderText("Search the Hub, e.g. SmolLM2 (Ctrl+F)")
        self.search_box.setClearButtonEnabled(True)
        self.search_box.returnPressed.connect(self.search)
        self.format_box = _choices("searchFormat", FORMAT_CHOICES)
        self.sort_box = _choices("searchSort", SORT_CHOICES)
        self.search_button = QPushButton("&Search")
        self.search_button.setObjectName("searchButton")
        self.search_button.clicked.connect(self.search)
        search_row = QHBoxLayout()
        search_row.addWidget(self.search_box, 1)
        search_row.addWidget(self.format_box)
        search_row.addWidget(self.sort_box)
        search_row.addWidget(self.search_button)

        self.message = QLabel()
        self.message.setObjectName("discoverMessage")
        self.message.setWordWrap(True)
        self.details_button = QPushButton("Details…")
        self.details_button.setObjectName("discoverDetails")
        self.details_button.clicked.connect(lambda: self.failure and show_failure(self, self.failure, "Discover"))
        self.details_button.hide()
        message_row = QHBoxLayout()
        message_row.addWidget(self.message, 1)
        message_row.addWidget(self.details_button)

        self.offline_row = QWidget()
        self.offline_row.setObjectName("offlineRow")
        self.offline_label = QLabel()
        self.offline_label.setObjectName("offlineLabel")
        self.offline_label.setWordWrap(True)
        self.offline_label.setProperty("role", "error")
        offline_import = QPushButton("&Import…")
        offline_import.setObjectName("offlineImport")
        offline_import.setToolTip("Add .gguf files you already have to the library")
        offline_import.clicked.connect(self.import_requested)
        offline_scan = QPushButton("Find &other apps' models")
        offline_scan.setObjectName("offlineScan")
        offline_scan.setToolTip("Add the Hugging Face cache, LM Studio's and Ollama's models, read-only")
        offline_scan.clicked.connect(self.scan_requested)
        self.retry_button = QPushButton("Check a&gain")
        self.retry_button.setObjectName("offlineRetry")
        self.retry_button.clicked.connect(self.check_hub)
        offline_layout = QHBoxLayout(self.offline_row)
        offline_layout.setContentsMargins(0, 0, 0, 0)
        offline_layout.addWidget(self.offline_label, 1)
        for button in (offline_import, offline_scan, self.retry_button):
            offline_layout.addWidget(button)
        self.offline_row.hide()

        self.results = ResultsTable()
        self.results.itemSelectionChanged.connect(self._listing_timer_start)
        self.files = FilesTable()
        self.files.itemSelectionChanged.connect(self._update_actions)
        self.files.itemActivated.connect(lambda _item: self.download_selected())
        self.repo_title = QLabel("Pick a repository to see its files.")
        self.repo_title.setObjectName("repoTitle")
        self.repo_title.setWordWrap(True)
        self.other_files = QLabel()
        self.other_files.setObjectName("otherFiles")
        self.other_files.setProperty("role", "hint")
        self.other_files.setWordWrap(True)
        self.download_button = QPushButton("&Download")
        self.download_button.setObjectName("downloadButton")
        self.download_button.setToolTip("Download the selected file into the Hugging Face cache and the library")
        self.download_button.clicked.connect(self.download_selected)
        repo_panel = QWidget()
        repo_layout = QVBoxLayout(repo_panel)
        repo_layout.setContentsMargins(0, 0, 0, 0)
        repo_layout.addWidget(self.repo_title)
        repo_layout.addWidget(self.files, 1)
        repo_layout.addWidget(self.other_files)
        download_row = QHBoxLayout()
        download_row.addStretch(1)
        download_row.addWidget(self.download_button)
        repo_layout.addLayout(download_row)
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.addWidget(self.results)
        self.splitter.addWidget(repo_panel)
        self.splitter.setSizes([520, 520])

        self.download_panel = DownloadPanel(context)
        self.download_panel.changed.connect(self._update_actions)

        layout = QVBoxLayout(self)
        layout.addWidget(heading)
        layout.addWidget(hint)
        layout.addWidget(self.offline_row)
        layout.addLayout(search_row)
        layout.addLayout(message_row)
        layout.addWidget(self.splitter, 1)
        layout.addWidget(self.download_panel)

        self._listing_timer = QTimer(self)
        self._listing_timer.setSingleShot(True)
        self._listing_timer.setInterval(LISTING_DELAY_MS)
        self._listing_timer.timeout.connect(self.show_selected_repo)
        find = QShortcut(QKeySequence(QKeySequence.StandardKey.Find), self)
        find.setContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
        find.activated.connect(self.search_box.setFocus)
        self._update_actions()

    # --- the hooks the main window calls ---

    def activated(self) -> None:
        self.search_box.setFocus()
        if self.hub_status is None and self.status_job is None:
            self.check_hub()

    # --- offline or not ---

    def check_hub(self) -> None:
        """Ask in the background whether the Hub can be searched now (no request in offline mode)."""
        if self.status_job is not None:
            return
        job = Job("Checking the Hugging Face Hub", lambda _progress, _cancel: hub_status(), self)
        job.succeeded.connect(self._show_hub_status)
        job.ended.connect(lambda: setattr(self, "status_job", None))
        self.retry_button.setEnabled(False)
        self.status_job = self.context.run(job)

    def _show_hub_status(self, status: HubStatus) -> None:
        self.hub_status = status
        self.retry_button.setEnabled(True)
        offline = not status.online
        if offline:
            self.offline_label.setText(f"{status.sentence} Meanwhile you can import the models you have, or find "
                                       "other apps' models on this computer.")
        self.offline_row.setVisible(offline)
        self.search_button.setEnabled(not status.offline_mode)

    def save_state(self, state: QSettings) -> None:
        state.setValue("discover/format", self.format_box.currentData())
        state.setValue("discover/sort", self.sort_box.currentData())
        state.setValue("discover/splitter", self.splitter.saveState())

    def restore_state(self, state: QSettings) -> None:
        for box, key in ((self.format_box, "discover/format"), (self.sort_box, "discover/sort")):
            index = box.findData(state.value(key))
            if index >= 0:
                box.setCurrentIndex(index)
        splitter = state.value("discover/splitter")
        if splitter is not None:
            self.splitter.restoreState(splitter)

    def shutdown(self) -> None:
        self.download_panel.shutdown()
        for job in (self.search_job, self.listing_job):
            if job is not None:
                job.cancel()

    # --- search ---

    def search(self) -> None:
        text = self.search_box.text().strip()
        formats, sort = str(self.format_box.currentData()), str(self.sort_box.currentData())
        job = Job(f"Searching the Hub for {text!r}", lambda _progress, _cancel: _search(text, formats, sort), self)
        job.succeeded.connect(lambda results: self._found(job, text, results))
        job.failed.connect(lambda failure: self._failed(job, failure))
        if self.search_job is not None:
            self.search_job.cancel()
        self.search_job = self.context.run(job)
        self._say(f"Searching for {text!r}…" if text else "Searching…")

    def _found(self, job: Job, text: str, results: list[ModelSummary]) -> None:
        if job is not self.search_job:
            return
        self.search_job = None
        self.offline_row.hide()  # the Hub answered
        self.results.show_results(results)
        if results:
            more = " (the first ones)" if len(results) >= SEARCH_LIMIT else ""
            self._say(f"{len(results)} repositories found{more}; pick one to see its files.")
        else:
            self._say(f"No models match {text!r}; try other words or another format.")

    # --- a repository's files ---

    def _listing_timer_start(self) -> None:
        self._listing_timer.start()

    def show_selected_repo(self) -> None:
        result = self.results.current_result()
        if result is not None and (self.listing is None or self.listing.repo_id != result.repo_id):
            self.show_repo(result.repo_id)

    def show_repo(self, repo_id: str) -> None:
        """List `repo_id`'s files in the background, reading GGUF headers for the fit marks."""
        job = Job(f"Listing {repo_id}", lambda _progress, _cancel: _listing(repo_id), self)
        job.succeeded.connect(lambda found: self._listed(job, *found))
        job.failed.connect(lambda failure: self._failed(job, failure))
        if self.listing_job is not None:
            self.listing_job.cancel()
        self.listing_job = self.context.run(job)
        self.listing = None
        self.files.show_listing(None)
        self.other_files.clear()
        self.repo_title.setText(f"Listing the files of {repo_id} and checking which fit this machine…")
        self._update_actions()

    def _listed(self, job: Job, listing: RepoListing, settings: HubSettings) -> None:
        if job is not self.listing_job:
            return
        self.listing_job = None
        self.listing, self.hub_settings = listing, settings
        self.files.show_listing(listing)
        gated = " · gated: log in with `hf auth login` after accepting its licence" if listing.gated else ""
        size = "" if listing.size is None else f" · {format_size(listing.size)} in all"  # a mirror may not say
        self.repo_title.setText(f"<b>{listing.repo_id}</b> · {len(listing.groups)} model files{size}{gated}")
        others = ", ".join(file.path for file in listing.other_files[:8])
        if len(listing.other_files) > 8:
            others += f" and {len(listing.other_files) - 8} more"
        self.other_files.setText(f"Other files: {others}" if others else "")
        if listing.groups:
            self.files.selectRow(0)
        self._update_actions()

    # --- downloading ---

    def download_selected(self) -> None:
        group = self.files.current_group()
        if group is None or self.listing is None or self.hub_settings is None or self.download_panel.busy:
            return
        self.download_panel.start(self.listing, group, self.hub_settings)

    # --- small things ---

    def _failed(self, job: Job, failure: JobFailure) -> None:
        if failure.cancelled:
            return
        if job is self.search_job:
            self.search_job = None
        elif job is self.listing_job:
            self.listing_job = None
            self.repo_title.setText("The files could not be listed.")
        else:
            return
        self._say(failure.sentence, failure=failure)

    def _update_actions(self) -> None:
        ready = self.files.current_group() is not None and self.listing is not None
        self.download_button.setEnabled(ready and not self.download_panel.busy)

    def _say(self, text: str, *, failure: JobFailure | None = None) -> None:
        self.failure = failure
        self.message.setText(text)
        self.message.setProperty("role", "error" if failure is not None else "hint")
        self.message.style().unpolish(self.message)
        self.message.style().polish(self.message)
        self.details_button.setVisible(failure is not None and bool(failure.details))


def _choices(name: str, choices: tuple[tuple[str, str], ...]) -> QComboBox:
    box = QComboBox()
    box.setObjectName(name)
    for title, key in choices:
        box.addItem(title, key)
    return box
