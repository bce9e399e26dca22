"""How long the desktop app takes to show its window, against a bare Qt window started the same way.

    .venv/bin/python bench/gui_startup.py [--runs 5] [--repo PATH …]

Each run starts a fresh Python process and times, from just before it starts to the moment the window has been shown
and the event loop has run once (the first paint is queued), wall-clock seconds:

* qdesk: `qdesk.gui.app.application()` and `open_main_window()`, as `qdesk gui` does, with empty config, models and
  cache folders of its own (a first run: the starter model is registered, the guide shows);
* peer: a QApplication and a QMainWindow holding one QLabel: what any PySide6 window costs here.

Runs alternate (peer, then each repository) so load on the machine falls on all alike; medians are printed with
the ratio qdesk/peer. `--repo` times another checkout's code (repeatable; default this one), e.g. the main branch,
to compare before and after a change. QT_QPA_PLATFORM defaults to offscreen.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

QDESK = """
from PySide6.QtCore import QTimer
from qdesk.gui.app import application, open_main_window
app = application()
window = open_main_window()
QTimer.singleShot(0, app.quit)
app.exec()
print("shown", flush=True)
window.close()
"""

PEER = """
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication, QLabel, QMainWindow
app = QApplication(["peer"])
window = QMainWindow()
window.setCentralWidget(QLabel("peer"))
window.resize(1280, 820)
window.show()
QTimer.singleShot(0, app.quit)
app.exec()
print("shown", flush=True)
"""


def time_one(code: str, repo: Path | None) -> float:
    with tempfile.TemporaryDirectory(prefix="qdesk-startup-") as home:
        environment = {**os.environ, "QT_QPA_PLATFORM": os.environ.get("QT_QPA_PLATFORM", "offscreen")}
        for name in ("CONFIG", "MODELS", "CACHE"):
            environment[f"QDESK_{name}_DIR"] = str(Path(home) / name.lower())
        if repo is not None:
            environment["PYTHONPATH"] = str(repo)
        started = time.perf_counter()
        process = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True,
                                 check=False, cwd=home)
        elapsed = time.perf_counter() - started
    if "shown" not in process.stdout:
        raise SystemExit(f"the window did not show (exit {process.returncode}): {process.stderr[-2000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each (default 5)")
    parser.add_argument("--repo", type=Path, action="append", help="a checkout whose qdesk to time (repeatable)")
    args = parser.parse_args()
    repos = [path.resolve() for path in args.repo or [REPO]]
    times: dict[str, list[float]] = {"peer": [], **{str(repo): [] for repo in repos}}
    time_one(PEER, None)  # warm the file cache once for both
    time_one(QDESK, repos[0])
    for _ in range(args.runs):
        times["peer"].append(time_one(PEER, None))
        for repo in repos:
            times[str(repo)].append(time_one(QDESK, repo))
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    print(f"{os.cpu_count()} logical cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; "
          f"{args.runs} runs each, median seconds from process start to the shown window")
    peer = statistics.median(times["peer"])
    print(f"{'peer (bare QMainWindow)':40} {peer:6.2f}")
    for repo in repos:
        median = statistics.median(times[str(repo)])
        print(f"{'qdesk ' + str(repo):40} {median:6.2f}  ({median / peer:.2f}x the peer; "
              f"runs {', '.join(f'{value:.2f}' for value in times[str(repo)])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
