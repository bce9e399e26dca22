"""What qdesk's own download of a large file costs next to huggingface_hub's `hf_hub_download`.

    python bench/hub_download.py [--size-mb 256] [--repeat 3] [--cache .cache/bench]

A local Hub and CDN (`tests.builders.hub_server.HubServer`, in this process) serve one LFS file of random bytes
(`--size-mb` MiB). Each side downloads it into a fresh Hugging Face cache, in a child process measured with
`bench._support.measure.run_measured` (wall time, CPU time, peak RSS of the process tree):

- qdesk: `qdesk.hub.download(repo, include=[file])` (listing, HEAD, resumable transfer, SHA-256 checked);
- peer: `huggingface_hub.hf_hub_download(repo, file)` (HEAD, transfer, size checked, no checksum).

Runs alternate; medians are printed with the ratio qdesk/peer. The difference is mostly the SHA-256 qdesk computes
(the peer computes none) and the listing request.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._support.measure import Measurement, run_measured  # noqa: E402
from tests.builders.hub_server import HubServer, ServedRepo  # noqa: E402

REPO_ID, FILE = "bench/large-GGUF", "large-F16.gguf"

OURS = f"""
from qdesk.hub import download
result = download({REPO_ID!r}, include=[{FILE!r}])
assert result.files[0].checksum == "sha256", result
"""
PEER = f"""
from huggingface_hub import hf_hub_download
hf_hub_download({REPO_ID!r}, {FILE!r})
"""


def _input(folder: Path, size_mb: int) -> Path:
    path = folder / FILE
    if not path.is_file() or path.stat().st_size != size_mb * 1024 * 1024:
        folder.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as out:
            for _ in range(size_mb):
                out.write(os.urandom(1024 * 1024))
    return path


def _run(code: str, server: HubServer, cache: Path, log: Path) -> Measurement:
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "HF_ENDPOINT": server.endpoint, "HF_HUB_CACHE": str(cache), "HF_TOKEN": "",
           "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "PYTHONPATH": str(REPO)}
    measured = run_measured([sys.executable, "-c", code], log=log, env=env, cwd=REPO)
    if measured.returncode != 0:
        raise SystemExit(f"the run failed; see {log}")
    shutil.rmtree(cache, ignore_errors=True)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench")
    args = parser.parse_args()
    work = args.cache / "hub_download"
    _input(work / "repo", args.size_mb)
    runs: dict[str, list[Measurement]] = {"qdesk": [], "peer": []}
    with HubServer() as server:
        server.add(ServedRepo.from_folder(REPO_ID, work / "repo"))
        for index in range(args.repeat):
            for name, code in (("qdesk", OURS), ("peer", PEER)):
                runs[name].append(_run(code, server, work / f"hf-{name}", work / f"{name}-{index}.log"))
    print(f"{args.size_mb} MiB from a local server, {args.repeat} runs each (medians); load average "
          f"{' '.join(f'{value:.1f}' for value in os.getloadavg())}")
    print(f"{'':8}{'wall s':>9}{'MiB/s':>9}{'CPU s':>9}{'peak RSS MiB':>14}")
    medians: dict[str, tuple[float, float, float]] = {}
    for name, measured in runs.items():
        wall = statistics.median(m.wall_s for m in measured)
        cpu = statistics.median(m.cpu_s for m in measured)
        rss = statistics.median(m.peak_rss for m in measured) / 2**20
        medians[name] = (wall, cpu, rss)
        print(f"{name:8}{wall:9.2f}{args.size_mb / wall:9.1f}{cpu:9.2f}{rss:14.0f}")
    (wall, cpu, rss), (peer_wall, peer_cpu, peer_rss) = medians["qdesk"], medians["peer"]
    print(f"{'ratio':8}{wall / peer_wall:9.2f}{'':9}{cpu / peer_cpu:9.2f}{rss / peer_rss:14.2f}   (qdesk/peer)")


if __name__ == "__main__":
    main()
