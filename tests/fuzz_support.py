"""The fault and fuzz suite's machinery: Hypothesis profiles, the count of cases tried, the contract every run on
a mutated input must keep, and mutations of the formats qdesk reads (GGUF headers, safetensors headers, JSON).

Profiles: "dev" (random, Hypothesis's example database in .hypothesis/) and "ci" (derandomized, no database:
every run tries the same cases), chosen by QDESK_FUZZ_PROFILE, else "ci" when CI is set. QDESK_FUZZ_SCALE
multiplies every target's number of examples (e.g. 10 for a long local hunt).
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests.cli_support import CliRun, digests, leftovers

settings.register_profile(
    "dev", deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.register_profile("ci", parent=settings.get_profile("dev"), derandomize=True, database=None)
PROFILE = os.environ.get("QDESK_FUZZ_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
settings.load_profile(PROFILE)
SCALE = float(os.environ.get("QDESK_FUZZ_SCALE", "1"))

CASES: Counter[str] = Counter()
"""Cases tried per target, printed at the end of the session (tests/conftest.py)."""
REFUSED: Counter[str] = Counter()
"""Of those, the cases refused (exit 1); the rest were still good inputs (exit 0)."""
SECONDS: Counter[str] = Counter()
_current: list[str] = []


def summary() -> list[str]:
    """The lines the session prints: cases, refusals and seconds per target, and the total."""
    if not CASES:
        return []
    lines = [f"fuzz ({PROFILE} profile): {sum(CASES.values())} cases in {sum(SECONDS.values()):.0f} s, "
             f"{sum(REFUSED.values())} refused in one sentence, the rest still good inputs"]
    lines += [f"  {target}: {count} cases, {REFUSED[target]} refused, {SECONDS[target]:.1f} s"
              for target, count in CASES.items()]
    return lines


def examples(count: int) -> int:
    """A target's number of examples, scaled by QDESK_FUZZ_SCALE."""
    return max(1, round(count * SCALE))


@contextmanager
def case(target: str) -> Iterator[Path]:
    """One tried case of `target`: a fresh working folder, counted and timed."""
    started = time.monotonic()
    CASES[target] += 1
    _current.append(target)
    try:
        with tempfile.TemporaryDirectory(prefix="qdesk-fuzz-") as folder:
            yield Path(folder)
    finally:
        _current.pop()
        SECONDS[target] += time.monotonic() - started


@contextmanager
def environment(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass(frozen=True)
class Contract:
    """What a run on a mutated input must keep, whatever the mutation: exit 0 (the input was still good) or 1 (it
    was refused in one sentence, no traceback, no output), never more; inputs byte-identical; nothing partial."""

    inputs: tuple[Path, ...]
    outputs: tuple[Path, ...]
    workdir: Path

    @classmethod
    def around(cls, inputs: list[Path], outputs: list[Path], workdir: Path,
               run: Callable[[], CliRun], *, must_refuse: bool = False) -> CliRun:
        contract = cls(tuple(inputs), tuple(outputs), workdir)
        before = digests(contract.inputs)
        result = run()
        if _current and result.code == 1:
            REFUSED[_current[-1]] += 1
        contract.check(result, before, must_refuse=must_refuse)
        return result

    def check(self, run: CliRun, before: dict[Path, str], *, must_refuse: bool) -> None:
        assert run.code in ((1,) if must_refuse else (0, 1)), (run.code, run.stderr[-2000:])
        if run.code == 1:
            lines = run.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("qdesk: "), run.stderr[-2000:]
            assert "Traceback" not in run.stderr and "internal error" not in run.stderr, run.stderr
            for output in self.outputs:
                assert not output.exists(), f"{output} was written although the run was refused"
        assert digests(self.inputs) == before, "an input changed"
        assert leftovers(self.workdir) == [], leftovers(self.workdir)


# --- integers worth trying where a count, a size, a type or an offset is stored ----------------------------------

def interesting_ints(current: int, width: int) -> st.SearchStrategy[int]:
    top = (1 << (8 * width)) - 1
    specials = [0, 1, 2, 3, 4, 7, 8, 31, 32, 33, 255, 256, 4096, 1 << 31, (1 << 31) - 1, top, top - 1,
                current + 1, max(0, current - 1), min(top, current * 2), current // 2, min(top, current << 16)]
    if width == 8:
        specials += [1 << 32, (1 << 63) - 1, 1 << 63]
    return st.one_of(st.sampled_from([value & top for value in specials]), st.integers(0, top))


# --- GGUF: the header's integer fields, found with gguf-py's reader ----------------------------------------------

@dataclass(frozen=True)
class Slot:
    """One integer field of a GGUF header: where it is, how wide, what it holds and what it is."""

    offset: int
    width: int
    value: int
    what: str


def gguf_slots(path: Path) -> tuple[list[Slot], int]:
    """Every scalar integer field of the header (counts, value types, string and array lengths, tensor dimensions,
    types and offsets) and where tensor data starts."""
    reader = gguf.GGUFReader(path)
    slots: list[Slot] = []
    fields = [(name, field) for name, field in reader.fields.items()]
    fields += [(f"tensor {tensor.name}", tensor.field) for tensor in reader.tensors]
    for name, field in fields:
        position = field.offset
        for index, part in enumerate(field.parts):
            if part.size == 1 and part.dtype.kind in "ui" and part.nbytes in (4, 8):
                slots.append(Slot(position, part.nbytes, int(part[0]), f"{name} part {index}"))
            position += part.nbytes
            if index > 6:  # the first items of a long array are enough
                break
    return slots, int(reader.data_offset)


@dataclass(frozen=True)
class ByteEdit:
    """Overwrite bytes at an offset, or cut the file there (`cut`)."""

    offset: int
    data: bytes = b""
    cut: bool = False

    def apply(self, content: bytearray) -> bytearray:
        if self.cut:
            return content[:self.offset]
        content[self.offset:self.offset + len(self.data)] = self.data
        return content


def gguf_edits(slots: list[Slot], header_end: int, file_size: int) -> st.SearchStrategy[list[ByteEdit]]:
    """Mutations of a GGUF header: an integer field set to a telling value, header bytes overwritten at random,
    or the file cut short."""

    def slot_edit(slot: Slot) -> st.SearchStrategy[ByteEdit]:
        return interesting_ints(slot.value, slot.width).map(
            lambda value: ByteEdit(slot.offset, value.to_bytes(slot.width, "little")))

    field = st.sampled_from(slots).flatmap(slot_edit)
    scribble = st.builds(ByteEdit, st.integers(4, header_end - 1), st.binary(min_size=1, max_size=8))
    cut = st.builds(lambda at: ByteEdit(at, cut=True), st.integers(0, file_size - 1))
    return st.lists(st.one_of(field, field, scribble, cut), min_size=1, max_size=3)


# --- safetensors: the JSON header, rewritten ---------------------------------------------------------------------

def read_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    content = path.read_bytes()
    (length,) = struct.unpack_from("<Q", content)
    return json.loads(content[8:8 + length]), content[8 + length:]


def write_safetensors(path: Path, header: Any, data: bytes, declared_length: int | None = None) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded) if declared_length is None else declared_length) + encoded + data)


JSON_ODDITIES = st.sampled_from([None, True, False, -1, 0, 1, 2.5, 1e300, -(2**63), 2**64, 10**400, math.inf, "",
                                 "F32", "x", [], {},
                                 [1], {"a": 1}, "../secret.safetensors"])
