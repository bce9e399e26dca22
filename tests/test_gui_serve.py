"""The Serve section: start the server on the starter model, see a request in its log, stop it, warnings."""

from __future__ import annotations

import json
import urllib.request

from qdesk.gui.serve_view import ServeView
from tests.test_engine import worker_children

START_TIMEOUT_MS = 60_000


def test_serve_starts_logs_requests_and_stops(qtbot, gui_context) -> None:
    before = set(worker_children())
    view = ServeView(gui_context)
    qtbot.addWidget(view)
    assert view.models.count() >= 1, "the starter model is offered"
    view.port.setValue(0)
    with qtbot.waitSignal(view.server_changed, timeout=START_TIMEOUT_MS):
        view.start_button.click()
    assert view.server is not None and view.server.url in view.address.text()
    assert not view.host.isEnabled()
    with urllib.request.urlopen(f"{view.server.url}/models", timeout=60) as response:
        listed = [model["id"] for model in json.loads(response.read())["data"]]
    assert listed == view.server.models
    qtbot.waitUntil(lambda: view.log.rowCount() == 1, timeout=10_000)
    assert view.log.item(0, 2).text() == "GET /v1/models" and view.log.item(0, 4).text() == "200"
    server = view.server
    with qtbot.waitSignal(view.server_changed, timeout=START_TIMEOUT_MS):
        view.start_button.click()
    assert view.server is None and not server.running and view.address.text() == "not running"
    assert set(worker_children()) <= before


def test_serve_refuses_other_machines_without_a_key_in_one_sentence(qtbot, gui_context) -> None:
    view = ServeView(gui_context)
    qtbot.addWidget(view)
    view.host.setText("0.0.0.0")
    view.port.setValue(0)
    with qtbot.waitSignal(view.server_changed, timeout=START_TIMEOUT_MS):
        view.start_button.click()
    assert view.server is None
    assert "--api-key" in view.problem.text() or "key" in view.problem.text()


def test_a_worker_off_this_machine_is_warned_about_and_kept(qtbot, gui_context) -> None:
    view = ServeView(gui_context)
    qtbot.addWidget(view)
    view.workers.setText("127.0.0.1:50052")
    assert view.worker_warning.isHidden()
    view.workers.setText("192.168.1.20:50052")
    assert not view.worker_warning.isHidden() and "no authentication" in view.worker_warning.text()
    view.save_workers()
    assert gui_context.settings.rpc_workers == "192.168.1.20:50052"
    view.workers.setText("not-an-address")
    assert "host:port" in view.worker_warning.text()
