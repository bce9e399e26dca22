"""The Hub: search, listing with fit marks, resumable checked downloads into the HF cache, offline mode, tokens.

Everything runs against `tests.builders.hub_server.HubServer`, a local Hub (and CDN) serving small real files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from converters.core.errors import OutputError
from converters.core.jobs import CancelToken, Progress
from qdesk.hub import (
    ChecksumError,
    DownloadCancelled,
    HubConnectionError,
    HubNotFoundError,
    HubOfflineError,
    HubSettings,
    HubUnreachableError,
    RetryPolicy,
    UnsafeFileNameError,
    check_repo_path,
    download,
    list_repo,
    quant_type,
    render_listing,
    search_models,
    shard_name,
)
from qdesk.hub.download import SMALL_FILE_BYTES
from qdesk.hub.fit import fetch_gguf_shape
from qdesk.hub.names import base_model_name
from qdesk.memory import check_fit, check_fit_for_shape, read_model_shape, read_model_shape_from_prefix
from tests.builders.hub_server import HubServer, ServedRepo, write_tiny_gguf, write_tiny_safetensors

GGUF_REPO, CHECKPOINT_REPO, GATED_REPO, EVIL_REPO = ("tester/tiny-GGUF", "tester/tiny-checkpoint",
                                                      "tester/gated-GGUF", "tester/evil")
BIG = "tiny-llama-F32.gguf"
SMALL = "tiny-llama-q4_k_m.gguf"
TOKEN = "hf_qdesk_secret_token_for_tests_7f3a91"
PAUSE_AT = 300_000
GiB = 1 << 30


# --- fixtures -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub-files")
    gguf_repo = root / "gguf"
    gguf_repo.mkdir()
    write_tiny_gguf(gguf_repo / BIG, vocab=5000)  # over 1 MiB: fetched by qdesk's own resumable transfer
    write_tiny_gguf(gguf_repo / SMALL, dtype=np.float16)
    write_tiny_gguf(gguf_repo / "tiny-llama-Q8_0-00001-of-00002.gguf", layers=range(1))
    (gguf_repo / "tiny-llama-Q8_0-00002-of-00002.gguf").write_bytes(np.random.default_rng(2).bytes(60_000))
    (gguf_repo / "mmproj-tiny-F16.gguf").write_bytes(np.random.default_rng(3).bytes(20_000))
    (gguf_repo / "README.md").write_text("# tiny\nA tiny model for tests.\n")
    (gguf_repo / "config.json").write_text('{"model_type": "llama"}\n')
    checkpoint = root / "checkpoint"
    checkpoint.mkdir()
    write_tiny_safetensors(checkpoint / "model-00001-of-00002.safetensors", 1)
    write_tiny_safetensors(checkpoint / "model-00002-of-00002.safetensors", 2)
    (checkpoint / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}\n')
    gated = root / "gated"
    gated.mkdir()
    write_tiny_gguf(gated / "gated-Q4_0.gguf", vocab=500, dtype=np.float16)
    evil = root / "evil"
    evil.mkdir()
    (evil / "config.json").write_text("{}\n")
    return {"gguf": gguf_repo, "checkpoint": checkpoint, "gated": gated, "evil": evil}


@pytest.fixture
def server(folders: dict[str, Path]) -> Iterator[HubServer]:
    with HubServer(token=TOKEN) as hub:
        hub.add(ServedRepo.from_folder(GGUF_REPO, folders["gguf"], downloads=900, last_modified="2024-03-01T00:00:00Z"))
        hub.add(ServedRepo.from_folder(CHECKPOINT_REPO, folders["checkpoint"], downloads=50,
                                       last_modified="2024-06-01T00:00:00Z"))
        hub.add(ServedRepo.from_folder(GATED_REPO, folders["gated"], gated=True, downloads=10))
        hub.add(ServedRepo.from_folder(EVIL_REPO, folders["evil"], extra_listing=["../evil.gguf"]))
        yield hub


def settings_for(server: HubServer, cache: Path, **options: object) -> HubSettings:
    values: dict = {"endpoint": server.endpoint, "cache_dir": cache, "token": False, "offline": False,
                    "retry": RetryPolicy(attempts=2, first_delay_s=0.05, max_delay_s=0.1), **options}
    return HubSettings.from_environment(**values)


@pytest.fixture
def settings(server: HubServer, tmp_path: Path) -> HubSettings:
    return settings_for(server, tmp_path / "hf" / "hub")


def served(server: HubServer, repo: str, path: str) -> bytes:
    return server.repos[repo].files[path].data


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def partial_file(settings: HubSettings, repo: str, data: bytes) -> Path:
    return settings.cache_dir / f"models--{repo.replace('/', '--')}" / "blobs" / f"{sha256_of(data)}.incomplete"


def wait_for_size(path: Path, size: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size >= size:
            return
        time.sleep(0.02)
    raise TimeoutError(f"{path} never reached {size} bytes")


def cdn_gets(server: HubServer) -> list:
    return server.requests(method="GET", server="cdn")


def one_sentence(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


# --- names ----------------------------------------------------------------------------------------------------------

def test_file_names_give_types_shards_and_models() -> None:
    assert quant_type("Llama-3.2-1B-Instruct-Q4_K_M.gguf") == "Q4_K_M"
    assert quant_type("model-q4_k_m.gguf") == "Q4_K_M"
    assert quant_type("sub/Qwen2.5-0.5B.IQ2_XS.gguf") == "IQ2_XS"
    assert quant_type("phi-3-mini-4k-instruct-fp16.gguf") == "F16"
    assert quant_type("gemma-2b-BF16-00001-of-00002.gguf") == "BF16"
    assert quant_type("model-Q8_0.gguf") == "Q8_0" and quant_type("x-IQ4_NL.gguf") == "IQ4_NL"
    assert quant_type("Mistral-7B-UD-Q4_K_XL.gguf") == "Q4_K_XL" and quant_type("a-Q4_0_4_4.gguf") == "Q4_0_4_4"
    assert quant_type("model.gguf") is None and quant_type("Q4-notes.gguf") is None
    shard = shard_name("dir/model-00002-of-00003.safetensors")
    assert shard is not None and (shard.index, shard.count, shard.folder) == (2, 3, "dir")
    assert shard.pattern == "dir/model-*-of-00003.safetensors"
    assert shard_name("model-00004-of-00003.gguf") is None and shard_name("model.gguf") is None
    assert base_model_name("Llama-3-8B-Q8_0-00001-of-00002.gguf") == base_model_name("llama-3-8b.q4_k_m.gguf")


@pytest.mark.parametrize("name", ["../x.gguf", "a/../../x", "/etc/passwd", "a\\..\\b", "C:x.gguf", "a//b", "./a",
                                  "", "a/\x00b", "\\\\host\\share\\x"])
def test_names_that_escape_the_cache_are_refused(name: str) -> None:
    with pytest.raises(UnsafeFileNameError, match="refuses"):
        check_repo_path(name)


@pytest.mark.parametrize(("name", "reason"), [("/etc/passwd", "absolute"), ("C:x.gguf", "drive"),
                                              ("a/../../x", "'..'"), ("a//b", "empty")])
def test_an_unsafe_name_is_refused_for_its_real_reason(name: str, reason: str) -> None:
    with pytest.raises(UnsafeFileNameError, match=reason):
        check_repo_path(name)


def test_ordinary_names_pass() -> None:
    assert check_repo_path("sub/dir/model-Q4_K_M.gguf") == "sub/dir/model-Q4_K_M.gguf"
    assert check_repo_path("..hidden-but-fine") == "..hidden-but-fine"


# --- the memory estimate from a header (the additions to qdesk.memory) ------------------------------------------

def test_shape_from_a_header_prefix(folders: dict[str, Path], tmp_path: Path) -> None:
    source = folders["gguf"] / BIG
    data = source.read_bytes()
    full = read_model_shape(source)
    prefix = tmp_path / "prefix.gguf"
    prefix.write_bytes(data[:1000])
    assert read_model_shape_from_prefix(prefix, file_size=len(data)) is None  # ends inside the header: fetch more
    prefix.write_bytes(data[:100_000])
    assert read_model_shape_from_prefix(prefix, file_size=len(data)) == full
    assert check_fit_for_shape(full, ram_bytes=8 * GiB, vram_bytes=None) == check_fit(source, ram_bytes=8 * GiB,
                                                                                       vram_bytes=None)


# --- search and listing ---------------------------------------------------------------------------------------------

def test_search_filters_by_format_and_sorts(server: HubServer, settings: HubSettings) -> None:
    gguf = search_models("tiny", formats="gguf", settings=settings)
    assert [result.repo_id for result in gguf] == [GGUF_REPO]
    assert gguf[0].formats == ("gguf",) and gguf[0].downloads == 900
    assert [r.repo_id for r in search_models("TINY", formats="safetensors", settings=settings)] == [CHECKPOINT_REPO]
    assert [r.repo_id for r in search_models("tiny", settings=settings)] == [GGUF_REPO, CHECKPOINT_REPO]
    assert [r.repo_id for r in search_models("tiny", sort="recent", settings=settings)] == [CHECKPOINT_REPO,
                                                                                            GGUF_REPO]
    assert search_models("no-such-model", settings=settings) == []
    queries = [entry.query for entry in server.requests(path_contains="/api/models")]
    assert any("filter=gguf" in query and "sort=downloads" in query for query in queries)
    assert any("sort=lastModified" in query for query in queries)


def test_listing_groups_types_shards_and_fit_from_headers_only(server: HubServer, settings: HubSettings) -> None:
    listing = list_repo(GGUF_REPO, settings=settings, ram_bytes=16 * GiB, vram_bytes=0)
    groups = {group.name: group for group in listing.groups}
    assert set(groups) == {BIG, SMALL, "tiny-llama-Q8_0-*-of-00002.gguf", "mmproj-tiny-F16.gguf"}
    assert groups[SMALL].quant_type == "Q4_K_M" and groups[BIG].quant_type == "F32"
    sharded = groups["tiny-llama-Q8_0-*-of-00002.gguf"]
    assert sharded.quant_type == "Q8_0" and sharded.shard_count == 2 and sharded.complete
    assert sharded.size == sum(len(served(server, GGUF_REPO, f.path)) for f in sharded.files)
    assert groups["mmproj-tiny-F16.gguf"].projector and groups["mmproj-tiny-F16.gguf"].fit.fits is None
    assert {file.path for file in listing.other_files} == {"README.md", "config.json"}
    assert groups[SMALL].fit.fits and not groups[SMALL].fit.approximate  # its header was read
    assert groups[BIG].fit.fits and groups[BIG].fit.approximate  # scaled from that header
    assert groups[BIG].fit.needed_bytes > groups[SMALL].fit.needed_bytes
    assert listing.files[0].sha256 == sha256_of(served(server, GGUF_REPO, listing.files[0].path)) or \
        listing.files[0].sha256 is None
    bodies = cdn_gets(server)
    assert len(bodies) == 1 and bodies[0].range == "bytes=0-262143"  # one header, and only the start of it
    assert bodies[0].body_bytes < len(served(server, GGUF_REPO, SMALL))

    tight = list_repo(GGUF_REPO, settings=settings, ram_bytes=1_000_000, vram_bytes=0)
    assert not any(group.fit.fits for group in tight.groups if group.fit.fits is not None)

    checkpoint = list_repo(CHECKPOINT_REPO, settings=settings, ram_bytes=16 * GiB, vram_bytes=0)
    (group,) = checkpoint.groups
    assert group.kind == "safetensors" and group.shard_count == 2 and group.fit.fits and group.fit.approximate
    assert "estimate" in group.fit.summary


def test_header_range_grows_until_it_parses(server: HubServer, settings: HubSettings, folders: dict[str, Path]) -> None:
    from huggingface_hub import hf_hub_url

    data = served(server, GGUF_REPO, BIG)
    url = hf_hub_url(GGUF_REPO, BIG, endpoint=settings.endpoint)
    shape = fetch_gguf_shape(settings, url, file_size=len(data), name=BIG, first_bytes=2048)
    assert shape == read_model_shape(folders["gguf"] / BIG)
    ranges = [entry.range for entry in cdn_gets(server)]
    starts = [int(text.split("=")[1].split("-")[0]) for text in ranges]
    ends = [int(text.split("-")[1]) + 1 for text in ranges]
    assert len(ranges) >= 3 and starts[0] == 0 and starts[1:] == ends[:-1]  # each asks only for what is new
    assert ends[-1] < len(data) // 4


# --- downloading ----------------------------------------------------------------------------------------------------

def test_download_is_verified_laid_out_like_huggingface_hub_and_not_fetched_twice(
        server: HubServer, settings: HubSettings) -> None:
    from huggingface_hub import hf_hub_download, scan_cache_dir, try_to_load_from_cache

    # files another tool put in the cache first (an LFS file and a small git one)
    for name in (SMALL, "config.json"):
        hf_hub_download(GGUF_REPO, name, cache_dir=settings.cache_dir, endpoint=server.endpoint, token=False)
    server.clear_log()

    seen: list[Progress] = []
    result = download(GGUF_REPO, include=["*.gguf", "*.json"], settings=settings, progress=seen.append)
    status = {file.path: file.status for file in result.files}
    assert status[SMALL] == "cached" and status["config.json"] == "cached" and status[BIG] == "downloaded"
    assert "README.md" not in status and status["tiny-llama-Q8_0-00002-of-00002.gguf"] == "downloaded"
    fetched = {entry.path.rsplit("/", 1)[-1] for entry in cdn_gets(server)}
    assert sha256_of(served(server, GGUF_REPO, SMALL)) not in fetched  # found, not fetched again
    for file in result.files:
        data = served(server, GGUF_REPO, file.path)
        assert file.local_path.read_bytes() == data
        assert file.local_path.is_symlink() and file.local_path.resolve().parent.name == "blobs"
        if file.path.endswith(".gguf"):
            assert file.sha256 == sha256_of(data) == file.local_path.resolve().name
        assert try_to_load_from_cache(GGUF_REPO, file.path, cache_dir=settings.cache_dir) == str(file.local_path)
        assert hf_hub_download(GGUF_REPO, file.path, cache_dir=settings.cache_dir, local_files_only=True) == \
            str(file.local_path)
    assert seen[-1].done == seen[-1].total == sum(file.size for file in result.files) and seen[-1].unit == "bytes"
    assert result.bytes_downloaded == sum(file.size for file in result.files if file.status == "downloaded")
    repo_folder = settings.cache_dir / "models--tester--tiny-GGUF"
    assert (repo_folder / "refs" / "main").read_text() == result.commit
    (cached_repo,) = scan_cache_dir(settings.cache_dir).repos
    assert {f.file_name for r in cached_repo.revisions for f in r.files} >= {BIG, SMALL, "config.json"}
    assert not list(repo_folder.glob("blobs/*.incomplete"))

    server.clear_log()
    again = download(GGUF_REPO, include=["*.gguf", "*.json"], settings=settings)
    assert {file.status for file in again.files} == {"cached"} and again.bytes_downloaded == 0
    assert [entry.path for entry in server.log] == [f"/api/models/{GGUF_REPO}/revision/main"]  # the listing only


def test_progress_reports_speed_and_time_left() -> None:
    from qdesk.hub.transfer import TransferMeter

    now = [100.0]
    seen: list[Progress] = []
    meter = TransferMeter(10_000_000, seen.append, clock=lambda: now[0])
    meter.current = "model.gguf"
    meter.add_present(2_000_000)  # a resumed partial file: done, but not part of the speed
    for _ in range(4):
        now[0] += 1.0
        meter.advance(1_000_000)
    assert seen[-1] == Progress(6_000_000, 10_000_000, "bytes", "model.gguf: 1.0 MB/s, 4 s left")


def test_a_damaged_cached_copy_is_refetched(server: HubServer, settings: HubSettings) -> None:
    first = download(GGUF_REPO, include=[SMALL], settings=settings)
    blob = first.files[0].local_path.resolve()
    damaged = bytearray(blob.read_bytes())
    damaged[5000] ^= 0x01
    blob.write_bytes(bytes(damaged))
    again = download(GGUF_REPO, include=[SMALL], settings=settings)
    assert again.files[0].status == "downloaded"
    assert again.files[0].local_path.read_bytes() == served(server, GGUF_REPO, SMALL)


def test_paused_download_resumes_with_only_the_missing_bytes(server: HubServer, settings: HubSettings) -> None:
    data = served(server, GGUF_REPO, BIG)
    assert len(data) > SMALL_FILE_BYTES  # qdesk's own transfer, not hf_hub_download
    partial = partial_file(settings, GGUF_REPO, data)
    server.pause(BIG, PAUSE_AT)
    token = CancelToken()

    def pause_when_stalled() -> None:
        server.wait_until_paused()
        wait_for_size(partial, PAUSE_AT)
        token.cancel()  # the client is blocked reading: the cancel must still get through

    threading.Thread(target=pause_when_stalled, daemon=True).start()
    with pytest.raises(DownloadCancelled) as paused:
        download(GGUF_REPO, include=[BIG], settings=settings, cancel=token)
    assert paused.value.kept_bytes == PAUSE_AT and "resume" in str(paused.value)
    assert partial.stat().st_size == PAUSE_AT
    server.release()
    server.clear_log()

    result = download(GGUF_REPO, include=[BIG], settings=settings)
    assert result.files[0].status == "resumed" and result.files[0].local_path.read_bytes() == data
    (body,) = cdn_gets(server)
    assert body.range == f"bytes={PAUSE_AT}-" and body.body_bytes == len(data) - PAUSE_AT
    assert result.bytes_downloaded == len(data) - PAUSE_AT and not partial.exists()


def test_a_server_ignoring_range_gets_a_fresh_start(server: HubServer, settings: HubSettings) -> None:
    data = served(server, GGUF_REPO, BIG)
    partial = partial_file(settings, GGUF_REPO, data)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data[:PAUSE_AT])
    server.ignore_range.add(BIG)
    seen: list[Progress] = []
    result = download(GGUF_REPO, include=[BIG], settings=settings, progress=seen.append)
    assert result.files[0].local_path.read_bytes() == data and result.bytes_downloaded == len(data)
    (body,) = cdn_gets(server)
    assert body.range == f"bytes={PAUSE_AT}-" and body.status == 200 and body.body_bytes == len(data)
    assert seen[-1].done == seen[-1].total == len(data)


def test_a_damaged_small_file_is_refused_and_not_kept(server: HubServer, settings: HubSettings) -> None:
    """Small files come through hf_hub_download, which checks no checksum: qdesk checks it after."""
    server.corrupt.add("config.json")
    with pytest.raises(ChecksumError) as damaged:
        download(GGUF_REPO, include=["config.json"], settings=settings)
    assert "config.json arrived damaged" in one_sentence(str(damaged.value))
    repo_folder = settings.cache_dir / "models--tester--tiny-GGUF"
    assert not list(repo_folder.glob("blobs/*")) and not list(repo_folder.glob("snapshots/*/*"))
    server.corrupt.clear()
    (file,) = download(GGUF_REPO, include=["config.json"], settings=settings).files
    assert file.checksum == "git-sha1" and file.local_path.read_bytes() == served(server, GGUF_REPO, "config.json")


def test_why_qdesk_keeps_its_own_transfer(server: HubServer, settings: HubSettings) -> None:
    """huggingface_hub 2.4's hf_hub_download deletes its partial file when a transfer fails, so the next call starts
    from the first byte again, where qdesk's transfer resumes (test_server_going_away_is_a_clear_error_and_resumable).
    The day this fails, huggingface_hub has learnt to resume across calls: see docs/hub.md."""
    from huggingface_hub import hf_hub_download

    data = served(server, GGUF_REPO, BIG)
    blobs = settings.cache_dir / "models--tester--tiny-GGUF" / "blobs"
    server.pause(BIG, PAUSE_AT)
    threading.Thread(target=lambda: (server.wait_until_paused(), server.stop()), daemon=True).start()
    with pytest.raises(Exception):  # noqa: B017 (whatever huggingface_hub raises: the point is what it leaves)
        hf_hub_download(GGUF_REPO, BIG, cache_dir=settings.cache_dir, endpoint=server.endpoint, token=False)
    assert not list(blobs.glob("*"))  # the bytes it had received are gone
    server.start()
    server.clear_log()
    hf_hub_download(GGUF_REPO, BIG, cache_dir=settings.cache_dir, endpoint=server.endpoint, token=False)
    (body,) = cdn_gets(server)
    assert body.range is None and body.body_bytes == len(data)


def test_a_downloaded_checkpoint_is_ready_to_quantize(server: HubServer, settings: HubSettings) -> None:
    result = download(CHECKPOINT_REPO, settings=settings)
    assert result.checkpoint_dir == result.snapshot_dir and (result.checkpoint_dir / "config.json").is_file()
    assert sorted(path.name for path in result.checkpoint_dir.glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert result.gguf_files == []


def test_cancel_can_delete_the_partial_file(server: HubServer, settings: HubSettings) -> None:
    data = served(server, GGUF_REPO, BIG)
    partial = partial_file(settings, GGUF_REPO, data)
    server.pause(BIG, PAUSE_AT)
    token = CancelToken()
    threading.Thread(target=lambda: (server.wait_until_paused(), wait_for_size(partial, PAUSE_AT), token.cancel()),
                     daemon=True).start()
    with pytest.raises(DownloadCancelled, match="deleted") as cancelled:
        download(GGUF_REPO, include=[BIG], settings=settings, cancel=token, keep_partial=False)
    assert cancelled.value.kept_bytes == 0 and not partial.exists()
    server.release()
    before = CancelToken()
    before.cancel()
    with pytest.raises(DownloadCancelled, match="paused"):
        download(GGUF_REPO, include=[SMALL], settings=settings, cancel=before)


def test_corrupted_download_is_refused_and_not_kept(server: HubServer, settings: HubSettings) -> None:
    server.corrupt.add(BIG)
    with pytest.raises(ChecksumError) as damaged:
        download(GGUF_REPO, include=[BIG], settings=settings)
    message = one_sentence(str(damaged.value))
    assert "damaged" in message and "SHA-256" in message
    repo_folder = settings.cache_dir / "models--tester--tiny-GGUF"
    assert not list(repo_folder.glob("blobs/*")) and not list(repo_folder.glob("snapshots/*/*"))
    server.corrupt.clear()
    assert download(GGUF_REPO, include=[BIG], settings=settings).files[0].status == "downloaded"


def test_dropped_connection_is_retried_from_where_it_stopped(server: HubServer, settings: HubSettings) -> None:
    data = served(server, GGUF_REPO, BIG)
    server.drop_after[BIG] = 200_000
    result = download(GGUF_REPO, include=[BIG], settings=settings)
    assert result.files[0].local_path.read_bytes() == data
    first, second = cdn_gets(server)
    assert first.range is None and second.range is not None
    start = int(second.range.removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= 200_000 and second.body_bytes == len(data) - start


def test_server_going_away_is_a_clear_error_and_resumable(server: HubServer, settings: HubSettings) -> None:
    data = served(server, GGUF_REPO, BIG)
    partial = partial_file(settings, GGUF_REPO, data)
    server.pause(BIG, PAUSE_AT)
    threading.Thread(target=lambda: (server.wait_until_paused(), wait_for_size(partial, PAUSE_AT), server.stop()),
                     daemon=True).start()
    with pytest.raises(HubConnectionError) as lost:
        download(GGUF_REPO, include=[BIG], settings=settings)
    message = one_sentence(str(lost.value))
    assert "lost" in message and "resume" in message and partial.stat().st_size == PAUSE_AT

    server.start()
    server.clear_log()
    result = download(GGUF_REPO, include=[BIG], settings=settings)
    assert result.files[0].local_path.read_bytes() == data
    (body,) = cdn_gets(server)
    assert body.range == f"bytes={PAUSE_AT}-"


@pytest.fixture
def small_disk(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A tmpfs of `request.param` kilobytes: a disk that really fills up (needs root, else skipped)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={request.param}k", "tmpfs", str(mount_point)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


@pytest.mark.parametrize("small_disk", [1024], indirect=True)
def test_not_enough_disk_is_refused_before_the_first_byte(server: HubServer, small_disk: Path) -> None:
    settings = settings_for(server, small_disk / "hub")
    with pytest.raises(OutputError) as full:
        download(GGUF_REPO, include=[BIG, SMALL], settings=settings)
    assert "Not enough disk space" in one_sentence(str(full.value))
    assert not cdn_gets(server) and not list(small_disk.rglob("blobs/*"))


@pytest.mark.parametrize("small_disk", [2048], indirect=True)
def test_disk_filling_up_during_a_download(server: HubServer, small_disk: Path) -> None:
    """Another program fills the disk after the check: a clear error, the partial file kept for later."""
    settings = settings_for(server, small_disk / "hub")
    filler = small_disk / "other-program.bin"

    def fill_the_disk(progress: Progress) -> None:
        if progress.done > 0 and not filler.exists():
            free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
            filler.write_bytes(b"\0" * (free - 64 * 1024))

    with pytest.raises(OutputError) as full:
        download(GGUF_REPO, include=[BIG], settings=settings, progress=fill_the_disk)
    assert "disk filled up" in one_sentence(str(full.value))
    partial = partial_file(settings, GGUF_REPO, served(server, GGUF_REPO, BIG))
    kept = partial.stat().st_size
    assert kept > 0
    filler.unlink()
    server.clear_log()
    result = download(GGUF_REPO, include=[BIG], settings=settings)
    assert result.files[0].local_path.read_bytes() == served(server, GGUF_REPO, BIG)
    assert cdn_gets(server)[0].range == f"bytes={kept}-"


def test_a_listing_that_escapes_the_cache_is_refused(server: HubServer, settings: HubSettings,
                                                     tmp_path: Path) -> None:
    with pytest.raises(UnsafeFileNameError) as refused:
        list_repo(EVIL_REPO, settings=settings, fit=False)
    assert "'../evil.gguf'" in one_sentence(str(refused.value))
    with pytest.raises(UnsafeFileNameError):
        download(EVIL_REPO, settings=settings)
    assert not list(tmp_path.rglob("evil.gguf")) and not server.requests(path_contains="/resolve/")


# --- offline, tokens, and the command line -------------------------------------------------------------------------

# --- other servers: mirrors without sizes, LFS metadata, Range support or checksums ----------------------------

def test_a_mirror_without_sizes_lfs_metadata_or_ranges(folders: dict[str, Path], tmp_path: Path) -> None:
    with HubServer(listing_metadata=False, ranges=False) as mirror:
        mirror.add(ServedRepo.from_folder(GGUF_REPO, folders["gguf"]))
        settings = settings_for(mirror, tmp_path / "hf" / "hub")
        data, config = served(mirror, GGUF_REPO, BIG), served(mirror, GGUF_REPO, "config.json")

        listing = list_repo(GGUF_REPO, settings=settings, ram_bytes=16 * GiB, vram_bytes=0)
        sizes = {file.path: file.size for file in listing.files}
        assert sizes[BIG] == len(data) and sizes["README.md"] is None  # a model file's size is asked with a HEAD
        assert not any(file.sha256 for file in listing.files)
        groups = {group.name: group for group in listing.groups}
        assert groups[SMALL].fit.fits and not groups[SMALL].fit.approximate  # its header, though Range is ignored
        assert "README.md (size unknown)" in render_listing(listing)

        partial = partial_file(settings, GGUF_REPO, data)
        token = CancelToken()
        mirror.pause(BIG, PAUSE_AT)
        threading.Thread(target=lambda: (mirror.wait_until_paused(), wait_for_size(partial, PAUSE_AT),
                                         token.cancel()), daemon=True).start()
        with pytest.raises(DownloadCancelled):
            download(GGUF_REPO, include=[BIG], settings=settings, cancel=token)
        mirror.release()
        mirror.clear_log()

        seen: list[Progress] = []
        result = download(GGUF_REPO, include=[BIG, "config.json"], settings=settings, progress=seen.append)
        files = {file.path: file for file in result.files}
        assert files[BIG].local_path.read_bytes() == data and files[BIG].status == "downloaded"  # from zero again
        (body,) = cdn_gets(mirror)
        assert body.range == f"bytes={PAUSE_AT}-" and body.status == 200 and body.body_bytes == len(data)
        assert result.bytes_downloaded == len(data) + len(config) and seen[-1].done == seen[-1].total
        assert (files[BIG].checksum, files["config.json"].checksum) == ("sha256", "git-sha1")  # from the ETags
        assert files[BIG].sha256 == sha256_of(data) and result.unverified == []


def test_a_plain_mirror_gives_no_checksum_and_the_result_says_so(folders: dict[str, Path], tmp_path: Path) -> None:
    with HubServer(listing_metadata=False, ranges=False, hub_headers=False) as mirror:
        mirror.add(ServedRepo.from_folder(GGUF_REPO, folders["gguf"]))
        env = cli_env(mirror, tmp_path)
        listed = qdesk("download", GGUF_REPO, "--list", env=env)
        assert listed.returncode == 0 and "size unknown" in listed.stdout, listed.stderr

        fetched = qdesk("download", GGUF_REPO, "--include", BIG, "--include", "config.json", "--json", env=env)
        assert fetched.returncode == 0, fetched.stderr
        result = json.loads(fetched.stdout)
        assert sorted(result["unverified"]) == sorted([BIG, "config.json"])
        for file in result["files"]:
            data = served(mirror, GGUF_REPO, file["path"])
            assert Path(file["local_path"]).read_bytes() == data and file["size"] == len(data)  # sizes from the GET
            assert file["verified"] is False and file["checksum"] is None and file["status"] == "downloaded"

        again = qdesk("download", GGUF_REPO, "--include", BIG, env=env)
        assert again.returncode == 0 and "already in the cache" in again.stdout
        assert f"not checksummed (the server published no checksum for them): {BIG}" in again.stdout


def closed_port_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_without_network_the_cache_still_serves(server: HubServer, settings: HubSettings, tmp_path: Path) -> None:
    download(GGUF_REPO, include=["*.json", "*.md"], settings=settings)
    unreachable = settings_for(server, settings.cache_dir, endpoint=closed_port_endpoint())
    result = download(GGUF_REPO, include=["*.json", "*.md"], settings=unreachable)
    assert "cannot be reached" in one_sentence(result.offline_note)
    assert {file.path for file in result.files} == {"config.json", "README.md"}
    assert result.files[0].local_path.is_file()
    with pytest.raises(HubUnreachableError, match="is not in the cache"):
        download(CHECKPOINT_REPO, settings=unreachable)
    with pytest.raises(HubUnreachableError):
        list_repo(GGUF_REPO, settings=unreachable)


def test_an_include_pattern_that_matches_nothing_says_so(server: HubServer, settings: HubSettings) -> None:
    download(GGUF_REPO, include=["*.md"], settings=settings)
    with pytest.raises(HubNotFoundError) as online:
        download(GGUF_REPO, include=["../*"], settings=settings)
    assert f"No file of {GGUF_REPO} matches '../*'" in one_sentence(str(online.value))
    offline = settings_for(server, settings.cache_dir, offline=True)
    with pytest.raises(HubOfflineError) as cached:
        download(GGUF_REPO, include=["../*"], settings=offline)
    message = one_sentence(str(cached.value))
    assert f"no file of {GGUF_REPO} in the cache matches '../*'" in message and "is not in the cache" not in message


def test_search_fails_at_once_when_the_server_is_in_trouble(server: HubServer, settings: HubSettings) -> None:
    """HfApi.list_models would retry five times over 23 s: qdesk configures its client not to."""
    server.api_status = 503
    with pytest.raises(HubUnreachableError, match="HTTP 503"):
        search_models("tiny", formats="gguf", settings=settings)
    assert len(server.requests(path_contains="/api/models")) == 1
    with pytest.raises(HubUnreachableError, match="cannot be reached"):
        search_models("tiny", settings=settings_for(server, settings.cache_dir, endpoint=closed_port_endpoint()))


def qdesk(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qdesk", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})


def cli_env(server: HubServer | None, home: Path, **extra: str) -> dict[str, str]:
    return {"HF_ENDPOINT": server.endpoint if server else closed_port_endpoint(), "HF_HOME": str(home / "hf"),
            "HF_HUB_CACHE": str(home / "hf" / "hub"), "HF_TOKEN": "", "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "QDESK_MODELS_DIR": str(home / "models"), **extra}


def test_cli_lists_downloads_and_adds_ggufs_to_the_library(server: HubServer, tmp_path: Path) -> None:
    from qdesk.library.store import Library

    env = cli_env(server, tmp_path)
    listed = qdesk("download", GGUF_REPO, "--list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "Q4_K_M" in listed.stdout and "2/2 shards" in listed.stdout and "fits" in listed.stdout
    document = json.loads(qdesk("download", GGUF_REPO, "--list", "--json", env=env).stdout)
    assert {group["quant_type"] for group in document["groups"]} >= {"Q4_K_M", "F32", "Q8_0"}

    fetched = qdesk("download", GGUF_REPO, "--include", "*Q4_K_M*", "--include", "config.json", "--json", env=env)
    assert fetched.returncode == 0, fetched.stderr
    result = json.loads(fetched.stdout)
    paths = {file["path"]: Path(file["local_path"]) for file in result["files"]}
    assert set(paths) == {SMALL, "config.json"}
    assert paths[SMALL].read_bytes() == served(server, GGUF_REPO, SMALL)
    entries = {entry.id: entry for entry in Library(tmp_path / "models").entries()}
    library_id = result["library"][str(paths[SMALL])]
    assert entries[library_id].source == "registered:hf-cache" and entries[library_id].status == "ok"

    text = qdesk("download", GGUF_REPO, "--include", "*Q4_K_M*", env=env)
    assert text.returncode == 0 and str(paths[SMALL]) in text.stdout and "already in the cache" in text.stdout

    searched = json.loads(qdesk("download", "--search", "tiny", "--format", "gguf", "--json", env=env).stdout)
    assert [item["repo_id"] for item in searched] == [GGUF_REPO]


def test_cli_errors_are_one_sentence(server: HubServer, tmp_path: Path) -> None:
    env = cli_env(server, tmp_path)
    cases = ((["tester/no-such-repo"], "no repository"), ([GGUF_REPO, "--include", "*.nothing"], "matches"),
             ([GGUF_REPO, "--revision", "v9"], "no revision"), (["not a repo"], "not a Hub repository"))
    for args, fragment in cases:
        result = qdesk("download", *args, env=env)
        assert result.returncode == 1 and fragment in one_sentence(result.stderr), result.stderr
    assert qdesk("download", env=env).returncode == 2


def test_cli_ctrl_c_keeps_the_partial_file_and_a_killed_download_resumes(server: HubServer, tmp_path: Path) -> None:
    env = cli_env(server, tmp_path)
    data = served(server, GGUF_REPO, BIG)
    partial = tmp_path / "hf" / "hub" / "models--tester--tiny-GGUF" / "blobs" / f"{sha256_of(data)}.incomplete"
    command = [sys.executable, "-m", "qdesk", "download", GGUF_REPO, "--include", BIG]

    server.pause(BIG, PAUSE_AT)
    interrupted = subprocess.Popen(command, env={**os.environ, **env}, stderr=subprocess.PIPE, text=True)
    server.wait_until_paused()
    wait_for_size(partial, PAUSE_AT)
    interrupted.send_signal(signal.SIGINT)
    _, stderr = interrupted.communicate(timeout=30)
    assert interrupted.returncode == 130
    assert "paused" in one_sentence(stderr) and "resume" in stderr and partial.stat().st_size == PAUSE_AT
    server.release()

    server.pause(BIG, 2 * PAUSE_AT)
    killed = subprocess.Popen(command, env={**os.environ, **env}, stderr=subprocess.DEVNULL)
    server.wait_until_paused()
    wait_for_size(partial, 2 * PAUSE_AT)
    killed.kill()
    killed.wait(timeout=30)
    server.release()
    assert partial.stat().st_size == 2 * PAUSE_AT
    server.clear_log()

    resumed = qdesk("download", GGUF_REPO, "--include", BIG, "--json", env=env)
    assert resumed.returncode == 0, resumed.stderr
    (file,) = json.loads(resumed.stdout)["files"]
    assert file["status"] == "resumed" and Path(file["local_path"]).read_bytes() == data
    (body,) = cdn_gets(server)
    assert body.range == f"bytes={2 * PAUSE_AT}-" and body.body_bytes == len(data) - 2 * PAUSE_AT


def test_offline_mode_makes_no_request_and_says_so_once(server: HubServer, tmp_path: Path) -> None:
    env = cli_env(server, tmp_path)
    assert qdesk("download", GGUF_REPO, "--include", "*.md", env=env).returncode == 0
    server.clear_log()
    offline = qdesk("download", GGUF_REPO, "--include", "*.md", "--no-library", env={**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    assert "Offline mode is on" in one_sentence(offline.stderr) and "README.md" in offline.stdout
    missing = qdesk("download", CHECKPOINT_REPO, env={**env, "HF_HUB_OFFLINE": "1"})
    assert missing.returncode == 1 and "HF_HUB_OFFLINE" in one_sentence(missing.stderr)
    unmatched = qdesk("download", GGUF_REPO, "--include", "../*", env={**env, "HF_HUB_OFFLINE": "1"})
    assert unmatched.returncode == 1 and "in the cache matches '../*'" in one_sentence(unmatched.stderr)
    search = qdesk("download", "--search", "tiny", env={**env, "HF_HUB_OFFLINE": "1"})
    assert search.returncode == 1 and "Offline mode" in one_sentence(search.stderr)
    assert server.log == []

    no_network = qdesk("download", GGUF_REPO, "--include", "*.md", env=cli_env(None, tmp_path))
    assert no_network.returncode == 0 and "cannot be reached" in one_sentence(no_network.stderr)


def test_gated_repository_needs_the_token_which_is_never_shown(server: HubServer, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    env = cli_env(server, tmp_path)
    anonymous = qdesk("download", GATED_REPO, env=env)
    assert anonymous.returncode == 1
    message = one_sentence(anonymous.stderr)
    assert "gated or private" in message and "hf auth login" in message

    wrong = "hf_wrong_token_should_not_show_5521"
    refused = qdesk("--debug", "download", GATED_REPO, env={**env, "HF_TOKEN": wrong})
    assert refused.returncode == 1 and "gated or private" in refused.stderr and wrong not in refused.stderr

    with_token = {**env, "HF_TOKEN": TOKEN}
    server.clear_log()
    runs = [qdesk("download", GATED_REPO, "--list", env=with_token), qdesk("download", GATED_REPO, env=with_token),
            qdesk("--debug", "download", GATED_REPO, "--json", env=with_token)]
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert TOKEN not in run.stdout + run.stderr
    resolves = server.requests(path_contains="/resolve/")
    assert resolves and all(entry.authorized for entry in resolves)
    assert not any(entry.authorized for entry in server.requests(server="cdn"))  # the token never leaves the Hub

    caplog.set_level(logging.DEBUG)
    settings = settings_for(server, tmp_path / "in-process", token=TOKEN)
    assert TOKEN not in repr(settings)
    download(GATED_REPO, settings=settings)
    assert TOKEN not in caplog.text
