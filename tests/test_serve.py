"""`qdesk serve` with the official `openai` client against the real server on loopback and the real starter model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from qdesk.chat.engine import LoadOptions
from qdesk.serve.server import RunningServer, ServeError, ServeOptions, start_server
from qdesk.serve.stops import StopScanner
from tests.starter_prompts import CAPITAL_QUESTION
from tests.test_engine import worker_children

CAPITAL = [{"role": "user", "content": CAPITAL_QUESTION}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
CLIENT_TIMEOUT_S = 180.0
"""Every request is bounded: a server that hangs fails the test instead of holding it."""
REPO = Path(__file__).resolve().parent.parent


def http(url: str, body: bytes | dict | None = None, headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], dict]:
    """(status, lower-cased headers, JSON) of one plain request, bounded in time."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=CLIENT_TIMEOUT_S) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, json.loads(error.read())


def client_for(server: RunningServer, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=CLIENT_TIMEOUT_S)


@pytest.fixture(scope="module")
def server(starter_gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    library = tmp_path_factory.mktemp("library")
    before = set(worker_children())
    with start_server(ServeOptions(models=(str(starter_gguf),), port=0, load=LoadOptions(n_ctx=512)),
                      library_root=library) as running:
        yield running
    assert not running.running
    assert set(worker_children()) <= before, "a model worker outlived the server"


@pytest.fixture(scope="module")
def model_name(server: RunningServer) -> str:
    return server.models[0]


def test_models_are_listed_by_name(server: RunningServer, model_name: str) -> None:
    client = client_for(server)
    assert [model.id for model in client.models.list()] == [model_name]
    assert client.models.retrieve(model_name).owned_by == "qdesk"


def test_an_unknown_model_is_a_404_in_openai_shape(server: RunningServer) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client_for(server).chat.completions.create(model="no-such-model", messages=CAPITAL, max_tokens=4)
    assert raised.value.code == "model_not_found"
    assert "GET /v1/models" in raised.value.message


def test_chat_streamed_and_not_give_the_same_greedy_answer(server: RunningServer, model_name: str) -> None:
    client = client_for(server)
    whole = client.chat.completions.create(model=model_name, messages=CAPITAL, max_tokens=16, temperature=0,
                                           seed=1)
    assert whole.choices[0].message.role == "assistant"
    assert "Paris" in whole.choices[0].message.content or whole.choices[0].message.content.strip()
    assert whole.usage.completion_tokens <= 16 and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    pieces, usage, reasons = [], None, []
    for chunk in client.chat.completions.create(model=model_name, messages=CAPITAL, max_tokens=16, temperature=0,
                                                seed=1, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == whole.choices[0].message.content
    assert reasons[-1] == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_completions_honour_stop_sequences_and_report_usage(server: RunningServer, model_name: str) -> None:
    client = client_for(server)
    free = client.completions.create(model=model_name, prompt="The capital of France is", max_tokens=12,
                                     temperature=0)
    text = free.choices[0].text
    stop = next((char for char in text[1:] if char in ".,\n"), None)
    assert stop is not None, f"the greedy continuation has no punctuation to stop at: {text!r}"
    stopped = client.completions.create(model=model_name, prompt="The capital of France is", max_tokens=12,
                                        temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[:text.index(stop, 1)]
    assert stopped.usage.completion_tokens < free.usage.completion_tokens


def test_two_clients_at_once_both_get_their_answers(server: RunningServer, model_name: str) -> None:
    answers: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(index: int) -> None:
        try:
            stream = client_for(server).chat.completions.create(
                model=model_name, messages=[{"role": "user", "content": f"Count to {3 + index}."}], max_tokens=12,
                temperature=0, stream=True)
            answers[index] = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CLIENT_TIMEOUT_S)
    assert not errors and sorted(answers) == [0, 1] and all(answers.values())
    records = [record for record in server.log() if record.path == "/v1/chat/completions"][-2:]
    assert all(record.status == 200 and record.completion_tokens > 0 for record in records)


def test_a_client_that_disconnects_mid_stream_stops_its_generation(server: RunningServer, model_name: str) -> None:
    client = client_for(server)
    stream = client.chat.completions.create(model=model_name, messages=STORY, max_tokens=400, temperature=0,
                                            stream=True)
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received >= 3:
            break
    stream.close()
    deadline = time.monotonic() + 60
    record = None
    while time.monotonic() < deadline and record is None:
        record = next((r for r in reversed(server.log()) if r.finish_reason == "disconnected"), None)
        time.sleep(0.1)
    assert record is not None, "the server did not notice the client leaving"
    assert record.completion_tokens < 400
    started = time.monotonic()
    after = client.chat.completions.create(model=model_name, messages=CAPITAL, max_tokens=4, temperature=0)
    assert after.choices[0].message.content
    print(f"next answer {time.monotonic() - started:.2f} s after a disconnect at {record.completion_tokens} tokens")


def test_an_oversized_prompt_is_a_400_and_the_server_keeps_serving(server: RunningServer, model_name: str) -> None:
    client = client_for(server)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "word " * 800}],
                                       max_tokens=4)
    assert raised.value.code == "context_length_exceeded"
    assert "context holds 512" in raised.value.message
    assert client.chat.completions.create(model=model_name, messages=CAPITAL, max_tokens=4).choices[0].message


def test_malformed_requests_get_openai_errors(server: RunningServer, model_name: str) -> None:
    status, _, broken = http(f"{server.url}/chat/completions", b"{not json")
    assert status == 400 and broken["error"]["type"] == "invalid_request_error"
    status, _, wrong = http(f"{server.url}/chat/completions",
                            {"model": model_name, "messages": CAPITAL, "temperature": 9})
    assert status == 400 and wrong["error"]["param"] == "temperature"
    status, _, missing = http(f"{server.url}/nothing-here")
    assert status == 404 and "error" in missing


def test_the_least_recently_used_model_makes_room(starter_gguf: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.gguf"
    other.symlink_to(starter_gguf)
    options = ServeOptions(models=(str(starter_gguf), str(other)), port=0, load=LoadOptions(n_ctx=256))
    from qdesk.serve.pool import estimated_bytes

    one = estimated_bytes(starter_gguf, options.load)
    with start_server(options.__class__(**{**options.__dict__, "memory_limit": int(one * 1.5)}),
                      library_root=tmp_path / "library") as running:
        client = client_for(running)
        first, second = running.models
        client.chat.completions.create(model=first, messages=CAPITAL, max_tokens=2, temperature=0)
        assert running.pool.loaded() == [first]
        client.chat.completions.create(model=second, messages=CAPITAL, max_tokens=2, temperature=0)
        assert running.pool.loaded() == [second]


def test_an_api_key_is_required_when_set(starter_gguf: Path, tmp_path: Path) -> None:
    options = ServeOptions(models=(str(starter_gguf),), port=0, api_key="s3cret", load=LoadOptions(n_ctx=256))
    with start_server(options, library_root=tmp_path) as running:
        with pytest.raises(openai.AuthenticationError) as raised:
            client_for(running, key="wrong").models.list()
        assert raised.value.code == "invalid_api_key"
        assert http(f"{running.url}/models")[0] == 401
        assert [model.id for model in client_for(running, key="s3cret").models.list()] == running.models


def test_other_machines_need_an_api_key(starter_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(ServeError, match="--api-key"):
        start_server(ServeOptions(models=(str(starter_gguf),), host="0.0.0.0", port=0), library_root=tmp_path)


def test_cors_is_off_unless_asked(server: RunningServer, starter_gguf: Path, tmp_path: Path) -> None:
    origin = {"Origin": "http://example.test"}
    assert "access-control-allow-origin" not in http(f"{server.url}/models", headers=origin)[1]
    options = ServeOptions(models=(str(starter_gguf),), port=0, cors_origins=("http://example.test",))
    with start_server(options, library_root=tmp_path) as running:
        assert http(f"{running.url}/models", headers=origin)[1]["access-control-allow-origin"] == "http://example.test"


def test_stop_scanner_holds_back_what_may_start_a_stop_sequence() -> None:
    scanner = StopScanner(["\n\nUser:"])
    assert scanner.feed("Hello") == "Hello"
    assert scanner.feed("\n") == ""
    assert scanner.feed("\nUs") == ""
    assert scanner.feed("ually") == "\n\nUsually"
    assert scanner.feed("\n\nUser: more") == "" and scanner.stopped
    assert scanner.finish() == ""
    assert StopScanner(["END"]).feed("the END") == "the "


def test_the_cli_serves_until_interrupted(starter_gguf: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "QDESK_MODELS_DIR": str(tmp_path / "models")}
    process = subprocess.Popen([sys.executable, "-m", "qdesk", "serve", str(starter_gguf), "--port", "0",
                                "--ctx", "256"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        assert line.startswith("qdesk serve: http://127.0.0.1:"), line
        url = line.split()[2]
        listing = http(f"{url}/models")[2]
        assert [model["id"] for model in listing["data"]] == [starter_gguf.stem]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) in (0, 130)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_cli_refuses_other_machines_without_a_key(starter_gguf: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "QDESK_MODELS_DIR": str(tmp_path / "models")}
    finished = subprocess.run([sys.executable, "-m", "qdesk", "serve", str(starter_gguf), "--host", "0.0.0.0"],
                              capture_output=True, text=True, env=env, timeout=120, check=False)
    assert finished.returncode == 1
    assert finished.stderr.count("\n") == 1 and "--api-key" in finished.stderr


def test_answer_documents_are_json(server: RunningServer, model_name: str) -> None:
    status, _, document = http(f"{server.url}/completions", {"model": model_name, "prompt": "Hi", "max_tokens": 2})
    assert status == 200 and document["object"] == "text_completion" and document["choices"][0]["index"] == 0
