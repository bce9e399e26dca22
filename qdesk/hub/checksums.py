"""What a downloaded file can be checked against, and the check.

A file is checked against the best checksum its server published, in this order:

1. the listing's LFS SHA-256 (`lfs.sha256` in `model_info(files_metadata=True)`): the publisher's checksum of an
   LFS file (every model file on the Hub);
2. the ETag of its resolve URL, which names its blob in the cache: on the Hub it is that same SHA-256 for an LFS
   file (64 hex digits) and the git blob id for a small file kept in git (40 hex digits). A 40-digit ETag is taken
   as a git blob id only for a file the Hub could keep in git (at most 10 MiB): beyond that it can only name an LFS
   pointer, not the file's bytes.

A server that publishes neither (a plain mirror whose ETags are opaque, like `"5f3c-1a2b"`) leaves the file
unchecked: it is still downloaded, and the result says so (`DownloadedFile.checksum` is None). A listing's git blob
id alone is never used: for an LFS file it is the id of the pointer, not of the file.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from converters.core.jobs import CancelToken
from qdesk.hub.errors import ChecksumError

__all__ = ["GIT_FILE_MAX_BYTES", "SHA256", "Checksum", "Digest", "Expected", "GitBlobId", "blob_digest_kind",
           "checksum_from_etag", "file_matches", "git_blob_id"]

GIT_FILE_MAX_BYTES = 10 * 1024 * 1024
"""The Hub keeps larger files in LFS: a git blob id can name the bytes of a file up to this size only."""

SHA256, GitBlobId = "sha256", "git-sha1"
Kind = Literal["sha256", "git-sha1"]

_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
_SHA1_PATTERN = re.compile(r"^[0-9a-f]{40}$")


class Digest(Protocol):
    """A hashlib object."""

    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


def git_blob_id(data_size: int) -> Digest:
    """A SHA-1 primed as git hashes a blob of `data_size` bytes (`blob <size>\\0` first): feed it the bytes."""
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(b"blob %d\0" % data_size)
    return digest


def blob_digest_kind(etag: str) -> Kind | None:
    """What a blob's name promises about its bytes: "sha256" (an LFS file), "git-sha1" (a git blob id) or None."""
    if _SHA256_PATTERN.match(etag):
        return SHA256
    if _SHA1_PATTERN.match(etag):
        return GitBlobId
    return None


@dataclass(frozen=True)
class Checksum:
    """A checksum a file's bytes must have: `kind` "sha256" or "git-sha1", `value` in lower-case hex, and where it
    came from ("listing" or "etag", for messages)."""

    kind: Kind
    value: str
    source: str

    @property
    def label(self) -> str:
        return "SHA-256" if self.kind == SHA256 else "git blob id"


def checksum_from_etag(etag: str | None, size: int | None) -> Checksum | None:
    """The checksum an ETag (or a blob's name) stands for, None when it stands for none."""
    kind = blob_digest_kind(etag.lower()) if etag else None
    if kind is None or etag is None:
        return None
    if kind == GitBlobId and (size is None or size > GIT_FILE_MAX_BYTES):
        return None
    return Checksum(kind, etag.lower(), "etag")


@dataclass(frozen=True)
class Expected:
    """What is known of a file before it arrives: its size (None: unknown until the server sends it) and the
    checksum to check it against (None: the server published none)."""

    size: int | None = None
    checksum: Checksum | None = None

    @property
    def sha256(self) -> str | None:
        return self.checksum.value if self.checksum is not None and self.checksum.kind == SHA256 else None

    def new_digest(self, size: int | None = None) -> Digest:
        """A digest to feed the file's bytes to; a git blob id needs the size first (`size`, else `self.size`)."""
        if self.checksum is not None and self.checksum.kind == GitBlobId:
            total = size if size is not None else self.size
            if total is None:
                raise ValueError("a git blob id needs the file's size first")
            return git_blob_id(total)
        return hashlib.sha256()

    def check(self, digest: Digest, name: str) -> None:
        """ChecksumError when the bytes fed to `digest` are not the ones the server published."""
        if self.checksum is None:
            return
        value = digest.hexdigest()
        if value != self.checksum.value:
            raise ChecksumError(f"{name} arrived damaged: its {self.checksum.label} is {value[:12]}… but the server "
                                f"published {self.checksum.value[:12]}…; the bad copy was deleted, so run the "
                                "download again.")


def file_matches(path: Path, expected: Expected, cancel: CancelToken | None = None) -> bool:
    """Whether the file at `path` has the expected size (when known) and checksum (when there is one), read in
    full."""
    try:
        size = path.stat().st_size
        if expected.size is not None and size != expected.size:
            return False
        if expected.checksum is None:
            return True
        digest = expected.new_digest(size)
        with path.open("rb") as file:
            while block := file.read(4 * 1024 * 1024):
                if cancel is not None:
                    cancel.raise_if_cancelled()
                digest.update(block)
    except OSError:
        return False
    return digest.hexdigest() == expected.checksum.value
