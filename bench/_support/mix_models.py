"""The two models issue 10's quality bar is measured on, built once and cached.

* original: SmolLM2-135M-Instruct as the HF checkpoint the tests use (`tests.builders.starter.smollm2_checkpoint`,
  dequantized from the shipped Q4_1 GGUF, so its weights lie on Q4_1's grid), converted by qdesk to F32.
* grid-broken: the same checkpoint with seeded Gaussian noise added to every weight matrix (2-D tensors; norms
  untouched), of standard deviation `noise` (8 %) times the standard deviation of each 32-weight block along the
  rows, written as a new HF folder (F32 safetensors, config and tokenizer files copied, config's dtype set to
  float32), converted to F32.

Each model also gets its importance matrix, calibrated once on the built-in calibration text.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BLOCK = 32
DEFAULT_NOISE = 0.08
DEFAULT_SEED = 10


@dataclass(frozen=True)
class BenchModel:
    name: str
    checkpoint: Path
    reference: Path
    imatrix: Path


CACHE_HIT_SECONDS = 1.0
"""A step that took less than this found its output in the cache; a longer one did the work."""


@dataclass
class Timings:
    """Seconds spent per named step in this run, and what each step cost the last time it did its work (a cached
    run takes milliseconds; `cold` keeps the figures of the run that built the cache, saved in `record`)."""

    steps: dict[str, float]
    record: Path | None = None
    cold: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.record is not None and self.record.is_file():
            try:
                self.cold = {str(k): float(v) for k, v in json.loads(self.record.read_text(encoding="utf-8")).items()}
            except (OSError, ValueError, AttributeError):
                self.cold = {}

    def timed(self, step: str, work: Callable[[], object]) -> None:
        started = time.monotonic()
        work()
        self.add(step, time.monotonic() - started)

    def add(self, step: str, seconds: float) -> None:
        self.steps[step] = self.steps.get(step, 0.0) + seconds
        if seconds >= CACHE_HIT_SECONDS:
            self.remember_cold(step, self.steps[step])

    def remember_cold(self, step: str, seconds: float) -> None:
        self.cold[step] = seconds
        if self.record is not None:
            self.record.write_text(json.dumps(self.cold, indent=1), encoding="utf-8")


def original_checkpoint(checkpoint_cache: Path) -> Path:
    from tests.builders.starter import smollm2_checkpoint

    return smollm2_checkpoint(checkpoint_cache)


def add_block_noise(weights: np.ndarray, relative: float, rng: np.random.Generator) -> np.ndarray:
    """`weights` (float32, rows contiguous) plus N(0, (relative · std of each 32-weight block)²) per element."""
    blocks = weights.reshape(-1, BLOCK)
    scale = relative * blocks.std(axis=1, keepdims=True)
    noise = rng.standard_normal(blocks.shape, dtype=np.float32) * scale
    return (blocks + noise).reshape(weights.shape).astype(np.float32)


def build_broken_checkpoint(original: Path, target: Path, *, noise: float = DEFAULT_NOISE,
                            seed: int = DEFAULT_SEED) -> Path:
    """The grid-broken copy of the HF folder `original` at `target` (built atomically; reused when present)."""
    if (target / "config.json").is_file():
        return target
    import safetensors.numpy
    import safetensors.torch

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    try:
        rng = np.random.default_rng(seed)
        weights = safetensors.torch.load_file(original / "model.safetensors")
        noisy: dict[str, np.ndarray] = {}
        for name in sorted(weights):
            values = weights[name].float().numpy()
            rows_fit_blocks = values.ndim == 2 and values.shape[-1] % BLOCK == 0
            noisy[name] = add_block_noise(values, noise, rng) if rows_fit_blocks else values
        safetensors.numpy.save_file(noisy, staging / "model.safetensors", metadata={
            "format": "pt", "qdesk.bench.noise": f"{noise} x std of each {BLOCK}-weight block, seed {seed}"})
        for source in original.iterdir():
            if source.name != "model.safetensors" and source.is_file():
                shutil.copy2(source, staging / source.name)
        config = json.loads((staging / "config.json").read_text(encoding="utf-8"))
        config["dtype"] = "float32"
        config.pop("torch_dtype", None)
        (staging / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def reference_gguf(checkpoint: Path, target: Path) -> Path:
    """`checkpoint` converted by qdesk to an F32 GGUF at `target` (written atomically; reused when present)."""
    if target.is_file():
        return target
    from converters.writing.convert import convert_checkpoint

    target.parent.mkdir(parents=True, exist_ok=True)
    return convert_checkpoint(checkpoint, target, outtype="f32").path


def importance_matrix(reference: Path, target: Path, chunks: int, ctx: int = 512) -> Path:
    """The importance matrix of `reference` on the built-in calibration text (computed once, then reused)."""
    if target.is_file():
        return target
    from converters.calibration.calibrate import calibrate

    calibrate(reference, target, chunks=chunks, ctx=ctx)
    return target


def prepare_models(cache: Path, checkpoint_cache: Path, names: list[str], calibration_chunks: int,
                   timings: Timings, *, noise: float = DEFAULT_NOISE, seed: int = DEFAULT_SEED
                   ) -> list[BenchModel]:
    """Build (or reuse) the checkpoint, the F32 reference and the importance matrix of every model in `names`."""
    original: list[Path] = []
    timings.timed("original HF checkpoint", lambda: original.append(original_checkpoint(checkpoint_cache)))
    checkpoints = {"original": original[0]}
    if "broken" in names:
        target = cache / f"broken-hf-noise{noise:g}-seed{seed}" / original[0].name
        timings.timed("grid-broken HF checkpoint",
                      lambda: build_broken_checkpoint(original[0], target, noise=noise, seed=seed))
        checkpoints["broken"] = target
    models = []
    for name in names:
        folder = cache / (name if name == "original" else f"{name}-noise{noise:g}-seed{seed}")
        reference = folder / "reference-f32.gguf"
        matrix = folder / f"imatrix-{calibration_chunks}x512.gguf"
        checkpoint = checkpoints[name]
        timings.timed(f"{name}: convert to F32", lambda c=checkpoint, r=reference: reference_gguf(c, r))
        timings.timed(f"{name}: calibrate ({calibration_chunks} chunks)",
                      lambda r=reference, m=matrix: importance_matrix(r, m, calibration_chunks))
        models.append(BenchModel(name, checkpoint, reference, matrix))
    return models
