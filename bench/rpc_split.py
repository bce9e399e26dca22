"""What llama.cpp's RPC protocol costs on one machine: a model local-only against split across 2 loopback workers.

    python bench/rpc_split.py [MODEL.gguf] [--tokens 32] [--repeat 2] [--threads 1]

Both sides go through qdesk's engine (`load_model(...).chat(...)`, temperature 0, the same tokens), with the same
thread count for the local process and for each worker (`qdesk worker --threads N`); the split puts a third of the
layers on each device (`place_layers` with equal free memory). It prints decode tokens/s and time to first token,
then what crosses the network per token: at every boundary between devices the activations of one token
(n_embd float32 values) go one way, so a real two-machine setup needs that many bytes per boundary per token,
plus one round trip per device per token, which is what dominates on a LAN.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from native.rpc import RemoteDevice, rpc_available  # noqa: E402
from qdesk.app.starter import starter_model_path  # noqa: E402
from qdesk.chat.engine import LoadOptions, SamplingOptions, load_model  # noqa: E402
from qdesk.memory.shape import read_model_shape  # noqa: E402
from qdesk.rpc.placement import place_layers  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long, detailed story about a dragon who learns to bake bread."}]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_worker(port: int, threads: int) -> subprocess.Popen:
    worker = subprocess.Popen([sys.executable, "-m", "qdesk", "worker", "--port", str(port), "--threads",
                               str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return worker
        except OSError:
            time.sleep(0.1)
    worker.kill()
    raise SystemExit(f"the worker on port {port} did not start")


def measure(model: Path, options: LoadOptions, tokens: int, repeat: int) -> tuple[float, float, tuple[int, ...]]:
    """(median decode tokens/s, median time to first token in s, the tokens) through the engine."""
    speeds, firsts = [], []
    answer: tuple[int, ...] = ()
    with load_model(model, options) as loaded:
        for _ in range(repeat):
            result = loaded.chat(PROMPT, SamplingOptions(temperature=0.0, max_tokens=tokens))
            speeds.append(result.stats.tokens_per_second)
            firsts.append(result.stats.time_to_first_token_s)
            answer = result.token_ids
    return statistics.median(speeds), statistics.median(firsts), answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not rpc_available():
        raise SystemExit("this llama-cpp-python has no RPC backend; run `make install`.")
    model = args.model or starter_model_path()
    shape = read_model_shape(model)
    print(f"model {model.name} ({shape.n_layer} layers, n_embd {shape.n_embd}), {args.tokens} tokens, "
          f"{args.threads} thread(s) per process, load average {os.getloadavg()[0]:.1f} at start")
    local = measure(model, LoadOptions(n_ctx=512, n_threads=args.threads), args.tokens, args.repeat)
    ports = free_port(), free_port()
    workers = [start_worker(port, args.threads) for port in ports]
    try:
        endpoints = tuple(f"127.0.0.1:{port}" for port in ports)
        equal = 8 << 30
        placement = place_layers(model, LoadOptions(n_ctx=512, n_threads=args.threads, rpc=endpoints),
                                 local_free=equal,
                                 workers=[RemoteDevice(e, f"RPC{i}", "CPU", equal, equal)
                                          for i, e in enumerate(endpoints)])
        print(placement.render())
        split = measure(model, placement.load_options, args.tokens, args.repeat)
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
    print(f"\ndecode       local {local[0]:6.2f} tok/s   split 3 ways {split[0]:6.2f} tok/s   "
          f"ratio {split[0] / local[0]:.2f}")
    print(f"first token  local {local[1] * 1000:6.0f} ms      split 3 ways {split[1] * 1000:6.0f} ms      "
          f"ratio {split[1] / local[1]:.2f}")
    print(f"same tokens: {split[2] == local[2]}")
    boundaries = sum(1 for device in placement.devices if device.layers or device.holds_output) - 1
    per_token = shape.n_embd * 4
    print(f"\nper generated token: {per_token} bytes of activations per boundary ({boundaries} boundaries here), "
          "and one round trip per worker; for a 70B Llama (n_embd 8192) 32 KiB per boundary, so 20 tok/s over "
          "one boundary is 0.66 MB/s of activations: latency, not bandwidth, sets the speed on a LAN")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
