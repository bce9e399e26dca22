"""Speed of the error-feedback encoder on the matrices of a 1.5B model, against the numpy reference and against
ggml's plain encoding, and what re-encoding whole 1.5B and 7B models would cost. Prints figures only.

    .venv/bin/python bench/feedback_encoder.py                       # q4_K, every encoder
    .venv/bin/python bench/feedback_encoder.py --type q3_K --skip-reference --torch-threads 1

Matrices (rows × n_in) of Qwen2.5-1.5B: attn_q and attn_output 1536 × 1536, attn_k and attn_v 256 × 1536,
ffn_gate and ffn_up 8960 × 1536, ffn_down 1536 × 8960; random Gaussian weights. Their inputs' second moments H
are made like activations': correlated through 256 shared factors plus a private part, each channel with its own
scale (log-normal) and a few channels 20× larger; the importance vector is H's diagonal per token. Each matrix
is encoded by:

* `numpy`: the float64 reference (what `backend="numpy"` runs, threads over slices of rows);
* `torch cpu`: `quantize_with_feedback` on the CPU in its working precision (float32), and in float64;
* `torch cuda`: the same on a CUDA GPU in float32, where torch sees one;
* `ggml`: `native.kernels.quantize_rows` with the importance vector (no feedback): the floor, since every
  feedback encoding also runs it once per block.

Times are per matrix and exclude H⁻¹'s factor, which is timed apart once per input width (a layer has four
distinct inputs: q/k/v share one, gate/up another). The torch encodings are checked against the reference: share
of identical blocks and tr(E H Eᵀ) ratio. Projections fit t = a·rows·n_in² + b·rows·n_in + c·n_in (the products,
the per-weight work, the per-column steps) to the measured matrices, and a·n³ + b·n² to the factor times, then
sum over a model's matrices: Qwen2.5-1.5B (28 layers, 151936 × 1536 output) and a Mistral-7B-shaped model (32
layers, 4096 / 14336, 1024-row k and v, 32768 × 4096 output).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from native.block_layouts import LAYOUTS
from native.error_feedback import PreparedInputs, prepare_inputs, quantize_with_feedback
from native.error_feedback_reference import reference_factor, reference_quantize
from native.kernels import dequantize_rows, quantize_rows

DAMPING = 0.01
TOKENS = 16384
"""The calibration tokens H stands for (32 chunks × 512), for the importance vector's scale."""


@dataclass(frozen=True)
class Matrix:
    name: str
    rows: int
    n_in: int


MEASURED = (Matrix("attn_q", 1536, 1536), Matrix("attn_k", 256, 1536), Matrix("ffn_gate", 8960, 1536),
            Matrix("ffn_down", 1536, 8960))


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    layer: tuple[Matrix, ...]
    inputs: tuple[int, ...]
    """The widths of a layer's distinct inputs (one factor each)."""
    output: Matrix


def _model(name: str, layers: int, hidden: int, ffn: int, kv_rows: int, vocab: int) -> Model:
    layer = (Matrix("attn_q", hidden, hidden), Matrix("attn_k", kv_rows, hidden), Matrix("attn_v", kv_rows, hidden),
             Matrix("attn_output", hidden, hidden), Matrix("ffn_gate", ffn, hidden), Matrix("ffn_up", ffn, hidden),
             Matrix("ffn_down", hidden, ffn))
    return Model(name, layers, layer, (hidden, hidden, hidden, ffn), Matrix("output", vocab, hidden))


MODELS = (_model("Qwen2.5-1.5B", 28, 1536, 8960, 256, 151936), _model("7B (Mistral-shaped)", 32, 4096, 14336, 1024,
                                                                      32768))


def activation_moments(n_in: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    factors = 256
    shared = rng.standard_normal((n_in, factors)) / np.sqrt(factors)
    h = 0.7 * (shared @ shared.T) + 0.3 * np.eye(n_in)
    scale = np.exp(0.8 * rng.standard_normal(n_in))
    scale[rng.choice(n_in, 4, replace=False)] *= 20
    return h * np.outer(scale, scale) * TOKENS


def timed(on: torch.device | None, work: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """Seconds that `work(*args, **kwargs)` took (waiting for a GPU to finish), and its result."""
    if on is not None and on.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = work(*args, **kwargs)
    if on is not None and on.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, result


def output_error(weights: np.ndarray, encoded: np.ndarray, type_name: str, h: np.ndarray) -> float:
    error = torch.from_numpy(weights.astype(np.float64) - dequantize_rows(encoded, type_name, *weights.shape))
    return float(((error @ torch.from_numpy(h)) * error).sum())


def fit_nonnegative(features: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient ≥ 0: the best over the subsets of features whose fit is nonnegative."""
    best, best_residual = np.zeros(features.shape[1]), float(np.square(targets).sum())
    for size in range(1, features.shape[1] + 1):
        for chosen in itertools.combinations(range(features.shape[1]), size):
            coefficients, *_ = np.linalg.lstsq(features[:, chosen], targets, rcond=None)
            if np.all(coefficients >= 0):
                residual = float(np.square(features[:, chosen] @ coefficients - targets).sum())
                if residual < best_residual:
                    best, best_residual = np.zeros(features.shape[1]), residual
                    best[list(chosen)] = coefficients
    return best


def encode_features(matrix: Matrix) -> np.ndarray:
    return np.array([matrix.rows * matrix.n_in**2, matrix.rows * matrix.n_in, matrix.n_in], dtype=np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--type", default="q4_K", help="the feedback type to encode (default q4_K)")
    parser.add_argument("--skip-reference", action="store_true", help="leave out the numpy reference (slowest)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch's CPU threads (default: every core, as compute_device() sets)")
    args = parser.parse_args()
    type_name = args.type
    if type_name.lower() not in LAYOUTS:
        parser.error(f"{type_name} is not a type error feedback writes")
    cpu = torch.device("cpu")
    prepare_inputs(np.eye(8), device=cpu)  # compute_device() sets torch's threads to every core
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    print(f"type {type_name}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} "
          f"CPU threads, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("CUDA: " + (torch.cuda.get_device_name() if torch.cuda.is_available() else "none here (not measured)"))

    encoders: list[tuple[str, torch.device | None, torch.dtype | None]] = []
    if not args.skip_reference:
        encoders.append(("numpy", None, None))
    encoders += [("torch cpu", cpu, torch.float32), ("torch cpu f64", cpu, torch.float64)]
    if torch.cuda.is_available():
        encoders.append(("torch cuda", torch.device("cuda"), torch.float32))

    factor_seconds: dict[str, dict[int, float]] = {name: {} for name, _, _ in encoders}
    encode_seconds: dict[str, dict[str, float]] = {name: {} for name, _, _ in encoders}
    encode_seconds["ggml"] = {}
    print(f"\n{'matrix':<10} {'rows × n_in':>12} {'encoder':<14} {'factor s':>9} {'encode s':>9} {'× ggml':>7} "
          f"{'same blocks':>11} {'E/E_numpy':>9} {'E/E_ggml':>8}")
    for width in sorted({matrix.n_in for matrix in MEASURED}):
        h = activation_moments(width, seed=width)
        importance = (np.diag(h) / TOKENS).astype(np.float32)
        prepared: dict[str, PreparedInputs | tuple[np.ndarray, np.ndarray]] = {}
        for name, device, dtype in encoders:
            if device is None:
                seconds, prepared[name] = timed(None, reference_factor, h, DAMPING)
            else:
                seconds, prepared[name] = timed(device, prepare_inputs, h, DAMPING, device=device, dtype=dtype)
            factor_seconds[name][width] = seconds
        for matrix in (m for m in MEASURED if m.n_in == width):
            weights = np.random.default_rng(matrix.rows).standard_normal((matrix.rows, width)).astype(np.float32)
            plain_seconds, plain = timed(None, quantize_rows, weights, type_name, importance)
            encode_seconds["ggml"][matrix.name] = plain_seconds
            plain_error = output_error(weights, plain, type_name, h)
            reference = None
            reference_error = None
            print(f"{matrix.name:<10} {f'{matrix.rows} × {width}':>12} {'ggml':<14} {'':>9} {plain_seconds:9.2f} "
                  f"{1:7.2f}", flush=True)
            for name, device, _ in encoders:
                inputs = prepared[name]
                if isinstance(inputs, PreparedInputs):
                    seconds, encoded = timed(device, quantize_with_feedback, weights, type_name, inputs, importance)
                else:  # the reference's own factor, computed once as the torch encoders' are
                    seconds, encoded = timed(None, reference_quantize, weights, LAYOUTS[type_name.lower()],
                                             type_name.lower(), *inputs, importance, threads=None, should_stop=None)
                encode_seconds[name][matrix.name] = seconds
                error = output_error(weights, encoded, type_name, h)
                same = ""
                versus_reference = ""
                if reference is None and device is None:
                    reference, reference_error = encoded, error
                elif reference is not None and reference_error is not None:
                    block_bytes = LAYOUTS[type_name.lower()].block_bytes
                    blocks = np.all(encoded.reshape(matrix.rows, -1, block_bytes)
                                    == reference.reshape(matrix.rows, -1, block_bytes), axis=2)
                    same, versus_reference = f"{blocks.mean():.2%}", f"{error / reference_error:.4f}"
                print(f"{'':<10} {'':>12} {name:<14} {factor_seconds[name][width]:9.2f} {seconds:9.2f} "
                      f"{seconds / plain_seconds:7.2f} {same:>11} {versus_reference:>9} {error / plain_error:8.3f}",
                      flush=True)

    widths = sorted(factor_seconds[encoders[0][0]])
    print("\nprojected re-encoding of every layer matrix and the output, factors included (fit to the figures above;"
          " seconds):")
    print(f"{'encoder':<14} " + " ".join(f"{model.name + ' layers':>26} {'output':>8}" for model in MODELS))
    for name in [*(name for name, _, _ in encoders), "ggml"]:
        encode_fit = fit_nonnegative(np.array([encode_features(m) for m in MEASURED]),
                                     np.array([encode_seconds[name][m.name] for m in MEASURED]))
        if name in factor_seconds:
            factor_fit = fit_nonnegative(np.array([[float(n) ** 3, float(n) ** 2] for n in widths]),
                                         np.array([factor_seconds[name][n] for n in widths]))
        else:
            factor_fit = np.zeros(2)
        cells = []
        for model in MODELS:
            per_layer = sum(float(encode_features(m) @ encode_fit) for m in model.layer)
            per_layer += sum(float(np.array([float(n) ** 3, float(n) ** 2]) @ factor_fit) for n in model.inputs)
            output = float(encode_features(model.output) @ encode_fit)
            output += float(np.array([float(model.output.n_in) ** 3, float(model.output.n_in) ** 2]) @ factor_fit)
            cells.append(f"{model.layers * per_layer:>20.0f} s ({model.layers * per_layer / 60:5.1f} min) "
                         f"{output:>5.0f} s")
        print(f"{name:<14} " + " ".join(cells))
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
