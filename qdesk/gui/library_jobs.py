"""The Library section's background work, as plain functions (no Qt): refresh, import several files, remove.

Each takes the `Library` it works on, a `progress` callback and a cancel token, so `qdesk.gui.background` can run it
off the GUI thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from converters.core.errors import Cancelled
from converters.core.jobs import CancelToken, Progress, ProgressFn
from qdesk.app.errors import UserError
from qdesk.library.identity import ModelGroup
from qdesk.library.store import Library, LibraryEntry


def refresh_library(library: Library, progress: ProgressFn, cancel: CancelToken, *,
                    offer_starter: bool = False) -> list[ModelGroup]:
    """Rescan the library (registering the starter model first when `offer_starter`) and return its groups."""
    if offer_starter:
        library.ensure_starter()
    library.refresh(progress, cancel)
    return library.model_groups()


def scan_known_folders(library: Library, progress: ProgressFn, cancel: CancelToken) -> list[str]:
    """Register the Hugging Face cache, LM Studio's and Ollama's folders that exist; their labels."""
    cancel.raise_if_cancelled()
    return library.register_known_folders(progress=progress)


@dataclass
class ImportOutcome:
    imported: list[LibraryEntry] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    """One sentence per file that could not be imported."""


def import_files(library: Library, paths: Sequence[Path], progress: ProgressFn, cancel: CancelToken) -> ImportOutcome:
    """Copy each GGUF into the library, one after the other, reporting bytes over all of them.

    A file that cannot be imported (not a GGUF, unreadable, no space) is reported in `failures` and the others go
    on; a cancel stops at once, leaving the files already imported and no partial copy.
    """
    sizes = [_size(path) for path in paths]
    total = sum(sizes)
    outcome = ImportOutcome()
    before = 0
    for path, size in zip(paths, sizes, strict=True):
        cancel.raise_if_cancelled()

        def overall(step: Progress, before: int = before, name: str = path.name) -> None:
            progress(Progress(before + step.done, total, "bytes", f"copying {name}"))

        try:
            outcome.imported.append(library.import_model(path, progress=overall, cancel=cancel))
        except Cancelled:
            raise
        except UserError as error:
            outcome.failures.append(str(error))
        except OSError as error:
            outcome.failures.append(f"Cannot import {path.name}: {error.strerror or error}.")
        before += size
        progress(Progress(before, total, "bytes", f"imported {path.name}"))
    return outcome


def remove_models(library: Library, ids: Sequence[str], progress: ProgressFn, cancel: CancelToken) -> int:
    """Forget the models named by `ids` (deleting imported files, leaving registered ones on disk)."""
    for done, name in enumerate(ids):
        cancel.raise_if_cancelled()
        progress(Progress(done, len(ids), "models", f"removing {name}"))
        library.remove(name)
    return len(ids)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
