"""Steps that run in a child process, as the application's functions see them: `native.child` with the
application's progress reports, cancel tokens and user-facing errors.

`@isolated("the calibration")` on a public function makes every call of it run in a child: the caller's
`progress` receives the child's reports, cancelling the caller's `cancel` token cancels the child's, the child's
exception (a `UserError` with its sentence) is raised in the caller, and a child that llama.cpp aborts or
crashes, or that hangs, raises `WorkerDied` with one sentence. `run_isolated(function, arguments, …)` does the
same for one call of a function that is not decorated. Why a child: llama.cpp aborts the whole process on some
files it cannot handle, and pure-Python stretches (parsing a large tokenizer.json) would hold a desktop window's
GIL; see `native.child` for what else every child gets (it dies with its parent, among others).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from converters.core.errors import Cancelled, WorkerDied
from converters.core.jobs import CancelToken, ProgressFn, no_progress
from native.child import isolated as _native_isolated
from native.child import run_in_child
from native.errors import ChildFailed, NativeError, Stopped

__all__ = ["WorkerDied", "isolated", "run_isolated"]

_T = TypeVar("_T")


def _user_error(error: NativeError) -> BaseException:
    if isinstance(error, Stopped):
        return Cancelled(str(error))
    return WorkerDied(str(error))


def isolated(what: str, *, stall_s: float | None = None) -> Callable[[Callable[..., _T]], Callable[..., _T]]:
    """Run the decorated function in a child process on every call (see the module docstring); `what` names it
    in sentences, `stall_s` overrides the hang watchdog (`native.child.stall_limit_s`)."""
    return _native_isolated(what, stall_s=stall_s, translate=_user_error)


def run_isolated(function: Callable[..., _T], arguments: Mapping[str, Any], *, progress: ProgressFn = no_progress,
                 cancel: CancelToken | None = None, what: str = "the step") -> _T:
    """`function(**arguments, progress=…, cancel=…)` in a child process; `function` must be importable by name."""
    cancel = cancel or CancelToken()
    cancel.raise_if_cancelled()
    try:
        return run_in_child(function, {**arguments, "progress": progress, "cancel": cancel}, what=what)
    except (ChildFailed, Stopped) as error:
        raise _user_error(error) from error
