"""What a download returns: each file's place in the cache, how it got there and what it was checked against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DOWNLOADED", "FROM_CACHE", "RESUMED", "DownloadResult", "DownloadedFile"]

DOWNLOADED, RESUMED, FROM_CACHE = "downloaded", "resumed", "cached"


@dataclass(frozen=True)
class DownloadedFile:
    """One file of a download: where it is now, whether it was fetched, resumed or found in the cache, and what it
    was checked against."""

    path: str
    """Its path in the repository."""
    local_path: Path
    """Its path in the cache snapshot (a link to the blob)."""
    size: int
    sha256: str | None
    """The SHA-256 it was checked against, None when it was checked by its git blob id or not at all."""
    status: str
    checksum: str | None = None
    """What it was checked against: "sha256", "git-sha1", or None when its server published no checksum for it
    (then only its size was checked, when the server gave one)."""

    @property
    def verified(self) -> bool:
        return self.checksum is not None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "local_path": str(self.local_path), "size": self.size, "sha256": self.sha256,
                "checksum": self.checksum, "verified": self.verified, "status": self.status}


@dataclass(frozen=True)
class DownloadResult:
    """The files of `repo_id` at `commit`, all complete and checked where they could be, under `snapshot_dir` in
    `cache_dir`."""

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
    def unverified(self) -> list[str]:
        """The files that could not be checksummed (their server published no checksum for them)."""
        return [file.path for file in self.files if not file.verified]

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
                "unverified": self.unverified, "files": [file.to_json() for file in self.files]}
