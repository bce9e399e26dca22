"""Run a command and measure it: wall time, CPU time, and peak resident memory of its whole process tree."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

MiB = 1024 * 1024


@dataclass(frozen=True)
class Measurement:
    returncode: int
    wall_s: float
    cpu_s: float
    """User plus system CPU time of the process and its reaped descendants."""
    sys_s: float
    """The system (kernel) part of cpu_s: mostly copying file data in and out of the page cache."""
    minor_faults: int
    """Page faults served without disk: mostly first touches of freshly allocated buffers."""
    peak_rss: int
    """Largest sum of RSS over the process and its descendants, sampled every `interval` seconds."""
    peak_anon: int
    """Same, counting only anonymous memory (RSS less file-backed and shared pages, e.g. mmapped inputs)."""
    ru_maxrss: int
    """Kernel's high-water mark of the largest single process in the tree (wait4 rusage), in bytes."""
    samples: int


def _tree_rss(root: psutil.Process) -> tuple[int, int]:
    rss = anon = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    for proc in procs:
        try:
            info = proc.memory_info()
        except psutil.Error:
            continue
        rss += info.rss
        anon += info.rss - getattr(info, "shared", 0)
    return rss, anon


def run_measured(command: list[str], *, log: Path, env: dict[str, str] | None = None, cwd: Path | None = None,
                 interval: float = 0.05) -> Measurement:
    """Run `command` to completion with stdout and stderr to `log`, sampling its memory in the background."""
    full_env = {**os.environ, **(env or {})}
    peaks = {"rss": 0, "anon": 0, "samples": 0}
    done = threading.Event()
    with log.open("wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=cwd)
        root = psutil.Process(proc.pid)

        def sample() -> None:
            while not done.is_set():
                rss, anon = _tree_rss(root)
                peaks["rss"] = max(peaks["rss"], rss)
                peaks["anon"] = max(peaks["anon"], anon)
                peaks["samples"] += 1
                done.wait(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # wait4 reaps this one child and returns its own rusage (ru_maxrss covers its reaped descendants too),
        # which getrusage(RUSAGE_CHILDREN) would mix with every earlier run.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return Measurement(
        returncode=proc.returncode,
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        sys_s=usage.ru_stime,
        minor_faults=usage.ru_minflt,
        peak_rss=peaks["rss"],
        peak_anon=peaks["anon"],
        ru_maxrss=usage.ru_maxrss * 1024,  # Linux reports kilobytes
        samples=peaks["samples"],
    )
