"""llama.cpp's RPC workers on loopback: `qdesk worker`, the starter model split three ways, placement, failures.

These need llama-cpp-python built with its RPC backend. `make install` builds it so, and CI installs through it, so
there a missing backend fails every test here; an installation made some other way skips them, saying why.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from converters.core.errors import UserError
from native.rpc import RemoteDevice, rpc_available
from qdesk.chat.engine import LoadOptions, ModelCrashed, SamplingOptions, load_model
from qdesk.rpc.endpoints import WorkerUnreachable, exposure_warnings, parse_endpoints
from qdesk.rpc.placement import device_of_layers, place_layers
from tests.starter_prompts import CAPITAL_QUESTION
from tests.test_engine import worker_children

REPO = Path(__file__).resolve().parent.parent
CAPITAL = [{"role": "user", "content": CAPITAL_QUESTION}]
GREEDY = SamplingOptions(temperature=0.0, max_tokens=12)
START_TIMEOUT_S = 60.0
LOGIT_TOLERANCE = 1e-3
"""The split run's logits agree with the local run's within this fraction of the logits' scale (largest |logit|)."""


def _installed_by_make() -> bool:
    return bool(os.environ.get("CI")) or (Path(sys.prefix).resolve() == (REPO / ".venv").resolve()
                                          and (REPO / ".venv" / ".installed").exists())


@pytest.fixture(scope="module", autouse=True)
def rpc_backend() -> None:
    if rpc_available():
        return
    message = "llama-cpp-python has no RPC backend"
    if _installed_by_make():
        pytest.fail(f"{message} although `make install` built it; make install must build it with "
                    "CMAKE_ARGS=\"-DGGML_RPC=on\" (see Makefile).")
    pytest.skip(f"{message}: it was installed outside `make install`; run `make install` to build it with RPC.")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_worker(port: int, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    worker = subprocess.Popen([sys.executable, "-m", "qdesk", "worker", "--port", str(port), "--threads", "1",
                               *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and worker.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return worker
        except OSError:
            time.sleep(0.1)
    stop_worker(worker)
    raise AssertionError(f"the worker on port {port} did not start: {worker.stderr.read() if worker.stderr else ''}")


def stop_worker(worker: subprocess.Popen[str]) -> None:
    if worker.poll() is None:
        worker.kill()
    worker.wait(timeout=30)
    if worker.stderr is not None:
        worker.stderr.close()


@pytest.fixture(scope="module")
def workers() -> Iterator[tuple[str, str]]:
    ports = free_port(), free_port()
    started = [start_worker(port) for port in ports]
    try:
        yield f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"
    finally:
        for worker in started:
            stop_worker(worker)


def test_the_starter_model_split_three_ways_answers_like_the_local_run(starter_gguf: Path,
                                                                       workers: tuple[str, str]) -> None:
    options = LoadOptions(n_ctx=256, n_threads=1, rpc=workers)
    free = 8 << 30
    placement = place_layers(starter_gguf, options, local_free=free,
                             workers=[RemoteDevice(endpoint, f"RPC{i}", "CPU", free, free)
                                      for i, endpoint in enumerate(workers)])
    print(placement.render())
    assert [bool(device.layers) for device in placement.devices] == [True, True, True]
    assert placement.devices[-1].holds_output
    with load_model(starter_gguf, LoadOptions(n_ctx=256, n_threads=1)) as local:
        expected = local.chat(CAPITAL, GREEDY)
        probe = list(expected.token_ids[:8])
        local_logits = local.next_token_logits(probe)
    with load_model(starter_gguf, placement.load_options) as split:
        assert split.rpc == workers
        answer = split.chat(CAPITAL, GREEDY)
        split_logits = split.next_token_logits(probe)
    assert answer.token_ids == expected.token_ids
    assert answer.text == expected.text
    scale = float(np.max(np.abs(local_logits)))
    worst = float(np.max(np.abs(split_logits - local_logits)))
    print(f"largest logit difference {worst:.3g} at a scale of {scale:.3g}")
    assert scale > 1.0 and worst <= LOGIT_TOLERANCE * scale


def test_the_placement_follows_llama_cpps_layer_rule() -> None:
    # 31 offloadable layers (30 blocks and the output), 20 offloaded, split evenly: llama.cpp's own log put blocks
    # 11-20 on the first worker and 21-29 with the output on the second.
    owners = device_of_layers(31, 20, [1.0, 1.0])
    assert owners[:11] == [None] * 11
    assert owners[11:21] == [0] * 10
    assert owners[21:] == [1] * 10


def test_load_model_places_layers_by_the_workers_free_memory(starter_gguf: Path, workers: tuple[str, str]) -> None:
    placement = place_layers(starter_gguf, LoadOptions(n_ctx=256, rpc=workers))
    assert [device.endpoint for device in placement.devices] == [None, *workers]
    assert all(device.free_bytes > 0 for device in placement.devices)
    assert placement.n_gpu_layers == sum(len(d.layers) + d.holds_output for d in placement.devices[1:])
    assert sum(len(device.layers) for device in placement.devices) == 30


def test_a_worker_that_dies_mid_generation_is_one_sentence(starter_gguf: Path) -> None:
    port = free_port()
    worker = start_worker(port)
    endpoint = f"127.0.0.1:{port}"
    try:
        with load_model(starter_gguf, LoadOptions(n_ctx=256, n_threads=1, rpc=(endpoint,),
                                                  n_gpu_layers=31, tensor_split=(1.0,))) as model:
            tokens = []

            def on_token(event: object) -> None:
                tokens.append(event)
                if len(tokens) == 2:
                    worker.kill()

            started = time.monotonic()
            with pytest.raises(ModelCrashed) as raised:
                model.chat([{"role": "user", "content": "Tell me a long story."}],
                           SamplingOptions(temperature=0.0, max_tokens=200), on_token=on_token)
            assert time.monotonic() - started < 120
        message = str(raised.value)
        assert endpoint in message and "qdesk worker" in message and message.count(". ") == 0
    finally:
        stop_worker(worker)


def test_an_unreachable_worker_is_refused_before_loading(starter_gguf: Path) -> None:
    before = set(worker_children())
    with pytest.raises(WorkerUnreachable, match=r"qdesk worker --host 127\.0\.0\.1"):
        load_model(starter_gguf, LoadOptions(n_ctx=256, rpc=(f"127.0.0.1:{free_port()}",)))
    assert set(worker_children()) <= before


def test_the_worker_command_refuses_a_taken_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        finished = subprocess.run([sys.executable, "-m", "qdesk", "worker", "--port", str(port)], capture_output=True,
                                  text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert finished.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in finished.stderr


def test_a_worker_with_a_memory_cap_reports_it(starter_gguf: Path) -> None:
    from qdesk.rpc.probe import describe_workers

    port = free_port()
    worker = start_worker(port, "--mem", "300MiB")
    try:
        devices = describe_workers([f"127.0.0.1:{port}"])
        assert [device.memory_free for device in devices] == [300 << 20]
    finally:
        stop_worker(worker)


def test_addresses_are_checked_and_remote_ones_warned_about() -> None:
    assert parse_endpoints("127.0.0.1:50052, localhost:1,127.0.0.1:50052") == ("127.0.0.1:50052", "localhost:1")
    with pytest.raises(UserError, match="host:port"):
        parse_endpoints("192.168.1.20")
    assert exposure_warnings(["127.0.0.1:1", "localhost:2"]) == []
    [warning] = exposure_warnings(["192.168.1.20:50052"])
    assert "no authentication" in warning and "192.168.1.20:50052" in warning
