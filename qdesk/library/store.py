"""The user's model library: `qdesk models list|import PATH|rm NAME [--json]`.

The models folder (`Library.root`) lives under the platform's data directory, `QDESK_MODELS_DIR`
or the `root` argument overriding it. Files imported into it are the library's own ("imported");
folders the user already has (a Hugging Face cache, LM Studio's models, Ollama's blobs, any folder)
are registered read-only and never written to; the starter model is registered read-only in place.

The index is one SQLite file, `root/library.sqlite3` (schema version in `PRAGMA user_version`).
Each file's facts are cached with the (size, mtime_ns) they were read at: `entries()` only stats
files, so a file deleted behind the app's back shows as "missing" and one changed as "changed" (its
cached facts are not trusted); `refresh()` rescans the registered folders and re-reads new and
changed files, which then become "ok" or "broken" with the reason.

Variants of one base model share `LibraryEntry.base_model`, so `groups()` and `render_text()`
show e.g. "SmolLM2-135M-Instruct: F16, Q8_0, Q4_K_M, mix-4.2bpw" together. `LibraryEntry.to_json()`
is the document `models list --json` prints (a list of them).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converters.core.atomic import atomic_output, check_free_space
from converters.core.errors import GGUFFileError, OutputError, UserError
from converters.core.hyperparameters import check_model_gguf
from converters.core.jobs import CancelToken, Progress, ProgressFn, no_progress
from converters.core.outputs import place_as_new
from converters.core.paths import MODELS_DIR_ENV, models_dir
from converters.core.units import format_count, format_size
from qdesk.display.tables import text_table
from qdesk.library.identity import ModelGroup, family_key, group_entries, shape_key
from qdesk.library.info import ModelInfo, model_info_from_header

__all__ = [
    "INDEX_NAME",
    "Library",
    "LibraryEntry",
    "LibraryError",
    "RefreshSummary",
    "render_text",
]

INDEX_NAME = "library.sqlite3"
SCHEMA_VERSION = 1
_DB_TIMEOUT_S = 10.0

IMPORTED = "imported"
STARTER = "starter"
REGISTERED = "registered"

OK, MISSING, BROKEN, CHANGED = "ok", "missing", "broken", "changed"
_UNREAD = "unread"  # stored only between discovering a file and reading it

# folder kinds: how a registered folder is searched for models
_GGUF_TREE = "gguf-tree"  # every *.gguf below it
_HF_CACHE = "hf-cache"  # a Hugging Face cache: the *.gguf files of its snapshots, as huggingface_hub scans it
_OLLAMA = "ollama"  # Ollama's models folder: GGUF blobs named through the manifests

_GROUP_NAME = "group-name:"  # settings key prefix: the user's name for a model group
_PROVENANCE_PREFIXES = ("qdesk.", "quantize.imatrix.")
_PROVENANCE_GENERAL = ("source.", "base_model.")  # general.* keys saying what a conversion started from
_OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
_OLLAMA_PROJECTOR_LAYER = "application/vnd.ollama.image.projector"


class LibraryError(UserError):
    """A library operation cannot be done: an unknown model name, a file that cannot be imported."""


# --- one model as the library shows it ----------------------------------------------------------

@dataclass(frozen=True)
class LibraryEntry:
    """One GGUF file the library knows, with the facts cached from its last successful read."""

    id: str
    path: Path
    source: str  # "imported" | "starter" | "registered:<label>" (hf-cache, lmstudio, ollama, folder, …)
    read_only: bool
    status: str  # "ok" | "missing" | "broken" | "changed" (not yet re-read; `Library.refresh` re-reads it)
    problem: str | None
    name: str
    architecture: str | None
    file_type: str | None
    parameters: int | None
    bpw: float | None
    context_length: int | None
    bytes: int
    has_chat_template: bool
    base_model: str
    variant: str
    provenance: dict[str, str] = field(hash=False)
    shape_key: str | None = None
    """Architecture and shape (`qdesk.library.identity.shape_key`); None when the header could not be read."""
    family_key: str = ""
    """The normalised family name (`qdesk.library.identity.family_key`)."""
    adapter_of: str | None = None
    """For a LoRA adapter: the normalised family name of the base model it adapts (`general.base_model.0.name`);
    the library shows it among that model's variants. None for a model."""

    @property
    def is_adapter(self) -> bool:
        return self.adapter_of is not None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types; the keys are the field names."""
        return {
            "id": self.id,
            "path": str(self.path),
            "source": self.source,
            "read_only": self.read_only,
            "status": self.status,
            "problem": self.problem,
            "name": self.name,
            "architecture": self.architecture,
            "file_type": self.file_type,
            "parameters": self.parameters,
            "bpw": None if self.bpw is None else round(self.bpw, 4),
            "context_length": self.context_length,
            "bytes": self.bytes,
            "has_chat_template": self.has_chat_template,
            "base_model": self.base_model,
            "variant": self.variant,
            "provenance": dict(self.provenance),
            "adapter_of": self.adapter_of,
        }


@dataclass(frozen=True)
class RefreshSummary:
    """What one `Library.refresh` found: files read (new or changed), gone, and unreadable."""

    read: int = 0
    missing: int = 0
    broken: int = 0


# --- naming: base model and variant -------------------------------------------------------------

_TYPE_SUFFIX = re.compile(
    r"[-._ ](?:F16|F32|BF16|F64|Q\d+(?:_[0-9A-Z]+)*|IQ\d+(?:_[0-9A-Z]+)*|TQ\d+(?:_[0-9A-Z]+)*|MXFP4(?:_MOE)?)$",
    re.IGNORECASE,
)


def _strip_type_suffix(name: str) -> str:
    stripped = _TYPE_SUFFIX.sub("", name.strip())
    return stripped or name


def _base_model(facts: Mapping[str, Any] | None, stem: str, prefer_file_name: bool) -> str:
    """The grouping name: `<BaseName>-<SizeLabel>-<FineTune>-<Version>` from general.*, else the name minus its type."""
    if facts is None or prefer_file_name:
        return _strip_type_suffix(stem)
    general = facts.get("general") or {}
    basename = general.get("basename")
    if isinstance(basename, str) and basename.strip():
        parts = [basename.strip()]
        parts += [str(general[key]).strip() for key in ("size_label", "finetune", "version")
                  if isinstance(general.get(key), str) and general[key].strip()]
        return "-".join(parts)
    name = facts.get("name")
    return _strip_type_suffix(name if isinstance(name, str) and name.strip() else stem)


def _adapted_family(facts: Mapping[str, Any] | None) -> str | None:
    """For a LoRA adapter GGUF, the family key of the model it adapts (its own name when it names no base)."""
    general = (facts or {}).get("general") or {}
    if general.get("type") != "adapter":
        return None
    base = general.get("base_model.0.name")
    return family_key({}, str(base)) if isinstance(base, str) and base.strip() else ""


def _variant(facts: Mapping[str, Any] | None) -> str:
    """"Q4_K_M" for a preset or a plain file type, "mix-4.2bpw" for a qdesk plan of its own, "LoRA" for an
    adapter."""
    if facts is None:
        return "?"
    if _adapted_family(facts) is not None:
        return "LoRA"
    plan = (facts.get("provenance") or {}).get("qdesk.plan")
    if plan:
        if plan.startswith("preset "):
            return plan.removeprefix("preset ").strip()
        bpw = facts.get("bpw")
        return f"mix-{bpw:.1f}bpw" if isinstance(bpw, int | float) else "mix"
    return facts.get("file_type") or facts.get("dominant_type") or "?"


# --- provenance keys, read from the header without parsing the tokenizer into Python objects ----

def _read_facts(path: Path) -> dict[str, Any]:
    """Everything the index caches about one file; raises GGUFFileError for a broken one."""
    header = check_model_gguf(path)
    info: ModelInfo = model_info_from_header(path, header)
    facts = info.to_json()
    provenance = {key: str(value) for key, value in header.metadata.items()
                  if key.startswith(_PROVENANCE_PREFIXES) and value is not None}
    provenance.update({f"general.{key}": str(value) for key, value in info.general.items()
                       if key.startswith(_PROVENANCE_GENERAL) and value is not None})
    facts["provenance"] = provenance
    return facts


# --- finding models in folders ------------------------------------------------------------------

@dataclass(frozen=True)
class _Found:
    path: Path
    alias: str | None = None  # a name the folder gives the file (Ollama's model:tag), used for its id


def _has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as file:
            return file.read(4) == b"GGUF"
    except OSError:
        return False


def _find_gguf_tree(folder: Path) -> list[_Found]:
    found: dict[Path, _Found] = {}
    for path in sorted(folder.rglob("*.gguf")):
        if path.name.startswith(".") or not path.is_file():
            continue
        found.setdefault(path.resolve(), _Found(path))  # HF snapshots link several names to one blob
    return list(found.values())


def _ollama_names(models: Path) -> dict[str, str]:
    """blob file name ("sha256-…") -> "model:tag" from Ollama's manifests (unreadable ones are skipped)."""
    names: dict[str, str] = {}
    manifests = models / "manifests"
    if not manifests.is_dir():
        return names
    for manifest in sorted(manifests.rglob("*")):
        if not manifest.is_file():
            continue
        parts = manifest.relative_to(manifests).parts
        if len(parts) < 2:
            continue
        *where, model, tag = parts
        if where[:2] in (["registry.ollama.ai", "library"],) or not where:
            label = f"{model}:{tag}"
        else:
            label = "/".join([*where[1:], model]) + f":{tag}"
        try:
            layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers") or []
        except (OSError, ValueError, AttributeError):
            continue
        for layer in layers:
            if not isinstance(layer, dict) or not isinstance(layer.get("digest"), str):
                continue
            blob = layer["digest"].replace(":", "-", 1)
            if layer.get("mediaType") == _OLLAMA_MODEL_LAYER:
                names.setdefault(blob, label)
            elif layer.get("mediaType") == _OLLAMA_PROJECTOR_LAYER:
                names.setdefault(blob, f"{label}-projector")
    return names


def _find_ollama(models: Path) -> list[_Found]:
    blobs = models / "blobs"
    if not blobs.is_dir():
        return []
    names = _ollama_names(models)
    return [_Found(blob, names.get(blob.name)) for blob in sorted(blobs.glob("sha256-*"))
            if blob.is_file() and _has_gguf_magic(blob)]


def _find_hf_cache(cache: Path) -> list[_Found]:
    """The GGUF files of a Hugging Face cache's snapshots, one per blob, through huggingface_hub's `scan_cache_dir`.
    It leaves out a repository it finds damaged (one dangling link is enough): those are walked as a plain tree."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        scanned = scan_cache_dir(cache)
    except (CacheNotFound, OSError, ValueError):
        return _find_gguf_tree(cache)
    found: dict[Path, _Found] = {}
    for repo in sorted(scanned.repos, key=lambda repo: str(repo.repo_path)):
        for revision in sorted(repo.revisions, key=lambda revision: revision.commit_hash):
            for file in sorted(revision.files, key=lambda file: file.file_path):
                if file.file_name.endswith(".gguf") and not file.file_name.startswith(".") and file.file_path.is_file():
                    found.setdefault(file.file_path.resolve(), _Found(file.file_path))
    scanned_folders = {repo.repo_path.resolve() for repo in scanned.repos}
    for folder in sorted(cache.iterdir()):
        if folder.is_dir() and "--" in folder.name and folder.resolve() not in scanned_folders:
            for item in _find_gguf_tree(folder):
                found.setdefault(item.path.resolve(), item)
    return list(found.values())


_FINDERS: dict[str, Callable[[Path], list[_Found]]] = {
    _GGUF_TREE: _find_gguf_tree, _HF_CACHE: _find_hf_cache, _OLLAMA: _find_ollama}


def _known_folders(home: Path | None) -> list[tuple[str, Path, str]]:
    """(label, folder, kind) for the other applications' model folders, from `home` or the environment."""
    if home is None:
        from qdesk.hub.settings import hub_cache_dir

        user_home = Path.home()
        hf_cache = hub_cache_dir()
        ollama = Path(os.environ.get("OLLAMA_MODELS") or user_home / ".ollama" / "models")
    else:
        user_home = home
        hf_cache = home / ".cache" / "huggingface" / "hub"
        ollama = home / ".ollama" / "models"
    return [
        ("hf-cache", hf_cache, _HF_CACHE),
        ("lmstudio", user_home / ".lmstudio" / "models", _GGUF_TREE),
        ("lmstudio", user_home / ".cache" / "lm-studio" / "models", _GGUF_TREE),  # LM Studio before 0.3
        ("ollama", ollama, _OLLAMA),
    ]


# --- the library --------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path      TEXT PRIMARY KEY,   -- absolute path as found (not resolved: a link stays a link)
    id        TEXT NOT NULL UNIQUE,
    source    TEXT NOT NULL,      -- imported | starter | registered:<label>
    folder    TEXT,               -- the registered folder that holds it, if any
    alias     TEXT,               -- the folder's own name for it (Ollama), if any
    origin    TEXT,               -- imported: the file it was copied or linked from
    hidden    INTEGER NOT NULL DEFAULT 0,  -- forgotten by `remove` (registered files stay on disk)
    size      INTEGER,
    mtime_ns  INTEGER,
    status    TEXT NOT NULL,
    problem   TEXT,
    facts     TEXT                -- JSON from the last successful read
);
CREATE TABLE IF NOT EXISTS folders (
    path   TEXT PRIMARY KEY,
    label  TEXT NOT NULL,
    kind   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
"""
_COLUMNS = {
    "files": ("path", "id", "source", "folder", "alias", "origin", "hidden", "size", "mtime_ns", "status", "problem",
              "facts"),
    "folders": ("path", "label", "kind"),
    "settings": ("key", "value"),
}
REBUILD_HINT = ("run `qdesk models scan --rebuild` to set it aside and index the models folder again "
                "(nothing is deleted)")


@dataclass
class _Row:
    path: str
    id: str
    source: str
    folder: str | None
    alias: str | None
    origin: str | None
    hidden: int
    size: int | None
    mtime_ns: int | None
    status: str
    problem: str | None
    facts: str | None


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()  # follows links: a dangling link is a missing model
    except OSError:
        return None


def _clean_id(text: str) -> str:
    cleaned = re.sub(r"[\s/\\]+", "-", text.strip()).strip("-.")
    return cleaned or "model"


class Library:
    """The index of the user's GGUF files; every method opens the SQLite index briefly, so any thread may call."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else models_dir()
        self.index_path = self.root / INDEX_NAME
        self._schema_checked = False
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.index_path, timeout=_DB_TIMEOUT_S)
            connection.close()
        except (OSError, sqlite3.Error) as error:
            raise LibraryError(f"Cannot open the model library in {self.root} ({error}); choose a models folder "
                               f"you can write to (set {MODELS_DIR_ENV}).") from error
        with self._connect():
            pass

    # --- the index ---

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            connection = sqlite3.connect(self.index_path, timeout=_DB_TIMEOUT_S)
        except sqlite3.Error as error:
            raise LibraryError(f"Cannot open the model index {self.index_path} ({error}); check the models folder's "
                               f"permissions, or choose another one (set {MODELS_DIR_ENV}).") from error
        try:
            connection.row_factory = sqlite3.Row
            self._prepare(connection)
            yield connection
        except sqlite3.OperationalError as error:
            message = str(error)
            if "locked" in message or "busy" in message:
                raise LibraryError(f"The model index {self.index_path} stayed locked by another qdesk for "
                                   f"{_DB_TIMEOUT_S:.0f} s; try again when it has finished.") from error
            if any(cause in message for cause in ("readonly", "unable to open", "disk I/O", "is full")):
                raise LibraryError(f"Cannot write the model index {self.index_path} ({error}); check the models "
                                   f"folder's permissions and free space, or choose another one (set "
                                   f"{MODELS_DIR_ENV}).") from error
            raise self._unreadable(error) from error
        except sqlite3.DatabaseError as error:
            raise self._unreadable(error) from error
        finally:
            connection.close()

    def _prepare(self, connection: sqlite3.Connection) -> None:
        """Create the schema in a new index; refuse one from a newer qdesk or one that is not qdesk's."""
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise LibraryError(f"The model index {self.index_path} was written by a newer qdesk; update qdesk "
                               f"or choose another models folder (set {MODELS_DIR_ENV}).")
        if version < SCHEMA_VERSION:
            with connection:
                connection.execute("BEGIN IMMEDIATE")
                if connection.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                    self._check_schema(connection)
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            connection.execute(statement)
                    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if not self._schema_checked:
            self._check_schema(connection)
            self._schema_checked = True

    def _check_schema(self, connection: sqlite3.Connection) -> None:
        """Raise LibraryError when a table qdesk uses exists without the columns qdesk needs."""
        for table, columns in _COLUMNS.items():
            present = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
            if present and not set(columns) <= present:
                raise self._unreadable(f"its table {table} lacks {', '.join(sorted(set(columns) - present))}")

    def _unreadable(self, reason: object) -> LibraryError:
        return LibraryError(f"The model index {self.index_path} is damaged or not qdesk's ({reason}); {REBUILD_HINT}.")

    def _rows(self, connection: sqlite3.Connection, *, hidden: bool = False) -> list[_Row]:
        query = "SELECT * FROM files" + ("" if hidden else " WHERE hidden = 0") + " ORDER BY id"
        return [_Row(**dict(row)) for row in connection.execute(query)]

    def _unique_id(self, connection: sqlite3.Connection, wanted: str) -> str:
        taken = {row[0].casefold() for row in connection.execute("SELECT id FROM files")}
        base = _clean_id(wanted)
        candidate, n = base, 2
        while candidate.casefold() in taken:
            candidate, n = f"{base}-{n}", n + 1
        return candidate

    def _add(self, connection: sqlite3.Connection, found: _Found, source: str, folder: Path | None,
             origin: Path | None = None) -> _Row:
        if not connection.in_transaction:
            connection.execute("BEGIN IMMEDIATE")  # choosing a free id and taking it: one step for every process
        stem = found.path.name.removesuffix(".gguf") if found.path.name.endswith(".gguf") else found.path.name
        if found.alias is None and stem.startswith("sha256-"):
            stem = stem[:19]  # an unnamed Ollama blob: a short digest is name enough
        row = _Row(str(found.path), self._unique_id(connection, found.alias or stem), source,
                   None if folder is None else str(folder), found.alias, None if origin is None else str(origin),
                   0, None, None, _UNREAD, None, None)
        inserted = connection.execute("INSERT OR IGNORE INTO files VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                                      tuple(vars(row).values()))
        if inserted.rowcount == 0:  # another qdesk process indexed it a moment ago
            return _Row(**dict(connection.execute("SELECT * FROM files WHERE path = ?", (row.path,)).fetchone()))
        return row

    def _read_into(self, connection: sqlite3.Connection, row: _Row) -> None:
        """Read the file behind `row` and store its facts (or why it is broken) with the stat they belong to."""
        path = Path(row.path)
        before = _stat(path)
        if before is None:
            row.status, row.problem = MISSING, _missing_problem(path)
        else:
            try:
                facts = _read_facts(path)
            except GGUFFileError as error:
                row.status, row.problem = BROKEN, str(error)
            else:
                row.status, row.problem, row.facts = OK, None, json.dumps(facts)
            row.size, row.mtime_ns = before.st_size, before.st_mtime_ns
        connection.execute("UPDATE files SET size=?, mtime_ns=?, status=?, problem=?, facts=? WHERE path=?",
                           (row.size, row.mtime_ns, row.status, row.problem, row.facts, row.path))

    # --- reading the library ---

    def entries(self) -> list[LibraryEntry]:
        """Every model, sorted by base model then size (largest first); stats each file, reads none."""
        with self._connect() as connection:
            rows = self._rows(connection)
        entries = [_entry(row) for row in rows]
        return sorted(entries, key=lambda e: (e.base_model.casefold(), -e.bytes, e.id.casefold()))

    def groups(self) -> dict[str, list[LibraryEntry]]:
        """model name -> its variants, largest file first: files of one model's identity (architecture, shape and
        family name, `qdesk.library.identity`) together, under the name the user gave the group if any."""
        return {group.name: list(group.entries) for group in self.model_groups()}

    def model_groups(self) -> list[ModelGroup]:
        """The models and their variants, with each group's key (for `rename_group`)."""
        return group_entries(self.entries(), self._group_names())

    def _group_names(self) -> dict[str, str]:
        with self._connect() as connection:
            rows = connection.execute("SELECT key, value FROM settings WHERE key LIKE ?", (_GROUP_NAME + "%",))
            return {key.removeprefix(_GROUP_NAME): value for key, value in rows}

    def rename_group(self, key: str, name: str) -> None:
        """Show the group `key` (`ModelGroup.key`) as `name`; an empty name goes back to the one the files give."""
        name = " ".join(name.split())
        with self._connect() as connection, connection:
            if name:
                connection.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (_GROUP_NAME + key, name))
            else:
                connection.execute("DELETE FROM settings WHERE key = ?", (_GROUP_NAME + key,))

    def group_of(self, name: str) -> ModelGroup:
        """The group holding the model `name` (an id or a path, as `find` takes)."""
        entry = self.find(name)
        return next(group for group in self.model_groups() if entry in group.entries)

    def find(self, name: str) -> LibraryEntry:
        """The entry whose id (case-insensitively) or path is `name`; LibraryError listing close names if none."""
        entries = self.entries()
        for entry in entries:
            if entry.id.casefold() == name.casefold() or str(entry.path) == name:
                return entry
        ids = [entry.id for entry in entries]
        close = difflib.get_close_matches(name, ids, n=3, cutoff=0.5)
        hint = (f"did you mean {', '.join(close)}?" if close else
                "see `qdesk models list` for the names." if ids else "the library is empty.")
        raise LibraryError(f"No model named {name!r} in the library; {hint}")

    # --- changing the library ---

    def refresh(self, progress: ProgressFn | None = None, cancel: CancelToken | None = None) -> RefreshSummary:
        """Rescan the models folder and the registered folders; re-read new and changed files, notice gone ones."""
        progress = progress or no_progress
        with self._connect() as connection:
            known = {row.path: row for row in self._rows(connection, hidden=True)}
            folders = [(self.root, IMPORTED, _GGUF_TREE)] + [
                (Path(row["path"]), f"{REGISTERED}:{row['label']}", row["kind"])
                for row in connection.execute("SELECT * FROM folders ORDER BY path")]
            with connection:
                for folder, source, kind in folders:
                    if not folder.is_dir():
                        continue
                    found = _find_gguf_tree_top(folder) if source == IMPORTED else _FINDERS[kind](folder)
                    for item in found:
                        if str(item.path) not in known:
                            owner = None if source == IMPORTED else folder
                            known[str(item.path)] = self._add(connection, item, source, owner)
            rows = [row for row in known.values() if not row.hidden]

            stale: list[_Row] = []
            missing = 0
            with connection:
                for row in rows:
                    status = _current_status(row)
                    if status == MISSING:
                        missing += 1
                        if row.status != MISSING:
                            row.status, row.problem = MISSING, _missing_problem(Path(row.path))
                            connection.execute("UPDATE files SET status=?, problem=? WHERE path=?",
                                               (row.status, row.problem, row.path))
                    elif status in (CHANGED, _UNREAD):
                        stale.append(row)
            broken = sum(1 for row in rows if row.status == BROKEN and row not in stale)
            for done, row in enumerate(stale):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                progress(Progress(done, len(stale), "files", f"reading {Path(row.path).name}"))
                with connection:
                    self._read_into(connection, row)
                broken += row.status == BROKEN
            progress(Progress(len(stale), len(stale), "files", "library up to date"))
        return RefreshSummary(read=len(stale), missing=missing, broken=broken)

    def import_model(self, path: str | os.PathLike[str], *, link: bool = False, progress: ProgressFn | None = None,
                     cancel: CancelToken | None = None) -> LibraryEntry:
        """Copy (atomically) or link a GGUF file into the models folder and index it.

        The file is checked first: a file that is not a complete GGUF raises GGUFFileError and nothing is
        copied. Importing a file the library already holds (the same path, or the same source imported
        before and unchanged since) returns the existing entry instead of a second copy. The copy reports
        `progress` in bytes; `cancel` stops it (Cancelled) and leaves no partial file.
        """
        source = Path(path).expanduser()
        absolute = source.absolute()
        if absolute.parent == self.root.absolute():
            self.refresh()  # a file dropped into the models folder is the library's already
        existing = self._already_imported(absolute)
        if existing is not None:
            return existing
        facts = _read_facts(source)  # raises GGUFFileError for anything that is not a complete GGUF

        name = source.name if source.suffix == ".gguf" else source.name + ".gguf"
        if link:
            target = _link(absolute.resolve(), self.root, name)
        else:
            check_free_space(self.root / name, source.stat().st_size)
            staging = self.root / f".{name}.import-{uuid.uuid4().hex[:12]}"
            with atomic_output(staging) as temporary:
                _copy_file(source, temporary, progress or no_progress, cancel)
                shutil.copystat(source, temporary)  # keep the mtime, so the copy can be recognised
            target = place_as_new(staging, self.root, name)  # a name no other file has, taken atomically
        after = target.stat()
        with self._connect() as connection, connection:
            row = self._add(connection, _Found(target), IMPORTED, None, origin=absolute)
            row.size, row.mtime_ns, row.status, row.facts = after.st_size, after.st_mtime_ns, OK, json.dumps(facts)
            connection.execute("UPDATE files SET size=?, mtime_ns=?, status=?, facts=? WHERE path=?",
                               (row.size, row.mtime_ns, row.status, row.facts, row.path))
        return _entry(row)

    def _already_imported(self, absolute: Path) -> LibraryEntry | None:
        source_stat = _stat(absolute)
        for entry in self.entries():
            if entry.path == absolute:
                return entry
        with self._connect() as connection:
            rows = connection.execute("SELECT * FROM files WHERE origin = ? AND hidden = 0", (str(absolute),))
            for row in (_Row(**dict(r)) for r in rows):
                target_stat = _stat(Path(row.path))
                if (source_stat is not None and target_stat is not None
                        and (target_stat.st_size, target_stat.st_mtime_ns)
                        == (source_stat.st_size, source_stat.st_mtime_ns)):
                    return _entry(row)
        return None

    def register_folder(self, folder: str | os.PathLike[str], label: str = "folder",
                        progress: ProgressFn | None = None) -> list[LibraryEntry]:
        """Register a folder read-only (its *.gguf files, searched recursively) and index what it holds now."""
        return self._register(Path(folder).expanduser(), label, _GGUF_TREE, progress)

    def _register(self, folder: Path, label: str, kind: str, progress: ProgressFn | None) -> list[LibraryEntry]:
        if not folder.is_dir():
            raise LibraryError(f"{folder} is not a folder; give the folder that holds your .gguf files.")
        folder = folder.absolute()
        with self._connect() as connection, connection:
            connection.execute("INSERT OR REPLACE INTO folders VALUES (?,?,?)", (str(folder), label, kind))
        self.refresh(progress)
        return [entry for entry in self.entries() if entry.path.is_relative_to(folder)]

    def register_hf_cache(self, folder: str | os.PathLike[str] | None = None,
                          progress: ProgressFn | None = None) -> list[LibraryEntry]:
        """Register a Hugging Face cache read-only (default: the one HF_HUB_CACHE / HF_HOME name now) and index the
        GGUF files of its snapshots."""
        from qdesk.hub.settings import hub_cache_dir

        cache = Path(folder).expanduser() if folder is not None else hub_cache_dir()
        return self._register(cache, "hf-cache", _HF_CACHE, progress)

    def register_known_folders(self, home: str | os.PathLike[str] | None = None,
                               progress: ProgressFn | None = None) -> list[str]:
        """Register the Hugging Face cache, LM Studio's and Ollama's model folders that exist; returns their labels.

        With `home`, the folders are looked for under it (the layouts of a user's home); otherwise under the
        user's home, with HF_HUB_CACHE / HF_HOME and OLLAMA_MODELS honoured.
        """
        labels: list[str] = []
        for label, folder, kind in _known_folders(None if home is None else Path(home)):
            if folder.is_dir():
                self._register(folder, label, kind, progress)
                if label not in labels:
                    labels.append(label)
        return labels

    @classmethod
    def rebuilt(cls, root: str | os.PathLike[str] | None = None) -> tuple[Library, Path | None]:
        """A new index for the models folder `root`: the old one (damaged, foreign, or merely old) is renamed aside,
        never deleted, and its registered folders are carried over when it can still be read; the models folder's
        own files are indexed again. Returns the library and where the old index went (None if there was none)."""
        root = Path(root).expanduser() if root is not None else models_dir()
        index = root / INDEX_NAME
        folders = _registered_folders(index)
        kept: Path | None = None
        if index.exists():
            kept = index.with_name(f"{INDEX_NAME}.set-aside-{time.strftime('%Y%m%d-%H%M%S')}")
            try:
                index.rename(kept)
                journal = index.with_name(index.name + "-journal")
                if journal.exists():
                    journal.rename(kept.with_name(kept.name + "-journal"))
            except OSError as error:
                raise LibraryError(f"Cannot set the model index {index} aside ({error.strerror or error}); check the "
                                   "models folder's permissions.") from error
        library = cls(root)
        with library._connect() as connection, connection:
            connection.executemany("INSERT OR REPLACE INTO folders VALUES (?,?,?)", folders)
        library.refresh()
        return library, kept

    def ensure_starter(self) -> LibraryEntry | None:
        """Register the starter model read-only in place the first time; None if its package is missing.

        Once offered, it is not registered again: a user who removed it keeps it removed.
        """
        from qdesk.app.starter import starter_model_path

        with self._connect() as connection:
            offered = connection.execute("SELECT value FROM settings WHERE key = 'starter'").fetchone()
            if offered is not None:
                row = connection.execute("SELECT * FROM files WHERE path = ? AND hidden = 0",
                                         (offered[0],)).fetchone()
                return None if row is None else _entry(_Row(**dict(row)))
        try:
            path = starter_model_path()
        except UserError:
            return None
        with self._connect() as connection:
            with connection:
                connection.execute("INSERT OR REPLACE INTO settings VALUES ('starter', ?)", (str(path),))
                existing = connection.execute("SELECT * FROM files WHERE path = ?", (str(path),)).fetchone()
                row = _Row(**dict(existing)) if existing else self._add(connection, _Found(path), STARTER, None)
            if row.status == _UNREAD:
                with connection:
                    self._read_into(connection, row)
        return _entry(row)

    def remove(self, name: str) -> None:
        """Forget a model; an imported one's file is deleted too, a registered one's file is never touched."""
        entry = self.find(name)
        if entry.source == IMPORTED:
            try:
                entry.path.unlink(missing_ok=True)  # a linked import: only the link goes
            except OSError as error:
                raise OutputError(f"Cannot delete {entry.path} ({error.strerror or error}); check its "
                                  "permissions and try again.") from error
            with self._connect() as connection, connection:
                connection.execute("DELETE FROM files WHERE path = ?", (str(entry.path),))
        else:
            with self._connect() as connection, connection:
                connection.execute("UPDATE files SET hidden = 1 WHERE path = ?", (str(entry.path),))


def _registered_folders(index: Path) -> list[tuple[str, str, str]]:
    """(path, label, kind) of the folders an index registered, read-only; none when it cannot be read."""
    if not index.is_file():
        return []
    try:
        connection = sqlite3.connect(f"{index.as_uri()}?mode=ro", uri=True, timeout=_DB_TIMEOUT_S)
    except sqlite3.Error:
        return []
    try:
        rows = connection.execute("SELECT path, label, kind FROM folders").fetchall()
    except sqlite3.Error:
        return []
    finally:
        connection.close()
    return [(str(path), str(label), str(kind)) for path, label, kind in rows if kind in _FINDERS]


def _find_gguf_tree_top(folder: Path) -> list[_Found]:
    """The models folder's own files (imports, and GGUFs the user dropped in), not its subfolders."""
    return [_Found(path) for path in sorted(folder.glob("*.gguf"))
            if not path.name.startswith(".") and (path.is_file() or path.is_symlink())]


_COPY_CHUNK = 8 << 20


def _copy_file(source: Path, target: Path, progress: ProgressFn, cancel: CancelToken | None) -> None:
    total = source.stat().st_size
    done = 0
    buffer = bytearray(_COPY_CHUNK)
    with source.open("rb") as reader, target.open("wb") as writer:
        while count := reader.readinto(buffer):
            if cancel is not None:
                cancel.raise_if_cancelled()
            writer.write(memoryview(buffer)[:count])
            done += count
            progress(Progress(done, total, "bytes", f"copying {source.name}"))


def _link(source: Path, folder: Path, name: str) -> Path:
    """A link to `source` in `folder` named `name`, or `stem-2.gguf`, … when taken: making the link takes the name,
    atomically."""
    stem, number = name.removesuffix(".gguf"), 1
    while True:
        target = folder / (name if number == 1 else f"{stem}-{number}.gguf")
        number += 1
        try:
            target.symlink_to(source)
            return target
        except FileExistsError:
            continue
        except OSError:
            pass
        try:
            os.link(source, target)  # Windows without the right to make symbolic links
            return target
        except FileExistsError:
            continue
        except OSError as error:
            raise LibraryError(f"Cannot link {source} into {folder} ({error.strerror or error}); import it "
                               "without --link to copy it instead.") from error


def _missing_problem(path: Path) -> str:
    if path.is_symlink():
        return f"{path} links to {os.readlink(path)}, which no longer exists; remove it or put the file back."
    return f"{path} was deleted or moved; remove it from the library or put the file back."


def _current_status(row: _Row) -> str:
    if row.status == _UNREAD:
        return _UNREAD
    now = _stat(Path(row.path))
    if now is None:
        return MISSING
    if row.status == MISSING:
        return CHANGED  # it came back: read it again before trusting it
    if (now.st_size, now.st_mtime_ns) != (row.size, row.mtime_ns):
        return CHANGED
    return row.status


def _entry(row: _Row) -> LibraryEntry:
    path = Path(row.path)
    facts: dict[str, Any] | None = json.loads(row.facts) if row.facts else None
    status = _current_status(row)
    problem = row.problem
    if status == MISSING and row.status != MISSING:
        problem = _missing_problem(path)
    elif status == CHANGED:
        problem = f"{path} changed since it was indexed; refresh the library to read it again."
    elif status == _UNREAD:
        status, problem = CHANGED, f"{path} has not been read yet; refresh the library to read it."
    now = _stat(path)
    stem = path.name.removesuffix(".gguf")
    name = row.alias or stem
    if facts is not None and isinstance(facts.get("name"), str):
        name = facts["name"]
    return LibraryEntry(
        id=row.id,
        path=path,
        source=row.source,
        read_only=row.source != IMPORTED,
        status=status,
        problem=problem,
        name=name,
        architecture=(facts or {}).get("architecture"),
        file_type=(facts or {}).get("file_type"),
        parameters=(facts or {}).get("parameters"),
        bpw=(facts or {}).get("bpw"),
        context_length=(facts or {}).get("context_length"),
        bytes=now.st_size if now is not None else row.size or 0,
        has_chat_template=bool((facts or {}).get("has_chat_template")),
        base_model=_base_model(facts, row.alias or stem, prefer_file_name=row.source == STARTER),
        variant=_variant(facts),
        provenance=dict((facts or {}).get("provenance") or {}),
        shape_key=shape_key(facts) if status == OK else None,
        family_key=family_key(facts, _base_model(facts, row.alias or stem, prefer_file_name=True)),
        adapter_of=_adapted_family(facts) if status == OK else None,
    )


# --- the text table -----------------------------------------------------------------------------

def render_text(entries: Iterable[LibraryEntry] | Mapping[str, list[LibraryEntry]]) -> str:
    """An aligned table, one block per base model ("Base: F16, Q8_0, …"), one row per variant."""
    if isinstance(entries, Mapping):
        grouped = {name: list(variants) for name, variants in entries.items()}
    else:
        grouped = {group.name: list(group.entries) for group in group_entries(list(entries))}
    if not grouped:
        return "No models in the library yet; add one with `qdesk models import FILE.gguf`."
    header = ("name", "variant", "size", "bpw", "params", "context", "chat", "source", "status")
    blocks: list[tuple[str, list[tuple[str, ...]]]] = []
    for base, variants in grouped.items():
        rows = [(
            entry.id,
            entry.variant,
            format_size(entry.bytes),
            "-" if entry.bpw is None else f"{entry.bpw:.2f}",
            format_count(entry.parameters) if entry.parameters else "-",
            "-" if entry.context_length is None else str(entry.context_length),
            "yes" if entry.has_chat_template else "no",
            entry.source + (" (read-only)" if entry.read_only and entry.source != STARTER else ""),
            entry.status if entry.problem is None else f"{entry.status}: {entry.problem}",
        ) for entry in variants]
        blocks.append((f"{base}: " + ", ".join(entry.variant for entry in variants), rows))
    lines = iter(text_table([h.upper() for h in header], [row for _, rows in blocks for row in rows], indent="  "))
    out = [next(lines)]
    for title, rows in blocks:
        out += ["", title, *(next(lines) for _ in rows)]
    return "\n".join(out)
