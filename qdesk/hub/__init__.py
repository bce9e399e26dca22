"""The Hugging Face Hub from qdesk: search, a repository's files with fit marks, and resumable, checked downloads
into the standard cache, from the Hub or any server that speaks its API (HF_ENDPOINT). See docs/hub.md.

The parts, one module each:

* `settings`: where the Hub is and how to reach it (endpoint, cache folder, token, offline mode, retries);
* `http`: requests (huggingface_hub's client, configured), redirects, errors translated (`errors`);
* `search`: finding models (`HfApi.list_models`);
* `listing`: a repository's files, grouped; `names` says what a file name means, `fit` whether it fits here;
* `download`: the files of a download; `transfer` fetches one large file resumably, `checksums` checks it,
  `cache` lays it out as huggingface_hub does, `offline` serves the cache when the Hub cannot be asked, `results`
  is what comes back.

This module gathers the public names (what the command line and the desktop app import) and renders results as
text for the command line.
"""

from __future__ import annotations

from collections.abc import Sequence

from converters.core.units import format_size
from qdesk.display.tables import text_table
from qdesk.hub.download import add_to_library, download
from qdesk.hub.errors import (
    ChecksumError,
    DownloadCancelled,
    HubAccessError,
    HubConnectionError,
    HubError,
    HubNotFoundError,
    HubOfflineError,
    HubUnreachableError,
    UnsafeFileNameError,
)
from qdesk.hub.fit import FitMark
from qdesk.hub.listing import FileGroup, RepoFile, RepoListing, list_repo, select_files
from qdesk.hub.names import base_model_name, check_repo_path, quant_type, shard_name
from qdesk.hub.results import DownloadedFile, DownloadResult
from qdesk.hub.search import FORMATS, SORTS, ModelSummary, search_models
from qdesk.hub.settings import HubSettings, RetryPolicy, hub_cache_dir

__all__ = [
    "FORMATS",
    "SORTS",
    "ChecksumError",
    "DownloadCancelled",
    "DownloadResult",
    "DownloadedFile",
    "FileGroup",
    "FitMark",
    "HubAccessError",
    "HubConnectionError",
    "HubError",
    "HubNotFoundError",
    "HubOfflineError",
    "HubSettings",
    "HubUnreachableError",
    "ModelSummary",
    "RepoFile",
    "RepoListing",
    "RetryPolicy",
    "UnsafeFileNameError",
    "add_to_library",
    "base_model_name",
    "check_repo_path",
    "download",
    "hub_cache_dir",
    "list_repo",
    "quant_type",
    "render_download",
    "render_listing",
    "render_search",
    "search_models",
    "select_files",
    "shard_name",
]


def _size(count: int | None) -> str:
    return "size unknown" if count is None else format_size(count)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def render_search(results: Sequence[ModelSummary]) -> str:
    """One row per model: name, downloads, likes, last update, formats."""
    if not results:
        return "No models found; try other words, or --format any."
    rows = [(result.repo_id, f"{result.downloads:,}", f"{result.likes:,}",
             result.last_modified.date().isoformat() if result.last_modified else "-",
             ", ".join(result.formats) or "-", "gated" if result.gated else "")
            for result in results]
    return "\n".join(text_table(("REPOSITORY", "DOWNLOADS", "LIKES", "UPDATED", "FORMATS", ""), rows, right={1, 2}))


def render_listing(listing: RepoListing) -> str:
    """The model files (GGUF variants with their type, checkpoints) with size and fit mark, then the other files."""
    out = [f"{listing.repo_id} at {listing.revision} (commit {listing.commit[:12]}), "
           f"{_count(len(listing.files), 'file')}, {_size(listing.size)}" + (", gated" if listing.gated else "")]
    if listing.groups:
        rows = []
        for group in listing.groups:
            kind = " ".join(part for part in (group.quant_type, "projector" if group.projector else None) if part)
            kind = kind or ("checkpoint" if group.kind == "safetensors" else "?")
            shards = f"{len(group.files)}/{group.shard_count} shards" if group.shard_count > 1 else ""
            fit = "-" if group.fit is None else group.fit.label
            rows.append((group.name, kind, "?" if group.size is None else format_size(group.size), shards, fit))
        out += ["", *text_table(("FILE", "TYPE", "SIZE", "SHARDS", "FIT"), rows, right={2})]
        marks = [group.fit for group in listing.groups if group.fit is not None and group.fit.fits is not None]
        if marks:
            out += ["", "fit: at a context of 4,096 tokens on this machine; ~ marks an estimate (see --json for why)."]
    if listing.other_files:
        others = ", ".join(f"{file.path} ({_size(file.size)})" for file in listing.other_files)
        out += ["", f"other files: {others}"]
    return "\n".join(out)


def render_download(result: DownloadResult, library_ids: dict[str, str] | None = None) -> str:
    """What was fetched and where each file is, with its library name when it was added to the library."""
    fetched = [file for file in result.files if file.status != "cached"]
    out = [f"{result.repo_id} at {result.revision} (commit {result.commit[:12]}): "
           f"{_count(len(result.files), 'file')}, {len(fetched)} fetched ({format_size(result.bytes_downloaded)}), "
           f"{len(result.files) - len(fetched)} already in the cache"]
    for file in result.files:
        line = f"  {file.local_path}"
        if library_ids and str(file.local_path) in library_ids:
            line += f"  (library: {library_ids[str(file.local_path)]})"
        out.append(line)
    if result.unverified:
        out.append(f"not checksummed (the server published no checksum for them): {', '.join(result.unverified)}")
    if result.checkpoint_dir is not None:
        out.append(f"checkpoint folder, ready for `qdesk quantize`: {result.checkpoint_dir}")
    return "\n".join(out)
