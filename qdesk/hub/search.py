"""Searching the Hub for models by text: GGUF files, safetensors checkpoints, or either; by downloads or recency.

The request is the one huggingface_hub's `HfApi.list_models` makes (`GET /api/models?search=…&filter=gguf&sort=
downloads&limit=…&expand=…`), sent once through its shared client and parsed into its `ModelInfo`: `list_models`
itself retries a failed request five times over 23 s, logging each, where a search without network should say so
at once, in one sentence. The Hub tags repositories with the formats they hold ("gguf", "safetensors"); "either"
asks for each and merges.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from qdesk.hub.errors import HubError
from qdesk.hub.http import check_online, translated
from qdesk.hub.names import GGUF, SAFETENSORS
from qdesk.hub.settings import HubSettings

__all__ = ["FORMATS", "SORTS", "ModelSummary", "search_models"]

Format = Literal["gguf", "safetensors", "any"]
Sort = Literal["downloads", "recent"]
FORMATS: tuple[str, ...] = ("gguf", "safetensors", "any")
SORTS: tuple[str, ...] = ("downloads", "recent")
_EXPAND = ["downloads", "likes", "lastModified", "tags", "gated", "pipeline_tag"]


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


def _summary(info: Any) -> ModelSummary:
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
    from huggingface_hub import ModelInfo
    from huggingface_hub.utils import get_session, hf_raise_for_status

    settings = settings or HubSettings.from_environment()
    check_online(settings)
    found: dict[str, ModelSummary] = {}
    for tag in ((GGUF, SAFETENSORS) if formats == "any" else (formats,)):
        params: dict[str, Any] = {"filter": tag, "sort": "downloads" if sort == "downloads" else "lastModified",
                                  "limit": limit, "expand": _EXPAND}
        if text:
            params["search"] = text
        with translated(settings, None):
            response = get_session().get(f"{settings.endpoint}/api/models", params=params,
                                         headers=settings.headers(), timeout=settings.timeout_s)
            hf_raise_for_status(response)
            items = response.json()
        for item in items if isinstance(items, list) else ():
            summary = _summary(ModelInfo(**{"siblings": None, **item}))
            found.setdefault(summary.repo_id, summary)

    def order(summary: ModelSummary) -> tuple[float, str]:
        if sort == "downloads":
            return (-summary.downloads, summary.repo_id)
        stamp = summary.last_modified.timestamp() if summary.last_modified else 0.0
        return (-stamp, summary.repo_id)

    return sorted(found.values(), key=order)[:limit]
