"""Finished evaluations kept across restarts: each evaluation document (`Evaluation.to_json()`) saved as it came.

`EvaluationHistory` writes `<config dir>/evaluations/<id>.json` (atomically) and an index of which models each one
measured (`index.json`), so the desktop app reopens the last evaluation on start and the Library finds the last one
that measured a given file without reading every document.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from converters.core.atomic import atomic_output
from converters.core.paths import config_dir
from qdesk.app.errors import UserError

__all__ = ["FOLDER_NAME", "EvaluationHistory", "HistoryError", "SavedEvaluation", "models_of"]

FOLDER_NAME = "evaluations"
INDEX_NAME = "index.json"
KEPT = 50
"""The most evaluations kept; the oldest go first."""


class HistoryError(UserError):
    """A saved evaluation cannot be written or read."""


@dataclass(frozen=True)
class SavedEvaluation:
    id: str
    created: str
    """ISO 8601, local time with offset."""
    models: tuple[str, ...]
    """The reference first, then the candidates (paths as the evaluation gave them)."""
    summary: str = ""


def models_of(report: Mapping[str, Any]) -> tuple[str, ...]:
    reference = report.get("reference") or {}
    paths = [reference.get("path")] + [candidate.get("path") for candidate in report.get("candidates") or []]
    return tuple(str(path) for path in paths if path)


class EvaluationHistory:
    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else config_dir() / FOLDER_NAME

    def _index(self) -> list[SavedEvaluation]:
        try:
            document = json.loads((self.folder / INDEX_NAME).read_text(encoding="utf-8"))
            return [SavedEvaluation(str(item["id"]), str(item["created"]), tuple(item.get("models") or ()),
                                    str(item.get("summary") or "")) for item in document]
        except (OSError, ValueError, KeyError, TypeError):
            return []

    def _write(self, path: Path, document: Any) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_output(path) as staging:
                staging.write_text(json.dumps(document, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as error:
            raise HistoryError(f"Cannot keep the evaluation in {self.folder} ({error.strerror or error}); check "
                               "that you can write to qdesk's config folder.") from error

    def save(self, report: Mapping[str, Any], summary: str = "") -> SavedEvaluation:
        """Keep `report`; the newest first in `saved()`; beyond `KEPT` the oldest is deleted."""
        now = datetime.now()
        saved = SavedEvaluation(now.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3),
                                now.astimezone().isoformat(timespec="seconds"), models_of(report), summary)
        self._write(self.folder / f"{saved.id}.json", dict(report))
        entries = [saved, *self._index()]
        for old in entries[KEPT:]:
            (self.folder / f"{old.id}.json").unlink(missing_ok=True)
        self._write(self.folder / INDEX_NAME, [{"id": entry.id, "created": entry.created, "models": list(entry.models),
                                                "summary": entry.summary} for entry in entries[:KEPT]])
        return saved

    def saved(self) -> list[SavedEvaluation]:
        """The kept evaluations, newest first."""
        return self._index()

    def latest(self, model: str | Path | None = None) -> SavedEvaluation | None:
        """The newest evaluation (that measured `model`, as reference or candidate, when given)."""
        wanted = None if model is None else str(model)
        return next((entry for entry in self._index() if wanted is None or wanted in entry.models), None)

    def load(self, saved: SavedEvaluation | str) -> dict[str, Any]:
        identifier = saved.id if isinstance(saved, SavedEvaluation) else saved
        path = self.folder / f"{identifier}.json"
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise HistoryError(f"The saved evaluation {path} cannot be read ({error}); run the evaluation "
                               "again.") from error
        if not isinstance(document, dict):
            raise HistoryError(f"The saved evaluation {path} is not an evaluation; run the evaluation again.")
        return document
