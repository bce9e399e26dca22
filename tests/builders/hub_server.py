"""A local stand-in for the Hugging Face Hub: the endpoints huggingface_hub 2.4 and qdesk call, from real files.

Two threaded HTTP servers on 127.0.0.1: the Hub itself (`endpoint`) and a "CDN" on another port, as on the real
Hub, where LFS files live:

* `GET /api/models?search=…&filter=…&sort=…&limit=…` — search (`HfApi.list_models`)
* `GET /api/whoami-v2` — the token's owner, "tester" for `HubServer.token` (`HfApi.whoami`)
* `GET /api/models/<owner>/<name>[/revision/<rev>]` — repository info with `siblings` (sizes, blob ids, LFS
  SHA-256) (`HfApi.model_info(files_metadata=True)`)
* `HEAD|GET /<owner>/<name>/resolve/<rev>/<path>` — a small file: 200 with `ETag` (its git blob id) and
  `X-Repo-Commit`; an LFS file: 302 to the CDN with `X-Linked-Etag` (its SHA-256), `X-Linked-Size`, `X-Repo-Commit`
* `HEAD|GET <cdn>/blobs/<sha256>` — the LFS file's bytes; both servers answer `Range: bytes=a-[b]` with 206

Other servers speak the same API with less: `HubServer(listing_metadata=False)` lists file names only (no size, git
blob id or LFS metadata, as some mirrors do), `ranges=False` ignores every Range header (200 with the whole file),
and `hub_headers=False` is a plain mirror that serves every file itself with an opaque ETag (`"<crc32>-<size>"`, like
a static file server's), no X-Linked-* headers and no size in its HEAD answers. `api_status` answers every `/api/`
request with that HTTP status (a server in trouble).

Gated repositories want `Authorization: Bearer <token>` on resolve (401, or 403 for a wrong token, with
`X-Error-Code: GatedRepo`). Every request is logged (`HubServer.log`), Range header and whether a token came
included. Faults, set per file path: `corrupt` (one byte flipped, the announced checksum kept), `ignore_range`
(answer 200 with the whole file, as some proxies do), `pause_after`
(send that many body bytes, then wait until `release()` or `stop()`), `drop_after` (close the connection after that
many bytes, once). `stop()` closes the listening sockets and every open connection; `start()` brings both servers
back on the same ports.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import threading
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin")
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class ServedFile:
    path: str
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def git_blob_id(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def opaque_etag(self) -> str:
        """An ETag that is no checksum, as a static file server makes them."""
        return f"{zlib.crc32(self.data):08x}-{len(self.data):x}"


@dataclass
class ServedRepo:
    repo_id: str
    commit: str
    files: dict[str, ServedFile]
    gated: bool = False
    downloads: int = 0
    likes: int = 0
    last_modified: str = "2024-01-01T00:00:00.000Z"
    extra_listing: list[str] = field(default_factory=list)
    """Names listed (with a size) but never served: for hostile listings such as `../evil.gguf`."""

    @classmethod
    def from_folder(cls, repo_id: str, folder: Path, **options: Any) -> ServedRepo:
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        files = {}
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                name = path.relative_to(folder).as_posix()
                files[name] = ServedFile(name, path.read_bytes(), name.endswith(LFS_SUFFIXES))
        return cls(repo_id, commit, files, **options)

    @property
    def tags(self) -> list[str]:
        names = list(self.files)
        return [tag for tag, suffix in (("gguf", ".gguf"), ("safetensors", ".safetensors"))
                if any(name.endswith(suffix) for name in names)]


@dataclass
class LoggedRequest:
    """One request, logged when it arrives; `status` and `body_bytes` grow as the answer is sent."""

    server: str
    method: str
    path: str
    query: str
    range: str | None
    authorized: bool
    status: int
    body_bytes: int


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], hub: HubServer, role: str) -> None:
        self.hub, self.role = hub, role
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.hub._track(self.connection)

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_GET(self) -> None:
        self._route("GET")

    def _route(self, method: str) -> None:
        target = urlsplit(self.path)
        self.entry = LoggedRequest(self.server.role, method, unquote(target.path), unquote(target.query),
                                   self.headers.get("Range"), "authorization" in self.headers, 0, 0)
        self.server.hub._record(self.entry)
        try:
            if self.server.role == "cdn":
                self._cdn(method)
            else:
                self._hub(method)
        except OSError:  # the client went away, or a fault cut the connection
            self.close_connection = True

    # --- answers ---

    def _answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                method: str = "GET") -> None:
        self.entry.status = status
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD" and body:
            self.entry.body_bytes = len(body)
            self.wfile.write(body)

    def _json(self, document: Any) -> None:
        self._answer(200, json.dumps(document).encode(), {"Content-Type": "application/json"})

    def _error(self, status: int, code: str, message: str, method: str = "GET",
               extra: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self._answer(status, body, {"Content-Type": "application/json", "X-Error-Code": code,
                                    "X-Error-Message": message, **(extra or {})}, method)

    # --- the Hub ---

    def _hub(self, method: str) -> None:
        hub = self.server.hub
        url = urlsplit(self.path)
        path = unquote(url.path)
        if hub.api_status is not None and path.startswith("/api/"):
            self._error(hub.api_status, "ServerError", "The server is in trouble", method)
            return
        if path == "/api/models":
            self._json(hub._search(parse_qs(url.query)))
            return
        if path == "/api/whoami-v2":  # `HfApi.whoami`: the token's owner, 401 for any other token
            if self.headers.get("authorization") != f"Bearer {hub.token}":
                self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
            else:
                self._json({"type": "user", "name": "tester", "auth": {"type": "access_token",
                                                                       "accessToken": {"displayName": "qdesk-test",
                                                                                       "role": "read"}}})
            return
        info = re.fullmatch(r"/api/models/([^/]+/[^/]+?)(?:/revision/(.+))?", path)
        if info:
            repo = hub.repos.get(info.group(1))
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
            elif info.group(2) not in (None, "main", repo.commit):
                self._error(404, "RevisionNotFound", "Invalid rev id")
            else:
                self._json(hub._info(repo))
            return
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if resolve is None:
            self._error(404, "NotFound", "Not found", method)
            return
        repo = hub.repos.get(resolve.group(1))
        if repo is None:
            self._error(401 if "authorization" not in self.headers else 404, "RepoNotFound", "Repository not found",
                        method)
            return
        if resolve.group(2) not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", "Invalid rev id", method)
            return
        if repo.gated:
            given = self.headers.get("authorization")
            if given is None:
                self._error(401, "GatedRepo", "Access to this model is restricted; log in.", method)
                return
            if given != f"Bearer {hub.token}":
                self._error(403, "GatedRepo", "Access to this model is restricted; ask for access.", method)
                return
        served = repo.files.get(resolve.group(3))
        commit_header = {"X-Repo-Commit": repo.commit}
        if served is None:
            self._error(404, "EntryNotFound", "Entry not found", method, commit_header)
            return
        if not hub.hub_headers:
            self._send_file(method, served, {**commit_header, "ETag": f'"{served.opaque_etag}"'})
            return
        if served.lfs:
            self._answer(302, b"", {**commit_header, "Location": f"{hub.cdn}/blobs/{served.sha256}",
                                    "X-Linked-Etag": f'"{served.sha256}"', "X-Linked-Size": str(len(served.data)),
                                    "ETag": f'"{served.git_blob_id}"'}, method)
            return
        self._send_file(method, served, {**commit_header, "ETag": f'"{served.git_blob_id}"'})

    # --- the CDN ---

    def _cdn(self, method: str) -> None:
        match = re.fullmatch(r"/blobs/([0-9a-f]{64})", urlsplit(self.path).path)
        served = self.server.hub._by_sha256(match.group(1)) if match else None
        if served is None:
            self._answer(404, b"no such blob", method=method)
            return
        self._send_file(method, served, {"ETag": f'"{served.sha256}"'})

    def _send_file(self, method: str, served: ServedFile, headers: dict[str, str]) -> None:
        hub = self.server.hub
        data = served.data
        if served.path in hub.corrupt:
            damaged = bytearray(data)
            damaged[len(damaged) // 2] ^= 0xFF
            data = bytes(damaged)
        size = len(data)
        start, stop, status = 0, size, 200
        ignored = served.path in hub.ignore_range or not hub.ranges
        asked = None if ignored else self.headers.get("Range")
        if asked:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", asked.strip())
            if match is None or int(match.group(1)) >= max(size, 1):
                self._answer(416, b"", {"Content-Range": f"bytes */{size}"}, method)
                return
            start = int(match.group(1))
            stop = min(size, int(match.group(2)) + 1) if match.group(2) else size
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{stop - 1}/{size}"}
        self.entry.status = status
        self.send_response(status)
        headers = {**headers, "Content-Length": str(stop - start), "Content-Type": "application/octet-stream"}
        if not ignored:
            headers["Accept-Ranges"] = "bytes"
        if method == "HEAD" and not hub.hub_headers:
            del headers["Content-Length"]
            self.close_connection = True  # without a length, the client cannot tell where the answer ends
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method == "HEAD":
            return
        position = start
        while position < stop:
            pause_at = hub.pause_after.get(served.path)
            if pause_at is not None and position >= pause_at:
                hub._paused.set()
                hub._release.wait()
                if hub._stopping:
                    raise ConnectionResetError("server stopped")
            drop_at = hub.drop_after.get(served.path)
            if drop_at is not None and position >= drop_at:
                del hub.drop_after[served.path]
                self.connection.shutdown(socket.SHUT_RDWR)
                raise ConnectionResetError("dropped on purpose")
            limit = stop
            for boundary in (pause_at, drop_at):
                if boundary is not None and position < boundary < limit:
                    limit = boundary
            chunk = data[position:min(limit, position + _CHUNK)]
            self.entry.body_bytes += len(chunk)
            self.wfile.write(chunk)
            self.wfile.flush()
            position += len(chunk)


class HubServer:
    """The Hub and its CDN on two local ports; use as a context manager, or `start()` / `stop()`."""

    def __init__(self, token: str = "hf_local_test_token_0123456789", *, listing_metadata: bool = True,
                 ranges: bool = True, hub_headers: bool = True) -> None:
        self.token = token
        self.listing_metadata, self.ranges, self.hub_headers = listing_metadata, ranges, hub_headers
        self.api_status: int | None = None
        self.repos: dict[str, ServedRepo] = {}
        self.log: list[LoggedRequest] = []
        self.corrupt: set[str] = set()
        self.pause_after: dict[str, int] = {}
        self.drop_after: dict[str, int] = {}
        self.ignore_range: set[str] = set()
        self._lock = threading.Lock()
        self._paused = threading.Event()
        self._release = threading.Event()
        self._stopping = False
        self._connections: list[socket.socket] = []
        self._servers: dict[str, _Server] = {}
        self._threads: list[threading.Thread] = []
        self._ports = {"hub": 0, "cdn": 0}

    # --- content ---

    def add(self, repo: ServedRepo) -> ServedRepo:
        self.repos[repo.repo_id] = repo
        return repo

    def _by_sha256(self, sha256: str) -> ServedFile | None:
        for repo in self.repos.values():
            for served in repo.files.values():
                if served.lfs and served.sha256 == sha256:
                    return served
        return None

    def _info(self, repo: ServedRepo) -> dict[str, Any]:
        siblings = []
        for served in repo.files.values():
            sibling: dict[str, Any] = {"rfilename": served.path}
            if self.listing_metadata:
                sibling.update({"size": len(served.data), "blobId": served.git_blob_id})
                if served.lfs:
                    sibling["lfs"] = {"sha256": served.sha256, "size": len(served.data), "pointerSize": 134}
            siblings.append(sibling)
        siblings += [{"rfilename": name, "size": 10, "blobId": "0" * 40} for name in repo.extra_listing]
        return {"id": repo.repo_id, "sha": repo.commit, "private": False, "gated": "auto" if repo.gated else False,
                "downloads": repo.downloads, "likes": repo.likes, "lastModified": repo.last_modified,
                "tags": repo.tags, "siblings": siblings}

    def _search(self, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        text = (query.get("search") or [""])[0].lower()
        wanted = set(query.get("filter") or [])
        found = [repo for repo in self.repos.values()
                 if text in repo.repo_id.lower() and wanted <= set(repo.tags)]
        sort = (query.get("sort") or [""])[0]
        if sort == "downloads":
            found.sort(key=lambda repo: -repo.downloads)
        elif sort == "lastModified":
            found.sort(key=lambda repo: repo.last_modified, reverse=True)
        limit = int((query.get("limit") or ["1000"])[0])
        return [{"id": repo.repo_id, "downloads": repo.downloads, "likes": repo.likes,
                 "lastModified": repo.last_modified, "tags": repo.tags, "gated": "auto" if repo.gated else False,
                 "pipeline_tag": "text-generation", "private": False} for repo in found[:limit]]

    # --- the log ---

    def _record(self, entry: LoggedRequest) -> None:
        with self._lock:
            self.log.append(entry)

    def _track(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.append(connection)

    def requests(self, *, method: str | None = None, server: str | None = None,
                 path_contains: str = "") -> list[LoggedRequest]:
        with self._lock:
            return [entry for entry in self.log if (method is None or entry.method == method)
                    and (server is None or entry.server == server) and path_contains in entry.path]

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    # --- running ---

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._ports['hub']}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._ports['cdn']}"

    def start(self) -> HubServer:
        self._stopping = False
        self._release.clear()
        self._paused.clear()
        for role in ("hub", "cdn"):
            server = _Server(("127.0.0.1", self._ports[role]), self, role)
            self._ports[role] = server.server_address[1]
            self._servers[role] = server
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Go away: stop listening and cut every open connection (a paused transfer included)."""
        self._stopping = True
        self.pause_after.clear()
        self._release.set()
        for server in self._servers.values():
            server.shutdown()
            server.server_close()
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def pause(self, path: str, after_bytes: int) -> None:
        """Make transfers of `path` stop after `after_bytes` bytes of the file, until `release()` or `stop()`."""
        self._paused.clear()
        self._release.clear()
        self.pause_after[path] = after_bytes

    def wait_until_paused(self, timeout: float = 30) -> None:
        if not self._paused.wait(timeout):
            raise TimeoutError("the transfer never reached its pause point")

    def release(self) -> None:
        """Let paused transfers go on (and later ones pass the pause point)."""
        self.pause_after.clear()
        self._release.set()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


# --- small real files to serve --------------------------------------------------------------------------------------

def write_tiny_gguf(path: Path, *, vocab: int = 3000, n_layer: int = 2, dtype: type = np.float32,
                    layers: range | None = None) -> Path:
    """A small real Llama GGUF (`vocab` tokens make its header tens of kB); `layers` limits the blocks written (a
    first shard)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(512)
    writer.add_block_count(n_layer)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_token_list([f"token-{i:05d}" for i in range(vocab)])
    rng = np.random.default_rng(len(path.name))
    writer.add_tensor("token_embd.weight", rng.standard_normal((vocab, 64)).astype(dtype))
    for layer in layers if layers is not None else range(n_layer):
        writer.add_tensor(f"blk.{layer}.attn_q.weight", rng.standard_normal((64, 64)).astype(dtype))
        writer.add_tensor(f"blk.{layer}.ffn_up.weight", rng.standard_normal((128, 64)).astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_safetensors(path: Path, seed: int, rows: int = 256) -> Path:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    save_file({f"model.layers.{seed}.mlp.up_proj.weight": rng.standard_normal((rows, 64)).astype(np.float16)},
              str(path))
    return path
