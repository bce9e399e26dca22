"""The Discover section's background work, as plain functions (no Qt): download one file (or shard set, or
checkpoint) of a listing into the Hugging Face cache and add it to the library, and discard what a stopped
download left.

Search and listing are `qdesk.hub.search_models` and `qdesk.hub.list_repo` themselves.
"""

from __future__ import annotations

import contextlib
import glob
from dataclasses import dataclass, field
from pathlib import Path

from converters.core.jobs import CancelToken, ProgressFn
from qdesk.hub import (
    DownloadResult,
    FileGroup,
    HubError,
    HubSettings,
    RepoFile,
    RepoListing,
    add_to_library,
    download,
)
from qdesk.hub.cache import RepoCache
from qdesk.hub.names import SAFETENSORS
from qdesk.library.store import Library, LibraryEntry


@dataclass(frozen=True)
class DownloadOutcome:
    result: DownloadResult
    entries: list[LibraryEntry] = field(default_factory=list)
    """The library entries of the GGUF files downloaded (the Hugging Face cache is registered read-only)."""

    @property
    def checkpoint_dir(self) -> Path | None:
        return self.result.checkpoint_dir


def files_to_fetch(listing: RepoListing, group: FileGroup) -> list[RepoFile]:
    """A GGUF variant's files (every shard); for a safetensors checkpoint, its weights and the small files beside
    them (config, tokenizer) that make it a checkpoint to quantize."""
    if group.kind != SAFETENSORS:
        return list(group.files)
    return [*group.files, *listing.other_files]


def download_group(listing: RepoListing, group: FileGroup, settings: HubSettings, library: Library,
                   progress: ProgressFn, cancel: CancelToken) -> DownloadOutcome:
    """Download `group` of `listing` (a pause or cancel keeps the partial file: see `discard_partial`), then add its
    GGUF files to `library`."""
    include = [glob.escape(file.path) for file in files_to_fetch(listing, group)]
    result = download(listing.repo_id, include=include, revision=listing.revision, settings=settings,
                      progress=progress, cancel=cancel, keep_partial=True)
    return DownloadOutcome(result, add_to_library(result, library))


def discard_partial(listing: RepoListing, group: FileGroup, settings: HubSettings) -> int:
    """Delete the partial files a paused or cancelled download of `group` left in the cache; the bytes freed."""
    cache = RepoCache(settings.cache_dir, listing.repo_id)
    freed = 0
    for file in files_to_fetch(listing, group):
        for etag in {file.sha256, file.blob_id} - {None}:
            with contextlib.suppress(OSError, HubError):
                partial = cache.incomplete_path(str(etag))
                size = partial.stat().st_size
                partial.unlink()
                freed += size
    return freed
