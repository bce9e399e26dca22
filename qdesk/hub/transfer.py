"""One file from the Hub into the cache: resumable, retried, checked, and only then named as the blob.

The bytes go to `blobs/<etag>.incomplete`. A later call (after a pause, a lost connection or a killed process)
asks the server for the rest only (`Range: bytes=<size of the partial file>-`); the bytes already there are read
once to carry on the checksum. A server that ignores the Range header (it answers 200 with the whole file) gets a
fresh start: the partial file is rewritten from its first byte. When the file is whole it is compared with the
checksum its server published (see `qdesk.hub.checksums`); a mismatch deletes the partial file and raises
ChecksumError, so a damaged file never takes the blob's name. A size nobody announced before the transfer is taken
from the response's headers (Content-Range, else Content-Length); without either, the file ends where the body
ends.

qdesk does this itself rather than through `hf_hub_download` for the reasons docs/hub.md gives (resuming after a
pause or a killed process, a cancel from another thread, progress callbacks, the checksum before the blob is named);
small files, where none of that matters, go through `hf_hub_download` (`qdesk.hub.download`).
"""

from __future__ import annotations

import collections
import errno
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
from qdesk.hub.cache import RepoCache
from qdesk.hub.checksums import Digest, Expected
from qdesk.hub.errors import ChecksumError, DownloadCancelled, HubConnectionError, HubError
from qdesk.hub.http import interrupt, is_retryable, open_stream, translated, wait
from qdesk.hub.settings import HubSettings

if TYPE_CHECKING:
    import httpx2

__all__ = ["FetchedBlob", "TransferMeter", "fetch_blob"]

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_UNSATISFIED_RANGE = re.compile(r"^bytes \*/(\d+)$")
_RANGE_NOT_SATISFIABLE = 416


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

    def expect(self, count: int) -> None:
        """Bytes of a file whose size was learned only when its transfer began."""
        self.total += count

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


def _resume_offset(partial: Path, size: int | None) -> int:
    try:
        length = partial.stat().st_size
    except FileNotFoundError:
        return 0
    if size is not None and length > size:  # not a prefix of this file: start again
        os.truncate(partial, 0)
        return 0
    return length


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


def _announced_size(response: httpx2.Response) -> int | None:
    """The whole file's size as the response's headers give it: Content-Range's total for a part, Content-Length
    for the whole (unless the body is encoded); None when they do not say."""
    if response.status_code == 206:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        return int(match.group(3)) if match is not None and match.group(3) != "*" else None
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    length = response.headers.get("Content-Length", "")
    return int(length) if length.isdigit() and encoding in ("", "identity") else None


def _unsatisfied_range_size(error: BaseException) -> int | None:
    """For a 416 answer to a resumed request (the partial file is as long as the file, or longer): the size the
    server gives in `Content-Range: bytes */<size>` (-1 when it gives none); None for any other error."""
    from huggingface_hub.errors import HfHubHTTPError

    cause = error.__cause__ if isinstance(error, HubError) else error
    if not isinstance(cause, HfHubHTTPError) or cause.response is None:
        return None
    if cause.response.status_code != _RANGE_NOT_SATISFIABLE:
        return None
    match = _UNSATISFIED_RANGE.match(cause.response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match is not None else -1


@dataclass(frozen=True)
class FetchedBlob:
    """A blob now in the cache: its size, and where the transfer that completed it started (0: from the first
    byte; more: it carried on a partial file)."""

    size: int
    resumed_from: int


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
) -> FetchedBlob:
    """Download `url` into the blob `etag` of `cache`, resuming a partial file. A network error
    is retried with exponential backoff while the retries last, then raised as HubConnectionError; the partial file
    stays for a later call unless `keep_partial` is False (then it is deleted on any failure or cancel). A damaged
    download is always deleted."""
    partial = cache.incomplete_path(etag)
    blob = cache.blob_path(etag)
    partial.parent.mkdir(parents=True, exist_ok=True)
    meter.current = name
    try:
        return _Transfer(settings, url, partial, expected, name, meter, cancel, keep_partial).run(blob)
    except ChecksumError:
        partial.unlink(missing_ok=True)
        raise
    except BaseException:
        if not keep_partial:
            partial.unlink(missing_ok=True)
        raise


class _Transfer:
    """The bytes of one file into its partial file, then checked and renamed to the blob."""

    def __init__(self, settings: HubSettings, url: str, partial: Path, expected: Expected, name: str,
                 meter: TransferMeter, cancel: CancelToken | None, keep_partial: bool) -> None:
        self.settings, self.url, self.partial, self.expected, self.name = settings, url, partial, expected, name
        self.meter, self.cancel, self.keep_partial = meter, cancel, keep_partial
        self.size = expected.size
        self.offset = 0
        self.digest = expected.new_digest()
        self.resumed_from = 0
        self.unsized_total = 0
        """While the size is unknown: the bytes this file added to the meter's total (those seen so far)."""

    def then(self) -> str:
        if self.keep_partial:
            return (f"the {format_size(self.offset)} already downloaded are kept, so run the same download again to "
                    "resume")
        return "the partial file was deleted, so run the download again"

    def restart(self) -> None:
        """Start again from the first byte (the counted bytes are taken off the meter)."""
        self.meter.discard(self.offset)
        self.offset, self.resumed_from, self.digest = 0, 0, self.expected.new_digest()
        with self.partial.open("wb"):
            pass

    def learn_size(self, announced: int | None) -> None:
        if announced is None:
            return
        if self.size is None:
            self.size = announced
            self.meter.expect(announced - self.unsized_total)
            if self.offset > announced:
                self.restart()
        elif announced != self.size:
            raise HubError(f"The server announced {self.size:,} bytes for {self.name} but sends {announced:,}; try "
                           "again later.")

    def run(self, blob: Path) -> FetchedBlob:
        self.offset = self.resumed_from = _resume_offset(self.partial, self.size)
        if self.offset:
            self.meter.report(f"{self.name}: checking the {format_size(self.offset)} already downloaded", force=True)
            _hash_prefix(self.partial, self.offset, self.digest, self.cancel)
        self.meter.add_present(self.offset)
        if self.size is None:  # what is there counts as done; the rest is added once the server says the size
            self.meter.expect(self.offset)
            self.unsized_total = self.offset
        failures = 0
        complete = self.size is not None and self.offset == self.size and self.partial.exists()
        while not complete:
            start = self.offset
            try:
                complete = self.receive()
            except (DownloadCancelled, ChecksumError):
                raise
            except OSError as error:
                if self.cancel is not None and self.cancel.cancelled:
                    raise DownloadCancelled("cancelled by the user", self.offset) from None
                if error.errno == errno.ENOSPC:
                    raise OutputError(f"The disk filled up while downloading {self.name} into {self.partial.parent}: "
                                      f"free some space; {self.then()}.") from error
                raise OutputError(describe_os_error(error, self.partial)) from error
            except Exception as error:
                if self.cancel is not None and self.cancel.cancelled:
                    raise DownloadCancelled("cancelled by the user", self.offset) from None
                whole_size = _unsatisfied_range_size(error) if self.offset else None
                if whole_size is not None:  # the partial file is no prefix the server can extend
                    if whole_size == self.offset and self.size in (None, whole_size):
                        self.learn_size(whole_size)
                        complete = True
                    else:
                        self.restart()
                    continue
                if not (isinstance(error, _EndedEarly) or is_retryable(error)):
                    raise
                failures = 1 if self.offset > start else failures + 1
                if failures > self.settings.retry.attempts:
                    of = f" of {format_size(self.size)}" if self.size is not None else ""
                    raise HubConnectionError(
                        f"The connection to the Hub was lost while downloading {self.name} "
                        f"({format_size(self.offset)}{of}) and {self.settings.retry.attempts} retries failed; "
                        f"{self.then()}.") from error
                delay = self.settings.retry.delay(failures)
                self.meter.report(f"{self.name}: connection lost, retrying in {format_duration(delay)}", force=True)
                wait(delay, self.cancel)
        self.expected.check(self.digest, self.name)
        os.replace(self.partial, blob)  # created by open(), so its mode follows the umask, as huggingface_hub's do
        return FetchedBlob(self.offset, self.resumed_from)

    def receive(self) -> bool:
        """One GET of the rest of the file; True when the file is whole."""
        unsubscribe: Callable[[], None] | None = None

        def close_on_cancel(response: httpx2.Response) -> None:
            nonlocal unsubscribe
            if self.cancel is not None:
                unsubscribe = self.cancel.subscribe(lambda: interrupt(response))

        try:
            with translated(self.settings, None), \
                    open_stream(self.settings, self.url, start=self.offset, on_open=close_on_cancel) as response:
                if self.offset and response.status_code == 200:  # the server ignored the Range header: start again
                    self.restart()
                elif self.offset and _range_start(response) != self.offset:
                    raise HubError(f"The Hub sent {self.name} from the wrong place when resuming; run the download "
                                   "again.")
                self.learn_size(_announced_size(response))
                self.write(response)
        finally:
            if unsubscribe is not None:
                unsubscribe()
        if self.size is not None and self.offset < self.size:
            raise _EndedEarly
        return True

    def write(self, response: httpx2.Response) -> None:
        with self.partial.open("r+b" if self.offset else "wb") as out:
            out.seek(self.offset)
            out.truncate()
            for chunk in response.iter_bytes():  # as the bytes arrive: a pause keeps them all
                if self.cancel is not None and self.cancel.cancelled:
                    raise DownloadCancelled("cancelled by the user", self.offset)
                out.write(chunk)
                out.flush()
                self.digest.update(chunk)
                self.offset += len(chunk)
                if self.size is None and self.offset > self.unsized_total:
                    self.meter.expect(self.offset - self.unsized_total)
                    self.unsized_total = self.offset
                self.meter.advance(len(chunk))
                if self.size is not None and self.offset > self.size:
                    raise ChecksumError(f"{self.name} arrived damaged: the server sent more than its "
                                        f"{self.size:,} bytes; the bad copy was deleted, so run the download "
                                        "again.")
