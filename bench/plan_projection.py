"""What planning a mix from scratch would cost on 7B and 70B models, computed from costs measured here per unit of
work (per token and parameter, per weight, per row and input width), not guessed. Prints figures only.

    .venv/bin/python bench/plan_projection.py [REFERENCE.gguf] [--threads 1,2] [--eval-tokens 256]

Each stage of `qdesk quantize --like …` at `--mix-effort default` with error feedback (docs/mix.md, "Cost model")
is one of five kinds of work, and each kind is timed on this machine at 1 thread and at every core:

* llama.cpp evaluating tokens (importance matrix, input rounding, probing, the feedback inputs' collection):
  seconds per token and parameter, from `--eval-tokens` tokens through REFERENCE (default: the grid-broken
  Qwen2.5-Coder-1.5B F16 that bench/mix_quality_real.py builds);
* ggml's encoders on sampled rows (the damage table: every candidate type; the probes' round trips and the file's
  writing: q4_K): seconds per weight;
* the covariance sums Σ x xᵀ (float32 products in torch): seconds per token and n_in²;
* H's Cholesky factor (`prepare_inputs`, float64): fit a·n³ + b·n² at three widths;
* the feedback encoder (`quantize_with_feedback`, q4_K): fit a·rows·n_in² + b·rows·n_in + c·n_in at two row counts
  and three widths.

A model's stage is then its count of that work (tokens × parameters, weights, rows × widths) times the unit cost.
Projected machines: this one (every core), an 8-core desktop, from the measured speed-up from 1 to N threads
through Amdahl's law (the parallel share f from 1 → N, then 1 / ((1 − f) + f / 8)), and one 24 GB GPU, only when
this script runs where torch sees CUDA and llama.cpp offloads: there the torch kinds are timed on the GPU and the
evaluations with every layer offloaded (a model that does not fit is marked so). Peak memory is the F16
reference (probing edits the weights in RAM) plus one input's H and factor and the spill's write buffers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.feedback_encoder import Matrix, activation_moments, encode_features, fit_nonnegative  # noqa: E402
from converters.calibration.calibrate import DEFAULT_CHUNKS as IMATRIX_CHUNKS  # noqa: E402
from converters.calibration.calibrate import DEFAULT_CTX as IMATRIX_CTX  # noqa: E402
from converters.core.gguf_file import check_gguf  # noqa: E402
from converters.mix.feedback import FEEDBACK_CHUNKS, RATIO_SAMPLE_ROWS  # noqa: E402
from converters.mix.sensitivity import (  # noqa: E402
    CANDIDATE_TYPES,
    DEFAULT_LAYER_BANDS,
    DEFAULT_PROBE_CHUNKS,
    DEFAULT_PROBE_CTX,
    DEFAULT_SAMPLE_ROWS,
    INPUT_ROUNDING_CHUNKS,
)
from native.error_feedback import FEEDBACK_TYPES, prepare_inputs, quantize_with_feedback  # noqa: E402
from native.kernels import dequantize_rows, fits, quantize_rows  # noqa: E402

DEFAULT_REFERENCE = REPO_ROOT / ".cache" / "bench" / "real" / "qwen-1.5b" / "reference-f16.gguf"
FEEDBACK_CTX = 512
COLLECTION_OVERHEAD = 1.10
"""Evaluation with statistics collected over plain evaluation, measured by bench/imatrix_overhead.py."""
GIB = 1 << 30


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    ffn: int
    kv_rows: int
    vocab: int
    tied: bool

    def layer(self) -> tuple[Matrix, ...]:
        h, f, kv = self.hidden, self.ffn, self.kv_rows
        return (Matrix("attn_q", h, h), Matrix("attn_k", kv, h), Matrix("attn_v", kv, h),
                Matrix("attn_output", h, h), Matrix("ffn_gate", f, h), Matrix("ffn_up", f, h),
                Matrix("ffn_down", h, f))

    def matrices(self) -> list[Matrix]:
        edges = [Matrix("token_embd", self.vocab, self.hidden)]
        if not self.tied:
            edges.append(Matrix("output", self.vocab, self.hidden))
        return [m for _ in range(self.layers) for m in self.layer()] + edges

    def parameters(self) -> int:
        return sum(m.rows * m.n_in for m in self.matrices())

    def inputs(self) -> list[int]:
        """Widths of the distinct inputs, one covariance and factor each: q/k/v share one, gate/up another."""
        return [self.hidden, self.hidden, self.hidden, self.ffn] * self.layers + [self.hidden]

    def product_parameters(self) -> int:
        """Parameters in matrix products per token (the lookup's rows are read, not multiplied)."""
        return self.parameters() - (0 if self.tied else self.vocab * self.hidden)


SHAPES = (
    Shape("Qwen2.5-1.5B", 28, 1536, 8960, 256, 151936, tied=False),
    Shape("7B (Mistral-shaped)", 32, 4096, 14336, 1024, 32768, tied=False),
    Shape("70B (Llama-3-shaped)", 80, 8192, 28672, 1024, 128256, tied=False),
)


@dataclass
class UnitCosts:
    """Seconds per unit of each kind of work on one device at one thread count."""

    eval_per_token_parameter: float
    ggml_per_weight: dict[str, float]
    covariance_per_token_n2: float
    factor_fit: np.ndarray
    encode_fit: np.ndarray


def _timed(work: Callable[[], object], device: torch.device | None = None, repeats: int = 2) -> float:
    """The best of `repeats` runs after one untimed run (which builds tables, warms caches and allocators)."""
    work()
    best = float("inf")
    for _ in range(repeats):
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        work()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best


def _eval_cost(reference: Path, tokens: int, threads: int, gpu_layers: int) -> float:
    from native.activations import ModelEvaluator

    with ModelEvaluator(reference, n_ctx=tokens, n_threads=threads, n_gpu_layers=gpu_layers,
                        collect=False) as evaluator:
        chunk = [100 + (index * 7919) % 20000 for index in range(tokens)]
        seconds = _timed(lambda: evaluator.evaluate_chunk(chunk), repeats=1)
    sizes = {t.name: int(np.prod(t.shape)) for t in check_gguf(reference).tensors if len(t.shape) >= 2}
    untied_lookup = sizes.get("token_embd.weight", 0) if "output.weight" in sizes else 0
    return seconds / (tokens * (sum(sizes.values()) - untied_lookup))


def _ggml_costs(threads: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((64, 4096)).astype(np.float32)
    importance = (rng.random(4096) + 0.1).astype(np.float32)
    costs = {}
    for type_name in CANDIDATE_TYPES:
        if type_name == "f16" or not fits(type_name, 4096):
            continue
        seconds = _timed(lambda t=type_name: dequantize_rows(quantize_rows(rows, t, importance, threads=threads), t,
                                                             *rows.shape))
        costs[type_name] = seconds / rows.size
    return costs


def _covariance_cost(device: torch.device) -> float:
    tokens, width = 2048, 4096
    x = torch.randn(tokens, width, device=device)
    total = torch.zeros(width, width, device=device)
    seconds = _timed(lambda: total.addmm_(x.T, x), device)
    return seconds / (tokens * width**2)


def _factor_fit(device: torch.device) -> np.ndarray:
    widths = (1024, 2048, 4096)
    seconds = []
    for width in widths:
        h = activation_moments(width, seed=width)
        seconds.append(_timed(lambda h=h: prepare_inputs(h, device=device), device))
    return fit_nonnegative(np.array([[float(n) ** 3, float(n) ** 2] for n in widths]), np.array(seconds))


def _encode_fit(device: torch.device) -> np.ndarray:
    measured: list[tuple[Matrix, float]] = []
    for width in (1024, 2048, 4096):
        h = activation_moments(width, seed=width)
        importance = (np.diag(h) / (FEEDBACK_CHUNKS * FEEDBACK_CTX)).astype(np.float32)
        prepared = prepare_inputs(h, device=device)
        for rows in (32, 128):
            weights = np.random.default_rng(rows).standard_normal((rows, width)).astype(np.float32)
            seconds = _timed(lambda w=weights, p=prepared, i=importance: quantize_with_feedback(w, "q4_K", p, i),
                             device)
            measured.append((Matrix("sample", rows, width), seconds))
    return fit_nonnegative(np.array([encode_features(m) for m, _ in measured]), np.array([s for _, s in measured]))


def measure(reference: Path, tokens: int, threads: int, device: torch.device, gpu_layers: int) -> UnitCosts:
    torch.set_num_threads(threads)
    return UnitCosts(
        eval_per_token_parameter=_eval_cost(reference, tokens, threads, gpu_layers),
        ggml_per_weight=_ggml_costs(threads),
        covariance_per_token_n2=_covariance_cost(device),
        factor_fit=_factor_fit(device),
        encode_fit=_encode_fit(device),
    )


UNIT_ROWS: tuple[tuple[str, float, Callable[[UnitCosts], float]], ...] = (
    ("llama.cpp evaluation, ps per token·parameter", 1e12, lambda c: c.eval_per_token_parameter),
    ("q4_K encode + decode, ns per weight", 1e9, lambda c: c.ggml_per_weight["q4_K"]),
    ("every candidate type, ns per weight", 1e9, lambda c: sum(c.ggml_per_weight.values())),
    ("Σ x xᵀ, ps per token·n_in²", 1e12, lambda c: c.covariance_per_token_n2),
    ("factor, s at n_in 4096", 1.0, lambda c: float(np.array([4096.0**3, 4096.0**2]) @ c.factor_fit)),
    ("feedback encode, s for 1024 rows × 4096", 1.0,
     lambda c: float(encode_features(Matrix("", 1024, 4096)) @ c.encode_fit)),
)


INPUT_PROBES = 8 * 2
"""The input-rounding probes after the groups: one per kind of input (q, k, v, attn_output, gate, up, down, output)
and input block (32 and 256) for rows that are multiples of 256, each over the first half of every probe chunk."""
INPUT_PROBE_SHARE = 0.5


def stage_seconds(shape: Shape, costs: UnitCosts) -> dict[str, float]:
    """Each stage of a default-effort mix with error feedback, from the unit costs."""
    per_token = costs.eval_per_token_parameter * shape.product_parameters()
    matrices = shape.matrices()
    groups = 7 * (DEFAULT_LAYER_BANDS + 2) + 2
    fed_types = [t for t in CANDIDATE_TYPES if t in FEEDBACK_TYPES and fits(t, shape.hidden)]

    def factor(n: int) -> float:
        return float(np.array([float(n) ** 3, float(n) ** 2]) @ costs.factor_fit)

    def encode(rows: int, n_in: int) -> float:
        return float(encode_features(Matrix("", rows, n_in)) @ costs.encode_fit)

    feedback_tokens = FEEDBACK_CHUNKS * FEEDBACK_CTX
    covariances = sum(feedback_tokens * n**2 * costs.covariance_per_token_n2 for n in shape.inputs())
    factors = sum(factor(n) for n in shape.inputs())
    sampled = sum(min(DEFAULT_SAMPLE_ROWS, m.rows) * m.n_in for m in matrices)
    return {
        "importance matrix": IMATRIX_CHUNKS * IMATRIX_CTX * per_token * COLLECTION_OVERHEAD,
        "damage table": sampled * sum(costs.ggml_per_weight.values()),
        "input rounding": INPUT_ROUNDING_CHUNKS * DEFAULT_PROBE_CTX * per_token * COLLECTION_OVERHEAD,
        "probing": ((groups + 1 + INPUT_PROBE_SHARE * INPUT_PROBES) * DEFAULT_PROBE_CHUNKS * DEFAULT_PROBE_CTX
                    * per_token
                    + shape.parameters() * costs.ggml_per_weight["q4_K"]),
        "feedback inputs": feedback_tokens * per_token * COLLECTION_OVERHEAD,
        "feedback ratios": covariances + factors + sum(
            len(fed_types) * encode(min(RATIO_SAMPLE_ROWS, m.rows), m.n_in) for m in matrices),
        "writing (llama.cpp)": shape.parameters() * costs.ggml_per_weight["q4_K"],
        "re-encoding": sum(encode(m.rows, m.n_in) for m in matrices),  # the ratios' factors are kept for it
    }


def peak_bytes(shape: Shape) -> tuple[int, int]:
    """(the F16 reference, the peak above it): one input's H and factor in float64, the widest."""
    widest = max(shape.inputs())
    return 2 * shape.parameters(), 2 * 8 * widest**2 + 512 * (1 << 20)


def amdahl(one: float, many: float, threads: int, target: int) -> float:
    """Seconds at `target` threads from those at 1 and at `threads`, by Amdahl's law."""
    if threads <= 1 or one <= 0:
        return many
    speedup = min(max(one / many, 1.0), threads)
    parallel = (1 - 1 / speedup) / (1 - 1 / threads)
    return one * ((1 - parallel) + parallel / target)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:7.1f}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", nargs="?", type=Path, default=DEFAULT_REFERENCE)
    parser.add_argument("--eval-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if not args.reference.is_file():
        parser.error(f"{args.reference} is not a file; build it with bench/mix_quality_real.py --models qwen-1.5b")
    cpu = torch.device("cpu")
    print(f"{os.cpu_count()} cores, torch {torch.__version__}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; reference {args.reference.name}")
    one = measure(args.reference, args.eval_tokens, 1, cpu, 0)
    many = measure(args.reference, args.eval_tokens, args.threads, cpu, 0)
    gpu = None
    if torch.cuda.is_available():
        gpu = measure(args.reference, args.eval_tokens, args.threads, torch.device("cuda"), 999)
    print(f"\n{'unit cost':<44} {'1 thread':>10} {f'{args.threads} threads':>10} {'speed-up':>9}")
    for label, scale, pick in UNIT_ROWS:
        low, high = pick(one), pick(many)
        print(f"{label:<44} {low * scale:10.4g} {high * scale:10.4g} {low / high:9.2f}")
    print("GPU: " + (torch.cuda.get_device_name() if gpu is not None else "none here: the GPU column is not measured"))
    print(f"load average after measuring: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    for shape in SHAPES:
        here, single = stage_seconds(shape, many), stage_seconds(shape, one)
        desktop = {stage: amdahl(single[stage], here[stage], args.threads, 8) for stage in here}
        on_gpu = stage_seconds(shape, gpu) if gpu is not None else None
        reference_bytes, above = peak_bytes(shape)
        fits_gpu = reference_bytes + above < 22 * GIB
        print(f"{shape.name}: {shape.parameters() / 1e9:.2f} B parameters, F16 reference {reference_bytes / GIB:.1f} "
              f"GiB, peak ≈ reference + {above / GIB:.2f} GiB")
        print(f"  {'stage':<22} {f'here, {args.threads} threads':>18} {'8-core desktop':>15} {'24 GB GPU':>10}  (min)")
        for stage in here:
            gpu_cell = "—" if on_gpu is None else _minutes(on_gpu[stage]) + ("" if fits_gpu else "*")
            print(f"  {stage:<22} {_minutes(here[stage]):>18} {_minutes(desktop[stage]):>15} {gpu_cell:>10}")
        total_gpu = "—" if on_gpu is None else _minutes(sum(on_gpu.values()))
        print(f"  {'total':<22} {_minutes(sum(here.values())):>18} {_minutes(sum(desktop.values())):>15} "
              f"{total_gpu:>10}\n")
    print("* the F16 weights do not fit 24 GB: llama.cpp's stages would run partly on the CPU.")


if __name__ == "__main__":
    main()
