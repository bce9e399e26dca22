"""What one redraw of a Compare pane costs the GUI thread while an answer streams, against plain text.

    .venv/bin/python bench/gui_render.py [--answers 3] [--redraws 40] [--repeat 3]

A Compare pane (`qdesk.gui.compare_pane.ComparePane`, offscreen unless QT_QPA_PLATFORM says otherwise) shows
`--answers` finished answers and one streaming answer that grows over `--redraws` redraws, as the Compare view redraws
at most every 40 ms; each answer is 2.5k characters of Markdown (two Python code blocks of 40 lines, a 20-item list).
Each redraw is timed with the event processing it causes. The peer redraws the same text the way the pane did before
Markdown: the whole transcript as escaped plain text (`white-space: pre-wrap`) set into a QTextBrowser. Medians and
maxima of `--repeat` passes (the first pass pays the libraries' loading: shown apart), with the ratio qdesk/peer.
"""

from __future__ import annotations

import argparse
import html
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

ANSWER = ("Here is how to do it:\n\n```python\n"
          + "\n".join(f"for i in range({n}):\n    print(i * {n})" for n in range(20))
          + "\n```\n\nSome **bold** text and a list:\n\n"
          + "\n".join(f"- item {n} with `code`" for n in range(20)) + "\n") * 2


def plain_page(entries: list[tuple[str, str]]) -> str:
    parts = ["<html><body>"]
    for prompt, text in entries:
        parts.append(f'<p style="white-space: pre-wrap;"><b>You:</b> {html.escape(prompt)}</p>')
        parts.append(f'<p style="white-space: pre-wrap;">{html.escape(text)}</p>')
    return "".join(parts) + "</body></html>"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--answers", type=int, default=3, help="finished answers above the streaming one")
    parser.add_argument("--redraws", type=int, default=40, help="redraws while the last answer grows")
    parser.add_argument("--repeat", type=int, default=3, help="passes (the first is shown apart)")
    args = parser.parse_args()
    os.environ.setdefault("QDESK_CONFIG_DIR", tempfile.mkdtemp(prefix="qdesk-render-"))

    from PySide6.QtWidgets import QApplication, QTextBrowser

    from qdesk.gui.compare_pane import ComparePane, TranscriptEntry
    from qdesk.gui.compare_runner import PaneRunner
    from qdesk.gui.context import AppContext

    app = QApplication.instance() or QApplication(["gui_render"])
    pane = ComparePane(PaneRunner(AppContext()))
    peer = QTextBrowser()
    for widget in (pane, peer):
        widget.resize(500, 600)
        widget.show()

    def one_pass(draw: object, fresh: object) -> list[float]:
        fresh()  # type: ignore[operator]
        times = []
        for step in range(args.redraws):
            live = ANSWER[: len(ANSWER) * (step + 1) // args.redraws]
            started = time.perf_counter()
            draw(live, step == args.redraws - 1)  # type: ignore[operator]
            app.processEvents()
            times.append((time.perf_counter() - started) * 1000)
        return times

    done = [TranscriptEntry(f"Question {n}?", ANSWER, turn=n) for n in range(args.answers)]

    def draw_pane(live: str, last: bool) -> None:
        pane.show_transcript([*done, TranscriptEntry("Last?", live, streaming=not last, turn=args.answers)])

    def draw_peer(live: str, _last: bool) -> None:
        peer.setHtml(plain_page([*((entry.prompt, entry.text) for entry in done), ("Last?", live)]))

    def fresh_pane() -> None:
        pane._head = None  # as if another conversation had been on show

    results: dict[str, list[list[float]]] = {"qdesk": [], "peer": []}
    for _ in range(args.repeat):
        results["peer"].append(one_pass(draw_peer, lambda: None))
        results["qdesk"].append(one_pass(draw_pane, fresh_pane))
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    print(f"{args.answers} finished answers + 1 streaming, {len(ANSWER):,} characters each, {args.redraws} redraws a "
          f"pass, {args.repeat} passes; load average {load[0]:.1f}")
    print(f"{'':34}{'median ms':>10}{'max ms':>9}{'first pass max':>16}")
    medians = {}
    for name, passes in results.items():
        later = [value for one in passes[1:] or passes for value in one]
        medians[name] = statistics.median(later)
        label = "qdesk (Markdown, the pane)" if name == "qdesk" else "peer (plain text, whole page)"
        print(f"{label:34}{medians[name]:>10.1f}{max(later):>9.1f}{max(passes[0]):>16.1f}")
    print(f"{'qdesk/peer':34}{medians['qdesk'] / medians['peer']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
