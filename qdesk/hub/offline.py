"""A download without the Hub (offline mode, no network, the server down): the files of the revision that are
already in the cache, found by huggingface_hub.

`snapshot_download(local_files_only=True, allow_patterns=…)` resolves the revision (a branch or tag through its ref,
or a commit) to its snapshot folder without a request, and `try_to_load_from_cache` gives each file's place in it.
Each file found is checked against what its blob's name promises (a SHA-256 or a git blob id; see
`qdesk.hub.checksums`) unless `verify` is off; a damaged one is deleted, since it cannot be fetched again now.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from converters.core.jobs import CancelToken, Progress, ProgressFn
from qdesk.hub.cache import COMMIT_PATTERN, RepoCache
from qdesk.hub.checksums import SHA256, Expected, checksum_from_etag, file_matches
from qdesk.hub.errors import (
    ChecksumError,
    HubError,
    HubOfflineError,
    HubUnreachableError,
    no_file_matches,
)
from qdesk.hub.names import matches_any
from qdesk.hub.results import FROM_CACHE, DownloadedFile, DownloadResult
from qdesk.hub.settings import HubSettings

__all__ = ["download_from_cache"]


def _snapshot_folder(cache: RepoCache, revision: str, patterns: Sequence[str]) -> Path | None:
    """The revision's snapshot folder in the cache, None when the cache does not hold it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(cache.repo_id, revision=revision, cache_dir=cache.root, local_files_only=True,
                                   allow_patterns=list(patterns) or None)
    except IncompleteSnapshotError as incomplete:  # some files huggingface_hub listed are missing: use the others
        folder = incomplete.snapshot_path
    except LocalEntryNotFoundError:
        return None
    path = Path(folder)
    return path if COMMIT_PATTERN.match(path.name) and path.is_dir() else None


def _snapshot_paths(folder: Path) -> list[str]:
    """The repository paths of the complete files in a snapshot folder (dangling links left out)."""
    return [path.relative_to(folder).as_posix() for path in sorted(folder.rglob("*")) if path.is_file()]


def _refusal(settings: HubSettings, reason: HubError, what: str) -> HubError:
    if isinstance(reason, HubOfflineError):
        return HubOfflineError(f"Offline mode is on (HF_HUB_OFFLINE is set) and {what}; unset HF_HUB_OFFLINE to "
                               "download it.")
    return HubUnreachableError(f"The Hugging Face Hub at {settings.endpoint} cannot be reached (no network, or the "
                               f"server is down) and {what}; check the connection and try again.")


def download_from_cache(settings: HubSettings, repo_id: str, revision: str, include: Sequence[str], reason: HubError,
                        progress: ProgressFn, cancel: CancelToken | None, verify: bool) -> DownloadResult:
    """The files of `repo_id` at `revision` matching `include` (all without any) that the cache holds, with one
    sentence saying why the Hub was not asked (`offline_note`); `reason` (the HubOfflineError or
    HubUnreachableError that stopped the listing) with the cache's story when it holds none."""
    from huggingface_hub import try_to_load_from_cache

    cache = RepoCache(settings.cache_dir, repo_id)
    folder = _snapshot_folder(cache, revision, include)
    if folder is None:
        raise _refusal(settings, reason, f"{repo_id} ({revision}) is not in the cache ({cache.root})") from reason
    commit = folder.name
    paths = [path for path in _snapshot_paths(folder) if not include or matches_any(path, include)]
    if not paths:
        what = (no_file_matches(repo_id, include, in_cache=True) if include else
                f"{repo_id} ({revision}) is not in the cache ({cache.root})")
        raise _refusal(settings, reason, what[0].lower() + what[1:]) from reason
    files = []
    for path in paths:
        if cancel is not None:
            cancel.raise_if_cancelled()
        found = try_to_load_from_cache(repo_id, path, cache_dir=cache.root, revision=commit)
        pointer = Path(found) if isinstance(found, str) else cache.snapshot_path(commit, path)
        size = pointer.stat().st_size
        etag = cache.etag_of(pointer)
        checksum = checksum_from_etag(etag, size)
        progress(Progress(len(files), len(paths), "files", f"{path}: checking the copy in the cache"))
        damaged = (verify and etag is not None and checksum is not None
                   and not file_matches(cache.blob_path(etag), Expected(size, checksum), cancel))
        if damaged and etag is not None:
            cache.blob_path(etag).unlink(missing_ok=True)
            raise ChecksumError(f"The cached copy of {path} is damaged and was deleted, and the Hub cannot be "
                                "reached to fetch it again; download it again once online.")
        files.append(DownloadedFile(path, pointer, size, checksum.value if checksum and checksum.kind == SHA256
                                    else None, FROM_CACHE, checksum.kind if verify and checksum else None))
    if isinstance(reason, HubOfflineError):
        note = (f"Offline mode is on (HF_HUB_OFFLINE), so the Hub was not contacted; using the {len(files)} files of "
                f"{repo_id} already in the cache.")
    else:
        note = (f"The Hugging Face Hub cannot be reached (no network, or the server is down); using the "
                f"{len(files)} files of {repo_id} already in the cache.")
    return DownloadResult(repo_id=repo_id, revision=revision, commit=commit, cache_dir=cache.root,
                          snapshot_dir=folder, files=tuple(files), bytes_downloaded=0, offline_note=note)
