"""The Discover section against the local stand-in Hub: search, listing with fit marks, download into the library,
pause and resume, cancel leaving nothing, and one sentence without network."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QPushButton, QWidget

from qdesk.gui.context import AppContext
from qdesk.gui.discover_download import State
from qdesk.gui.discover_view import DiscoverView
from tests.builders.hub_server import HubServer, ServedRepo, write_tiny_gguf, write_tiny_safetensors

REPO, CHECKPOINT_REPO = "tester/tiny-GGUF", "tester/tiny-checkpoint"
SMALL, BIG = "tiny-llama-q4_k_m.gguf", "tiny-llama-F32.gguf"
PAUSE_AT = 300_000
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def repo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hub-repo")
    write_tiny_gguf(folder / BIG, vocab=5000)  # over 1 MiB: fetched by qdesk's own resumable transfer
    write_tiny_gguf(folder / SMALL, dtype=np.float16)
    (folder / "README.md").write_text("# tiny\n")
    return folder


@pytest.fixture(scope="module")
def checkpoint_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hub-checkpoint")
    write_tiny_safetensors(folder / "model.safetensors", 1)
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}\n')
    return folder


@pytest.fixture
def hub(repo_folder: Path, checkpoint_folder: Path, gui_folders: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add(ServedRepo.from_folder(REPO, repo_folder, downloads=900))
        server.add(ServedRepo.from_folder(CHECKPOINT_REPO, checkpoint_folder, downloads=5))
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_HOME", str(gui_folders["cache"] / "hf"))
        monkeypatch.setenv("HF_HUB_CACHE", str(gui_folders["cache"] / "hf" / "hub"))
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        try:
            yield server
        finally:
            server.release()


def repo_cache(gui_folders: dict[str, Path]) -> Path:
    return gui_folders["cache"] / "hf" / "hub" / "models--tester--tiny-GGUF"


def discover_view(qtbot, context: AppContext) -> DiscoverView:
    view = DiscoverView(context)
    qtbot.addWidget(view)
    view.show()
    return view


def open_repo(qtbot, view: DiscoverView) -> None:
    qtbot.keyClicks(view.search_box, "tiny-GGUF")
    qtbot.keyClick(view.search_box, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: view.results.rowCount() == 1, timeout=WAIT_MS)
    view.results.selectRow(0)
    qtbot.waitUntil(lambda: view.listing is not None, timeout=WAIT_MS)


def wait_for_partial(qtbot, gui_folders: dict[str, Path]) -> Path:
    """The partial file of the paused transfer, once it holds every byte sent before the pause."""
    def partial() -> Path | None:
        found = list(repo_cache(gui_folders).glob("blobs/*.incomplete"))
        return found[0] if found and found[0].stat().st_size >= PAUSE_AT else None

    qtbot.waitUntil(lambda: partial() is not None, timeout=WAIT_MS)
    return partial()


def start_download(qtbot, view: DiscoverView, name: str) -> None:
    view.files.select_group(name)
    assert view.download_button.isEnabled()
    qtbot.mouseClick(view.download_button, Qt.MouseButton.LeftButton)
    assert view.download_panel.state == State.RUNNING


def test_search_list_and_download_into_the_library(qtbot, gui_context: AppContext, hub: HubServer,
                                                   gui_folders: dict[str, Path]) -> None:
    view = discover_view(qtbot, gui_context)
    open_repo(qtbot, view)
    cells = [view.results.item(0, column).text() for column in range(view.results.columnCount())]
    assert cells[0] == REPO and cells[1] == "900" and cells[4] == "gguf"
    rows = {view.files.item(row, 0).text(): [view.files.item(row, column).text() for column in range(4)]
            for row in range(view.files.rowCount())}
    assert set(rows) == {SMALL, BIG}
    assert rows[SMALL][1] == "Q4_K_M" and rows[BIG][1] == "F32"
    assert all(row[3].startswith("✓") for row in rows.values())  # tiny models fit any machine
    assert "README.md" in view.other_files.text()

    with qtbot.waitSignal(gui_context.library_changed, timeout=WAIT_MS):
        start_download(qtbot, view, SMALL)
    panel = view.download_panel
    assert panel.state == State.IDLE and "in the library" in panel.label.text()
    assert panel.library_button.isVisible()
    (entry,) = [entry for entry in gui_context.library().entries() if entry.path.name == SMALL]
    assert entry.path.read_bytes() == hub.repos[REPO].files[SMALL].data and entry.read_only


def test_a_paused_download_resumes(qtbot, gui_context: AppContext, hub: HubServer,
                                   gui_folders: dict[str, Path]) -> None:
    view = discover_view(qtbot, gui_context)
    open_repo(qtbot, view)
    hub.pause(BIG, PAUSE_AT)
    start_download(qtbot, view, BIG)
    hub.wait_until_paused()
    partial = wait_for_partial(qtbot, gui_folders)
    panel = view.download_panel
    qtbot.mouseClick(panel.pause_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: panel.state == State.PAUSED, timeout=WAIT_MS)
    assert panel.pause_button.text() == "&Resume" and "Resume" in panel.label.text()
    assert partial.stat().st_size == PAUSE_AT
    hub.release()
    hub.clear_log()
    with qtbot.waitSignal(gui_context.library_changed, timeout=WAIT_MS):
        qtbot.mouseClick(panel.pause_button, Qt.MouseButton.LeftButton)
    (body,) = hub.requests(method="GET", server="cdn")
    assert body.range == f"bytes={PAUSE_AT}-"
    assert any(entry.path.name == BIG for entry in gui_context.library().entries())


def test_a_cancelled_download_leaves_nothing(qtbot, gui_context: AppContext, hub: HubServer,
                                             gui_folders: dict[str, Path]) -> None:
    view = discover_view(qtbot, gui_context)
    open_repo(qtbot, view)
    hub.pause(BIG, PAUSE_AT)
    start_download(qtbot, view, BIG)
    hub.wait_until_paused()
    wait_for_partial(qtbot, gui_folders)
    panel = view.download_panel
    qtbot.mouseClick(panel.cancel_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: panel.state == State.IDLE, timeout=WAIT_MS)
    assert "cancelled" in panel.label.text()
    cache = repo_cache(gui_folders)
    assert not list(cache.glob("blobs/*")) and not list(cache.glob("snapshots/*/*"))
    assert gui_context.library().entries() == [] or all(
        not entry.path.is_relative_to(cache) for entry in gui_context.library().entries())
    assert view.download_button.isEnabled()


def test_offline_mode_is_one_sentence_and_no_request(qtbot, gui_context: AppContext, hub: HubServer,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    view = discover_view(qtbot, gui_context)
    qtbot.keyClicks(view.search_box, "tiny")
    qtbot.keyClick(view.search_box, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: view.search_job is None, timeout=WAIT_MS)
    text = view.message.text()
    assert "Offline mode" in text and "\n" not in text and view.message.property("role") == "error"
    assert hub.log == []


def test_no_network_is_one_sentence(qtbot, gui_context: AppContext, hub: HubServer,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    view = discover_view(qtbot, gui_context)
    view.search_box.setText("tiny")
    view.search()
    qtbot.waitUntil(lambda: view.search_job is None, timeout=WAIT_MS)
    text = view.message.text()
    assert "cannot be reached" in text and "\n" not in text and view.details_button.isVisibleTo(view)


def test_a_downloaded_checkpoint_goes_to_quantize(qtbot, gui_context: AppContext, hub: HubServer) -> None:
    view = discover_view(qtbot, gui_context)
    view.format_box.setCurrentIndex(view.format_box.findData("safetensors"))
    view.search_box.setText("tiny")
    view.search()
    qtbot.waitUntil(lambda: view.results.rowCount() == 1, timeout=WAIT_MS)
    view.results.selectRow(0)
    qtbot.waitUntil(lambda: view.listing is not None, timeout=WAIT_MS)
    assert view.files.item(0, 1).text() == "checkpoint"
    start_download(qtbot, view, "model.safetensors")
    panel = view.download_panel
    qtbot.waitUntil(lambda: panel.state == State.IDLE, timeout=WAIT_MS)
    assert panel.quantize_button.isVisibleTo(view) and "quantize it" in panel.label.text()
    with qtbot.waitSignal(gui_context.open_in_quantize, timeout=5_000) as opened:
        qtbot.mouseClick(panel.quantize_button, Qt.MouseButton.LeftButton)
    (folder,) = opened.args
    assert sorted(path.name for path in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_offline_mode_shows_on_opening_with_a_way_on(qtbot, gui_context: AppContext, hub: HubServer,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    view = discover_view(qtbot, gui_context)
    view.activated()
    qtbot.waitUntil(lambda: view.hub_status is not None, timeout=WAIT_MS)
    assert view.offline_row.isVisibleTo(view) and "Offline mode" in view.offline_label.text()
    assert not view.search_button.isEnabled()
    with qtbot.waitSignal(view.scan_requested, timeout=1000):
        qtbot.mouseClick(view.findChild(QPushButton, "offlineScan"), Qt.MouseButton.LeftButton)
    assert hub.log == []


def test_no_network_shows_on_opening_and_clears_when_the_hub_answers(qtbot, gui_context: AppContext, hub: HubServer,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    view = discover_view(qtbot, gui_context)
    view.activated()
    qtbot.waitUntil(lambda: view.hub_status is not None, timeout=WAIT_MS)
    assert view.offline_row.isVisibleTo(view) and "cannot be reached" in view.offline_label.text()
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    qtbot.mouseClick(view.retry_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: view.hub_status is not None and view.hub_status.online, timeout=WAIT_MS)
    assert not view.offline_row.isVisibleTo(view)


def test_failure_details_go_to_the_log_not_the_window(qtbot, gui_context: AppContext,
                                                      gui_folders: dict[str, Path]) -> None:
    from qdesk.app.logs import log_path
    from qdesk.gui.feedback import show_failure

    parent = QWidget()
    qtbot.addWidget(parent)
    try:
        raise RuntimeError("a bug deep inside")
    except RuntimeError as error:
        box = show_failure(parent, error, "Discover")
    assert box.detailedText() == "" and "Traceback" not in box.text() + box.informativeText()
    assert str(log_path()) in box.informativeText() and log_path().is_relative_to(gui_folders["cache"])
    assert "Traceback" in log_path().read_text(encoding="utf-8")
    assert box.findChild(QPushButton, "openLog") is not None
    box.close()


def test_every_column_shows_in_a_narrow_window(qtbot, gui_context: AppContext, hub: HubServer) -> None:
    view = discover_view(qtbot, gui_context)
    view.resize(850, 600)  # the section's width in a 1024-pixel window
    open_repo(qtbot, view)
    for table in (view.results, view.files):
        header = table.horizontalHeader()
        last = header.count() - 1
        assert header.sectionViewportPosition(last) + header.sectionSize(last) <= table.viewport().width()
        assert header.sectionSize(0) > 60  # the name still has room
