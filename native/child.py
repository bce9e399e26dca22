"""Child processes: the one way qdesk starts them, and the one way it calls a function in one.

**Starting a child** (`spawn_python(module)`). Every process qdesk starts goes through here: the engine's model
workers, llama.cpp's quantizer, and every function call below. Each child

- *dies with its parent*. On Linux the child asks the kernel, first thing, for SIGKILL when its parent ends
  (`prctl(PR_SET_PDEATHSIG)`), then checks that its parent is still the process that started it: one that died
  in between has already handed the child to another parent. Linux sends that signal when the parent *thread*
  that started the child ends, so children are started from one long-lived thread (`_Spawner`), never from a
  worker thread that Qt's pool may retire. On Windows the parent puts each child in a job object that kills its
  processes when its last handle closes (at the parent's death), and the child also waits on its parent's
  handle. Elsewhere (macOS) a thread in the child polls its parent id.
- *runs in its own process group*, so Ctrl-C in a terminal reaches the parent alone, which stops the child.
- *runs with GGML_NO_BACKTRACE set*: when llama.cpp aborts, ggml's abort handler otherwise attaches gdb to
  print a backtrace, which lands on stdout and can hang the process for good.

**Calling a function in a child** (`run_in_child(function, arguments, what=…)`, or the `isolated(what)`
decorator). `function(**arguments)` runs in a fresh Python process (`python -m native.child --call`) and its
result or exception comes back by pickle (large numpy arrays travel out of band, without extra copies). Three
argument names are the channel's own, because functions cannot travel by pickle:

- `progress`: the child gets a callable that forwards its reports (coalesced to one per `PROGRESS_INTERVAL_S`);
  the parent calls the caller's `progress` with each.
- `cancel`: a cancel token (`.cancelled`, `.cancel()`, built without arguments); the child gets a new token of the
  same class, cancelled when the caller's is.
- `should_stop`: a callable; the child gets one that turns true when the caller's does.

(None travels as itself.)

A stopped child has `stop_grace_s` to end on its own (and remove its temporary files) before it is killed. A child
that dies without an answer (llama.cpp aborting or crashing, the OOM killer) raises `ChildFailed` with one
sentence saying what happened, taken from its exit status and the last lines of its stderr. One that neither
reports progress nor works (uses a CPU second in `CPU_SAMPLE_S`) for the watchdog's limit (`QDESK_STALL_MINUTES`,
10 minutes by default) is taken as hung, killed, and raises `ChildStalled`: llama.cpp has been seen to hang at
0% CPU after an abort, while a long stretch of real work without a report (measuring a large model's speed) must
not be cut short. Nothing a child prints reaches the parent's stdout: its stdout is the protocol, and whatever
llama.cpp prints goes to its stderr, which the parent keeps the tail of for those sentences.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import inspect
import os
import pickle
import queue
import re
import runpy
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import IO, Any, TypeVar

from native.errors import ChildFailed, ChildStalled, NativeError, Stopped

__all__ = [
    "DEFAULT_STALL_S",
    "STALL_VARIABLE",
    "die_with_parent",
    "in_child_process",
    "isolated",
    "run_in_child",
    "spawn_python",
]

PARENT_VARIABLE = "QDESK_PARENT_PID"
"""The id of the process that started a child, for the child to check its parent against."""
STALL_VARIABLE = "QDESK_STALL_MINUTES"
DEFAULT_STALL_S = 600.0
"""A child that reports no progress for this long is taken as hung and killed."""
CHILD_ENVIRONMENT = {"GGML_NO_BACKTRACE": "1"}
PROGRESS_INTERVAL_S = 0.05
STOP_GRACE_S = 30.0
"""How long a stopped child may take to clean up (remove its temporary files) before it is killed."""
INTERRUPTED_GRACE_S = 2.0
"""How long a child may take to stop when its caller fails or is interrupted (Ctrl-C)."""
POLL_S = 0.05
CPU_SAMPLE_S = 5.0
CPU_WORK_S = 0.1
"""A child (with its own children) that used this much CPU time since the last sample is working, not hung."""
PARENT_POLL_S = 0.5
STDERR_TAIL_LINES = 40
ORPHANED_EXIT_STATUS = 75
"""A child's exit status when it finds that its parent has already gone."""
CALL = "--call"

_T = TypeVar("_T")
_PROGRESS = "progress"
_SHOULD_STOP = "should_stop"
_CANCEL = "cancel"
_STOP = "stop"


# --- starting a child ------------------------------------------------------------------------------------------------

def spawn_python(
    module: str,
    arguments: Sequence[str] = (),
    *,
    stdin: int | IO[Any] | None = subprocess.PIPE,
    stdout: int | IO[Any] | None = subprocess.PIPE,
    stderr: int | IO[Any] | None = subprocess.PIPE,
    environment: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `python -m module arguments…` as a child of this process that dies with it (see the module docstring).

    In the desktop bundle `sys.executable` is qdesk itself, which answers `-m` for qdesk's own modules.
    """
    env = {**os.environ, **CHILD_ENVIRONMENT, **(environment or {}), PARENT_VARIABLE: str(os.getpid()),
           "PYTHONPATH": os.pathsep.join(filter(None, (_package_root(), os.environ.get("PYTHONPATH"))))}
    options: dict[str, Any] = {"stdin": stdin, "stdout": stdout, "stderr": stderr, "env": env, "close_fds": True}
    if sys.platform == "win32":
        options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
    else:
        options["process_group"] = 0
    return _SPAWNER.popen([sys.executable, "-m", "native.child", module, *arguments], options)


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Spawner:
    """Starts every child from one thread that lives as long as the process (see "dies with its parent")."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: queue.SimpleQueue[tuple[Future[subprocess.Popen[bytes]], list[str], dict[str, Any]]] = (
            queue.SimpleQueue())
        self._thread: threading.Thread | None = None

    def popen(self, command: list[str], options: dict[str, Any]) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # not yet, or this is a fork of the process
                self._thread = threading.Thread(target=self._serve, name="qdesk child spawner", daemon=True)
                self._thread.start()
        started: Future[subprocess.Popen[bytes]] = Future()
        self._requests.put((started, command, options))
        return started.result()

    def _serve(self) -> None:
        while True:
            started, command, options = self._requests.get()
            try:
                process = subprocess.Popen(command, **options)
                if sys.platform == "win32":
                    _windows_job().assign(process)
            except BaseException as error:  # the caller's to see, in its own thread
                started.set_exception(error)
            else:
                started.set_result(process)


_SPAWNER = _Spawner()


class _BasicLimitInformation(ctypes.Structure):
    _fields_ = [("PerProcessUserTimeLimit", ctypes.c_int64), ("PerJobUserTimeLimit", ctypes.c_int64),
                ("LimitFlags", ctypes.c_uint32), ("MinimumWorkingSetSize", ctypes.c_size_t),
                ("MaximumWorkingSetSize", ctypes.c_size_t), ("ActiveProcessLimit", ctypes.c_uint32),
                ("Affinity", ctypes.c_size_t), ("PriorityClass", ctypes.c_uint32), ("SchedulingClass", ctypes.c_uint32)]


class _IoCounters(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("ReadOperationCount", "WriteOperationCount",
                                                     "OtherOperationCount", "ReadTransferCount",
                                                     "WriteTransferCount", "OtherTransferCount")]


class _ExtendedLimitInformation(ctypes.Structure):
    _fields_ = [("BasicLimitInformation", _BasicLimitInformation), ("IoInfo", _IoCounters),
                ("ProcessMemoryLimit", ctypes.c_size_t), ("JobMemoryLimit", ctypes.c_size_t),
                ("PeakProcessMemoryUsed", ctypes.c_size_t), ("PeakJobMemoryUsed", ctypes.c_size_t)]


class _WindowsJob:
    """A job object whose processes Windows kills when its last handle closes: this process's, when it ends."""

    KILL_ON_JOB_CLOSE = 0x2000
    EXTENDED_LIMIT_INFORMATION = 9

    def __init__(self) -> None:
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
        kernel32.CreateJobObjectW.restype = ctypes.c_void_p
        kernel32.CreateJobObjectW.argtypes = [ctypes.c_void_p, ctypes.c_wchar_p]
        kernel32.SetInformationJobObject.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32]
        kernel32.AssignProcessToJobObject.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._kernel32 = kernel32
        self._handle = kernel32.CreateJobObjectW(None, None)
        limits = _ExtendedLimitInformation()
        limits.BasicLimitInformation.LimitFlags = self.KILL_ON_JOB_CLOSE
        kernel32.SetInformationJobObject(self._handle, self.EXTENDED_LIMIT_INFORMATION, ctypes.byref(limits),
                                         ctypes.sizeof(limits))

    def assign(self, process: subprocess.Popen[bytes]) -> None:
        self._kernel32.AssignProcessToJobObject(self._handle, int(process._handle))  # type: ignore[attr-defined]


@functools.cache
def _windows_job() -> _WindowsJob:
    return _WindowsJob()


# --- the child's first steps -----------------------------------------------------------------------------------------

def die_with_parent() -> None:
    """Make this process end when the process that started it (`spawn_python`) ends; exit at once if it has."""
    expected = os.environ.pop(PARENT_VARIABLE, None)
    if not expected:
        return
    parent = int(expected)
    if sys.platform.startswith("linux") and _ask_for_parent_death_signal():
        if os.getppid() != parent:  # it died before the request: this process has been handed to another
            os._exit(ORPHANED_EXIT_STATUS)
        return
    if sys.platform == "win32":
        _watch_windows_parent(parent)
    else:
        _watch_parent_id(parent)


def _ask_for_parent_death_signal() -> bool:
    pr_set_pdeathsig = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent_id(parent: int) -> None:
    if os.getppid() != parent:
        os._exit(ORPHANED_EXIT_STATUS)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(ORPHANED_EXIT_STATUS)

    threading.Thread(target=watch, name="parent watch", daemon=True).start()


def _watch_windows_parent(parent: int) -> None:
    synchronize, infinite = 0x00100000, 0xFFFFFFFF
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    kernel32.OpenProcess.restype = ctypes.c_void_p
    kernel32.OpenProcess.argtypes = [ctypes.c_uint32, ctypes.c_int, ctypes.c_uint32]
    kernel32.WaitForSingleObject.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    handle = kernel32.OpenProcess(synchronize, 0, parent)
    if not handle:
        os._exit(ORPHANED_EXIT_STATUS)

    def watch() -> None:
        kernel32.WaitForSingleObject(handle, infinite)
        os._exit(ORPHANED_EXIT_STATUS)

    threading.Thread(target=watch, name="parent watch", daemon=True).start()


def child_main(argv: Sequence[str]) -> int:
    """`python -m native.child MODULE ARGS…` runs MODULE as `python -m` would; `… --call` serves `run_in_child`."""
    die_with_parent()
    module, *arguments = argv
    if module == CALL:
        return _serve_call()
    sys.argv = [module, *arguments]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


# --- messages: a pickle, then the large buffers it refers to, raw ------------------------------------------------

def _send(stream: IO[bytes], message: Any) -> None:
    buffers: list[pickle.PickleBuffer] = []
    body = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    views = [buffer.raw() for buffer in buffers]
    stream.write(pickle.dumps((body, [view.nbytes for view in views]), protocol=5))
    for view in views:
        stream.write(view)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    """The next message; raises EOFError at the end of the stream (or inside a message cut short)."""
    body, sizes = pickle.load(stream)
    buffers = []
    for size in sizes:
        buffer = bytearray(size)
        view = memoryview(buffer)
        filled = 0
        while filled < size:
            count = stream.readinto(view[filled:])  # type: ignore[attr-defined]
            if not count:
                raise EOFError
            filled += count
        buffers.append(buffer)
    return pickle.loads(body, buffers=buffers)


# --- calling a function in a child: the parent's side --------------------------------------------------------------

class _End:
    """The child closed its end of the protocol (it exited, or died)."""


def run_in_child(
    function: Callable[..., _T] | str,
    arguments: Mapping[str, Any],
    *,
    what: str,
    stall_s: float | None = None,
    stop_grace_s: float = STOP_GRACE_S,
) -> _T:
    """`function(**arguments)` in a child process; see the module docstring. `function` must be importable by name
    (a module-level function), or be given as its name, "package.module:function", when importing its module here
    would load what the child is for (llama_cpp, say). `what` names the work in sentences ("the calibration").
    `stall_s` overrides the watchdog (None: `QDESK_STALL_MINUTES`, else 10 minutes; 0: no watchdog)."""
    arguments = dict(arguments)
    progress, cancel, should_stop = (arguments.pop(name) if arguments.get(name) is not None else None
                                     for name in (_PROGRESS, _CANCEL, _SHOULD_STOP))
    channels: dict[str, Any] = {}
    if progress is not None:
        channels[_PROGRESS] = _PROGRESS
    if should_stop is not None:
        channels[_SHOULD_STOP] = _SHOULD_STOP
    if cancel is not None:
        channels[_CANCEL] = type(cancel)

    def stop_asked() -> bool:
        return bool((cancel is not None and cancel.cancelled) or (should_stop is not None and should_stop()))

    def stopped() -> BaseException:
        if cancel is not None and cancel.cancelled:
            try:
                cancel.raise_if_cancelled()
            except BaseException as cancelled:  # the token's own error (converters.core.errors.Cancelled)
                return cancelled
        return Stopped(f"{what} was stopped")

    limit = stall_limit_s(stall_s)
    child = _Child(spawn_python(CALL))
    work = _CpuWatch(child.process.pid)
    stop_sent_at: float | None = None
    finished = False
    try:
        child.send((function, arguments, channels))
        last_news = time.monotonic()
        while True:
            now = time.monotonic()
            if stop_sent_at is None and stop_asked():
                stop_sent_at = now
                child.send(_STOP)
            if stop_sent_at is not None and now - stop_sent_at >= stop_grace_s:
                child.kill()
                raise stopped()
            message = child.next_message(POLL_S)
            if message is None:
                if work.worked():
                    last_news = time.monotonic()
                if limit and time.monotonic() - last_news > limit:
                    child.kill()
                    raise ChildStalled(_stall_sentence(what, limit))
                continue
            if isinstance(message, _End):
                break
            last_news = time.monotonic()
            kind, payload = message
            if kind == _PROGRESS:
                if progress is not None:
                    progress(payload)
            elif kind == "result":
                finished = True
                return payload  # type: ignore[no-any-return]
            else:
                finished = True
                raise _rebuilt(payload)
        status = child.wait()
        if stop_sent_at is not None:
            raise stopped()
        raise ChildFailed(death_sentence(what, status, child.stderr_tail()))
    finally:
        child.close(grace_s=1.0 if finished else stop_grace_s if stop_sent_at is not None else INTERRUPTED_GRACE_S)


def stall_limit_s(asked: float | None = None) -> float:
    """The watchdog's limit in seconds: `asked`, else `QDESK_STALL_MINUTES`, else `DEFAULT_STALL_S` (0: none)."""
    if asked is not None:
        return max(0.0, asked)
    try:
        return max(0.0, float(os.environ[STALL_VARIABLE]) * 60)
    except (KeyError, ValueError):
        return DEFAULT_STALL_S


class _CpuWatch:
    """Whether a process and its descendants used at least `CPU_WORK_S` of CPU time since the last sample, sampled at
    most every `CPU_SAMPLE_S`."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._sampled_at = time.monotonic()
        self._seconds = 0.0

    def worked(self) -> bool:
        now = time.monotonic()
        if now - self._sampled_at < CPU_SAMPLE_S:
            return False
        self._sampled_at = now
        seconds = _cpu_seconds(self._pid)
        worked = seconds - self._seconds >= CPU_WORK_S
        self._seconds = max(self._seconds, seconds)
        return worked


def _cpu_seconds(pid: int) -> float:
    import psutil  # here, not at the top: every child imports this module first thing

    total = 0.0
    try:
        root = psutil.Process(pid)
        for process in (root, *root.children(recursive=True)):
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
    except psutil.Error:
        pass
    return total


class _Child:
    """A `--call` child and its pipes: messages read on one thread, the tail of stderr kept by another."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        self.process = process
        self._control = process.stdin
        self._messages: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._readers = [threading.Thread(target=self._read_messages, args=(process.stdout,), daemon=True),
                         threading.Thread(target=self._read_stderr, args=(process.stderr,), daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read_messages(self, stream: IO[bytes]) -> None:
        try:
            while True:
                self._messages.put(_receive(stream))
        except Exception:  # the end of the stream, or a message cut short by the child's death
            self._messages.put(_End())

    def _read_stderr(self, stream: IO[bytes]) -> None:
        for line in stream:
            self._tail.append(line.decode("utf-8", errors="replace").rstrip())

    def send(self, message: Any) -> None:
        with contextlib.suppress(OSError, ValueError):  # the child has gone; its end says how
            _send(self._control, message)

    def next_message(self, timeout: float) -> Any:
        try:
            return self._messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def wait(self) -> int:
        for reader in self._readers:
            reader.join(timeout=5)
        return self.process.wait()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()

    def stderr_tail(self) -> list[str]:
        for reader in self._readers[1:]:
            reader.join(timeout=1)
        return list(self._tail)

    def close(self, grace_s: float) -> None:
        if self.process.poll() is None:
            self.send(_STOP)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.close()  # type: ignore[union-attr]
        for reader in self._readers:
            reader.join(timeout=5)


class _RemoteTraceback(Exception):
    """Where in the child an error was raised (its traceback, as text)."""


class _RemoteError(Exception):
    """An exception from the child that could not travel as itself: its type name and message."""


def _rebuilt(payload: tuple[BaseException | None, str, str, str]) -> BaseException:
    error, type_name, message, details = payload
    if error is None:
        error = _RemoteError(f"{type_name}: {message}")
    error.__cause__ = _RemoteTraceback(details) if details else None
    return error


_ASSERTION = re.compile(r"(?P<file>[^\s:]+):(?P<line>\d+): (?P<message>.+)$")


def death_sentence(what: str, status: int, stderr_tail: Sequence[str]) -> str:
    """One sentence for a child that ended without an answer, from its exit status and the end of its stderr."""
    if status == -signal.SIGABRT or (sys.platform == "win32" and status == 3):  # abort() on Windows exits with 3
        reason = _abort_reason(stderr_tail)
        detail = f" ({reason})" if reason else ""
        return (f"llama.cpp stopped {what} on an internal check{detail}; the model file probably holds settings or "
                "data it cannot handle, so check it with `qdesk info` and convert or download it again.")
    if status == -getattr(signal, "SIGSEGV", 11) or status == -getattr(signal, "SIGBUS", 7):
        return (f"llama.cpp crashed during {what} (it read memory it should not); the model file is probably "
                "damaged, so convert or download it again.")
    if status == -getattr(signal, "SIGKILL", 9):
        return (f"the process running {what} was killed, most likely because the system ran out of memory; close "
                "other programs or try a smaller model or context.")
    how = _ending(status)
    last = next((line for line in reversed(stderr_tail) if line.strip()), "")
    hint = f" (last words: {last[:300]})" if last else ""
    return (f"the process running {what} ended without finishing ({how}){hint}; it may have run out of memory. "
            "Try again, or with a smaller model or context.")


def _abort_reason(stderr_tail: Sequence[str]) -> str:
    for line in reversed(stderr_tail):
        if "what():" in line:
            return line.split("what():", 1)[1].strip()
        match = _ASSERTION.search(line.strip())
        if match and ("GGML" in match["message"] or "assert" in match["message"].lower()):
            return f"{os.path.basename(match['file'])}:{match['line']}: {match['message'].strip()}"
    return ""


def _ending(status: int) -> str:
    if status < 0:
        try:
            return f"ended by signal {signal.Signals(-status).name}"
        except ValueError:
            return f"ended by signal {-status}"
    return f"exit status {status}"


def _stall_sentence(what: str, limit_s: float) -> str:
    minutes = f"{limit_s / 60:g} minutes" if limit_s >= 60 else f"{limit_s:g} seconds"
    return (f"{what} made no progress and did no work for {minutes}, so qdesk stopped it; llama.cpp may be stuck on "
            f"this model. If the machine is only slow, allow more time with the environment variable "
            f"{STALL_VARIABLE}.")


# --- calling a function in a child: the child's side --------------------------------------------------------------

_serving_call = False


def in_child_process() -> bool:
    """Whether this process is a `run_in_child` child (where `isolated` functions run in place)."""
    return _serving_call


class _Events:
    """The protocol's output: the descriptor that was stdout; stdout itself now goes to stderr."""

    def __init__(self) -> None:
        self._stream = os.fdopen(os.dup(1), "wb")
        os.dup2(2, 1)
        self._lock = threading.Lock()

    def send(self, message: Any) -> None:
        with self._lock:
            _send(self._stream, message)


class _CoalescedProgress:
    def __init__(self, events: _Events) -> None:
        self._events = events
        self._sent_at = 0.0
        self._pending: Any = None
        self._has_pending = False

    def __call__(self, report: Any) -> None:
        now = time.monotonic()
        if now - self._sent_at >= PROGRESS_INTERVAL_S:
            self._sent_at = now
            self._has_pending = False
            self._events.send((_PROGRESS, report))
        else:
            self._pending, self._has_pending = report, True

    def flush(self) -> None:
        if self._has_pending:
            self._has_pending = False
            self._events.send((_PROGRESS, self._pending))


def _serve_call() -> int:
    global _serving_call
    _serving_call = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is the parent's to handle
    events = _Events()
    control = sys.stdin.buffer
    stop = threading.Event()
    on_stop: list[Callable[[], None]] = []
    progress = _CoalescedProgress(events)
    try:
        function, arguments, channels = _receive(control)
        if isinstance(function, str):
            module, _, name = function.partition(":")
            function = getattr(importlib.import_module(module), name)
        threading.Thread(target=_listen_for_stop, args=(control, stop, on_stop), name="stop listener",
                         daemon=True).start()
        for name, kind in channels.items():
            if kind == _PROGRESS:
                arguments[name] = progress
            elif kind == _SHOULD_STOP:
                arguments[name] = stop.is_set
            else:
                token = kind()
                on_stop.append(token.cancel)
                if stop.is_set():
                    token.cancel()
                arguments[name] = token
        result = function(**arguments)
    except BaseException as error:  # every failure goes back to the parent, whatever it is
        progress.flush()
        _send_error(events, error)
    else:
        progress.flush()
        try:
            events.send(("result", result))
        except Exception as error:  # a result that cannot be pickled; nothing of it was written
            _send_error(events, error)
    sys.stderr.flush()
    os._exit(0)  # no teardown: llama.cpp's destructors and stray threads have nothing left to do


def _listen_for_stop(control: IO[bytes], stop: threading.Event, on_stop: list[Callable[[], None]]) -> None:
    with contextlib.suppress(Exception):  # the end of the stream: the parent went away, so stop as well
        while _receive(control) != _STOP:
            pass
    stop.set()
    for listener in list(on_stop):
        listener()


def _send_error(events: _Events, error: BaseException) -> None:
    details = "".join(traceback.format_exception(error))
    try:
        pickle.loads(pickle.dumps(error))
        events.send(("error", (error, type(error).__name__, str(error), details)))
    except Exception:  # an exception that does not survive pickling goes as its name and message
        events.send(("error", (None, type(error).__name__, str(error), details)))


# --- the decorator ----------------------------------------------------------------------------------------------

def isolated(
    what: str,
    *,
    stall_s: float | None = None,
    stop_grace_s: float = STOP_GRACE_S,
    translate: Callable[[NativeError], BaseException] | None = None,
) -> Callable[[Callable[..., _T]], Callable[..., _T]]:
    """Make a module-level function run in a child (`run_in_child`) whenever it is called, except inside such a
    child, where it runs in place (a child is isolation enough, and large results then stay where they are used).

    `translate` turns the mechanism's own errors (`ChildFailed`, `Stopped`) into the caller's error family."""

    def decorate(function: Callable[..., _T]) -> Callable[..., _T]:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def in_child(*args: Any, **kwargs: Any) -> _T:
            if in_child_process():
                return function(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            arguments: dict[str, Any] = {}
            for name, value in bound.arguments.items():
                if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                    arguments.update(value)
                else:
                    arguments[name] = value
            try:
                return run_in_child(in_child, arguments, what=what, stall_s=stall_s, stop_grace_s=stop_grace_s)
            except (ChildFailed, Stopped) as error:
                if translate is None:
                    raise
                raise translate(error) from error

        return in_child

    return decorate


if __name__ == "__main__":
    from native.child import child_main as _child_main  # the module under its own name, not this __main__ copy

    sys.exit(_child_main(sys.argv[1:]))
