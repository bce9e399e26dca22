"""How long each step of a quantization job will take, told before it starts, and a calibration sized to the presets.

The estimate is work divided by a rate: converting moves the reference's bytes; the importance matrix runs the
model over the calibration text (parameters × tokens, most of a default job: 48 chunks of 512 tokens of a 135M model
are about 3.3·10¹² parameter-tokens); quantizing reads the reference once, plus a process start. The rates start from
figures measured on a 2-core machine and are replaced by this machine's own as soon as it has run a step of that kind
(`record_step`, kept in `$QDESK_CACHE_DIR/step-rates.json`, the median of the last few runs).

`calibration_chunks` sizes the text to what the presets gain from it: an importance matrix matters most below five
bits per weight (Q2_K to Q4_K_M, Q4_0, a sensitivity mix), where it keeps rounding error off the weights the model
leans on most; Q5_K_S, Q5_K_M and Q6_K barely change with it, so a quarter of the text does for them; Q8_0 uses
none.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from converters.calibration.calibrate import DEFAULT_CHUNKS, DEFAULT_CTX
from converters.core.atomic import atomic_output
from converters.core.paths import cache_dir
from qdesk.quantization.batch import BatchRequest, VariantChoice

__all__ = ["DEFAULT_RATES", "QUICK_CHUNKS", "StepTime", "calibration_chunks", "estimate_steps", "record_step"]

QUICK_CHUNKS = 12
"""The calibration text's length for presets that barely need an importance matrix (Q5_K_S and up)."""
PRESETS_THAT_BARELY_NEED_IT = frozenset({"Q5_K_S", "Q5_K_M", "Q6_K"})
DEFAULT_RATES = {
    "convert": 60e6,  # reference bytes per second
    "calibrate": 6e10,  # parameter-tokens per second, 2 cores (bench/imatrix_overhead.py: 466 tokens/s of 135M)
    "quantize": 80e6,  # reference bytes per second
    "mix": 4e6,  # reference bytes per second: sensitivity probes, error feedback and the quantization
    "feedback": 3.2e6,  # reference bytes per second: a preset with error feedback, about 25× a preset (bench/README.md)
}
PROCESS_START_S = 3.0
"""Each step runs in a fresh child process (`converters.core.isolation`): the interpreter and libraries load first."""
RATES_NAME = "step-rates.json"
KEPT_RUNS = 5


@dataclass(frozen=True)
class StepTime:
    key: str
    """As `BatchStep.key`: "convert", "calibrate", or a variant's type label."""
    seconds: float
    measured: bool
    """From this machine's own earlier steps of the kind (else from the default rates)."""


def calibration_chunks(choices: Sequence[VariantChoice], default: int = DEFAULT_CHUNKS) -> int:
    """How many chunks of calibration text the chosen variants are worth: all `default` when one of them is below
    five bits per weight, `QUICK_CHUNKS` when those using a matrix are Q5_K_S and up (0 when none uses one)."""
    using = [choice for choice in choices if choice.uses_imatrix]
    if not using:
        return 0
    if all(choice.preset in PRESETS_THAT_BARELY_NEED_IT for choice in using):
        return min(default, QUICK_CHUNKS)
    return default


def rates_path() -> Path:
    return cache_dir() / RATES_NAME


def _recorded() -> dict[str, list[float]]:
    try:
        document = json.loads(rates_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(document, dict):
        return {}
    return {kind: [float(rate) for rate in rates if isinstance(rate, int | float) and rate > 0]
            for kind, rates in document.items() if isinstance(rates, list)}


def rate_of(kind: str) -> tuple[float, bool]:
    """(units per second, measured here) for a kind of step."""
    rates = sorted(_recorded().get(kind) or ())
    if not rates:
        return DEFAULT_RATES[kind], False
    middle = len(rates) // 2
    return (rates[middle] if len(rates) % 2 else (rates[middle - 1] + rates[middle]) / 2), True


def record_step(kind: str, units: float, seconds: float) -> None:
    """Remember how fast a finished step went (`units` of work in `seconds`, process start excluded where known);
    a failure to write is ignored: the estimate then stays as it was."""
    work_seconds = max(0.1, seconds - PROCESS_START_S)
    if kind not in DEFAULT_RATES or units <= 0:
        return
    recorded = _recorded()
    recorded[kind] = ([*recorded.get(kind, []), units / work_seconds])[-KEPT_RUNS:]
    try:
        path = rates_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as staging:
            staging.write_text(json.dumps(recorded, indent=1) + "\n", encoding="utf-8")
    except (OSError, ValueError):
        pass


def step_units(kind: str, *, reference_bytes: int, parameters: int, chunks: int = DEFAULT_CHUNKS,
               ctx: int = DEFAULT_CTX) -> float:
    """The work a step of `kind` does, in the units its rate counts."""
    return float(parameters) * chunks * ctx if kind == "calibrate" else float(reference_bytes)


def step_kind(key: str, request: BatchRequest | None = None) -> str:
    """The rate a step's key is timed by: convert, calibrate, mix (a `mix-…` label), or for a preset feedback
    (when `request` rounds its presets with error feedback) or quantize."""
    if key in ("convert", "calibrate"):
        return key
    if key.startswith("mix-"):
        return "mix"
    return "feedback" if request is not None and request.feedback_presets else "quantize"


def estimate_steps(request: BatchRequest, *, is_checkpoint: bool, reference_bytes: int,
                   parameters: int) -> list[StepTime]:
    """The expected seconds of each step of `request`, in the order the job runs them."""
    keys: list[str] = ["convert"] if is_checkpoint else []
    if request.use_imatrix and any(choice.uses_imatrix for choice in request.choices):
        keys.append("calibrate")
    keys += [choice.type_label for choice in request.choices]
    times = []
    for key in keys:
        kind = step_kind(key, request)
        rate, measured = rate_of(kind)
        units = step_units(kind, reference_bytes=reference_bytes, parameters=parameters, chunks=request.chunks,
                           ctx=request.ctx)
        times.append(StepTime(key, PROCESS_START_S + units / rate, measured))
    return times
