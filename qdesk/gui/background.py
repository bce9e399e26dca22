"""Running qdesk's functions off the GUI thread: one small abstraction for every slow step.

A `Job` wraps a plain function `work(progress, cancel) -> result`. Views hand it to `AppContext.run`, the one
entry point for background work, which lists it until it ends and cancels it when the window closes; `start_job`
(called by `AppContext.run` only) runs it on Qt's thread pool and delivers its progress reports, its result or its
error on the GUI thread through Qt signals. Progress reports are coalesced: the GUI sees the latest one at most
every `PROGRESS_INTERVAL_S`, so a chatty function cannot flood the event loop.

A failure reaches the view as a `JobFailure`: any `UserError` (llama.cpp's `NativeError` included) as its one
sentence, a cancellation as such, anything else as one sentence with the traceback in the details.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import QObject, QRunnable, QThreadPool, QTimer, Signal

from converters.core.errors import Cancelled
from converters.core.jobs import CancelToken, Progress
from qdesk.app.errors import UserError

PROGRESS_INTERVAL_S = 0.1

Work = Callable[[Callable[[Progress], None], CancelToken], Any]


@dataclass(frozen=True)
class JobFailure:
    """Why a job failed: one sentence for the user and the details on demand."""

    sentence: str
    details: str
    cancelled: bool = False


def describe_failure(error: BaseException) -> JobFailure:
    if isinstance(error, Cancelled):
        return JobFailure("Cancelled.", "", cancelled=True)
    details = "".join(traceback.format_exception(error))
    if isinstance(error, UserError):
        return JobFailure(str(error), details)
    return JobFailure(f"Something went wrong: {type(error).__name__}: {error}. The details say where; please "
                      "report them if this keeps happening.", details)


class Job(QObject):
    """One background run of `work`. Connect to its signals before `start_job`; all fire on the GUI thread."""

    progressed = Signal(object)  # Progress
    succeeded = Signal(object)  # the function's result
    failed = Signal(object)  # JobFailure (cancellation included, with cancelled=True)
    ended = Signal()  # after succeeded or failed

    def __init__(self, title: str, work: Work, parent: QObject | None = None, *, cancellable: bool = True) -> None:
        super().__init__(parent)
        self.title = title
        self.work = work
        self.cancellable = cancellable
        """False for work that must run to its end once queued (closing a model), shutdown included."""
        self.cancel_token = CancelToken()
        self.started_at: float | None = None
        self.last_progress: Progress | None = None
        self.running = False
        self.finished = False
        self._pending: Progress | None = None
        self._lock = threading.Lock()
        self._flush = QTimer(self)
        self._flush.setInterval(int(PROGRESS_INTERVAL_S * 1000))
        self._flush.timeout.connect(self._deliver_progress)
        self._outcome = _Outcome()
        self._outcome.done.connect(self._finish)

    def cancel(self) -> None:
        if self.cancellable:
            self.cancel_token.cancel()

    @property
    def cancelled(self) -> bool:
        return self.cancel_token.cancelled

    def seconds_left(self) -> float | None:
        """Time remaining from the rate so far, once there is enough progress to say."""
        progress = self.last_progress
        if self.started_at is None or progress is None or progress.fraction <= 0.02:
            return None
        elapsed = time.monotonic() - self.started_at
        return elapsed * (1 - progress.fraction) / progress.fraction

    def _report(self, progress: Progress) -> None:  # any thread
        with self._lock:
            self._pending = progress

    def _deliver_progress(self) -> None:
        with self._lock:
            progress, self._pending = self._pending, None
        if progress is not None:
            self.last_progress = progress
            self.progressed.emit(progress)

    def _finish(self, ok: bool, value: object) -> None:
        self._flush.stop()
        self._deliver_progress()
        self.running, self.finished = False, True
        if ok:
            self.succeeded.emit(value)
        else:
            self.failed.emit(value)
        self.ended.emit()


class _Outcome(QObject):
    done = Signal(bool, object)


class _Runner(QRunnable):
    def __init__(self, job: Job) -> None:
        super().__init__()
        self.job = job
        self.outcome = job._outcome

    def run(self) -> None:
        job = self.job
        try:
            job.cancel_token.raise_if_cancelled()
            result = job.work(job._report, job.cancel_token)
        except BaseException as error:  # the job's failure is the GUI's to show, whatever it is
            failure = describe_failure(error)
            if job.cancelled and not failure.cancelled:
                failure = JobFailure("Cancelled.", failure.details, cancelled=True)
            self.outcome.done.emit(False, failure)
        else:
            self.outcome.done.emit(True, result)


def job_pool() -> QThreadPool:
    pool = QThreadPool.globalInstance()
    pool.setMaxThreadCount(max(pool.maxThreadCount(), 8))
    return pool


def start_job(job: Job) -> Job:
    """Run `job` on the thread pool; its signals fire on the GUI thread. Views call `AppContext.run` instead."""
    job.started_at = time.monotonic()
    job.running = True
    job._flush.start()
    job_pool().start(_Runner(job))
    return job


def wait_for_jobs(timeout_ms: int = 30_000) -> bool:
    """Block until every pool thread is idle (for shutdown and tests)."""
    return job_pool().waitForDone(timeout_ms)
