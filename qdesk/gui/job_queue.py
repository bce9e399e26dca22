"""The Quantize section's job queue: one entry per source, its steps run one at a time off the GUI thread.

Each entry is a `qdesk.quantization.batch.VariantBatch`; its steps (convert, calibrate, one quantization per choice)
run in order as background `Job`s through the context, so closing the window cancels them. A step that later
steps need (convert, calibrate) takes down with it only the steps that need it when it fails or is cancelled (a
Q8_0 needs no importance matrix); cancelling one quantization leaves the others to run. Every variant that lands
is in the library, and `library_changed` says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from PySide6.QtCore import QObject, Signal

from converters.core.jobs import Progress
from converters.core.units import format_duration
from qdesk.gui.background import Job, JobFailure, wait_for_jobs
from qdesk.gui.context import AppContext
from qdesk.quantization.batch import BatchStep, StepOutcome, VariantBatch
from qdesk.quantization.timing import record_step, step_kind


class StepState(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"

    @property
    def over(self) -> bool:
        return self not in (StepState.WAITING, StepState.RUNNING)


@dataclass(eq=False)
class QueuedStep:
    step: BatchStep
    state: StepState = StepState.WAITING
    progress: Progress | None = None
    job: Job | None = None
    failure: JobFailure | None = None
    outcome: StepOutcome | None = None

    def seconds_left(self) -> float | None:
        return self.job.seconds_left() if self.job is not None and self.state is StepState.RUNNING else None

    def describe(self) -> str:
        """A few words on where the step stands: "40 % · 1 min 05 s left", "done: Model-Q4_K_M.gguf"."""
        if self.state is StepState.RUNNING:
            if self.progress is None or self.progress.total <= 0:
                return "starting…"
            left = format_duration(self.seconds_left())
            doing = f"{self.progress.message} " if self.progress.message else ""
            return f"{doing}{self.progress.fraction:.0%}" + (f" · {left} left" if left else "")
        if self.state is StepState.DONE:
            path = self.outcome.path if self.outcome is not None else None
            return f"done: {path.name}" if path is not None else "done"
        if self.state in (StepState.FAILED, StepState.SKIPPED) and self.failure is not None:
            return self.failure.sentence
        return self.state.value


@dataclass(eq=False)
class QueuedBatch:
    title: str
    batch: VariantBatch
    steps: list[QueuedStep] = field(default_factory=list)
    closed: bool = False
    work: dict[str, float] = field(default_factory=dict)
    """Each step's work in its rate's units (`qdesk.quantization.timing.step_units`), to learn this machine's rates."""

    @property
    def over(self) -> bool:
        return all(step.state.over for step in self.steps)

    def running(self) -> QueuedStep | None:
        return next((step for step in self.steps if step.state is StepState.RUNNING), None)


class QuantizeQueue(QObject):
    changed = Signal()
    """Entries or states changed (rebuild the view)."""
    step_progressed = Signal(object)  # QueuedStep
    variant_added = Signal(object)  # Path of a GGUF that just landed in the models folder

    def __init__(self, context: AppContext, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.context = context
        self.batches: list[QueuedBatch] = []
        self._stopping = False

    def add(self, batch: VariantBatch, title: str, work: dict[str, float] | None = None) -> QueuedBatch:
        queued = QueuedBatch(title, batch, [QueuedStep(step) for step in batch.steps()], work=dict(work or {}))
        self.batches.append(queued)
        self.changed.emit()
        self._advance()
        return queued

    def running(self) -> tuple[QueuedBatch, QueuedStep] | None:
        for queued in self.batches:
            step = queued.running()
            if step is not None:
                return queued, step
        return None

    def is_busy(self) -> bool:
        return any(not queued.over for queued in self.batches)

    # --- cancel ---

    def cancel_step(self, queued: QueuedBatch, step: QueuedStep) -> None:
        """Cancel one step: a running one stops at its next check, a waiting one will not start."""
        if step.state is StepState.RUNNING and step.job is not None:
            step.job.cancel()
        elif step.state is StepState.WAITING:
            step.state = StepState.CANCELLED
            self._skip_dependents(queued, step)
            self._settle(queued)
            self.changed.emit()

    def cancel_batch(self, queued: QueuedBatch) -> None:
        for step in queued.steps:
            if step.state is StepState.WAITING:
                step.state = StepState.CANCELLED
        running = queued.running()
        if running is not None and running.job is not None:
            running.job.cancel()
        self._settle(queued)
        self.changed.emit()

    def clear_finished(self) -> None:
        self.batches = [queued for queued in self.batches if not (queued.over and queued.closed)]
        self.changed.emit()

    def shutdown(self, timeout_ms: int = 15_000) -> None:
        """Cancel everything, wait for the running step to stop and remove temporary files."""
        self._stopping = True
        for queued in self.batches:
            self.cancel_batch(queued)
        wait_for_jobs(timeout_ms)
        for queued in self.batches:
            queued.batch.close()
            queued.closed = True

    # --- running ---

    def _advance(self) -> None:
        if self._stopping or self.running() is not None:
            return
        for queued in self.batches:
            waiting = next((step for step in queued.steps if step.state is StepState.WAITING), None)
            if waiting is not None:
                self._start(queued, waiting)
                return
            self._settle(queued)

    def _start(self, queued: QueuedBatch, step: QueuedStep) -> None:
        job = Job(f"{queued.title}: {step.step.title}", step.step.work, self)
        step.job, step.state = job, StepState.RUNNING
        job.progressed.connect(lambda progress: self._progressed(step, progress))
        job.succeeded.connect(lambda outcome: self._succeeded(queued, step, outcome))
        job.failed.connect(lambda failure: self._failed(queued, step, failure))
        self.context.run(job)
        self.changed.emit()

    def _progressed(self, step: QueuedStep, progress: Progress) -> None:
        step.progress = progress
        self.step_progressed.emit(step)

    def _succeeded(self, queued: QueuedBatch, step: QueuedStep, outcome: StepOutcome) -> None:
        step.state, step.outcome = StepState.DONE, outcome
        key = step.step.key
        if key in queued.work and step.job is not None and step.job.started_at is not None:
            record_step(step_kind(key, queued.batch.request), queued.work[key], time.monotonic() - step.job.started_at)
        if outcome.path is not None:
            self.context.library_changed.emit()
            self.variant_added.emit(outcome.path)
        self._next(queued)

    def _failed(self, queued: QueuedBatch, step: QueuedStep, failure: JobFailure) -> None:
        step.state = StepState.CANCELLED if failure.cancelled else StepState.FAILED
        step.failure = failure
        self._skip_dependents(queued, step)
        self._next(queued)

    def _next(self, queued: QueuedBatch) -> None:
        self._settle(queued)
        self.changed.emit()
        self._advance()

    def _skip_dependents(self, queued: QueuedBatch, failed: QueuedStep) -> None:
        """Skip the waiting steps that need `failed` (directly or through a step that needs it); the others run."""
        reason = f"skipped: it needs the step “{failed.step.title}”, which did not finish"
        lost = {failed.step.key}
        for step in queued.steps[queued.steps.index(failed) + 1:]:
            if step.state is StepState.WAITING and lost.intersection(step.step.needs):
                step.state = StepState.SKIPPED
                step.failure = JobFailure(reason, "")
                lost.add(step.step.key)

    def _settle(self, queued: QueuedBatch) -> None:
        """Once every step is over, remove the batch's temporary files."""
        if queued.over and not queued.closed:
            queued.batch.close()
            queued.closed = True

    # --- for the status bar ---

    def outcome_summary(self) -> str:
        """What the finished jobs came to: "2 made, 1 cancelled, 1 skipped" (an empty queue: "")."""
        counts: dict[StepState, int] = {}
        for queued in self.batches:
            for step in queued.steps:
                if step.step.key not in ("convert", "calibrate") and step.state.over:
                    counts[step.state] = counts.get(step.state, 0) + 1
        words = ((StepState.DONE, "made"), (StepState.FAILED, "failed"), (StepState.CANCELLED, "cancelled"),
                 (StepState.SKIPPED, "skipped"))
        return ", ".join(f"{counts[state]} {word}" for state, word in words if counts.get(state))

    def summary(self) -> str:
        """One line on the queue for any section to show: what runs now, how far, how many steps wait."""
        current = self.running()
        waiting = sum(step.state is StepState.WAITING for queued in self.batches for step in queued.steps)
        if current is None:
            return ""
        queued, step = current
        more = f" ({waiting} more step{'s' if waiting != 1 else ''} queued)" if waiting else ""
        return f"Quantize · {queued.title} · {step.step.title}: {step.describe()}{more}"
