"""Converter benchmark: peak memory and wall time converting a large synthetic checkpoint, against llama.cpp.

Writes (once, then reuses) a synthetic Llama checkpoint of at least --size-gb GiB of BF16 weights, converts it
with `qdesk convert` and with llama.cpp's own convert_hf_to_gguf.py (from the pinned llama-cpp-python source
distribution), and prints wall time, CPU time, peak RSS of each process tree and the output size, with the
ratios ours/peer. Figures only: nothing here passes or fails.

    .venv/bin/python bench/convert_memory.py [--size-gb 8.5] [--outtype f16] [--keep] [--cache DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psutil
from _support.measure import Measurement, MiB, run_measured
from _support.peer import PEER_VERSION, peer_command, peer_converter
from _support.synthetic import GIB, REPO_ROOT, synthetic_llama

OUR_TOOL = "qdesk convert"
PEER_TOOL = f"llama.cpp convert_hf_to_gguf.py ({PEER_VERSION})"


@dataclass(frozen=True)
class GGUFSummary:
    tensor_count: int
    names: frozenset[str]
    types: Counter[str]
    tensor_bytes: int


@dataclass(frozen=True)
class Result:
    tool: str
    measurement: Measurement
    output_bytes: int
    gguf: GGUFSummary | None
    error: str | None = None


def summarize(path: Path) -> GGUFSummary:
    import gguf

    reader = gguf.GGUFReader(path)
    return GGUFSummary(
        tensor_count=len(reader.tensors),
        names=frozenset(t.name for t in reader.tensors),
        types=Counter(t.tensor_type.name for t in reader.tensors),
        tensor_bytes=sum(int(t.n_bytes) for t in reader.tensors),
    )


def set_page_cache(folder: Path, state: str) -> None:
    """Put the input's pages out of (cold) or into (warm) the page cache, so both tools start alike."""
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        with path.open("rb") as f:
            if state == "cold":
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while f.read(64 * MiB):
                    pass


def run_tool(tool: str, command: list[str], env: dict[str, str], output: Path, log: Path, keep: bool) -> Result:
    output.unlink(missing_ok=True)
    print(f"\n$ {' '.join(command)}", flush=True)
    measurement = run_measured(command, log=log, env=env, cwd=REPO_ROOT)
    print(f"  exit {measurement.returncode}, {measurement.wall_s:.1f} s, peak RSS {measurement.peak_rss / MiB:.0f} MiB "
          f"(log: {log})", flush=True)
    if measurement.returncode != 0 or not output.is_file():
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
        print("  no output produced; last lines of its log:\n    " + "\n    ".join(tail), flush=True)
        return Result(tool, measurement, 0, None, error=f"exit {measurement.returncode}")
    size = output.stat().st_size
    try:
        summary = summarize(output)
    except Exception as error:  # a damaged file is a figure to report, not a crash
        summary = None
        print(f"  WARNING: {output} is not a readable GGUF: {error}")
    if not keep:
        output.unlink()
    return Result(tool, measurement, size, summary)


def ratio(ours: float, peer: float) -> str:
    return f"{ours / peer:.2f}" if peer else "n/a"


def print_table(ours: Result, peer: Result) -> None:
    rows = [
        ("wall time (s)", lambda r: r.measurement.wall_s, "{:.1f}"),
        ("CPU time, user+sys (s)", lambda r: r.measurement.cpu_s, "{:.1f}"),
        ("  of which sys (s)", lambda r: r.measurement.sys_s, "{:.1f}"),
        ("minor page faults (thousands)", lambda r: r.measurement.minor_faults / 1000, "{:.0f}"),
        ("peak RSS, process tree (MiB)", lambda r: r.measurement.peak_rss / MiB, "{:.0f}"),
        ("  of which anonymous (MiB)", lambda r: r.measurement.peak_anon / MiB, "{:.0f}"),
        ("ru_maxrss, largest process (MiB)", lambda r: r.measurement.ru_maxrss / MiB, "{:.0f}"),
        ("output size (MiB)", lambda r: r.output_bytes / MiB, "{:.0f}"),
    ]
    header = ("", OUR_TOOL, PEER_TOOL, "ours/peer")
    lines = [[label, fmt.format(get(ours)), fmt.format(get(peer)), ratio(get(ours), get(peer))]
             for label, get, fmt in rows]
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(4)]

    def fmt_row(cells) -> str:
        first = str(cells[0]).ljust(widths[0])
        return "| " + " | ".join([first, *(str(c).rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))]) + " |"

    print(fmt_row(header))
    print("|" + "|".join(("-" * (w + 1) + ":") if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|")
    for line in lines:
        print(fmt_row(line))


def compare_outputs(ours: Result, peer: Result) -> None:
    if ours.gguf is None or peer.gguf is None:
        print("\nWARNING: could not compare the outputs (a run failed or its file did not read as GGUF).")
        return
    a, b = ours.gguf, peer.gguf
    print(f"\nGGUF check: ours {a.tensor_count} tensors {dict(sorted(a.types.items()))}; "
          f"peer {b.tensor_count} tensors {dict(sorted(b.types.items()))}")
    if a.tensor_count != b.tensor_count:
        print(f"WARNING: tensor counts differ: ours {a.tensor_count}, peer {b.tensor_count}")
    if a.names != b.names:
        print(f"WARNING: tensor names differ: only ours {sorted(a.names - b.names)[:10]}, "
              f"only peer {sorted(b.names - a.names)[:10]}")
    if a.types != b.types:
        print("WARNING: tensor type mix differs")
    if a.tensor_bytes != b.tensor_bytes:
        print(f"WARNING: tensor data differs in size: ours {a.tensor_bytes} B, peer {b.tensor_bytes} B")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=8.5,
                        help="weights in the synthetic checkpoint, GiB (at least; 7B shapes; default 8.5)")
    parser.add_argument("--outtype", default="f16", choices=("f32", "f16", "bf16", "q8_0"))
    parser.add_argument("--keep", action="store_true", help="keep both output GGUFs in the cache folder")
    parser.add_argument("--cache", type=Path, default=REPO_ROOT / ".cache" / "bench",
                        help="where the synthetic checkpoint, the peer converter and outputs live")
    parser.add_argument("--page-cache", choices=("cold", "warm"), default="cold",
                        help="input pages dropped from (cold, default) or read into (warm) the page cache before "
                             "each run")
    parser.add_argument("--only", choices=("ours", "peer"), help="run one tool only")
    args = parser.parse_args(argv)
    cache: Path = args.cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)

    qdesk = Path(sys.executable).parent / "qdesk"
    if not qdesk.exists():
        raise SystemExit(f"{qdesk} not found; run `{sys.executable} -m pip install -e . --no-deps` once")

    source = synthetic_llama(cache, args.size_gb)
    input_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    peer_folder = peer_converter(cache)

    free = shutil.disk_usage(cache).free
    if free < input_bytes * (2.1 if args.keep else 1.1):
        print(f"WARNING: {free / GIB:.1f} GiB free in {cache}; each output is about {input_bytes / GIB:.1f} GiB")

    memory = psutil.virtual_memory()
    print(f"\nConverter benchmark, {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}, "
          f"{psutil.cpu_count(logical=True)} logical cores, {memory.total / GIB:.1f} GiB RAM "
          f"({memory.available / GIB:.1f} available), Python {platform.python_version()}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"input: {source} ({input_bytes / GIB:.2f} GiB BF16 safetensors), outtype {args.outtype}, "
          f"page cache {args.page_cache} before each run")

    ours_out = cache / f"ours.{args.outtype}.gguf"
    peer_out = cache / f"peer.{args.outtype}.gguf"
    results: dict[str, Result] = {}
    if args.only in (None, "ours"):
        set_page_cache(source, args.page_cache)
        command = [str(qdesk), "convert", str(source), "-o", str(ours_out), "--outtype", args.outtype]
        results["ours"] = run_tool(OUR_TOOL, command, {}, ours_out, cache / "ours.log", args.keep)
    if args.only in (None, "peer"):
        set_page_cache(source, args.page_cache)
        command, env = peer_command(peer_folder, source, peer_out, args.outtype)
        results["peer"] = run_tool(PEER_TOOL, command, env, peer_out, cache / "peer.log", args.keep)

    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    if len(results) == 2:
        print_table(results["ours"], results["peer"])
        compare_outputs(results["ours"], results["peer"])
    else:
        for result in results.values():
            m = result.measurement
            print(f"{result.tool}: {m.wall_s:.1f} s wall, {m.cpu_s:.1f} s CPU, peak RSS {m.peak_rss / MiB:.0f} MiB "
                  f"(anonymous {m.peak_anon / MiB:.0f} MiB, ru_maxrss {m.ru_maxrss / MiB:.0f} MiB), "
                  f"output {result.output_bytes / MiB:.0f} MiB")
    for result in results.values():
        if result.error:
            print(f"NOTE: {result.tool} did not convert ({result.error}); its figures are not a conversion")
    return 0


if __name__ == "__main__":
    sys.exit(main())
