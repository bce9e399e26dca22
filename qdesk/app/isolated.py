"""Running a long step in a child process: the caller's interpreter keeps its GIL, and a crash stays in the child.

`run_isolated(function, arguments, progress=, cancel=)` calls `function(**arguments, progress=…, cancel=…)` in a
fresh Python process and returns its result. Progress reports come back (coalesced to one per
`PROGRESS_INTERVAL_S`), cancelling the caller's token cancels the child's, and the child's exception is raised in
the caller: a `UserError` keeps its sentence. A child that dies without an answer (llama.cpp aborting, the OOM
killer) is one sentence, not a hung caller.

Why: pure-Python stretches of a conversion (parsing a large tokenizer.json, for one) hold the GIL for hundreds of
milliseconds, which a desktop window's event loop would feel. The function and its arguments travel by pickle, so
the function must be importable at module level.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from converters.core.errors import Cancelled, UserError
from converters.core.jobs import CancelToken, Progress, ProgressFn, no_progress

PROGRESS_INTERVAL_S = 0.05
CANCEL_GRACE_S = 30.0
"""How long a cancelled child may take to clean up (remove its temporary files) before it is terminated."""

_T = TypeVar("_T")


class WorkerDied(UserError):
    """The child process ended without a result or an error: killed, out of memory, or aborted by native code."""


class _RemoteError(Exception):
    """An exception from the child that could not be sent as itself; carries its type name and message."""


def run_isolated(function: Callable[..., _T], arguments: Mapping[str, Any], *, progress: ProgressFn = no_progress,
                 cancel: CancelToken | None = None, what: str = "the step") -> _T:
    """`function(**arguments, progress=…, cancel=…)` in a child process; see the module docstring."""
    cancel = cancel or CancelToken()
    cancel.raise_if_cancelled()
    spawn = multiprocessing.get_context("spawn")
    events_in, events_out = spawn.Pipe(duplex=False)
    control_in, control_out = spawn.Pipe(duplex=False)
    child = spawn.Process(target=_child_main, args=(events_out, control_in, function, dict(arguments)),
                          name=f"qdesk: {what}", daemon=True)
    child.start()
    events_out.close()
    control_in.close()
    cancelled_at: float | None = None
    try:
        while True:
            if cancel.cancelled and cancelled_at is None:
                cancelled_at = time.monotonic()
                _send_quietly(control_out, "cancel")
            if cancelled_at is not None and time.monotonic() - cancelled_at > CANCEL_GRACE_S:
                child.terminate()
                raise Cancelled(f"{what} was cancelled")
            if events_in.poll(0.05):
                try:
                    kind, payload = events_in.recv()
                except EOFError:
                    break
                if kind == "progress":
                    progress(payload)
                elif kind == "result":
                    return payload
                else:
                    raise _rebuilt(payload)
            elif not child.is_alive() and not events_in.poll(0):
                break
        child.join(5)
        if cancel.cancelled:
            raise Cancelled(f"{what} was cancelled")
        raise WorkerDied(f"The process running {what} ended without finishing (exit status {child.exitcode}); it "
                         "may have run out of memory. Try again, or with a smaller model or context.")
    finally:
        events_in.close()
        control_out.close()
        child.join(CANCEL_GRACE_S if child.is_alive() and cancelled_at is not None else 1)
        if child.is_alive():
            child.terminate()
            child.join(5)


def _send_quietly(connection: Connection, message: Any) -> None:
    with contextlib.suppress(OSError, ValueError):  # the child has gone; the loop will see it
        connection.send(message)


def _rebuilt(payload: tuple[BaseException | None, str, str, str]) -> BaseException:
    error, type_name, message, details = payload
    if error is None:
        error = _RemoteError(f"{type_name}: {message}")
    error.__cause__ = _RemoteError(details) if details else None
    return error


# --- the child's side ----------------------------------------------------------------------------------------------

def _child_main(events: Connection, control: Connection, function: Callable[..., Any],
                arguments: dict[str, Any]) -> None:
    cancel = CancelToken()

    def on_terminate(_signum: int, _frame: object) -> None:
        raise Cancelled("terminated")

    signal.signal(signal.SIGTERM, on_terminate)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is the parent's to handle
    threading.Thread(target=_listen_for_cancel, args=(control, cancel), daemon=True).start()
    reporter = _CoalescedProgress(events)
    try:
        result = function(**arguments, progress=reporter, cancel=cancel)
    except BaseException as error:  # every failure goes back to the parent, whatever it is
        reporter.flush()
        events.send(("error", _picklable(error)))
    else:
        reporter.flush()
        events.send(("result", result))
    finally:
        events.close()


def _listen_for_cancel(control: Connection, cancel: CancelToken) -> None:
    try:
        while control.recv() != "cancel":
            pass
    except (EOFError, OSError):
        pass  # the parent went away: stop as if cancelled
    cancel.cancel()


def _picklable(error: BaseException) -> tuple[BaseException | None, str, str, str]:
    import pickle

    details = "".join(traceback.format_exception(error))
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # an exception that does not survive pickling is sent as its name and message
        return None, type(error).__name__, str(error), details
    return error, type(error).__name__, str(error), details


class _CoalescedProgress:
    def __init__(self, events: Connection) -> None:
        self.events = events
        self.sent_at = 0.0
        self.pending: Progress | None = None

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        if now - self.sent_at >= PROGRESS_INTERVAL_S:
            self.sent_at = now
            self.pending = None
            self.events.send(("progress", progress))
        else:
            self.pending = progress

    def flush(self) -> None:
        if self.pending is not None:
            self.events.send(("progress", self.pending))
            self.pending = None
