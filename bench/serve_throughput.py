"""What serving over HTTP costs: `qdesk serve` against `Llama.generate` and against llama-cpp-python's own server.

    python bench/serve_throughput.py [MODEL.gguf] [--tokens 64] [--repeat 3] [--clients 4] [--requests 2]

On loopback, the same model, prompt style and settings (temperature 0, the same thread count):

1. one client, streamed: decode tokens/s and time to first token through `qdesk serve` (the official openai client)
   against `Llama.generate` in this process; target decode ratio ≥ 0.95;
2. `--clients` clients at once, `--requests` streamed requests each (every prompt different, so no side reuses a
   cached prefix): throughput (completion tokens per second of wall time) and p95 request latency, `qdesk serve`
   against llama-cpp-python's server (`python -m llama_cpp.server`, which needs its `[server]` extra: fastapi,
   sse-starlette, starlette-context, pydantic-settings; skipped with a note when they are missing).

Every request is bounded (max_tokens, a client timeout); every process started here is stopped here.
"""

import llama_cpp  # before numpy, as the engine's worker does  # isort: skip

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import openai  # noqa: E402
from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # noqa: E402

from qdesk.app.starter import starter_model_path  # noqa: E402
from qdesk.chat.engine import LoadOptions  # noqa: E402
from qdesk.serve.server import ServeOptions, start_server  # noqa: E402

PROMPT = "Write a long, detailed story about a dragon who learns to bake bread in a small mountain village."
CTX = 1024
CLIENT_TIMEOUT_S = 300.0
PEER_START_S = 180.0


def messages(index: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{PROMPT} (story number {index})"}]


def direct(llm: llama_cpp.Llama, tokens: int, index: int) -> tuple[float, float]:
    """(time to first token, decode tokens/s) of `Llama.generate` on the chat-templated prompt."""
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"],
                                    eos_token=llm._model.token_get_text(llm.token_eos()),
                                    bos_token=llm._model.token_get_text(llm.token_bos()))
    started = time.perf_counter()
    prompt = llm.tokenize(formatter(messages=messages(index)).prompt.encode(), add_bos=False, special=True)
    llm.reset()
    stamps = []
    for token in llm.generate(prompt, top_k=40, top_p=1.0, min_p=0.05, temp=0.0, repeat_penalty=1.0):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            break
        stamps.append(time.perf_counter())
        if len(stamps) >= tokens:
            break
    return stamps[0] - started, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def streamed(client: openai.OpenAI, model: str, tokens: int, index: int) -> tuple[float, float, int, float]:
    """(time to first token, decode tokens/s, completion chunks, total seconds) of one streamed request."""
    started = time.perf_counter()
    stamps = []
    for chunk in client.chat.completions.create(model=model, messages=messages(index), max_tokens=tokens,
                                                temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
    total = time.perf_counter() - started
    if not stamps:
        raise RuntimeError(f"{model} streamed no text for request {index}")
    speed = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return stamps[0] - started, speed, len(stamps), total


def concurrent(client_factory, model: str, clients: int, requests: int, tokens: int, offset: int
               ) -> tuple[float, float]:
    """(completion tokens per second of wall time, p95 request latency in s) with `clients` clients at once."""
    latencies: list[float] = []
    produced: list[int] = []
    errors: list[BaseException] = []

    def run(client_index: int) -> None:
        client = client_factory()
        for request in range(requests):
            try:
                _, _, count, total = streamed(client, model, tokens, offset + client_index * requests + request)
                latencies.append(total)
                produced.append(count)
            except BaseException as error:
                errors.append(error)

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CLIENT_TIMEOUT_S * requests)
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return sum(produced) / wall, p95


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_peer(model: Path, threads: int) -> tuple[subprocess.Popen, str] | None:
    try:
        import fastapi  # noqa: F401
        import pydantic_settings  # noqa: F401
        import sse_starlette  # noqa: F401
        import starlette_context  # noqa: F401
    except ImportError as error:
        print(f"peer skipped: llama-cpp-python's server needs its [server] extra ({error.name} is missing)")
        return None
    port = free_port()
    peer = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", str(CTX), "--n_threads", str(threads),
                             "--n_threads_batch", str(threads), "--verbose", "false",
                             "--interrupt_requests", "false"],  # by default a new request cuts the one streaming
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + PEER_START_S
    while time.monotonic() < deadline and peer.poll() is None:
        try:
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=5).models.list()
            return peer, url
        except openai.APIError:
            time.sleep(0.5)
    peer.kill()
    peer.wait()
    print("peer skipped: llama-cpp-python's server did not start")
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    model = args.model or starter_model_path()
    print(f"model {model.name}, {args.tokens} tokens, {args.threads} threads, load average "
          f"{os.getloadavg()[0]:.1f} at start")

    options = ServeOptions(models=(str(model),), port=0, load=LoadOptions(n_ctx=CTX, n_threads=args.threads))
    llm = llama_cpp.Llama(str(model), n_ctx=CTX, n_threads=args.threads, n_threads_batch=args.threads,
                          verbose=False)
    with start_server(options, library_root=REPO / ".cache" / "bench-serve-library") as server:
        name = server.models[0]
        ours = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=CLIENT_TIMEOUT_S)
        streamed(ours, name, 4, 0)  # loads the model
        served, plain = [], []
        for run in range(args.repeat):
            served.append(streamed(ours, name, args.tokens, 100 + run))
            plain.append(direct(llm, args.tokens, 100 + run))
        del llm
        ttft_ours = statistics.median(item[0] for item in served)
        ttft_direct = statistics.median(item[0] for item in plain)
        speed_ours = statistics.median(item[1] for item in served)
        speed_direct = statistics.median(item[1] for item in plain)
        print("\none client, streamed (medians):")
        print(f"  decode       qdesk serve {speed_ours:6.1f} tok/s   Llama.generate {speed_direct:6.1f} tok/s   "
              f"ratio {speed_ours / speed_direct:.3f}")
        print(f"  first token  qdesk serve {ttft_ours * 1000:6.0f} ms      Llama.generate {ttft_direct * 1000:6.0f} ms"
              f"      ratio {ttft_ours / ttft_direct:.2f}")
        throughput, p95 = concurrent(lambda: openai.OpenAI(base_url=server.url, api_key="x", max_retries=0,
                                                           timeout=CLIENT_TIMEOUT_S),
                                     name, args.clients, args.requests, args.tokens, 1000)
    print(f"\n{args.clients} clients at once, {args.requests} requests each:")
    print(f"  qdesk serve            {throughput:6.1f} tok/s   p95 latency {p95:6.2f} s")
    started = start_peer(model, args.threads)
    if started is not None:
        peer, url = started
        try:
            peer_client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=CLIENT_TIMEOUT_S)
            streamed(peer_client, str(model), 4, 0)
            peer_throughput, peer_p95 = concurrent(
                lambda: openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=CLIENT_TIMEOUT_S),
                str(model), args.clients, args.requests, args.tokens, 1000)
        finally:
            peer.terminate()
            peer.wait(timeout=30)
        print(f"  llama-cpp-python server {peer_throughput:6.1f} tok/s   p95 latency {peer_p95:6.2f} s")
        print(f"  ratio (qdesk / llama-cpp-python): throughput {throughput / peer_throughput:.2f}, "
              f"p95 latency {p95 / peer_p95:.2f}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
