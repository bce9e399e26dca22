"""A repository's files as qdesk shows them: sizes, checksums, GGUF quantization types, shard sets, fit marks.

One request lists everything: huggingface_hub's `model_info(files_metadata=True)`
(`GET /api/models/<repo>/revision/<rev>?blobs=true`), which on the Hub gives the commit, each file's size, git blob
id and, for LFS files, the SHA-256 the download is checked against. A mirror may leave out any of these but the
commit (which `snapshot_download` needs too): a size it does not give is unknown (None), never 0. For the fit
marks, the sizes of the model files it left out are asked with a HEAD request each (the size huggingface_hub reads
too: X-Linked-Size, else Content-Length).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qdesk.hub.cache import COMMIT_PATTERN
from qdesk.hub.errors import HubError
from qdesk.hub.fit import FitMark, checkpoint_fit, fetch_gguf_shape, gguf_fit, resized_shape, unknown_fit
from qdesk.hub.http import check_online, file_metadata, translated
from qdesk.hub.names import (
    GGUF,
    SAFETENSORS,
    base_model_name,
    check_repo_path,
    file_kind,
    is_projector,
    matches_any,
    quant_type,
    shard_name,
)
from qdesk.hub.settings import HubSettings

if TYPE_CHECKING:
    from huggingface_hub.hf_api import RepoSibling

__all__ = ["FileGroup", "RepoFile", "RepoListing", "check_repo_id", "list_repo", "select_files"]


@dataclass(frozen=True)
class RepoFile:
    """One file of a repository at one commit."""

    path: str
    size: int | None
    """Its size in bytes; None when the listing did not give it (a mirror's): the download learns it."""
    sha256: str | None = None
    """The Hub's SHA-256 of an LFS file (its blob name in the cache); None for a small file kept in git."""
    blob_id: str | None = None
    """The git blob id (SHA-1 of `blob <size>\\0` + bytes)."""

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256, "blob_id": self.blob_id}


@dataclass(frozen=True)
class FileGroup:
    """A model file, or the shards of one, as one entry: a GGUF variant or a safetensors checkpoint (set)."""

    name: str
    """The file's path, or for shards their shared name as a glob (`model-*-of-00002.safetensors`)."""
    kind: str
    files: tuple[RepoFile, ...]
    quant_type: str | None
    projector: bool = False
    shard_count: int = 1
    fit: FitMark | None = None

    @property
    def size(self) -> int | None:
        """The files' total size; None when one of them has no known size."""
        return _total(self.files)

    @property
    def complete(self) -> bool:
        """For shards: every one of the announced count is present."""
        return len(self.files) == self.shard_count

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "size": self.size, "quant_type": self.quant_type,
                "projector": self.projector, "shards": self.shard_count, "complete": self.complete,
                "files": [file.path for file in self.files], "fit": None if self.fit is None else self.fit.to_json()}


@dataclass(frozen=True)
class RepoListing:
    """What `list_repo` found: the commit the revision resolved to, the model files grouped, and the rest."""

    repo_id: str
    revision: str
    commit: str
    gated: bool
    files: tuple[RepoFile, ...]
    groups: tuple[FileGroup, ...]
    other_files: tuple[RepoFile, ...]

    @property
    def size(self) -> int | None:
        """The files' total size; None when one of them has no known size."""
        return _total(self.files)

    def to_json(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit, "gated": self.gated,
                "size": self.size, "groups": [group.to_json() for group in self.groups],
                "other_files": [file.to_json() for file in self.other_files],
                "files": [file.to_json() for file in self.files]}


def _total(files: Iterable[RepoFile]) -> int | None:
    sizes = [file.size for file in files]
    return None if any(size is None for size in sizes) else sum(size for size in sizes if size is not None)


def check_repo_id(repo_id: str) -> str:
    """`repo_id` when it is a valid Hub model name (`owner/name`); HubError otherwise."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubError(f"{repo_id!r} is not a Hub repository name; write it as owner/name, e.g. "
                       "bartowski/SmolLM2-135M-Instruct-GGUF.") from None
    return repo_id


def _group(files: Sequence[RepoFile]) -> tuple[list[FileGroup], list[RepoFile]]:
    shard_sets: dict[tuple[str, str, int, str], list[tuple[int, RepoFile]]] = {}
    patterns: dict[tuple[str, str, int, str], str] = {}
    groups: list[FileGroup] = []
    others: list[RepoFile] = []
    for file in files:
        kind = file_kind(file.path)
        if kind not in (GGUF, SAFETENSORS):
            others.append(file)
            continue
        shard = shard_name(file.path)
        if shard is None:
            groups.append(FileGroup(file.path, kind, (file,), quant_type(file.path) if kind == GGUF else None,
                                    projector=is_projector(file.path)))
            continue
        shard_sets.setdefault(shard.group_key, []).append((shard.index, file))
        patterns[shard.group_key] = shard.pattern
    for key, members in shard_sets.items():
        ordered = tuple(file for _, file in sorted(members, key=lambda item: item[0]))
        kind = file_kind(ordered[0].path)
        groups.append(FileGroup(patterns[key], kind, ordered, quant_type(ordered[0].path) if kind == GGUF else None,
                                projector=is_projector(ordered[0].path), shard_count=key[2]))
    groups.sort(key=lambda group: (group.kind != GGUF, group.name.casefold()))
    return groups, others


def list_repo(
    repo_id: str,
    *,
    revision: str | None = None,
    settings: HubSettings | None = None,
    fit: bool = True,
    ram_bytes: int | None = None,
    vram_bytes: int | None = None,
    n_ctx: int = 4096,
) -> RepoListing:
    """The files of `repo_id` at `revision` (default main), model files grouped, each group with a fit mark for a
    context of `n_ctx` tokens (RAM and VRAM available now unless given) when `fit` is set.

    GGUF headers for the fit marks are read with Range requests (see `qdesk.hub.fit`). Raises HubErrors: offline,
    unreachable, not found, gated; UnsafeFileNameError for a listing with a file name that escapes the repository.
    """
    settings = settings or HubSettings.from_environment()
    revision = revision or "main"
    check_repo_id(repo_id)
    check_online(settings)
    with translated(settings, repo_id, revision=revision):
        info = settings.api().model_info(repo_id, revision=revision, files_metadata=True, timeout=settings.timeout_s)
    commit = info.sha or ""
    if not COMMIT_PATTERN.match(commit):
        raise HubError(f"The Hub did not say which commit {repo_id} {revision} is; try again later.")
    files = tuple(_repo_file(sibling) for sibling in info.siblings or ())
    if fit:
        files = _with_model_file_sizes(settings, repo_id, commit, files)
    groups, others = _group(files)
    if fit:
        groups = _with_fit_marks(settings, repo_id, commit, groups, ram_bytes, vram_bytes, n_ctx)
    return RepoListing(repo_id=repo_id, revision=revision, commit=commit, gated=bool(info.gated), files=files,
                       groups=tuple(groups), other_files=tuple(others))


def _repo_file(sibling: RepoSibling) -> RepoFile:
    lfs = sibling.lfs
    size = sibling.size if sibling.size is not None else (lfs.size if lfs is not None else None)
    sha256 = lfs.sha256.lower() if lfs is not None and lfs.sha256 else None
    return RepoFile(path=check_repo_path(sibling.rfilename), size=None if size is None else int(size), sha256=sha256,
                    blob_id=sibling.blob_id)


def _with_model_file_sizes(settings: HubSettings, repo_id: str, commit: str,
                           files: tuple[RepoFile, ...]) -> tuple[RepoFile, ...]:
    """The files, with the sizes the listing left out of GGUF and safetensors files asked with a HEAD each (one
    that fails leaves the size unknown)."""
    from huggingface_hub import hf_hub_url

    sized = []
    for file in files:
        if file.size is None and file_kind(file.path) in (GGUF, SAFETENSORS):
            url = hf_hub_url(repo_id, file.path, revision=commit, endpoint=settings.endpoint)
            with contextlib.suppress(HubError), translated(settings, repo_id, revision=commit, path=file.path):
                file = dataclasses.replace(file, size=file_metadata(settings, url).size)
        sized.append(file)
    return tuple(sized)


def _with_fit_marks(settings: HubSettings, repo_id: str, commit: str, groups: list[FileGroup],
                    ram_bytes: int | None, vram_bytes: int | None, n_ctx: int) -> list[FileGroup]:
    from huggingface_hub import hf_hub_url

    from qdesk.memory import available_ram, available_vram

    ram = available_ram() if ram_bytes is None else ram_bytes
    vram = available_vram() if vram_bytes is None else vram_bytes
    marks: dict[str, FitMark] = {}
    models: dict[str, list[FileGroup]] = {}
    for group in groups:
        size = group.size
        if size is None:
            marks[group.name] = unknown_fit("The server did not give its size.")
        elif group.kind == SAFETENSORS:
            marks[group.name] = checkpoint_fit(size, ram_bytes=ram, vram_bytes=vram)
        elif group.projector:
            marks[group.name] = unknown_fit("A multimodal projector: it is loaded beside its model, not on its own.")
        elif not group.complete:
            marks[group.name] = unknown_fit(f"Only {len(group.files)} of its {group.shard_count} shards are in the "
                                            "repository.")
        else:
            models.setdefault(base_model_name(group.files[0].path), []).append(group)
    for variants in models.values():
        reference = min(variants, key=lambda group: (group.shard_count > 1, group.size or 0))
        first = reference.files[0]
        assert first.size is not None and reference.size is not None  # groups without a size were marked above
        url = hf_hub_url(repo_id, first.path, revision=commit, endpoint=settings.endpoint)
        try:
            shape = fetch_gguf_shape(settings, url, file_size=first.size, name=first.path)
        except HubError as error:
            for group in variants:
                marks[group.name] = unknown_fit(f"Its header could not be read: {error}")
            continue
        except Exception as error:  # a damaged header: GGUFFileError, and anything gguf-py makes of nonsense
            for group in variants:
                marks[group.name] = unknown_fit(f"Its header could not be read ({error}).")
            continue
        header_bytes = max(0, first.size - shape.tensor_bytes)
        full = resized_shape(shape, reference.size - header_bytes * reference.shard_count)
        for group in variants:
            exact = group is reference and group.shard_count == 1
            variant_shape = full if group is reference else resized_shape(
                full, (group.size or 0) - header_bytes * group.shard_count)
            basis = ("the first shard's header and the other shards' sizes" if group is reference
                     else f"{reference.name}'s header, scaled to this file's size")
            marks[group.name] = gguf_fit(variant_shape, approximate=not exact, basis=basis, ram_bytes=ram,
                                         vram_bytes=vram, n_ctx=n_ctx)
    return [FileGroup(group.name, group.kind, group.files, group.quant_type, group.projector, group.shard_count,
                      marks.get(group.name)) for group in groups]


def select_files(listing: RepoListing, include: Iterable[str] | None) -> list[RepoFile]:
    """The files matching any of the `include` globs (all files without any), matched case-insensitively against
    the path in the repository; picking one shard of a set picks the whole set."""
    patterns = list(include or ())
    if not patterns:
        return list(listing.files)

    def wanted(path: str) -> bool:
        return matches_any(path, patterns)

    chosen = {file.path for file in listing.files if wanted(file.path)}
    for group in listing.groups:
        if any(file.path in chosen for file in group.files) or wanted(group.name):
            chosen.update(file.path for file in group.files)
    return [file for file in listing.files if file.path in chosen]
