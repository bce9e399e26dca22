"""Screenshots of every section of the desktop app, taken under a virtual X server (Xvfb).

    .venv/bin/python bench/gui_screenshots.py [FOLDER] [--theme light|dark|both] [--size WxH …] [--evaluate]
                                              [--queue] [--conversation] [--own-settings]

Starts the app as `qdesk.gui.app` does, visits each section with its shortcut (Ctrl+1…6) and saves
`FOLDER/<n>-<section>-<theme>[-<W>x<H>].png` (default FOLDER: .cache/screenshots/), at each window size asked
(default 1280x820; the size is in the name when several are asked). The app runs with empty settings and
models folders of its own (a first run: the starter model and the guide), unless --own-settings is given.
With --evaluate, the Evaluate section first runs a real one-chunk evaluation of the starter model against the
test suite's F16 reference (.cache/tests/smollm2-135m-f16.gguf, made by the tests), so its chart, tables and
heat map are filled. With --queue, the Quantize section queues a job for that reference and cancels it, so its job
rows show.

Outside an X display the script restarts itself under `xvfb-run` (or a bare `Xvfb` it starts itself); when
neither is installed it says so and exits without screenshots (install with `apt-get install -y xvfb`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SCREEN = "2048x1200x24"
UNDER_XVFB = "QDESK_SCREENSHOTS_UNDER_XVFB"
REFERENCE = REPO / ".cache" / "tests" / "smollm2-135m-f16.gguf"
SETTLE_S = 0.6


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, default=REPO / ".cache" / "screenshots",
                        help="where the PNGs go (default .cache/screenshots/)")
    parser.add_argument("--theme", choices=("light", "dark", "both"), default="both")
    parser.add_argument("--evaluate", action="store_true",
                        help="run a one-chunk evaluation in the Evaluate section before its screenshot")
    parser.add_argument("--size", action="append", metavar="WxH",
                        help="window size, e.g. 1024x700 (repeatable; default 1280x820)")
    parser.add_argument("--queue", action="store_true",
                        help="queue (and cancel) a Quantize job first, so its rows are in the screenshot")
    parser.add_argument("--conversation", action="store_true",
                        help="open a two-turn conversation with Markdown answers in Compare first")
    parser.add_argument("--own-settings", action="store_true",
                        help="use your settings and models folder instead of empty ones")
    return parser.parse_args()


def restart_under_xvfb() -> int | None:
    """Run this script again inside a virtual X server; None when there is none to run."""
    environment = {**os.environ, UNDER_XVFB: "1", "QT_QPA_PLATFORM": "xcb"}
    command = [sys.executable, *sys.argv]
    if shutil.which("xvfb-run"):
        return subprocess.call(["xvfb-run", "-a", "-s", f"-screen 0 {SCREEN}", *command], env=environment)
    if shutil.which("Xvfb"):
        display = f":{os.getpid() % 400 + 100}"
        server = subprocess.Popen(["Xvfb", display, "-screen", "0", SCREEN, "-nolisten", "tcp"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)
            return subprocess.call(command, env={**environment, "DISPLAY": display})
        finally:
            server.terminate()
            server.wait(timeout=10)
    return None


def settle(seconds: float = SETTLE_S) -> None:
    from PySide6.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    QTimer.singleShot(int(seconds * 1000), loop.quit)
    loop.exec()


def run_evaluation(window: object) -> None:
    from qdesk.app.starter import starter_model_path

    if not REFERENCE.is_file():
        print(f"--evaluate: {REFERENCE} is missing (the test suite makes it); Evaluate stays empty.")
        return
    view = window.views["evaluate"]  # type: ignore[attr-defined]
    window.context.open_in_evaluate.emit([REFERENCE, starter_model_path()])  # type: ignore[attr-defined]
    view.chunks_spin.setValue(1)
    view.run_button.click()
    deadline = time.monotonic() + 600
    while view.running and time.monotonic() < deadline:
        settle(0.5)
    print(f"evaluation: {view.status_label.text()}")


def queue_job(window: object) -> None:
    if not REFERENCE.is_file():
        print(f"--queue: {REFERENCE} is missing (the test suite makes it); Quantize stays empty.")
        return
    view = window.views["quantize"]  # type: ignore[attr-defined]
    view.set_source(REFERENCE)
    view.start()
    settle(1.0)
    for queued in view.queue.batches:
        view.queue.cancel_batch(queued)
    deadline = time.monotonic() + 60
    while view.queue.is_busy() and time.monotonic() < deadline:
        settle(0.5)


SAMPLE_ANSWER = ("Here is a **loop** in Python:\n\n```python\nfor number in range(3):\n    print(number * 2)\n```\n\n"
                 "It prints 0, 2 and 4.")


def show_conversation(window: object) -> None:
    """A conversation of two turns with Markdown answers, the second pane's leaving the first's."""
    from qdesk.app.starter import starter_model_path
    from qdesk.chat.conversations import Answer, new_conversation

    view = window.views["compare"]  # type: ignore[attr-defined]
    starter = starter_model_path()
    conversation = new_conversation([starter, starter])
    for prompt in ("Write a loop in Python", "Thanks! And in one line?"):
        turn = conversation.add_turn(prompt)
        turn.set_answer(0, Answer(starter, SAMPLE_ANSWER))
        turn.set_answer(1, Answer(starter, SAMPLE_ANSWER.replace("It prints 0, 2 and 4.", "It prints even numbers.")))
    view.store.save(conversation)
    view.open_conversation(conversation.id)


def capture(folder: Path, themes: list[str], evaluate: bool, sizes: list[tuple[int, int]] | None = None,
            queue: bool = False, conversation: bool = False) -> list[Path]:
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest

    from qdesk.gui.app import application, open_main_window
    from qdesk.gui.main_window import SECTIONS
    from qdesk.gui.theme import apply_theme

    app = application()
    window = open_main_window()
    sizes = sizes or [(1280, 820)]
    window.resize(*sizes[0])
    window.activateWindow()
    settle(1.5)
    if evaluate:
        run_evaluation(window)
    if queue:
        queue_job(window)
    if conversation:
        show_conversation(window)
    saved = []
    for width, height in sizes:
        window.resize(width, height)
        suffix = f"-{width}x{height}" if len(sizes) > 1 else ""
        for theme in themes:
            apply_theme(theme)
            settle()
            for number, section in enumerate(SECTIONS, start=1):
                QTest.keyClick(window, getattr(Qt.Key, f"Key_{number}"), Qt.KeyboardModifier.ControlModifier)
                settle()
                if window.current_section() != section.key:
                    print(f"Ctrl+{number} did not open {section.title}; showing it directly")
                    window.show_section(section.key)
                    settle()
                path = folder / f"{number}-{section.key}-{theme}{suffix}.png"
                window.grab().save(str(path))
                saved.append(path)
    window.close()
    app.processEvents()
    return saved


def main() -> int:
    arguments = parse_arguments()
    if not os.environ.get(UNDER_XVFB):
        code = restart_under_xvfb()
        if code is None:
            print("Skipped: no Xvfb on this machine, so no screenshots; install it with `apt-get install -y xvfb` "
                  "and run this again.")
            return 0
        return code
    folder = arguments.folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    themes = ["light", "dark"] if arguments.theme == "both" else [arguments.theme]
    with tempfile.TemporaryDirectory(prefix="qdesk-screenshots-") as home:
        if not arguments.own_settings:
            for name in ("CONFIG", "MODELS", "CACHE"):
                os.environ[f"QDESK_{name}_DIR"] = str(Path(home) / name.lower())
        sizes = [tuple(int(part) for part in size.lower().split("x")) for size in arguments.size or ()]
        saved = capture(folder, themes, arguments.evaluate, sizes, arguments.queue,  # type: ignore[arg-type]
                        arguments.conversation)
    for path in saved:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
