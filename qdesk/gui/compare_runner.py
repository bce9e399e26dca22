"""One Compare pane's model: loaded in the background once per binding, kept while bound, its answers streamed.

`PaneRunner.bind(path)` chooses the model; `ensure_loaded` starts loading it in its own worker process (off the GUI
thread); `ask` starts an answer (waiting for the load when it is still running) and `stop` ends it between two
tokens. Tokens arrive on a pool thread: they are gathered under a lock and handed to the GUI thread with one queued
signal per batch, so a fast model cannot flood the event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QObject, Signal

from converters.core.errors import Cancelled
from converters.core.jobs import CancelToken
from qdesk.chat.engine import ChatResult, LoadedModel, LoadOptions, Message, SamplingOptions, TokenEvent, load_model
from qdesk.gui.background import Job, JobFailure
from qdesk.gui.context import AppContext


@dataclass(frozen=True)
class Request:
    messages: tuple[dict[str, str], ...]
    sampling: SamplingOptions
    system: str | None


class PaneRunner(QObject):
    state_changed = Signal()
    """Loading started or ended, a load failed, an answer started or ended."""
    streamed = Signal(str)
    """Text generated since the last delivery (GUI thread)."""
    answered = Signal(object)
    """ChatResult: the answer, also when stopped (stop_reason "cancelled")."""
    failed = Signal(object)
    """JobFailure: the model could not be loaded or crashed, or the request was stopped before it started."""
    _tokens_waiting = Signal()

    def __init__(self, context: AppContext, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.context = context
        self.path: Path | None = None
        self.model: LoadedModel | None = None
        self.load_failure: JobFailure | None = None
        self._load_job: Job | None = None
        self._answer_job: Job | None = None
        self._request: Request | None = None
        self._closers: set[Job] = set()
        self._lock = threading.Lock()
        self._pieces: list[str] = []
        self._delivery_pending = False
        self._generation = 0
        self.unloaded = False
        """Unloaded by the user: it stays unloaded until a prompt is sent (or it is bound anew)."""
        self._tokens_waiting.connect(self._deliver)

    # --- what the pane shows ---

    @property
    def loading(self) -> bool:
        return self._load_job is not None

    @property
    def busy(self) -> bool:
        """An answer is being generated or waits for its model."""
        return self._answer_job is not None or self._request is not None

    @property
    def idle(self) -> bool:
        return not (self.busy or self.loading or self._closers)

    # --- binding and loading ---

    def bind(self, path: Path | None) -> None:
        """Bind to `path` (None: no model); the previous model is stopped and closed."""
        if path == self.path:
            return
        self.release()
        self.path = path
        self.load_failure = None
        self.unloaded = False
        self.state_changed.emit()

    def unload(self) -> None:
        """Free the model's memory (its worker process ends); the next prompt loads it again."""
        self.release()
        self.load_failure = None
        self.unloaded = True
        self.state_changed.emit()

    def reload(self, options: LoadOptions) -> None:
        """Load the bound model again with `options` (new load settings)."""
        self.release()
        self.load_failure = None
        self.unloaded = False
        self.ensure_loaded(options)
        self.state_changed.emit()

    def ensure_loaded(self, options: LoadOptions) -> None:
        """Start loading the bound model unless it is loaded, loading, or failed to load (see `retry`)."""
        if (self.path is None or self.model is not None or self._load_job is not None or self.load_failure is not None
                or self.unloaded):
            return
        path = self.path

        def work(_progress: object, cancel: CancelToken) -> LoadedModel:
            model = load_model(path, options)
            if cancel.cancelled:
                model.close()
                raise Cancelled("the model was unbound while loading")
            return model

        job = Job(f"Loading {path.name}", work)
        job.succeeded.connect(lambda model, job=job: self._loaded(job, model))
        job.failed.connect(lambda failure, job=job: self._load_failed(job, failure))
        self._load_job = job
        self.context.run(job)
        self.state_changed.emit()

    def retry(self, options: LoadOptions) -> None:
        self.load_failure = None
        self.ensure_loaded(options)

    def _loaded(self, job: Job, model: LoadedModel) -> None:
        if job is not self._load_job:
            self._close_later(model)
            return
        self._load_job = None
        self.model = model
        self.state_changed.emit()
        if self._request is not None:
            request, self._request = self._request, None
            self._start(request)

    def _load_failed(self, job: Job, failure: JobFailure) -> None:
        if job is not self._load_job:
            return
        self._load_job = None
        self.load_failure = None if failure.cancelled else failure
        self.state_changed.emit()
        if self._request is not None:
            self._request = None
            self.failed.emit(failure)

    # --- answering ---

    def ask(self, messages: Sequence[Message], sampling: SamplingOptions, system: str | None,
            options: LoadOptions) -> None:
        """Answer `messages`; starts loading the model first when it is not loaded."""
        request = Request(tuple({"role": m["role"], "content": m["content"]} for m in messages), sampling, system)
        if self.path is None:
            self.failed.emit(JobFailure("No model is chosen for this pane; choose one first.", ""))
            return
        if self.busy:
            self.failed.emit(JobFailure("This pane is still answering; stop it first.", ""))
            return
        if self.model is not None and not self.model.alive:
            self._close_later(self.model)
            self.model = None
        if self.model is None:
            self.load_failure = None
            self.unloaded = False
            self._request = request
            self.ensure_loaded(options)
            self.state_changed.emit()
            return
        self._start(request)

    def _start(self, request: Request) -> None:
        model = self.model
        assert model is not None
        with self._lock:
            self._generation += 1
            generation = self._generation
            self._pieces.clear()

        def receive(event: TokenEvent) -> None:  # a pool thread
            with self._lock:
                if generation != self._generation:
                    return
                self._pieces.append(event.text)
                if self._delivery_pending:
                    return
                self._delivery_pending = True
            self._tokens_waiting.emit()

        def work(_progress: object, cancel: CancelToken) -> ChatResult:
            return model.chat(request.messages, request.sampling, system=request.system, on_token=receive,
                              cancel=cancel)

        job = Job(f"Answering with {model.path.name}", work)
        job.succeeded.connect(lambda result, job=job: self._answer_ended(job, result))
        job.failed.connect(lambda failure, job=job: self._answer_ended(job, failure))
        self._answer_job = job
        self.context.run(job)
        self.state_changed.emit()

    def _deliver(self) -> None:
        with self._lock:
            text = "".join(self._pieces)
            self._pieces.clear()
            self._delivery_pending = False
        if text:
            self.streamed.emit(text)

    def _answer_ended(self, job: Job, outcome: ChatResult | JobFailure) -> None:
        if job is not self._answer_job:
            return
        self._deliver()
        self._answer_job = None
        self.state_changed.emit()
        if isinstance(outcome, ChatResult):
            self.answered.emit(outcome)
        else:
            self.failed.emit(outcome)

    def stop(self) -> None:
        """Stop the answer in progress (it ends with what it has) or the one waiting for its model."""
        if self._answer_job is not None:
            self._answer_job.cancel()
        if self._request is not None:
            self._request = None
            self.state_changed.emit()
            self.failed.emit(JobFailure("Stopped before the model was ready.", "", cancelled=True))

    # --- letting go ---

    def release(self, *, close_now: bool = False) -> None:
        """Stop, forget any answer in progress, and close the model: in the background, or at once (its worker
        exits as soon as it is asked) when `close_now`."""
        self._request = None
        if self._answer_job is not None:
            self._answer_job.cancel()
            self._answer_job = None
        with self._lock:
            self._generation += 1
            self._pieces.clear()
        if self._load_job is not None:
            self._load_job.cancel()
            self._load_job = None
        model, self.model = self.model, None
        if model is None:
            return
        if close_now:
            model.stop()
            model.close()
        else:
            self._close_later(model)

    def _close_later(self, model: LoadedModel) -> None:
        def work(_progress: object, _cancel: CancelToken) -> None:
            model.stop()
            model.close()

        job = Job(f"Closing {model.path.name}", work, cancellable=False)
        self._closers.add(job)
        job.ended.connect(lambda job=job: self._closers.discard(job))
        self.context.run(job)
