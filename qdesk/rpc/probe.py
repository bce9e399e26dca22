"""What RPC workers offer: their devices and free memory, asked from a child process (`python -m qdesk.rpc.probe`).

ggml aborts a process whose worker goes away, and a worker serves one client at a time (a second one waits until the
first disconnects), so the question is asked in a child with a deadline: a crash or a wait past it is one sentence.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence

from converters.core.errors import UserError
from native.rpc import RemoteDevice
from qdesk.rpc.endpoints import check_reachable

PROBE_TIMEOUT_S = 20.0
EXIT_UNAVAILABLE = 3
"""The probe's exit status when this llama.cpp has no RPC backend (its sentence is on stderr)."""


class WorkerBusy(UserError):
    """A worker accepted the connection but does not answer: it serves another client."""


def describe_workers(endpoints: Sequence[str], timeout_s: float = PROBE_TIMEOUT_S) -> list[RemoteDevice]:
    """Every device the workers at `endpoints` offer, in order, with the memory each reports free."""
    check_reachable(endpoints)
    try:
        finished = subprocess.run([sys.executable, "-m", "qdesk.rpc.probe", *endpoints], capture_output=True,
                                  timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise WorkerBusy(f"the RPC workers ({', '.join(endpoints)}) accept connections but did not answer within "
                         f"{timeout_s:.0f} s; a worker serves one client at a time, so stop the model that uses it "
                         "or start another worker.") from None
    last = finished.stderr.decode("utf-8", errors="replace").strip().splitlines()
    if finished.returncode == EXIT_UNAVAILABLE and last:
        raise UserError(last[-1])
    if finished.returncode != 0:
        detail = f" ({last[-1][:200]})" if last else ""
        raise UserError(f"asking the RPC workers ({', '.join(endpoints)}) for their devices failed{detail}; check "
                        "that each runs `qdesk worker` from the same qdesk version.")
    answer = finished.stdout.decode("utf-8", errors="replace").strip().splitlines()
    return [RemoteDevice(**device) for device in json.loads(answer[-1])]


def main(argv: Sequence[str]) -> int:
    from native.errors import NativeError
    from native.rpc import add_servers

    try:
        devices = add_servers(argv)
    except NativeError as error:
        print(str(error), file=sys.stderr)
        return EXIT_UNAVAILABLE
    print(json.dumps([device.to_json() for device in devices]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
