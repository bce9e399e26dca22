"""Downloading a repository's files (all, or those matching globs) into the Hugging Face cache.

The listing gives the commit and, on the Hub, every file's size and checksum. Files already in the cache
(downloaded by qdesk, huggingface_hub, transformers, llama.cpp's `-hf`…) are found with huggingface_hub's
`try_to_load_from_cache` and not fetched again, only checked. For the others, a HEAD of each file's resolve URL
(`get_hf_file_metadata`, as `hf_hub_download` does) gives the ETag that names its blob and the size the server will
send, which governs over the listing's. Before the first byte the disk must hold what is left to fetch.

Then each file is fetched:

* a small file (at most `SMALL_FILE_BYTES`: configs, READMEs, small tokenizer files) by huggingface_hub's own
  `hf_hub_download`, then checked: none of what qdesk's transfer adds matters for it (a pause loses at most a few
  hundred kilobytes, and it is over before a cancel would take effect);
* any other by `qdesk.hub.transfer.fetch_blob`, resumably, under huggingface_hub's per-blob lock (see docs/hub.md
  for why `hf_hub_download` cannot do this one).

Each file is checked against the best checksum its server published (`qdesk.hub.checksums`); the result says which
files could not be checksummed. Without the Hub (offline mode, or no network) the files of the revision already in
the cache are returned instead (`qdesk.hub.offline`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from converters.core.atomic import check_free_space
from converters.core.errors import Cancelled
from converters.core.jobs import CancelToken, ProgressFn, no_progress
from converters.core.units import format_size
from qdesk.hub.cache import RepoCache
from qdesk.hub.checksums import SHA256, Checksum, Expected, checksum_from_etag, file_matches
from qdesk.hub.errors import (
    ChecksumError,
    DownloadCancelled,
    HubError,
    HubNotFoundError,
    HubOfflineError,
    HubUnreachableError,
    no_file_matches,
)
from qdesk.hub.http import file_metadata, is_retryable, library_requests, translated, wait
from qdesk.hub.listing import RepoFile, check_repo_id, list_repo, select_files
from qdesk.hub.offline import download_from_cache
from qdesk.hub.results import DOWNLOADED, FROM_CACHE, RESUMED, DownloadedFile, DownloadResult
from qdesk.hub.settings import HubSettings
from qdesk.hub.transfer import TransferMeter, fetch_blob

if TYPE_CHECKING:
    from qdesk.library.store import Library, LibraryEntry

__all__ = ["SMALL_FILE_BYTES", "add_to_library", "download"]

SMALL_FILE_BYTES = 1024 * 1024
"""Files up to this size are fetched by `hf_hub_download`; larger ones by qdesk's resumable transfer."""

T = TypeVar("T")


@dataclass(frozen=True)
class _Remote:
    """What the server says of a file before it is fetched: where it is, the ETag naming its blob, and what it must
    turn out to be."""

    url: str
    etag: str
    expected: Expected


def _check_disk(cache: RepoCache, repo_id: str, needed: int) -> None:
    check_free_space(cache.folder, needed, purpose=f"to download {repo_id}",
                     advice="free some space or set HF_HUB_CACHE to a folder on a larger disk")


def _listed_checksum(file: RepoFile) -> Checksum | None:
    return Checksum(SHA256, file.sha256, "listing") if file.sha256 else None


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
    checksum of files found in the cache too (a damaged one is deleted and fetched again). A file whose server
    published no checksum is downloaded unchecked, and the result says so (`DownloadResult.unverified`).

    Raises HubErrors (not found, gated, unreachable with nothing cached, connection lost: resumable, ChecksumError,
    UnsafeFileNameError) and OutputError (not enough disk space).
    """
    settings = settings or HubSettings.from_environment()
    revision = revision or "main"
    patterns = list(include or ())
    cache = RepoCache(settings.cache_dir, check_repo_id(repo_id))
    cache.ref_path(revision)  # refuses a revision name that is not one
    progress = progress or no_progress
    try:
        listing = list_repo(repo_id, revision=revision, settings=settings, fit=False)
    except (HubOfflineError, HubUnreachableError) as error:
        return download_from_cache(settings, repo_id, revision, patterns, error, progress, cancel, verify_cached)
    selected = select_files(listing, patterns)
    if not selected:
        raise HubNotFoundError(f"{no_file_matches(repo_id, patterns)}; see its files with "
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
        self._current_etag: str | None = None

    def partial_bytes(self) -> int:
        if self._current_etag is None:
            return 0
        with contextlib.suppress(OSError, HubError):
            return self.cache.incomplete_path(self._current_etag).stat().st_size
        return 0

    def _partial_size(self, etag: str) -> int:
        with contextlib.suppress(OSError):
            return self.cache.incomplete_path(etag).stat().st_size
        return 0

    def run(self, revision: str, selected: list[RepoFile]) -> list[DownloadedFile]:
        in_cache = {file.path: self._cached_blob(file) for file in selected}
        remote: dict[str, _Remote] = {}
        for file in selected:
            if in_cache[file.path] is None:
                if self.cancel is not None:
                    self.cancel.raise_if_cancelled()
                remote[file.path] = self._remote(file)
        _check_disk(self.cache, self.cache.repo_id,
                    sum(max(0, (item.expected.size or 0) - self._partial_size(item.etag)) for item in remote.values()))
        self.cache.write_ref(revision, self.commit)
        cached_sizes = {path: self._blob_size(etag) for path, etag in in_cache.items() if etag is not None}
        self.meter = TransferMeter(sum(cached_sizes.values()) + sum(item.expected.size or 0
                                                                    for item in remote.values()), self.progress)
        done = []
        for file in selected:
            if self.cancel is not None:
                self.cancel.raise_if_cancelled()
            etag = in_cache[file.path]
            if etag is not None and (found := self._sound_cached_file(file, etag)) is not None:
                self.meter.add_present(found.size)
                done.append(found)
                continue
            if etag is not None:  # damaged and deleted: no longer counted as present
                self.meter.total -= cached_sizes[file.path]
            if file.path not in remote:
                remote[file.path] = self._remote(file)
                self.meter.total += remote[file.path].expected.size or 0
            done.append(self._fetch(file, remote[file.path]))
        self.meter.report("download complete", force=True)
        return done

    # --- files already in the cache ---

    def _cached_blob(self, file: RepoFile) -> str | None:
        """The blob name under which the file is already in the cache, if it is."""
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(self.cache.repo_id, file.path, cache_dir=self.cache.root, revision=self.commit)
        if isinstance(found, str) and (etag := self.cache.etag_of(Path(found))) is not None:
            return etag
        if file.sha256 is not None and self.cache.blob_path(file.sha256).is_file():
            return file.sha256
        return None

    def _blob_size(self, etag: str) -> int:
        with contextlib.suppress(OSError):
            return self.cache.blob_path(etag).stat().st_size
        return 0

    def _sound_cached_file(self, file: RepoFile, etag: str) -> DownloadedFile | None:
        """The cached copy, linked into this commit's snapshot, when it is sound (deleted when it is damaged)."""
        assert self.meter is not None
        blob = self.cache.blob_path(etag)
        size = self._blob_size(etag)
        checksum = _listed_checksum(file) or checksum_from_etag(etag, size)
        expected = Expected(file.size, checksum)
        if self.verify_cached and checksum is not None:
            self.meter.report(f"{file.path}: checking the copy already in the cache", force=True)
            sound = file_matches(blob, expected, self.cancel)
        else:
            sound = file_matches(blob, Expected(file.size), self.cancel)
            checksum = None
        if not sound:
            blob.unlink(missing_ok=True)  # damaged: never used again; fetched instead
            return None
        pointer = self.cache.link_snapshot(self.commit, file.path, etag)
        return DownloadedFile(file.path, pointer, size, expected.sha256 if checksum else None, FROM_CACHE,
                              checksum.kind if checksum else None)

    # --- files to fetch ---

    def _retried(self, attempt: Callable[[], T]) -> T:
        """`attempt()`, tried again after a retryable error while the retry policy allows."""
        failures = 0
        while True:
            try:
                return attempt()
            except HubError as error:
                failures += 1
                if not is_retryable(error) or failures > self.settings.retry.attempts:
                    raise
                wait(self.settings.retry.delay(failures), self.cancel)

    def _remote(self, file: RepoFile) -> _Remote:
        """What a HEAD of the file's resolve URL says (retried): the ETag naming its blob (as huggingface_hub names
        it), its size (which governs over the listing's), and the checksum it must have."""
        from huggingface_hub import hf_hub_url

        url = hf_hub_url(self.cache.repo_id, file.path, revision=self.commit, endpoint=self.settings.endpoint)

        def head() -> _Remote:
            with translated(self.settings, self.cache.repo_id, revision=self.commit, path=file.path):
                metadata = file_metadata(self.settings, url)
            etag = metadata.etag or file.sha256
            if etag is None:
                raise HubError(f"The server gave no ETag for {file.path}, so it cannot be stored in the Hugging Face "
                               "cache; try again later, or use another mirror.")
            self.cache.blob_path(etag)  # refuses an ETag that cannot name a file
            size = metadata.size if metadata.size is not None else file.size
            from_etag = checksum_from_etag(etag, size)
            listed = _listed_checksum(file)
            if listed is not None and from_etag is not None and from_etag.kind == SHA256 and \
                    from_etag.value != listed.value:
                raise ChecksumError(f"The Hub announced two different checksums for {file.path}; try again later.")
            return _Remote(url, etag, Expected(size, listed or from_etag))

        return self._retried(head)

    def _fetch(self, file: RepoFile, remote: _Remote) -> DownloadedFile:
        assert self.meter is not None
        partial = self.cache.incomplete_path(remote.etag)
        size = remote.expected.size
        if size is not None and size <= SMALL_FILE_BYTES and not partial.exists():
            return self._fetch_small(file, remote)
        self._current_etag = remote.etag
        with self._lock(remote.etag, file.path):
            blob = self.cache.blob_path(remote.etag)
            if blob.is_file() and file_matches(blob, remote.expected, self.cancel):  # another program just did it
                size = blob.stat().st_size
                self.meter.add_present(size)
                status = FROM_CACHE
            else:
                fetched = fetch_blob(self.settings, self.cache, url=remote.url, etag=remote.etag,
                                     expected=remote.expected, name=file.path, meter=self.meter, cancel=self.cancel,
                                     keep_partial=self.keep_partial)
                size, status = fetched.size, RESUMED if fetched.resumed_from else DOWNLOADED
            pointer = self.cache.link_snapshot(self.commit, file.path, remote.etag)
        self._current_etag = None
        return self._downloaded(file, pointer, size, status, remote.expected.checksum)

    def _fetch_small(self, file: RepoFile, remote: _Remote) -> DownloadedFile:
        """A small file through `hf_hub_download` (silent: qdesk reports the progress), then checked: a damaged
        copy is deleted, blob and snapshot link, and raises ChecksumError."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import silent_tqdm

        from qdesk import __version__

        assert self.meter is not None
        self.meter.current = file.path

        def fetch() -> str:
            with translated(self.settings, self.cache.repo_id, revision=self.commit, path=file.path), \
                    library_requests(self.settings):
                return str(hf_hub_download(
                    self.cache.repo_id, file.path, revision=self.commit, cache_dir=self.cache.root,
                    endpoint=self.settings.endpoint, token=self.settings.token or False,
                    etag_timeout=self.settings.timeout_s, library_name="qdesk", library_version=__version__,
                    tqdm_class=silent_tqdm))

        pointer = Path(self._retried(fetch))
        etag = self.cache.etag_of(pointer) or remote.etag
        blob = self.cache.blob_path(etag)
        if not file_matches(blob, remote.expected, self.cancel):
            blob.unlink(missing_ok=True)
            pointer.unlink(missing_ok=True)
            label = remote.expected.checksum.label if remote.expected.checksum else "size"
            raise ChecksumError(f"{file.path} arrived damaged: its {label} is not the one the server published; the "
                                "bad copy was deleted, so run the download again.")
        size = blob.stat().st_size
        self.meter.advance(size)
        return self._downloaded(file, pointer, size, DOWNLOADED, remote.expected.checksum)

    @staticmethod
    def _downloaded(file: RepoFile, pointer: Path, size: int, status: str,
                    checksum: Checksum | None) -> DownloadedFile:
        sha256 = checksum.value if checksum is not None and checksum.kind == SHA256 else None
        return DownloadedFile(file.path, pointer, size, sha256, status, checksum.kind if checksum else None)

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


def add_to_library(result: DownloadResult, library: Library | None = None) -> list[LibraryEntry]:
    """Register the Hugging Face cache in the model library (read-only, as `qdesk models scan` does) and return the
    library entries of the GGUF files downloaded. Projectors and the later shards of a set are entries too (the
    library lists every GGUF file)."""
    from qdesk.library.store import Library

    if not result.gguf_files:
        return []
    library = library or Library()
    library.register_hf_cache(result.cache_dir)
    wanted = {path.resolve() for path in result.gguf_files}
    return [entry for entry in library.entries() if entry.path.resolve() in wanted]
