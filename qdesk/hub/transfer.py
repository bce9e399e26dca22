"""One file from the Hub into the cache: resumable, retried, checked, and only then named as the blob.

The bytes go to `blobs/<etag>.incomplete`. A later call (after a pause, a lost connection or a killed process)
asks the server for the rest only (`Range: bytes=<size of the partial file>-`); the bytes already there are read
once to carry on the checksum. When the file is whole its SHA-256 (LFS files; the Hub's published checksum) or git
blob id (small files) is compared with what the Hub announced; a mismatch deletes the partial file and raises
ChecksumError, so a damaged file never takes the blob's name.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from converters.core.atomic import describe_os_error
from converters.core.errors import OutputError
from converters.core.jobs import CancelToken, Progress, ProgressFn
from converters.core.units import format_duration, format_size
from qdesk.hub.cache import Digest, RepoCache, git_blob_id
from qdesk.hub.errors import ChecksumError, DownloadCancelled, HubConnectionError, HubError
from qdesk.hub.http import interrupt, is_retryable, open_stream, translated, wait
from qdesk.hub.settings import HubSettings

if TYPE_CHECKING:
    import httpx2

__all__ = ["Expected", "TransferMeter", "fetch_blob", "file_matches"]

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclass(frozen=True)
class Expected:
    """What the Hub announced for a file: its size and checksum (SHA-256 for LFS files, else the git blob id)."""

    size: int
    sha256: str | None = None
    git_blob_id: str | None = None

    def new_digest(self) -> Digest:
        return hashlib.sha256() if self.sha256 or not self.git_blob_id else git_blob_id(self.size)

    def check(self, digest: Digest, name: str) -> str:
        """The SHA-256 when it was the one computed (else ""); ChecksumError when the digest differs."""
        value = digest.hexdigest()
        wanted = self.sha256 or self.git_blob_id
        if wanted is not None and value != wanted.lower():
            kind = "SHA-256" if self.sha256 else "git blob id"
            raise ChecksumError(f"{name} arrived damaged: its {kind} is {value[:12]}… but the Hub published "
                                f"{wanted[:12]}…; the bad copy was deleted, so run the download again.")
        return value if self.sha256 or not self.git_blob_id else ""


def file_matches(path: Path, expected: Expected, cancel: CancelToken | None = None) -> bool:
    """Whether the file at `path` has the expected size and checksum (read in full)."""
    try:
        if path.stat().st_size != expected.size:
            return False
        digest = expected.new_digest()
        with path.open("rb") as file:
            while block := file.read(4 * 1024 * 1024):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                digest.update(block)
    except OSError:
        return False
    wanted = expected.sha256 or expected.git_blob_id
    return wanted is None or digest.hexdigest() == wanted.lower()


class TransferMeter:
    """Bytes done of a whole download (files found in the cache and partial files count as done), the speed over
    the last seconds and the time left, reported as `Progress(done, total, "bytes", message)`."""

    def __init__(self, total_bytes: int, progress: ProgressFn, *, window_s: float = 5.0,
                 interval_s: float = 0.1, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total_bytes
        self.done = 0
        self.transferred = 0
        self.current = ""
        self._progress = progress
        self._window_s = window_s
        self._interval_s = interval_s
        self._clock = clock
        self._samples: collections.deque[tuple[float, int]] = collections.deque([(clock(), 0)])
        self._last_report = 0.0

    def add_present(self, count: int) -> None:
        """Bytes already on disk: done, but not transferred (they do not count toward the speed)."""
        self.done += count

    def discard(self, count: int) -> None:
        """Bytes counted as done that were thrown away (a partial file the server would not resume)."""
        self.done -= count

    def advance(self, count: int) -> None:
        self.done += count
        self.transferred += count
        self.report()

    def bytes_per_second(self) -> float | None:
        now = self._clock()
        self._samples.append((now, self.transferred))
        while len(self._samples) > 2 and now - self._samples[0][0] > self._window_s:
            self._samples.popleft()
        started, transferred_then = self._samples[0]
        if now - started < 0.2:
            return None
        return (self.transferred - transferred_then) / (now - started)

    def report(self, message: str | None = None, *, force: bool = False) -> None:
        now = self._clock()
        if not force and message is None and now - self._last_report < self._interval_s:
            return
        self._last_report = now
        if message is None:
            speed = self.bytes_per_second()
            message = self.current
            if speed:
                message += f": {format_size(speed)}/s"
                if self.total > self.done:
                    message += f", {format_duration((self.total - self.done) / speed)} left"
        self._progress(Progress(self.done, self.total, "bytes", message))


def _resume_offset(partial: Path, expected: Expected) -> int:
    try:
        size = partial.stat().st_size
    except FileNotFoundError:
        return 0
    if size > expected.size:  # not a prefix of this file: start again
        os.truncate(partial, 0)
        return 0
    return size


def _hash_prefix(partial: Path, length: int, digest: Digest, cancel: CancelToken | None) -> None:
    with partial.open("rb") as file:
        left = length
        while left > 0:
            if cancel is not None:
                cancel.raise_if_cancelled()
            block = file.read(min(left, 4 * 1024 * 1024))
            if not block:
                raise OSError(errno.EIO, f"{partial} shrank while being read")
            digest.update(block)
            left -= len(block)


def _range_start(response: httpx2.Response) -> int:
    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
    if match is None:
        raise HubError("The Hub answered a resumed download without saying which bytes it sent; run the download "
                       "again.")
    return int(match.group(1))


class _EndedEarly(Exception):
    """The server closed the body before the file's last byte (a network error: retried)."""


def fetch_blob(
    settings: HubSettings,
    cache: RepoCache,
    *,
    url: str,
    etag: str,
    expected: Expected,
    name: str,
    meter: TransferMeter,
    cancel: CancelToken | None = None,
    keep_partial: bool = True,
) -> str:
    """Download `url` into the blob `etag` of `cache`, resuming a partial file; returns the SHA-256 it verified ("" for
    a small file checked by its git blob id). A network error is retried with exponential backoff while the retries
    last, then raised as HubConnectionError; the partial file stays for a later call unless `keep_partial` is False
    (then it is deleted on any failure or cancel). A damaged download is always deleted."""
    partial = cache.incomplete_path(etag)
    blob = cache.blob_path(etag)
    partial.parent.mkdir(parents=True, exist_ok=True)
    meter.current = name
    try:
        return _fetch(settings, url, partial, blob, expected, name, meter, cancel, keep_partial)
    except ChecksumError:
        partial.unlink(missing_ok=True)
        raise
    except BaseException:
        if not keep_partial:
            partial.unlink(missing_ok=True)
        raise


def _fetch(settings: HubSettings, url: str, partial: Path, blob: Path, expected: Expected, name: str,
           meter: TransferMeter, cancel: CancelToken | None, keep_partial: bool) -> str:
    def then(done: int) -> str:
        if keep_partial:
            return (f"the {format_size(done)} already downloaded are kept, so run the same download again to "
                    "resume")
        return "the partial file was deleted, so run the download again"

    offset = _resume_offset(partial, expected)
    digest = expected.new_digest()
    if offset:
        meter.report(f"{name}: checking the {format_size(offset)} already downloaded", force=True)
        _hash_prefix(partial, offset, digest, cancel)
    meter.add_present(offset)
    failures = 0
    while offset < expected.size or not partial.exists():
        start = offset
        unsubscribe = None
        try:
            def close_on_cancel(response: httpx2.Response) -> None:
                nonlocal unsubscribe
                if cancel is not None:
                    unsubscribe = cancel.subscribe(lambda: interrupt(response))

            with translated(settings, None), \
                    open_stream(settings, url, start=offset, on_open=close_on_cancel) as response:
                if offset and response.status_code == 200:  # the server ignored the Range header: start again
                    meter.discard(offset)
                    offset, digest = 0, expected.new_digest()
                elif offset and _range_start(response) != offset:
                    raise HubError(f"The Hub sent {name} from the wrong place when resuming; run the download again.")
                with partial.open("r+b" if offset else "wb") as out:
                    out.seek(offset)
                    out.truncate()
                    for chunk in response.iter_bytes():  # as the bytes arrive: a pause keeps them all
                        if cancel is not None and cancel.cancelled:
                            raise DownloadCancelled("cancelled by the user", offset)
                        out.write(chunk)
                        out.flush()
                        digest.update(chunk)
                        offset += len(chunk)
                        meter.advance(len(chunk))
                        if offset > expected.size:
                            raise ChecksumError(f"{name} arrived damaged: the Hub sent more than its "
                                                f"{expected.size:,} bytes; the bad copy was deleted, so run the "
                                                "download again.")
            if offset < expected.size:
                raise _EndedEarly
        except (DownloadCancelled, ChecksumError):
            raise
        except OSError as error:
            if cancel is not None and cancel.cancelled:
                raise DownloadCancelled("cancelled by the user", offset) from None
            if error.errno == errno.ENOSPC:
                raise OutputError(f"The disk filled up while downloading {name} into {partial.parent}: free some "
                                  f"space; {then(offset)}.") from error
            raise OutputError(describe_os_error(error, partial)) from error
        except Exception as error:
            if cancel is not None and cancel.cancelled:
                raise DownloadCancelled("cancelled by the user", offset) from None
            if not (isinstance(error, _EndedEarly) or is_retryable(error)):
                raise
            failures = 1 if offset > start else failures + 1
            if failures > settings.retry.attempts:
                raise HubConnectionError(
                    f"The connection to the Hub was lost while downloading {name} ({format_size(offset)} of "
                    f"{format_size(expected.size)}) and {settings.retry.attempts} retries failed; {then(offset)}."
                ) from error
            delay = settings.retry.delay(failures)
            meter.report(f"{name}: connection lost, retrying in {format_duration(delay)}", force=True)
            wait(delay, cancel)
        finally:
            if unsubscribe is not None:
                unsubscribe()
    sha256 = expected.check(digest, name)
    os.replace(partial, blob)  # created by open(), so its mode already follows the umask, as huggingface_hub's do
    return sha256
