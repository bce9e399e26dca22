"""The Serve section: the library's variants behind an OpenAI-compatible API for other programs (`qdesk serve`).

Start and stop the server, see its address, choose the variants it offers, and watch its request log. The server
is `qdesk.serve.start_server` (the same as the command line), started and stopped off the GUI thread; requests are
logged from the server's thread through a Qt signal. RPC workers (kept in the settings, `rpc_workers`) add their
devices to every model the server loads; an address off this machine gets a warning, since ggml's RPC protocol has
no authentication or encryption.
"""

from __future__ import annotations

import dataclasses
import time

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from qdesk.app.errors import UserError
from qdesk.chat.engine import LoadOptions
from qdesk.gui.background import Job, JobFailure
from qdesk.gui.context import AppContext
from qdesk.rpc.endpoints import exposure_warnings, parse_endpoints
from qdesk.serve.app import RequestRecord
from qdesk.serve.server import DEFAULT_CTX, DEFAULT_HOST, DEFAULT_PORT, RunningServer, ServeOptions, start_server

LOG_ROWS = 200
LOG_COLUMNS = ("time", "client", "request", "model", "status", "tokens", "seconds")


class ServeView(QWidget):
    request_logged = Signal(object)  # RequestRecord, emitted on the server's thread, shown on the GUI thread
    server_changed = Signal()

    def __init__(self, context: AppContext) -> None:
        super().__init__()
        self.context = context
        self.server: RunningServer | None = None
        self.job: Job | None = None

        heading = QLabel("Serve")
        heading.setProperty("role", "heading")
        intro = QLabel("Other programs (editors, agents, scripts) can use the variants below through an "
                       "OpenAI-compatible API at the address shown once the server runs.")
        intro.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.addWidget(heading)
        layout.addWidget(intro)
        layout.addWidget(self._server_group())
        row = QHBoxLayout()
        row.addWidget(self._models_group(), 1)
        row.addWidget(self._log_group(), 2)
        layout.addLayout(row, 1)

        self.request_logged.connect(self.add_record)
        context.library_changed.connect(self.refresh_models)
        self.refresh_models()
        self._show_state()

    # --- building ---

    def _server_group(self) -> QGroupBox:
        group = QGroupBox("Server")
        self.host = QLineEdit(DEFAULT_HOST)
        self.host.setObjectName("serveHost")
        self.host.setToolTip("127.0.0.1: this computer only. Another address lets other machines in and needs a key.")
        self.port = QSpinBox()
        self.port.setObjectName("servePort")
        self.port.setRange(0, 65535)
        self.port.setValue(DEFAULT_PORT)
        self.port.setToolTip("0 picks any free port.")
        self.api_key = QLineEdit()
        self.api_key.setObjectName("serveApiKey")
        self.api_key.setEchoMode(QLineEdit.EchoMode.Password)
        self.api_key.setPlaceholderText("none (needed when the address is not 127.0.0.1)")
        self.workers = QLineEdit(self.context.settings.rpc_workers)
        self.workers.setObjectName("rpcWorkers")
        self.workers.setPlaceholderText("none; e.g. 192.168.1.20:50052,192.168.1.21:50052 (machines running "
                                        "`qdesk worker`)")
        self.workers.editingFinished.connect(self.save_workers)
        self.workers.textChanged.connect(self._warn_about_workers)
        self.worker_warning = QLabel()
        self.worker_warning.setObjectName("rpcWarning")
        self.worker_warning.setProperty("role", "error")
        self.worker_warning.setWordWrap(True)
        self.worker_warning.hide()
        self.start_button = QPushButton("&Start")
        self.start_button.setObjectName("serveStart")
        self.start_button.clicked.connect(self.toggle)
        self.address = QLabel()
        self.address.setObjectName("serveAddress")
        self.address.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.copy_button = QPushButton("&Copy address")
        self.copy_button.setObjectName("serveCopy")
        self.copy_button.clicked.connect(self.copy_address)
        self.problem = QLabel()
        self.problem.setObjectName("serveProblem")
        self.problem.setProperty("role", "error")
        self.problem.setWordWrap(True)
        self.problem.hide()
        endpoint = QHBoxLayout()
        endpoint.addWidget(self.host, 1)
        endpoint.addWidget(QLabel("port"))
        endpoint.addWidget(self.port)
        status = QHBoxLayout()
        status.addWidget(self.start_button)
        status.addWidget(self.address, 1)
        status.addWidget(self.copy_button)
        form = QFormLayout(group)
        form.addRow("&Address:", endpoint)
        form.labelForField(endpoint).setBuddy(self.host)
        form.addRow("API &key:", self.api_key)
        form.addRow("&RPC workers:", self.workers)
        form.addRow("", self.worker_warning)
        form.addRow(status)
        form.addRow(self.problem)
        return group

    def _models_group(self) -> QGroupBox:
        group = QGroupBox("Variants offered")
        self.models = QListWidget()
        self.models.setObjectName("serveModels")
        column = QVBoxLayout(group)
        column.addWidget(self.models)
        return group

    def _log_group(self) -> QGroupBox:
        group = QGroupBox("Requests")
        self.log = QTableWidget(0, len(LOG_COLUMNS))
        self.log.setObjectName("serveLog")
        self.log.setHorizontalHeaderLabels(list(LOG_COLUMNS))
        self.log.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.log.verticalHeader().hide()
        self.log.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.log.horizontalHeader().setStretchLastSection(True)
        column = QVBoxLayout(group)
        column.addWidget(self.log)
        return group

    # --- the variants ---

    def refresh_models(self) -> None:
        checked = {self.models.item(row).data(Qt.ItemDataRole.UserRole): self.models.item(row).checkState()
                   for row in range(self.models.count())}
        self.models.clear()
        try:
            library = self.context.library()
            library.ensure_starter()
            entries = [entry for entry in library.entries() if entry.status == "ok"]
        except UserError:
            entries = []
        for entry in entries:
            item = QListWidgetItem(entry.id)
            item.setData(Qt.ItemDataRole.UserRole, str(entry.path))
            item.setToolTip(str(entry.path))
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(checked.get(str(entry.path), Qt.CheckState.Checked))
            self.models.addItem(item)

    def chosen_models(self) -> tuple[str, ...]:
        return tuple(self.models.item(row).data(Qt.ItemDataRole.UserRole) for row in range(self.models.count())
                     if self.models.item(row).checkState() == Qt.CheckState.Checked)

    # --- RPC workers ---

    def _warn_about_workers(self) -> None:
        try:
            warnings = exposure_warnings(parse_endpoints(self.workers.text()))
        except UserError as error:
            warnings = [str(error)]
        self.worker_warning.setText(" ".join(warning[0].upper() + warning[1:] for warning in warnings))
        self.worker_warning.setVisible(bool(warnings))

    def save_workers(self) -> None:
        text = self.workers.text().strip()
        if text != self.context.settings.rpc_workers:
            self.context.update_settings(dataclasses.replace(self.context.settings, rpc_workers=text))

    # --- starting and stopping ---

    def options(self) -> ServeOptions:
        """What the fields ask for (UserError for workers that are not host:port)."""
        settings = self.context.settings
        load = LoadOptions(n_ctx=DEFAULT_CTX, n_threads=settings.threads or None, n_gpu_layers=settings.gpu_layers,
                           rpc=parse_endpoints(self.workers.text()))
        return ServeOptions(models=self.chosen_models(), host=self.host.text().strip() or DEFAULT_HOST,
                            port=self.port.value(), api_key=self.api_key.text() or None, load=load)

    def toggle(self) -> None:
        if self.job is not None:
            return
        if self.server is None:
            self.start()
        else:
            self.stop()

    def start(self) -> None:
        self.problem.hide()
        if not self.chosen_models():
            self._show_problem("Choose at least one variant to offer.")
            return
        try:
            options = self.options()
        except UserError as error:
            self._show_problem(str(error))
            return
        root = self.context.models_folder
        self.job = Job("Starting the server", lambda _progress, _cancel: start_server(
            options, on_request=self.request_logged.emit, library_root=root), cancellable=False)
        self.job.succeeded.connect(self._started)
        self.job.failed.connect(self._failed)
        self.job.ended.connect(self._job_ended)
        self.context.run(self.job)
        self._show_state()

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is None:
            return
        self.job = Job("Stopping the server", lambda _progress, _cancel: server.stop(), cancellable=False)
        self.job.failed.connect(self._failed)
        self.job.ended.connect(self._job_ended)
        self.context.run(self.job)
        self._show_state()

    def _started(self, server: RunningServer) -> None:
        self.server = server
        self.server_changed.emit()

    def _failed(self, failure: JobFailure) -> None:
        self._show_problem(failure.sentence)

    def _job_ended(self) -> None:
        self.job = None
        self._show_state()
        self.server_changed.emit()

    def _show_problem(self, sentence: str) -> None:
        self.problem.setText(sentence)
        self.problem.show()

    def _show_state(self) -> None:
        running = self.server is not None
        busy = self.job is not None
        if self.job is not None:
            self.start_button.setText(self.job.title.split()[0] + "…")
        else:
            self.start_button.setText("&Stop" if running else "&Start")
        self.start_button.setEnabled(not busy)
        for field in (self.host, self.port, self.api_key, self.workers, self.models):
            field.setEnabled(not running and not busy)
        self.copy_button.setEnabled(running)
        if running and self.server is not None:
            self.address.setText(f"{self.server.url}  ·  {len(self.server.models)} variants")
        else:
            self.address.setText("not running")

    def copy_address(self) -> None:
        if self.server is not None:
            QGuiApplication.clipboard().setText(self.server.url)

    # --- the request log ---

    def add_record(self, record: RequestRecord) -> None:
        row = self.log.rowCount()
        self.log.insertRow(row)
        tokens = f"{record.prompt_tokens} + {record.completion_tokens}" if record.model else ""
        status = str(record.status) + (f" ({record.finish_reason})" if record.finish_reason else "")
        cells = (time.strftime("%H:%M:%S", time.localtime(record.at)), record.client,
                 f"{record.method} {record.path}", record.model or "", status, tokens, f"{record.seconds:.2f}")
        for column, text in enumerate(cells):
            item = QTableWidgetItem(text)
            if record.error and column == LOG_COLUMNS.index("status"):
                item.setToolTip(record.error)
            self.log.setItem(row, column, item)
        while self.log.rowCount() > LOG_ROWS:
            self.log.removeRow(0)
        self.log.scrollToBottom()

    # --- the hooks the main window calls ---

    def shutdown(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.stop()
