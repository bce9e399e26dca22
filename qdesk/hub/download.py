"""Downloading a repository's files (all, or those matching globs) into the Hugging Face cache.

The listing gives the commit and every file's size and checksum. Files already in the cache (downloaded by
qdesk, huggingface_hub, transformers, llama.cpp's `-hf`…) are found by their blob name and not fetched again, only
checked; the others are fetched by `qdesk.hub.transfer.fetch_blob`, resumably, under huggingface_hub's per-blob
lock. Before the first byte, the disk must hold what is left to fetch. The result names each file's path in the
cache snapshot, which `hf_hub_download(..., local_files_only=True)` and `try_to_load_from_cache` also return.

Without the Hub (offline mode, or no network) the files of the revision already in the cache are returned, with
one sentence saying why (`DownloadResult.offline_note`).
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from converters.core.atomic import check_free_space
from converters.core.errors import Cancelled
from converters.core.jobs import CancelToken, Progress, ProgressFn, no_progress
from converters.core.units import format_size
from qdesk.hub.cache import RepoCache, blob_digest_kind
from qdesk.hub.errors import (
    ChecksumError,
    DownloadCancelled,
    HubError,
    HubNotFoundError,
    HubOfflineError,
    HubUnreachableError,
)
from qdesk.hub.http import file_metadata, is_retryable, translated, wait
from qdesk.hub.listing import RepoFile, check_repo_id, list_repo, select_files
from qdesk.hub.settings import HubSettings
from qdesk.hub.transfer import Expected, TransferMeter, fetch_blob, file_matches

if TYPE_CHECKING:
    from qdesk.library.store import Library, LibraryEntry

__all__ = ["DOWNLOADED", "FROM_CACHE", "RESUMED", "DownloadResult", "DownloadedFile", "add_to_library", "download"]

DOWNLOADED, RESUMED, FROM_CACHE = "downloaded", "resumed", "cached"


@dataclass(frozen=True)
class DownloadedFile:
    """One file of a download: where it is now, and whether it was fetched, resumed or found in the cache."""

    path: str
    """Its path in the repository."""
    local_path: Path
    """Its path in the cache snapshot (a link to the blob)."""
    size: int
    sha256: str | None
    """The SHA-256 it was checked against (LFS files), None for a small file checked by its git blob id."""
    status: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "local_path": str(self.local_path), "size": self.size, "sha256": self.sha256,
                "status": self.status}


@dataclass(frozen=True)
class DownloadResult:
    """The files of `repo_id` at `commit`, all complete and checked, under `snapshot_dir` in `cache_dir`."""

    repo_id: str
    revision: str
    commit: str
    cache_dir: Path
    snapshot_dir: Path
    files: tuple[DownloadedFile, ...]
    bytes_downloaded: int
    offline_note: str | None = None
    """Set when the Hub could not be asked and the files came from the cache: one sentence saying so."""

    @property
    def gguf_files(self) -> list[Path]:
        return [file.local_path for file in self.files if file.path.lower().endswith(".gguf")]

    @property
    def checkpoint_dir(self) -> Path | None:
        """The snapshot folder when it holds a Hugging Face checkpoint (config.json and safetensors weights): ready
        for `qdesk convert` or `qdesk quantize`."""
        names = {file.path for file in self.files}
        if "config.json" in names and any(name.endswith(".safetensors") and "/" not in name for name in names):
            return self.snapshot_dir
        return None

    def to_json(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit,
                "cache_dir": str(self.cache_dir), "snapshot_dir": str(self.snapshot_dir),
                "checkpoint_dir": None if self.checkpoint_dir is None else str(self.checkpoint_dir),
                "bytes_downloaded": self.bytes_downloaded, "offline_note": self.offline_note,
                "files": [file.to_json() for file in self.files]}


def _expected(file: RepoFile) -> Expected:
    return Expected(size=file.size, sha256=file.sha256, git_blob_id=None if file.sha256 else file.blob_id)


def _check_disk(cache: RepoCache, repo_id: str, needed: int) -> None:
    check_free_space(cache.folder, needed, purpose=f"to download {repo_id}",
                     advice="free some space or set HF_HUB_CACHE to a folder on a larger disk")


def _partial_bytes(cache: RepoCache, file: RepoFile) -> int:
    if file.sha256 is None:
        return 0
    with contextlib.suppress(OSError):
        return min(file.size, cache.incomplete_path(file.sha256).stat().st_size)
    return 0


def download(
    repo_id: str,
    *,
    include: Iterable[str] | None = None,
    revision: str | None = None,
    settings: HubSettings | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    keep_partial: bool = True,
    verify_cached: bool = True,
) -> DownloadResult:
    """Download the files of `repo_id` at `revision` (default main) that match the `include` globs (all without
    any) into the Hugging Face cache, and return where they are.

    `progress` gets the bytes done of the whole download (with speed and time left in its message); `cancel` pauses
    it, raising DownloadCancelled: with `keep_partial` (the default) the partial file stays and the next call
    fetches only the rest, without it the partial file is deleted. Ctrl-C does the same. `verify_cached` checks the
    checksum of files found in the cache too (a damaged one is deleted and fetched again).

    Raises HubErrors (not found, gated, unreachable with nothing cached, connection lost: resumable, ChecksumError,
    UnsafeFileNameError) and OutputError (not enough disk space).
    """
    settings = settings or HubSettings.from_environment()
    revision = revision or "main"
    cache = RepoCache(settings.cache_dir, check_repo_id(repo_id))
    cache.ref_path(revision)  # refuses a revision name that is not one
    progress = progress or no_progress
    try:
        listing = list_repo(repo_id, revision=revision, settings=settings, fit=False)
    except (HubOfflineError, HubUnreachableError) as error:
        return _from_cache(settings, cache, revision, include, error, progress, cancel, verify_cached)
    selected = select_files(listing, include)
    if not selected:
        patterns = ", ".join(repr(pattern) for pattern in include or ())
        raise HubNotFoundError(f"No file of {repo_id} matches {patterns}; see its files with "
                               f"`qdesk download {repo_id} --list`.")
    job = _Download(settings, cache, listing.commit, progress, cancel, keep_partial, verify_cached)
    try:
        files = job.run(revision, selected)
    except (KeyboardInterrupt, Cancelled):
        kept = job.partial_bytes() if keep_partial else 0
        if keep_partial:
            message = (f"Download of {repo_id} paused; the {format_size(kept)} already downloaded are kept in the "
                       "cache, so run the same download again to resume.")
        else:
            message = f"Download of {repo_id} cancelled; its partial data was deleted."
        raise DownloadCancelled(message, kept) from None
    return DownloadResult(repo_id=repo_id, revision=revision, commit=listing.commit, cache_dir=settings.cache_dir,
                          snapshot_dir=cache.snapshot_dir(listing.commit), files=tuple(files),
                          bytes_downloaded=job.meter.transferred if job.meter else 0)


class _Download:
    """The files of one commit into the cache, one after the other."""

    def __init__(self, settings: HubSettings, cache: RepoCache, commit: str, progress: ProgressFn,
                 cancel: CancelToken | None, keep_partial: bool, verify_cached: bool) -> None:
        self.settings, self.cache, self.commit = settings, cache, commit
        self.progress, self.cancel = progress, cancel
        self.keep_partial, self.verify_cached = keep_partial, verify_cached
        self.meter: TransferMeter | None = None
        self._current: RepoFile | None = None
        self._current_etag: str | None = None

    def partial_bytes(self) -> int:
        if self._current_etag is None:
            return 0
        with contextlib.suppress(OSError):
            return self.cache.incomplete_path(self._current_etag).stat().st_size
        return 0

    def run(self, revision: str, selected: list[RepoFile]) -> list[DownloadedFile]:
        cached = {file.path: self._cached_blob(file) for file in selected}
        to_fetch = [file for file in selected if cached[file.path] is None]
        _check_disk(self.cache, self.cache.repo_id,
                    sum(file.size - _partial_bytes(self.cache, file) for file in to_fetch))
        self.cache.write_ref(revision, self.commit)
        self.meter = TransferMeter(sum(file.size for file in selected), self.progress)
        done = []
        for file in selected:
            if self.cancel is not None:
                self.cancel.raise_if_cancelled()
            etag = cached[file.path]
            if etag is not None and self._cached_is_sound(file, etag):
                self.meter.add_present(file.size)
                pointer = self.cache.link_snapshot(self.commit, file.path, etag)
                done.append(DownloadedFile(file.path, pointer, file.size, file.sha256, FROM_CACHE))
            else:
                done.append(self._fetch(file))
        self.meter.report("download complete", force=True)
        return done

    def _cached_blob(self, file: RepoFile) -> str | None:
        """The blob name under which the file is already in the cache, if it is."""
        pointer = self.cache.snapshot_path(self.commit, file.path)
        if pointer.is_file():
            etag = self.cache.etag_of(pointer)
            if etag is not None:
                return etag
        if file.sha256 is not None and self.cache.blob_path(file.sha256).is_file():
            return file.sha256
        return None

    def _cached_is_sound(self, file: RepoFile, etag: str) -> bool:
        blob = self.cache.blob_path(etag)
        assert self.meter is not None
        if not self.verify_cached:
            return blob.is_file() and blob.stat().st_size == file.size
        self.meter.report(f"{file.path}: checking the copy already in the cache", force=True)
        if file_matches(blob, _expected(file), self.cancel):
            return True
        blob.unlink(missing_ok=True)  # damaged: never used again; fetched below
        return False

    def _fetch(self, file: RepoFile) -> DownloadedFile:
        from huggingface_hub import hf_hub_url

        assert self.meter is not None
        url = hf_hub_url(self.cache.repo_id, file.path, revision=self.commit, endpoint=self.settings.endpoint)
        etag = self._etag(file, url)
        self._current, self._current_etag = file, etag
        status = RESUMED if self.cache.incomplete_path(etag).exists() else DOWNLOADED
        with self._lock(etag, file.path):
            blob = self.cache.blob_path(etag)
            if blob.is_file() and file_matches(blob, _expected(file), self.cancel):  # another program just fetched it
                self.meter.add_present(file.size)
                status, sha256 = FROM_CACHE, file.sha256
            else:
                sha256 = fetch_blob(self.settings, self.cache, url=url, etag=etag, expected=_expected(file),
                                    name=file.path, meter=self.meter, cancel=self.cancel,
                                    keep_partial=self.keep_partial) or None
            pointer = self.cache.link_snapshot(self.commit, file.path, etag)
        self._current, self._current_etag = None, None
        return DownloadedFile(file.path, pointer, file.size, sha256, status)

    def _etag(self, file: RepoFile, url: str) -> str:
        """The blob name huggingface_hub gives this file: the ETag of its resolve URL (HEAD, retried)."""
        failures = 0
        while True:
            try:
                with translated(self.settings, self.cache.repo_id, revision=self.commit, path=file.path):
                    metadata = file_metadata(self.settings, url)
                break
            except HubError as error:
                failures += 1
                if not is_retryable(error) or failures > self.settings.retry.attempts:
                    raise
                wait(self.settings.retry.delay(failures), self.cancel)
        etag = metadata.etag or file.sha256 or file.blob_id
        if etag is None:
            raise HubError(f"The Hub gave no checksum for {file.path}; try again later.")
        if file.sha256 is not None and blob_digest_kind(etag) == "sha256" and etag.lower() != file.sha256:
            raise ChecksumError(f"The Hub announced two different checksums for {file.path}; try again later.")
        if metadata.size is not None and metadata.size != file.size:
            raise HubError(f"The Hub announced two different sizes for {file.path}; try again later.")
        return etag

    @contextlib.contextmanager
    def _lock(self, etag: str, name: str) -> Iterator[None]:
        from filelock import Timeout

        assert self.meter is not None
        while True:
            try:
                with self.cache.locked(etag, timeout_s=1.0):
                    yield
                return
            except Timeout:
                if self.cancel is not None:
                    self.cancel.raise_if_cancelled()
                self.meter.report(f"{name}: waiting for another program that is downloading it", force=True)


def _from_cache(settings: HubSettings, cache: RepoCache, revision: str, include: Iterable[str] | None,
                reason: HubError, progress: ProgressFn, cancel: CancelToken | None, verify: bool) -> DownloadResult:
    repo_id = cache.repo_id
    commit = cache.commit_for(revision)
    paths = cache.snapshot_files(commit) if commit else []
    patterns = [pattern.lower() for pattern in include or ()]
    if patterns:
        paths = [path for path in paths if any(fnmatch.fnmatchcase(path.lower(), p) for p in patterns)]
    if commit is None or not paths:
        missing = f"{repo_id} ({revision}) is not in the cache ({cache.root})"
        if isinstance(reason, HubOfflineError):
            raise HubOfflineError(f"Offline mode is on (HF_HUB_OFFLINE is set) and {missing}; unset HF_HUB_OFFLINE "
                                  "to download it.") from reason
        raise HubUnreachableError(f"The Hugging Face Hub at {settings.endpoint} cannot be reached (no network, or the "
                                  f"server is down) and {missing}; check the connection and try again.") from reason
    files = []
    for path in paths:
        if cancel is not None:
            cancel.raise_if_cancelled()
        pointer = cache.snapshot_path(commit, path)
        size = pointer.stat().st_size
        etag = cache.etag_of(pointer)
        kind = blob_digest_kind(etag) if etag else None
        progress(Progress(len(files), len(paths), "files", f"{path}: checking the copy in the cache"))
        if verify and etag is not None and kind is not None:
            expected = Expected(size, sha256=etag if kind == "sha256" else None,
                                git_blob_id=etag if kind == "git-sha1" else None)
            if not file_matches(cache.blob_path(etag), expected, cancel):
                cache.blob_path(etag).unlink(missing_ok=True)
                raise ChecksumError(f"The cached copy of {path} is damaged and was deleted, and the Hub cannot be "
                                    "reached to fetch it again; download it again once online.")
        files.append(DownloadedFile(path, pointer, size, etag if kind == "sha256" else None, FROM_CACHE))
    if isinstance(reason, HubOfflineError):
        note = (f"Offline mode is on (HF_HUB_OFFLINE), so the Hub was not contacted; using the {len(files)} files of "
                f"{repo_id} already in the cache.")
    else:
        note = (f"The Hugging Face Hub cannot be reached (no network, or the server is down); using the "
                f"{len(files)} files of {repo_id} already in the cache.")
    return DownloadResult(repo_id=repo_id, revision=revision, commit=commit, cache_dir=cache.root,
                          snapshot_dir=cache.snapshot_dir(commit), files=tuple(files), bytes_downloaded=0,
                          offline_note=note)


def add_to_library(result: DownloadResult, library: Library | None = None) -> list[LibraryEntry]:
    """Register the Hugging Face cache in the model library (read-only, as `qdesk models scan` does) and return the
    library entries of the GGUF files downloaded. Projectors and the later shards of a set are entries too (the
    library lists every GGUF file)."""
    from qdesk.library.store import Library

    if not result.gguf_files:
        return []
    library = library or Library()
    library.register_folder(result.cache_dir, label="hf-cache")
    wanted = {path.resolve() for path in result.gguf_files}
    return [entry for entry in library.entries() if entry.path.resolve() in wanted]
