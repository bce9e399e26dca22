"""Searching the Hub for models by text: GGUF files, safetensors checkpoints, or either; by downloads or recency.

huggingface_hub's `HfApi.list_models` makes the request (`GET /api/models?search=…&filter=gguf&sort=downloads&
limit=…&expand=…`) and parses the answer into its `ModelInfo`. It runs inside `qdesk.hub.http.library_requests`:
a search without network says so at once, in one sentence, instead of being retried for 23 s. The Hub tags
repositories with the formats they hold ("gguf", "safetensors"); "any" asks for each and merges.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from qdesk.hub.errors import HubError
from qdesk.hub.http import check_online, library_requests, translated
from qdesk.hub.names import GGUF, SAFETENSORS
from qdesk.hub.settings import HubSettings

if TYPE_CHECKING:
    from huggingface_hub import ModelInfo

__all__ = ["FORMATS", "SORTS", "ModelSummary", "search_models"]

Format = Literal["gguf", "safetensors", "any"]
Sort = Literal["downloads", "recent"]
FORMATS: tuple[str, ...] = ("gguf", "safetensors", "any")
SORTS: tuple[str, ...] = ("downloads", "recent")
_EXPAND: Any = ["downloads", "likes", "lastModified", "tags", "gated", "pipeline_tag"]
_LIBRARY_SORT: dict[str, Any] = {"downloads": "downloads", "recent": "last_modified"}


@dataclass(frozen=True)
class ModelSummary:
    """One search result."""

    repo_id: str
    downloads: int
    likes: int
    last_modified: datetime | None
    formats: tuple[str, ...]
    """Which of "gguf" and "safetensors" the Hub's tags say the repository holds."""
    gated: bool
    pipeline_tag: str | None

    def to_json(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "downloads": self.downloads, "likes": self.likes,
                "last_modified": None if self.last_modified is None else self.last_modified.isoformat(),
                "formats": list(self.formats), "gated": self.gated, "pipeline_tag": self.pipeline_tag}


def _summary(info: ModelInfo) -> ModelSummary:
    tags = set(info.tags or ())
    return ModelSummary(
        repo_id=info.id,
        downloads=int(info.downloads or 0),
        likes=int(info.likes or 0),
        last_modified=info.last_modified,
        formats=tuple(name for name in (GGUF, SAFETENSORS) if name in tags),
        gated=bool(info.gated),
        pipeline_tag=info.pipeline_tag,
    )


def search_models(
    text: str,
    *,
    formats: Format = "any",
    sort: Sort = "downloads",
    limit: int = 20,
    settings: HubSettings | None = None,
) -> list[ModelSummary]:
    """Models whose name contains `text`, holding GGUF files, safetensors checkpoints or either (`formats`), most
    downloaded or most recently updated first (`sort`), at most `limit`. Raises HubErrors (offline, unreachable)."""
    if formats not in FORMATS:
        raise HubError(f"{formats!r} is not a format to search for; choose one of {', '.join(FORMATS)}.")
    if sort not in SORTS:
        raise HubError(f"{sort!r} is not a search order; choose one of {', '.join(SORTS)}.")
    if limit < 1:
        raise HubError("Ask for at least one search result.")
    settings = settings or HubSettings.from_environment()
    check_online(settings)
    api = settings.api()
    found: dict[str, ModelSummary] = {}
    for tag in ((GGUF, SAFETENSORS) if formats == "any" else (formats,)):
        with translated(settings, None), library_requests(settings):
            infos = list(api.list_models(search=text or None, filter=tag, sort=_LIBRARY_SORT[sort], limit=limit,
                                         expand=_EXPAND))
        for info in infos:
            summary = _summary(info)
            found.setdefault(summary.repo_id, summary)

    def order(summary: ModelSummary) -> tuple[float, str]:
        if sort == "downloads":
            return (-summary.downloads, summary.repo_id)
        stamp = summary.last_modified.timestamp() if summary.last_modified else 0.0
        return (-stamp, summary.repo_id)

    return sorted(found.values(), key=order)[:limit]
