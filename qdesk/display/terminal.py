"""A progress bar on an interactive terminal, silence on a pipe."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from converters.core.jobs import Progress
from converters.core.units import format_duration, format_size


class ProgressBar:
    """A callable progress sink that draws one updating line on a terminal and nothing elsewhere."""

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 30) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.enabled = self.stream.isatty()
        self._started = time.monotonic()
        self._last_draw = 0.0

    def __call__(self, progress: Progress) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        finished = progress.total > 0 and progress.done >= progress.total
        if not finished and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        filled = int(self.width * progress.fraction)
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = now - self._started
        if progress.unit == "bytes":
            amount = f"{format_size(progress.done)}/{format_size(progress.total)}"
        else:
            amount = f"{progress.done:.0f}/{progress.total:.0f}"
        remaining = ""
        if 0 < progress.fraction < 1 and elapsed > 1:
            remaining = f" ~{format_duration(elapsed * (1 - progress.fraction) / progress.fraction)} left"
        line = f"\r{self.label} [{bar}] {progress.fraction * 100:5.1f}% {amount}{remaining} {progress.message}"
        self.stream.write(line[:160].ljust(100))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
