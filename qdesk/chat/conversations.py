"""Side-by-side conversations: what the Compare section asked, what each pane's model answered, kept across restarts.

A `Conversation` has 1 to 4 panes (each bound to a model file, with the shared sampling settings or its own) and a
list of turns; a turn is one prompt sent to every pane and each pane's answer to it. A pane's own history is its own
answers only (`Conversation.messages`), so two variants never see each other's words. `ConversationStore` keeps
each conversation as one JSON file (written atomically) under `default_conversations_dir()`;
`conversation_markdown` and `conversation_json` are the exports.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from converters.core.atomic import atomic_output
from converters.core.paths import config_dir
from converters.core.units import format_size
from qdesk.app.errors import UserError
from qdesk.chat.compare import Divergence, first_divergence
from qdesk.chat.engine import ChatResult, GenerationStats, SamplingOptions

__all__ = [
    "FORMAT_VERSION",
    "Answer",
    "Conversation",
    "ConversationError",
    "ConversationStore",
    "ConversationSummary",
    "PaneRecord",
    "Turn",
    "conversation_json",
    "conversation_markdown",
    "default_conversations_dir",
    "diverging_offset",
    "export_conversation",
    "new_conversation",
]

FORMAT_VERSION = 1
FOLDER_NAME = "conversations"
TITLE_LENGTH = 60


class ConversationError(UserError):
    """A conversation cannot be read, written or exported; the message says what to do."""


def default_conversations_dir() -> Path:
    """`<config dir>/conversations` (`$QDESK_CONFIG_DIR` moves it with the settings)."""
    return config_dir() / FOLDER_NAME


# --- the record -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Answer:
    """One pane's answer to one turn, with the model and settings that made it."""

    model: Path
    text: str
    token_ids: tuple[int, ...] = ()
    stats: GenerationStats | None = None
    error: str | None = None
    """Why there is no (complete) answer; None when the model answered."""
    sampling: SamplingOptions | None = None
    system: str | None = None

    @classmethod
    def from_result(cls, model: Path, result: ChatResult, sampling: SamplingOptions | None = None,
                    system: str | None = None) -> Answer:
        return cls(model, result.text, tuple(result.token_ids), result.stats, None, sampling, system)

    def as_result(self) -> ChatResult:
        stats = self.stats or GenerationStats(0, len(self.token_ids), 0.0, 0.0, 0.0, "stop", 0)
        return ChatResult(self.text, self.token_ids, stats)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": str(self.model),
            "text": self.text,
            "token_ids": list(self.token_ids),
            "stats": None if self.stats is None else asdict(self.stats),
            "error": self.error,
            "sampling": None if self.sampling is None else asdict(self.sampling),
            "system": self.system,
        }

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Answer:
        stats = document.get("stats")
        sampling = document.get("sampling")
        return cls(
            Path(str(document["model"])),
            str(document.get("text", "")),
            tuple(int(token) for token in document.get("token_ids") or ()),
            GenerationStats(**{f.name: stats[f.name] for f in fields(GenerationStats)}) if stats else None,
            document.get("error"),
            SamplingOptions.from_json(sampling) if isinstance(sampling, dict) else None,
            document.get("system"),
        )


@dataclass
class Turn:
    """One prompt sent to every pane; `answers[i]` is pane i's answer, None where that pane did not answer."""

    prompt: str
    answers: list[Answer | None] = field(default_factory=list)

    def answer(self, pane: int) -> Answer | None:
        return self.answers[pane] if 0 <= pane < len(self.answers) else None

    def set_answer(self, pane: int, answer: Answer | None) -> None:
        while len(self.answers) <= pane:
            self.answers.append(None)
        self.answers[pane] = answer

    def divergence(self, pane: int) -> Divergence | None:
        """Where pane `pane`'s answer first differs from the first pane's (None for identical or missing ones)."""
        reference, other = self.answer(0), self.answer(pane)
        if pane == 0 or reference is None or other is None or reference.error or other.error:
            return None
        return first_divergence(reference.as_result(), other.as_result())


@dataclass
class PaneRecord:
    """A pane: the model it is bound to and, when `own_settings`, its own sampling and system prompt."""

    model: Path | None = None
    own_settings: bool = False
    sampling: SamplingOptions | None = None
    system: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"model": None if self.model is None else str(self.model), "own_settings": self.own_settings,
                "sampling": None if self.sampling is None else asdict(self.sampling), "system": self.system}

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> PaneRecord:
        model, sampling = document.get("model"), document.get("sampling")
        return cls(Path(model) if isinstance(model, str) and model else None, bool(document.get("own_settings")),
                   SamplingOptions.from_json(sampling) if isinstance(sampling, dict) else None,
                   document.get("system") if isinstance(document.get("system"), str) else None)


@dataclass
class Conversation:
    id: str
    created: str
    """ISO 8601, local time with offset."""
    updated: str
    system: str = ""
    """The shared system prompt; "" for none."""
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    """The shared sampling settings."""
    panes: list[PaneRecord] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    title: str = ""
    """"" until the first prompt names it."""

    @property
    def display_title(self) -> str:
        return self.title or "New conversation"

    def settings_for(self, pane: int) -> tuple[SamplingOptions, str]:
        """The sampling settings and system prompt pane `pane` uses: its own where it has them, else the shared."""
        record = self.panes[pane] if 0 <= pane < len(self.panes) else PaneRecord()
        if record.own_settings:
            return record.sampling or self.sampling, record.system if record.system is not None else self.system
        return self.sampling, self.system

    def messages(self, pane: int, turns: int | None = None) -> list[dict[str, str]]:
        """Pane `pane`'s own history over the first `turns` turns (all when None): each prompt it answered and its
        own answer, skipping turns it did not answer or answered with nothing."""
        history: list[dict[str, str]] = []
        for turn in self.turns[:turns]:
            answer = turn.answer(pane)
            if answer is None or not answer.text.strip():
                continue
            history += [{"role": "user", "content": turn.prompt}, {"role": "assistant", "content": answer.text}]
        return history

    def add_turn(self, prompt: str) -> Turn:
        turn = Turn(prompt, [None] * len(self.panes))
        self.turns.append(turn)
        if not self.title:
            self.title = _title_from(prompt)
        self.touch()
        return turn

    def delete_turn(self, index: int) -> None:
        """Forget turn `index`: its prompt and every pane's answer to it (later turns stay)."""
        del self.turns[index]
        self.touch()

    def edit_turn(self, index: int, prompt: str) -> Turn:
        """Ask `prompt` instead of turn `index`'s: that turn's answers and every later turn go (their context
        changed), and a new last turn holds the prompt, to be answered."""
        del self.turns[index:]
        return self.add_turn(prompt)

    def add_pane(self, record: PaneRecord | None = None) -> None:
        self.panes.append(record or PaneRecord())
        for turn in self.turns:
            turn.set_answer(len(self.panes) - 1, None)

    def remove_pane(self, pane: int) -> None:
        """Forget pane `pane` and its answers."""
        del self.panes[pane]
        for turn in self.turns:
            if pane < len(turn.answers):
                del turn.answers[pane]

    def touch(self) -> None:
        self.updated = _now()

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "id": self.id,
            "title": self.title,
            "created": self.created,
            "updated": self.updated,
            "system": self.system,
            "sampling": asdict(self.sampling),
            "panes": [pane.to_json() for pane in self.panes],
            "turns": [{"prompt": turn.prompt,
                       "answers": [None if answer is None else answer.to_json() for answer in turn.answers]}
                      for turn in self.turns],
        }

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Conversation:
        """Raises KeyError, TypeError or ValueError on a document that is not a conversation."""
        if int(document.get("format", 0)) > FORMAT_VERSION:
            raise ValueError("written by a newer qdesk")
        sampling = document.get("sampling")
        return cls(
            id=str(document["id"]),
            created=str(document.get("created", "")),
            updated=str(document.get("updated", "")),
            system=str(document.get("system") or ""),
            sampling=SamplingOptions.from_json(sampling) if isinstance(sampling, dict) else SamplingOptions(),
            panes=[PaneRecord.from_json(pane) for pane in document.get("panes") or []],
            turns=[Turn(str(turn["prompt"]), [None if answer is None else Answer.from_json(answer)
                                              for answer in turn.get("answers") or []])
                   for turn in document.get("turns") or []],
            title=str(document.get("title") or ""),
        )


def new_conversation(models: Sequence[Path | None] = (), *, system: str = "",
                     sampling: SamplingOptions | None = None) -> Conversation:
    """An empty conversation with one pane per entry of `models` (None: a pane not bound yet)."""
    now = _now()
    identifier = datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    return Conversation(identifier, now, now, system, sampling or SamplingOptions(),
                        [PaneRecord(model) for model in models])


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _title_from(prompt: str) -> str:
    line = " ".join(prompt.split())
    return line if len(line) <= TITLE_LENGTH else line[:TITLE_LENGTH - 1].rstrip() + "…"


# --- where answers part ways, while they stream ----------------------------------------------------

def diverging_offset(reference: str, text: str, *, reference_done: bool = True, done: bool = True) -> int | None:
    """The character offset where `text` leaves `reference` (the first pane's answer), or None where it has not
    (yet): a text that is still a prefix of a reference that is still streaming has not diverged, nor has one that
    the reference merely runs ahead of. The highlight is `text[offset:]`."""
    common = 0
    for mine, theirs in zip(reference, text, strict=False):
        if mine != theirs:
            break
        common += 1
    if common < len(reference) and common < len(text):
        return common
    if common == len(reference) and len(text) > common and reference_done:
        return common  # the reference ended here; this answer goes on
    if common == len(text) and len(reference) > common and done:
        return common  # this answer ended here and the reference goes on: nothing of this text to highlight
    return None


# --- the store -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConversationSummary:
    id: str
    title: str
    updated: str
    turns: int
    models: tuple[str, ...]
    """The panes' model file names."""


class ConversationStore:
    """Conversations as `<folder>/<id>.json`, each written atomically."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else default_conversations_dir()

    def path_of(self, identifier: str) -> Path:
        if not identifier or "/" in identifier or "\\" in identifier or identifier.startswith("."):
            raise ConversationError(f"{identifier!r} is not a conversation name; pick one from the list.")
        return self.folder / f"{identifier}.json"

    def save(self, conversation: Conversation) -> Path:
        path = self.path_of(conversation.id)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConversationError(f"Cannot create {self.folder} ({error.strerror or error}); check that you can "
                                    "write to qdesk's config folder.") from error
        _write_text(path, json.dumps(conversation.to_json(), indent=1, ensure_ascii=False) + "\n")
        return path

    def load(self, identifier: str) -> Conversation:
        path = self.path_of(identifier)
        try:
            return Conversation.from_json(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError as error:
            raise ConversationError(f"The conversation {identifier} is gone (no {path}); start a new one.") from error
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ConversationError(f"Cannot read the conversation in {path} ({error}); it may be damaged or from a "
                                    "newer qdesk, so start a new one.") from error

    def delete(self, identifier: str) -> None:
        self.path_of(identifier).unlink(missing_ok=True)

    def rename(self, identifier: str, title: str) -> Conversation:
        """Give the conversation `identifier` the title `title` (blank: named by its first prompt again)."""
        conversation = self.load(identifier)
        title = " ".join(title.split())
        conversation.title = title or (_title_from(conversation.turns[0].prompt) if conversation.turns else "")
        self.save(conversation)
        return conversation

    def summaries(self, search: str = "") -> list[ConversationSummary]:
        """Every readable conversation, the most recently updated first (unreadable files are left out); with
        `search`, only those whose title, prompts, answers or model names hold it (ignoring case)."""
        found: list[ConversationSummary] = []
        if not self.folder.is_dir():
            return found
        wanted = search.casefold().strip()
        for path in self.folder.glob("*.json"):
            if path.name.startswith("."):
                continue
            try:
                conversation = Conversation.from_json(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
            summary = ConversationSummary(
                conversation.id, conversation.display_title, conversation.updated, len(conversation.turns),
                tuple(pane.model.name for pane in conversation.panes if pane.model is not None))
            if wanted and wanted not in _searchable(conversation, summary):
                continue
            found.append(summary)
        return sorted(found, key=lambda summary: (summary.updated, summary.id), reverse=True)


def _searchable(conversation: Conversation, summary: ConversationSummary) -> str:
    texts = [summary.title, *summary.models]
    for turn in conversation.turns:
        texts.append(turn.prompt)
        texts += [answer.text for answer in turn.answers if answer is not None]
    return "\n".join(texts).casefold()


def _write_text(path: Path, text: str) -> None:
    try:
        with atomic_output(path) as staging:
            staging.write_text(text, encoding="utf-8")
    except UserError:
        raise
    except OSError as error:
        raise ConversationError(f"Cannot write {path} ({error.strerror or error}); choose another place.") from error


# --- exports ---------------------------------------------------------------------------------------

def conversation_json(conversation: Conversation) -> dict[str, Any]:
    """The export document: the stored record plus, per answer, its divergence from the first pane."""
    document = conversation.to_json()
    for turn, exported in zip(conversation.turns, document["turns"], strict=True):
        for pane, answer in enumerate(exported["answers"]):
            divergence = turn.divergence(pane)
            if answer is not None and divergence is not None:
                answer["divergence"] = {"token_index": divergence.token_index,
                                        "common_text": divergence.common_text,
                                        "first_continues": divergence.reference_continues,
                                        "this_continues": divergence.this_continues}
    return document


def conversation_markdown(conversation: Conversation, model_labels: dict[Path, str] | None = None) -> str:
    """The conversation as Markdown: each prompt, then each pane's answer with its figures and where it diverges.
    `model_labels` names models (e.g. by quantization type); file names are used otherwise."""
    labels = model_labels or {}
    lines = [f"# {conversation.display_title}", "",
             f"Started {conversation.created}, last updated {conversation.updated}.", ""]
    if conversation.system:
        lines += [f"System prompt: {conversation.system}", ""]
    for pane, record in enumerate(conversation.panes, start=1):
        model = "(no model)" if record.model is None else _label(record.model, labels)
        own = " (own settings)" if record.own_settings else ""
        lines.append(f"- Pane {pane}: {model}{own}")
    lines.append("")
    for number, turn in enumerate(conversation.turns, start=1):
        lines += [f"## Turn {number}", "", "**Prompt:**", "", _quoted(turn.prompt), ""]
        for pane, answer in enumerate(turn.answers):
            if answer is None:
                continue
            lines += [f"### Pane {pane + 1}: {_label(answer.model, labels)}", ""]
            lines += [answer.text.strip() or "_(no answer)_", ""]
            notes = _answer_notes(answer, turn.divergence(pane), first=pane == 0)
            if notes:
                lines += [f"_{notes}_", ""]
    return "\n".join(lines).rstrip() + "\n"


def _label(model: Path, labels: dict[Path, str]) -> str:
    return labels.get(model) or model.name


def _quoted(text: str) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in text.strip().splitlines()) or ">"


def _answer_notes(answer: Answer, divergence: Divergence | None, *, first: bool) -> str:
    parts: list[str] = []
    if answer.error:
        parts.append(f"failed: {answer.error}")
    if answer.stats is not None:
        stats = answer.stats
        parts += [f"{stats.generated_tokens} tokens", f"{stats.tokens_per_second:.1f} tokens/s",
                  f"first token after {stats.time_to_first_token_s:.2f} s"]
        if stats.memory_bytes:
            parts.append(f"memory {format_size(stats.memory_bytes)}")
        if stats.stop_reason != "stop":
            parts.append({"length": "cut at the token limit", "cancelled": "stopped"}.get(stats.stop_reason,
                                                                                          stats.stop_reason))
    if divergence is not None:
        parts.append(f"differs from pane 1 from token {divergence.token_index} on")
    elif not first and answer.stats is not None and not answer.error:
        parts.append("same as pane 1")
    return " · ".join(parts)


EXPORT_FORMATS = {".md": "markdown", ".markdown": "markdown", ".json": "json"}


def export_conversation(conversation: Conversation, path: Path,
                        model_labels: dict[Path, str] | None = None) -> Path:
    """Write `conversation` to `path` as Markdown (.md) or JSON (.json), atomically."""
    path = Path(path)
    kind = EXPORT_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ConversationError(f"Cannot tell the export format from {path.name}; end the name in .md or .json.")
    if kind == "json":
        text = json.dumps(conversation_json(conversation), indent=2, ensure_ascii=False) + "\n"
    else:
        text = conversation_markdown(conversation, model_labels)
    _write_text(path, text)
    return path
