"""Where qdesk writes what went wrong in detail: one log file, so that a window shows a sentence, never a traceback.

`log_failure(sentence, details)` appends a dated entry to `log_path()` (`$QDESK_CACHE_DIR/logs/qdesk.log` when that
is set, else the platform's user log folder) and returns the file, which the message box can open. The file is
rotated at `MAX_BYTES` (one older copy, `qdesk.log.1`).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from converters.core.paths import logs_dir

__all__ = ["LOG_NAME", "MAX_BYTES", "log_failure", "log_path"]

LOG_NAME = "qdesk.log"
MAX_BYTES = 2 * 1024 * 1024


def log_path() -> Path:
    return logs_dir() / LOG_NAME


def log_failure(sentence: str, details: str) -> Path | None:
    """Append `sentence` and `details` (a traceback) to the log; the file, or None when it cannot be written."""
    path = log_path()
    entry = f"--- {datetime.now().astimezone().isoformat(timespec='seconds')} {sentence}\n{details.rstrip()}\n\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size > MAX_BYTES:
            path.replace(path.with_name(LOG_NAME + ".1"))
        with path.open("a", encoding="utf-8") as log:
            log.write(entry)
    except OSError:
        return None
    return path
