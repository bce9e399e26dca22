"""Running the `qdesk` command line in this process (many cases a second) or as a real process, and the checks
every refused input must pass: exit status 1, one sentence on stderr, no traceback, nothing left behind."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from collections.abc import Iterable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from qdesk.cli import main

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class CliRun:
    code: int
    stdout: str
    stderr: str

    @property
    def sentence(self) -> str:
        return self.stderr.strip()


def run_in_process(*args: str | Path) -> CliRun:
    """`qdesk ARGS…` through `qdesk.cli.main`, its streams captured (llama.cpp's own log lines are not)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exit_:  # argparse: usage errors
            code = exit_.code if isinstance(exit_.code, int) else 2
    return CliRun(code, out.getvalue(), err.getvalue())


def run_process(*args: str | Path, timeout: float = 300, env: dict[str, str] | None = None) -> CliRun:
    """`python -m qdesk ARGS…` as a real child process."""
    done = subprocess.run([sys.executable, "-m", "qdesk", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT, env=env, check=False)
    return CliRun(done.returncode, done.stdout, done.stderr)


def assert_refused(run: CliRun, *fragments: str) -> str:
    """Exit status 1, exactly one line on stderr that reads as a sentence and names each fragment."""
    assert run.code == 1, (run.code, run.stderr)
    assert "Traceback" not in run.stderr and "internal error" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qdesk: "), run.stderr
    assert lines[0].rstrip().endswith((".", ")")), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def digests(paths: Iterable[Path]) -> dict[Path, str]:
    """Each file's SHA-256 (each file under a folder, for a folder), to show inputs are unchanged after a run."""
    found: dict[Path, str] = {}
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            found[file] = hashlib.sha256(file.read_bytes()).hexdigest()
    return found


def leftovers(folder: Path) -> list[str]:
    """Temporary files a run may have left in `folder` (and below): partial outputs, scratch conversions."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")
                  if ".partial" in path.name or path.name.startswith((".qdesk-", ".building-")))
