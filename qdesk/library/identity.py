"""Which files are the same model: grouping the library by the model's identity rather than by its name alone.

Two files are variants of one model when they have the same architecture and shape (layers, width, vocabulary,
parameters) and names that agree once normalised: the family name (`general.basename`, else `general.name`, else the
file or folder name, with the type suffix dropped), lower-cased with everything but letters and digits removed, one
being the start of the other ("smollm2" and "smollm2135minstruct"). So the starter model and a checkpoint folder
"smollm2-135M" quantized by the user land in one group, while two different models of one shape stay apart. A file
whose header could not be read is grouped by its name alone. A LoRA adapter joins the group of the model it adapts
(same architecture, its `general.base_model.0.name` related to the group's family), or stands alone when the library
holds no such model. The user may rename a group (`Library.rename_group`); the name is kept under the group's key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qdesk.library.store import LibraryEntry

__all__ = ["ModelGroup", "display_name", "family_key", "group_entries", "shape_key"]

_NOT_ALPHANUMERIC = re.compile(r"[^0-9a-z]+")


def _normalised(text: str) -> str:
    return _NOT_ALPHANUMERIC.sub("", text.casefold())


def shape_key(facts: Mapping[str, Any] | None) -> str | None:
    """"llama/30x576/v49152/134515008": architecture, layers × width, vocabulary and parameters (None if unknown)."""
    if not facts:
        return None
    parts = [facts.get(key) for key in ("architecture", "block_count", "embedding_length", "vocab_size", "parameters")]
    if any(part in (None, "", 0) for part in (parts[0], parts[1], parts[2], parts[4])):
        return None
    architecture, blocks, width, vocabulary, parameters = parts
    return f"{architecture}/{blocks}x{width}/v{vocabulary or 0}/{parameters}"


def family_key(facts: Mapping[str, Any] | None, fallback_name: str) -> str:
    """The normalised family name: `general.basename`, else `general.name`, else `fallback_name` (the base model
    name the library derives from the file or folder)."""
    general = (facts or {}).get("general") or {}
    for candidate in (general.get("basename"), general.get("name"), (facts or {}).get("name")):
        if isinstance(candidate, str) and _normalised(candidate):
            return _normalised(candidate)
    return _normalised(fallback_name) or fallback_name.casefold()


@dataclass(frozen=True)
class ModelGroup:
    """One model and its variants (largest file first)."""

    key: str
    """Stable across refreshes: where the user's name for the group is kept."""
    name: str
    """The user's name for it, else the most descriptive of its files' base model names."""
    entries: tuple[LibraryEntry, ...]
    renamed: bool = False


def _related(a: str, b: str) -> bool:
    return a.startswith(b) or b.startswith(a)


def group_entries(entries: Sequence[LibraryEntry], names: Mapping[str, str] | None = None) -> list[ModelGroup]:
    """`entries` gathered into models (see the module's notes), sorted by name; `names` maps group keys to the
    names the user gave them."""
    names = names or {}
    clusters: list[list[LibraryEntry]] = []
    adapters = [entry for entry in entries if entry.adapter_of is not None]
    for entry in [entry for entry in entries if entry.adapter_of is None]:
        home = None
        if entry.shape_key is not None:
            home = next((cluster for cluster in clusters if cluster[0].shape_key == entry.shape_key
                         and any(_related(entry.family_key, other.family_key) for other in cluster)), None)
        else:
            home = next((cluster for cluster in clusters if cluster[0].shape_key is None
                         and cluster[0].base_model.casefold() == entry.base_model.casefold()), None)
        if home is None:
            clusters.append([entry])
        else:
            home.append(entry)
    for adapter in adapters:
        home = next((cluster for cluster in clusters if adapter.adapter_of
                     and cluster[0].architecture == adapter.architecture and cluster[0].adapter_of is None
                     and any(_related(adapter.adapter_of, member.family_key) for member in cluster)), None)
        if home is None:
            clusters.append([adapter])
        else:
            home.append(adapter)
    groups = []
    for cluster in clusters:
        members = tuple(sorted(cluster, key=lambda e: (e.adapter_of is not None, -e.bytes, e.id.casefold())))
        key = _group_key(members)
        models = [member for member in members if member.adapter_of is None] or list(members)
        default = max((member.base_model for member in models), key=lambda name: (len(name), name))
        given = names.get(key, "").strip()
        groups.append(ModelGroup(key, given or default, members, bool(given)))
    return sorted(groups, key=lambda group: (group.name.casefold(), group.key))


def _group_key(members: Sequence[LibraryEntry]) -> str:
    shape = members[0].shape_key
    if shape is None:
        return "name:" + members[0].base_model.casefold()
    return f"{shape}/{min((member.family_key for member in members), key=lambda key: (len(key), key))}"


def display_name(entry: LibraryEntry, group_name: str | None = None) -> str:
    """How the app names one file: its model and variant ("SmolLM2-135M-Instruct · Q4_1"), never a raw
    `general.name` such as "Smollm2 135M 8k Lc100K Mix1 Ep2"."""
    return f"{group_name or entry.base_model} · {entry.variant}"
