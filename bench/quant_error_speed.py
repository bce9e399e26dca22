"""Speed of measuring quantization error on every weight at every candidate type, against quantizing the model
once per type with llama.cpp, and how far the sampled measurement lies from the full one. Prints figures only.

    .venv/bin/python bench/quant_error_speed.py                  # SmolLM2-135M F16 from the test cache
    .venv/bin/python bench/quant_error_speed.py MODEL.gguf --repeat 3 --threads 2

Ours: `native.kernels.measure_gguf` at q2_k q3_k q4_k q5_k q6_k q8_0 q4_0 with its defaults (sampled rows, one
thread per core), types that do not fit a tensor's rows skipped. Peer: `llama_cpp.llama_model_quantize` once per
type with the matching pure ftype and one thread per core, outputs written to a temporary folder and deleted.
Both read the same input, which is read once beforehand so neither pays for a cold page cache. The default
model is built in the test cache (as the `smollm2_f16` test fixture builds it) when missing.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import llama_cpp

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from native.kernels import DEFAULT_SAMPLE_ROWS, ErrorTable, measure_gguf  # noqa: E402

DEFAULT_MODEL = REPO_ROOT / ".cache" / "tests" / "smollm2-135m-f16.gguf"
CANDIDATES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0", "q4_0")
PURE_FTYPES = {
    "q2_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K,
    "q3_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M,
    "q4_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "q5_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
}
"""With `pure`, llama.cpp gives every tensor the ftype's base type (Q4_K_M -> Q4_K), or its fallback where the
row length does not fit."""


@llama_cpp.llama_log_callback
def _quiet(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """Swallows llama.cpp's log; kept at module level so the callback outlives every call."""


def default_model() -> Path:
    if DEFAULT_MODEL.is_file():
        return DEFAULT_MODEL
    from converters.writing.convert import convert_checkpoint
    from tests.builders.starter import smollm2_checkpoint

    print(f"building {DEFAULT_MODEL} (as the smollm2_f16 test fixture does)...", flush=True)
    DEFAULT_MODEL.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=DEFAULT_MODEL.parent, prefix=".building-") as staging:
        built = Path(staging) / DEFAULT_MODEL.name
        convert_checkpoint(smollm2_checkpoint(DEFAULT_MODEL.parent), built, outtype="f16")
        built.replace(DEFAULT_MODEL)
    return DEFAULT_MODEL


def warm_page_cache(path: Path) -> None:
    with path.open("rb") as stream:
        while stream.read(1 << 24):
            pass


def time_ours(model: Path, sample_rows: int | None, threads: int | None) -> tuple[float, ErrorTable]:
    started = time.perf_counter()
    table = measure_gguf(model, CANDIDATES, sample_rows=sample_rows, threads=threads)
    return time.perf_counter() - started, table


def time_peer(model: Path, threads: int) -> dict[str, float]:
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="qdesk-bench-quantize-") as scratch:
        for type_name, ftype in PURE_FTYPES.items():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.pure = True
            params.nthread = threads
            output = Path(scratch) / f"{type_name}.gguf"
            started = time.perf_counter()
            result = llama_cpp.llama_model_quantize(str(model).encode(), str(output).encode(), ctypes.byref(params))
            seconds[type_name] = time.perf_counter() - started
            if result != 0:
                raise SystemExit(f"llama.cpp failed to quantize {model} to {type_name} (code {result})")
            output.unlink()
    return seconds


def sampling_deviation(sampled: ErrorTable, full: ErrorTable) -> list[tuple[float, str, str, int, int]]:
    """|sampled/full - 1| of the relative error for every (tensor, type), largest first."""
    deviations = []
    for (tensor, type_name), exact in full.errors.items():
        estimate = sampled.errors[(tensor, type_name)]
        if exact.relative_error > 0:
            deviations.append((abs(estimate.relative_error / exact.relative_error - 1.0), tensor, type_name,
                               estimate.rows, exact.rows))
    return sorted(deviations, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, help=f"an F16/BF16/F32 GGUF (default {DEFAULT_MODEL})")
    parser.add_argument("--repeat", type=int, default=1, help="timed rounds of ours and the peer, alternating")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--sample-rows", type=int, default=DEFAULT_SAMPLE_ROWS)
    arguments = parser.parse_args()
    model = arguments.model or default_model()
    threads = arguments.threads
    llama_cpp.llama_log_set(_quiet, ctypes.c_void_p(0))

    print(f"model: {model} ({model.stat().st_size / 2**20:.0f} MiB), threads: {threads}, "
          f"types: {' '.join(CANDIDATES)}, sample rows: {arguments.sample_rows}")
    warm_page_cache(model)
    ours_runs: list[float] = []
    peer_runs: list[float] = []
    table: ErrorTable | None = None
    for round_number in range(1, arguments.repeat + 1):
        ours_seconds, table = time_ours(model, arguments.sample_rows, threads)
        peer_seconds = time_peer(model, threads)
        ours_runs.append(ours_seconds)
        peer_runs.append(sum(peer_seconds.values()))
        per_type = " ".join(f"{name} {seconds:.2f}" for name, seconds in peer_seconds.items())
        print(f"round {round_number}: ours {ours_seconds:.2f} s, peer {peer_runs[-1]:.2f} s ({per_type}), "
              f"ours/peer {ours_seconds / peer_runs[-1]:.2f}")
    assert table is not None
    ours_median = statistics.median(ours_runs)
    peer_median = statistics.median(peer_runs)
    print()
    print(f"measured: {len(table.tensors)} tensors, {len(table.errors)} (tensor, type) pairs, "
          f"{len(table.skipped())} pairs skipped (block size does not divide the rows)")
    print(f"ours  (measure every weight at every type, sampled): {ours_median:8.2f} s")
    print(f"peer  (llama_model_quantize once per type):          {peer_median:8.2f} s")
    print(f"ours/peer:                                           {ours_median / peer_median:8.2f}")

    full_seconds, full = time_ours(model, None, threads)
    deviations = sampling_deviation(table, full)
    values = [deviation for deviation, *_ in deviations]
    sampled_pairs = sum(1 for *_, rows, total in deviations if rows < total)
    print()
    print(f"full measurement (every row): {full_seconds:.2f} s; sampled/full time {ours_median / full_seconds:.2f}")
    print(f"sampling estimate of the relative error against the full measurement, {len(values)} pairs "
          f"({sampled_pairs} of them sampled): median {100 * statistics.median(values):.2f} %, "
          f"90th percentile {100 * sorted(values)[int(0.9 * (len(values) - 1))]:.2f} %, "
          f"largest {100 * values[0]:.2f} %")
    print("largest deviations:")
    for deviation, tensor, type_name, rows, total in deviations[:5]:
        print(f"  {tensor:28s} {type_name:5s} {rows:6d}/{total:<6d} rows  {100 * deviation:6.2f} %")


if __name__ == "__main__":
    main()
