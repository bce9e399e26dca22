"""How late the desktop app's event loop runs while a conversion and a generation run in the background.

    nice -n 5 .venv/bin/python bench/gui_responsiveness.py [--idle-s 10] [--max-tokens 256] [--interval-ms 10]
                                                           [--convert-in-thread] [--compare-view [--turns 3]]

A QApplication (offscreen unless QT_QPA_PLATFORM says otherwise) runs a QTimer every `--interval-ms`; each tick
records how much later than the interval it fired. Two phases, same process:

1. peer: nothing running, for `--idle-s` seconds: the loop's own jitter on this machine;
2. jobs: through `qdesk.gui.background`, a real conversion (the SmolLM2-135M Hugging Face checkpoint of the test
   suite, BF16 safetensors, to an F16 GGUF in a temporary folder) and, at the same time, real generations with the
   starter model (`qdesk.chat.engine.load_model` + `chat`, tokens streamed to a GUI-thread signal that appends them to a
   QPlainTextEdit, as the Compare view does), repeated until the conversion has finished (at least one answer).
   The conversion runs as the app's Quantize queue runs it: `converters.core.isolation.run_isolated` in a child
   process, with progress and cancel forwarded. With --convert-in-thread it runs in the job's own thread of this
   process, for comparison (pure-Python stretches of a conversion then hold the GIL the event loop needs). With
   --compare-view the tokens go to a real Compare pane, redrawn every 40 ms as the app does (its Markdown rendering
   included).

Prints the worst, p99 and median lateness of each phase and the ratio jobs/peer. The target (issue 7) is a worst
delay under 100 ms while the jobs run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QElapsedTimer, QObject, Qt, QTimer, Signal  # noqa: E402
from PySide6.QtWidgets import QApplication, QPlainTextEdit  # noqa: E402

from converters.core.jobs import CancelToken, ProgressFn  # noqa: E402
from qdesk.gui.background import Job, JobFailure, start_job, wait_for_jobs  # noqa: E402

PROMPT = "Write a long, detailed story about a dragon who learns to bake bread in a small mountain village."


@dataclass(frozen=True)
class Lateness:
    ticks: int
    worst_ms: float
    p99_ms: float
    median_ms: float

    @classmethod
    def of(cls, late_ms: list[float]) -> Lateness:
        ordered = sorted(late_ms)
        p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] if ordered else 0.0
        return cls(len(ordered), ordered[-1] if ordered else 0.0, p99, statistics.median(ordered) if ordered else 0.0)


class Probe(QObject):
    """A precise timer ticking every `interval_ms`; each tick's lateness is the gap since the last, less the
    interval (never negative)."""

    def __init__(self, interval_ms: int) -> None:
        super().__init__()
        self.interval_ms = interval_ms
        self.late_ms: list[float] = []
        self.at_s: list[float] = []
        """When each tick fired, seconds since `start`."""
        self.clock = QElapsedTimer()
        self.last_ns = 0
        self.timer = QTimer(self)
        self.timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)

    def start(self) -> None:
        self.late_ms, self.at_s = [], []
        self.clock.start()
        self.last_ns = self.clock.nsecsElapsed()
        self.timer.start()

    def stop(self) -> Lateness:
        self.timer.stop()
        return Lateness.of(self.late_ms)

    def _tick(self) -> None:
        now = self.clock.nsecsElapsed()
        self.late_ms.append(max(0.0, (now - self.last_ns) / 1e6 - self.interval_ms))
        self.at_s.append(now / 1e9)
        self.last_ns = now

    def between(self, start_s: float, end_s: float) -> Lateness:
        return Lateness.of([late for late, at in zip(self.late_ms, self.at_s, strict=True) if start_s <= at < end_s])


class TokenSink(QObject):
    """What the Compare view does with a streamed token: a signal queued to the GUI thread, appended to a pane."""

    token = Signal(str)

    def __init__(self) -> None:
        super().__init__()
        self.pane = QPlainTextEdit()
        self.pane.resize(500, 400)
        self.count = 0
        self.token.connect(self._append)

    def _append(self, text: str) -> None:
        self.count += 1
        cursor = self.pane.textCursor()
        cursor.movePosition(cursor.MoveOperation.End)
        cursor.insertText(text)


class CompareSink(QObject):
    """What the Compare view itself does (`--compare-view`): tokens gathered, and a real `ComparePane`'s transcript
    redrawn at most every 40 ms with the answer so far (`show_transcript`: the app's own rendering, Markdown where
    the app renders it), after `turns` earlier answers of the same length."""

    token = Signal(str)

    def __init__(self, turns: int) -> None:
        super().__init__()
        from qdesk.gui.compare_pane import ComparePane
        from qdesk.gui.compare_runner import PaneRunner
        from qdesk.gui.context import AppContext

        self.context = AppContext()
        self.pane = ComparePane(PaneRunner(self.context))
        self.pane.resize(500, 600)
        self.count = 0
        self.turns = turns
        self.text = ""
        self.earlier: list[str] = []
        self.timer = QTimer(self)
        self.timer.setSingleShot(True)
        self.timer.setInterval(40)
        self.timer.timeout.connect(self._render)
        self.token.connect(self._append)
        warm_up = getattr(self.pane, "warm_up", None)
        if callable(warm_up):
            warm_up()  # as the Compare view does after start: the renderer's libraries load in the background

    def _append(self, text: str) -> None:
        self.count += 1
        self.text += text
        if not self.timer.isActive():
            self.timer.start()

    def _render(self) -> None:
        from qdesk.gui.compare_pane import TranscriptEntry

        entries = [TranscriptEntry(PROMPT, answer) for answer in self.earlier[-self.turns:]]
        self.pane.show_transcript([*entries, TranscriptEntry(PROMPT, self.text, streaming=True)])

    def answer_done(self) -> None:
        self.earlier.append(self.text)
        self.text = ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle-s", type=float, default=10.0, help="length of the peer phase (default 10 s)")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per answer (default 256)")
    parser.add_argument("--interval-ms", type=int, default=10, help="probe interval (default 10 ms)")
    parser.add_argument("--convert-in-thread", action="store_true",
                        help="convert in the job's thread of this process instead of a child process, to compare")
    parser.add_argument("--compare-view", action="store_true",
                        help="stream into a real Compare pane (its own rendering every 40 ms) instead of a plain "
                             "text box")
    parser.add_argument("--turns", type=int, default=3,
                        help="--compare-view: earlier answers on show above the streaming one (default 3)")
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "tests",
                        help="where the test checkpoint is cached (default .cache/tests)")
    args = parser.parse_args()

    from qdesk.app.starter import starter_model_path
    from qdesk.chat.engine import LoadOptions, SamplingOptions, load_model
    from tests.builders.starter import smollm2_checkpoint

    checkpoint = smollm2_checkpoint(args.cache)
    starter = starter_model_path()
    app = QApplication.instance() or QApplication(["gui_responsiveness"])
    app.setApplicationName("qdesk-bench")
    probe = Probe(args.interval_ms)
    sink: TokenSink | CompareSink = CompareSink(args.turns) if args.compare_view else TokenSink()
    sink.pane.show()

    probe.start()
    loop_for(args.idle_s)
    peer = probe.stop()

    outcome: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="qdesk-gui-bench-") as folder:
        output = Path(folder) / "SmolLM2-135M-Instruct-F16.gguf"
        conversion_done = CancelToken()
        conversion_ended: list[float] = []

        def convert(progress: ProgressFn, cancel: CancelToken) -> float:
            from converters.core.isolation import run_isolated
            from converters.writing.convert import convert_checkpoint

            started = time.monotonic()
            try:
                if args.convert_in_thread:
                    convert_checkpoint(checkpoint, output, outtype="f16", progress=progress, cancel=cancel)
                else:
                    run_isolated(convert_checkpoint, {"source": checkpoint, "output": output, "outtype": "f16"},
                                 progress=progress, cancel=cancel, what="the conversion")
            finally:
                conversion_ended.append(time.monotonic())
                conversion_done.cancel()
            return time.monotonic() - started

        def generate(progress: ProgressFn, cancel: CancelToken) -> tuple[int, float]:
            del progress
            answers, started = 0, time.monotonic()
            options = LoadOptions(n_ctx=2048, n_threads=None)
            sampling = SamplingOptions(temperature=0.0, max_tokens=args.max_tokens)
            with load_model(starter, options) as model:
                while not cancel.cancelled and (answers == 0 or not conversion_done.cancelled):
                    model.chat([{"role": "user", "content": PROMPT}], sampling,
                               on_token=lambda event: sink.token.emit(event.text), cancel=cancel)
                    answers += 1
                    if isinstance(sink, CompareSink):
                        QTimer.singleShot(0, sink.answer_done)
            return answers, time.monotonic() - started

        jobs = [Job("convert", convert), Job("generate", generate)]
        for job in jobs:
            job.succeeded.connect(lambda value, job=job: outcome.__setitem__(job.title, value))
            job.failed.connect(lambda failure, job=job: outcome.__setitem__(job.title, failure))
        probe.start()
        started = time.monotonic()
        for job in jobs:
            start_job(job)
        while not all(job.finished for job in jobs):
            loop_for(0.05)
        busy = probe.stop()
        busy_s = time.monotonic() - started
        both_s = conversion_ended[0] - started if conversion_ended else busy_s
        together, alone = probe.between(0.0, both_s), probe.between(both_s, busy_s + 1)
        wait_for_jobs()
        written = output.stat().st_size if output.is_file() else 0

    failures = [f"{title}: {value.sentence}" for title, value in outcome.items() if isinstance(value, JobFailure)]
    if failures:
        print("a job failed: " + "; ".join(failures), file=sys.stderr)
        return 1
    answers, generation_s = outcome["generate"]  # type: ignore[misc]
    print(f"machine: {platform.machine()}, {os.cpu_count()} logical cores, Python {platform.python_version()}")
    where = "a thread of this process" if args.convert_in_thread else "a child process (as the app runs it)"
    shown = (f"a Compare pane's transcript (its rendering, at most every 40 ms, {args.turns} earlier answers above)"
             if args.compare_view else "a plain text box")
    print(f"tokens go to {shown}")
    print(f"jobs: conversion in {where} {outcome['convert']:.1f} s ({written / 1e6:.0f} MB F16 written); "
          f"{answers} answer(s), {sink.count} tokens streamed to the GUI in {generation_s:.1f} s; "
          f"probed {busy_s:.1f} s")
    print(f"probe: a {args.interval_ms} ms QTimer; lateness = gap between ticks less the interval")
    print()
    print(f"{'':24}{'ticks':>8}{'worst ms':>10}{'p99 ms':>9}{'median ms':>11}")
    rows = (("peer: no jobs", peer), ("jobs, whole run", busy), ("  while converting", together),
            ("  generation alone", alone))
    for label, figures in rows:
        print(f"{label:24}{figures.ticks:>8}{figures.worst_ms:>10.1f}{figures.p99_ms:>9.1f}{figures.median_ms:>11.2f}")
    ratio_worst = busy.worst_ms / peer.worst_ms if peer.worst_ms else float("inf")
    ratio_p99 = busy.p99_ms / peer.p99_ms if peer.p99_ms else float("inf")
    print(f"{'jobs/peer':24}{'':>8}{ratio_worst:>10.2f}{ratio_p99:>9.2f}")
    print()
    print(f"target: worst delay under 100 ms while the jobs run: {'met' if busy.worst_ms < 100 else 'NOT met'}")
    return 0


def loop_for(seconds: float) -> None:
    """Run the Qt event loop for `seconds` (the probe's ticks are delivered by it, as in the app)."""
    from PySide6.QtCore import QEventLoop

    loop = QEventLoop()
    QTimer.singleShot(int(seconds * 1000), loop.quit)
    loop.exec()


if __name__ == "__main__":
    sys.exit(main())
