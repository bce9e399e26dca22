"""The Hugging Face cache layout, exactly as huggingface_hub writes it, so each tool finds the other's files.

```
<cache>/models--<owner>--<name>/
    blobs/<etag>                     the file's bytes, named by the ETag of its resolve URL: on the Hub the SHA-256
                                     of an LFS file, the git blob id of a small one; a mirror's own ETag elsewhere
    blobs/<etag>.incomplete          a partial download, resumed from its end (qdesk; huggingface_hub < 1.0 too)
    refs/<revision>                  the commit a branch or tag pointed to when last resolved
    snapshots/<commit>/<path>        a relative symbolic link to ../../blobs/<etag> (a copy where links are not allowed)
<cache>/.locks/models--<owner>--<name>/<etag>.lock   held while a blob is written (huggingface_hub's lock file)
```

Every name written is checked first: repository paths by `check_repo_path`, commits as 40 hex digits, ETags and
revisions as plain names, and the final path must lie inside the repository's folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from qdesk.hub.errors import HubError, UnsafeFileNameError
from qdesk.hub.names import check_repo_path

__all__ = ["COMMIT_PATTERN", "RepoCache"]

COMMIT_PATTERN = re.compile(r"^[0-9a-f]{40}$")
_ETAG_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,254}$")


@dataclass(frozen=True)
class RepoCache:
    """One model repository's folder in the Hugging Face cache at `root`."""

    root: Path
    repo_id: str

    @property
    def folder(self) -> Path:
        from huggingface_hub.file_download import repo_folder_name

        return self.root / repo_folder_name(repo_id=self.repo_id, repo_type="model")

    def _inside(self, path: Path) -> Path:
        folder = os.path.abspath(self.folder)
        if os.path.commonpath([folder, os.path.abspath(path)]) != folder:
            raise UnsafeFileNameError(f"{path} lies outside the cache folder {folder}; qdesk refuses to write it.")
        return path

    def blob_path(self, etag: str) -> Path:
        if not _ETAG_PATTERN.match(etag) or ".." in etag:
            raise HubError(f"The Hub named a file's content {etag!r} (its ETag), which cannot name a file in the "
                           "cache; qdesk refuses to store it. Try again later, or use another mirror.")
        return self._inside(self.folder / "blobs" / etag)

    def incomplete_path(self, etag: str) -> Path:
        return self.blob_path(etag).with_name(f"{etag}.incomplete")

    def lock_path(self, etag: str) -> Path:
        self.blob_path(etag)
        return self.root / ".locks" / self.folder.name / f"{etag}.lock"

    def snapshot_dir(self, commit: str) -> Path:
        if not COMMIT_PATTERN.match(commit):
            raise HubError(f"The Hub gave {commit!r} as a commit, which is not a commit hash; try again later.")
        return self._inside(self.folder / "snapshots" / commit)

    def snapshot_path(self, commit: str, path: str) -> Path:
        return self._inside(self.snapshot_dir(commit).joinpath(*check_repo_path(path).split("/")))

    def ref_path(self, revision: str) -> Path:
        if (not revision or "\\" in revision or revision.startswith("/")
                or any(part in ("", ".", "..") for part in revision.split("/"))):
            raise HubError(f"{revision!r} is not a revision name; give a branch, tag or commit.")
        return self._inside(self.folder / "refs" / revision)

    # --- reading ---

    def etag_of(self, snapshot_file: Path) -> str | None:
        """The name of the blob a snapshot entry links to; None where the entry is a copy, not a link."""
        if not snapshot_file.is_symlink():
            return None
        return Path(os.readlink(snapshot_file)).name

    # --- writing ---

    def write_ref(self, revision: str, commit: str) -> None:
        """Record that `revision` points at `commit` (atomically), unless `revision` is that commit."""
        if revision == commit:
            return
        self.snapshot_dir(commit)  # validates the commit
        ref = self.ref_path(revision)
        with contextlib.suppress(OSError):
            if ref.read_text(encoding="utf-8") == commit:
                return
        ref.parent.mkdir(parents=True, exist_ok=True)
        staging = ref.with_name(f"{ref.name}.{uuid.uuid4().hex[:8]}.tmp")
        staging.write_text(commit, encoding="utf-8")
        os.replace(staging, ref)

    def link_snapshot(self, commit: str, path: str, etag: str) -> Path:
        """Point snapshots/<commit>/<path> at blobs/<etag>: a relative symbolic link, else a hard link, else a copy."""
        blob = self.blob_path(etag)
        pointer = self.snapshot_path(commit, path)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        if pointer.is_symlink() or pointer.exists():
            if pointer.resolve() == blob.resolve():
                return pointer
            pointer.unlink()
        try:
            pointer.symlink_to(os.path.relpath(blob, pointer.parent))
        except OSError:
            try:
                os.link(blob, pointer)
            except OSError:
                shutil.copyfile(blob, pointer)
        return pointer

    @contextlib.contextmanager
    def locked(self, etag: str, timeout_s: float) -> Iterator[None]:
        """Hold huggingface_hub's lock for blob `etag` (so it and qdesk never write one blob at once); raises
        filelock.Timeout after `timeout_s`."""
        from huggingface_hub.utils import WeakFileLock

        lock = self.lock_path(etag)
        lock.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(lock, timeout=timeout_s):
            yield
