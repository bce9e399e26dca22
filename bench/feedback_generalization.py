"""Does error feedback's gain hold on text it was not fitted to? In-sample against held-out output error.

    .venv/bin/python bench/feedback_generalization.py [--model qwen-1.5b] [--layers 3,14,25] [--chunks 32]
        [--ctx 512] [--types q4_K,q3_K] [--rows 64] [--damping 0.01,0.1] [--shrink 0,0.1]

The feedback encoder chooses integers against H = Σ x xᵀ of calibration inputs, and the mix values each type
by the ratio tr(E H Eᵀ) feedback / ggml measured on that same H. With fewer tokens than a few times the input's
width (16,384 tokens against ffn_down's 8,960 inputs on the 1.5B model) an in-sample ratio can promise more than
the encoding keeps on other text. This collects the inputs of a few layers of a real benchmark model
(`bench/_support/real_models.py`) on the built-in calibration text, fits H on the first `--fit-share` of the chunks
(H_fit) and holds out the rest (H_held), and prints, per input and type, the ratio feedback / ggml on
`--rows` sampled rows of each weight reading it: in-sample (on H_fit) and held out (on H_held), for each damping
(a fraction of H's mean diagonal, added to the diagonal) and shrinkage λ (H ← (1 − λ) H + λ diag H).
Prints figures; never passes or fails.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench._support.real_models import DEFAULT_REAL_CACHE, REAL_MODELS, prepare_real_model  # noqa: E402
from converters.calibration.calibrate import builtin_texts, calibration_chunks  # noqa: E402
from converters.calibration.imatrix import read_imatrix  # noqa: E402
from converters.core.gguf_file import file_fingerprint  # noqa: E402
from converters.mix.feedback import _ReferenceWeights  # noqa: E402
from native.input_spill import InputSpillWriter, SpilledInputs, spill_tag  # noqa: E402

_LAYER = re.compile(r"^blk\.(\d+)\.")


class _LayerWriter(InputSpillWriter):
    """Spills only the inputs of the chosen layers."""

    def __init__(self, folder: Path, tag: bytes, layers: set[int]) -> None:
        super().__init__(folder, tag)
        self._layers = layers

    def add(self, name: str, rows: np.ndarray) -> None:
        match = _LAYER.match(name)
        if match is not None and int(match.group(1)) in self._layers:
            super().add(name, rows)


def _collect(reference: Path, folder: Path, layers: set[int], chunks: int, ctx: int) -> SpilledInputs:
    from native.activations import ModelEvaluator

    tag = spill_tag(file_fingerprint(reference))
    if not (folder / "manifest.json").exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        writer = _LayerWriter(folder, tag, layers)
        with ModelEvaluator(reference, n_ctx=ctx, covariance_chunks=chunks, spill=writer) as evaluator:
            for index, chunk in enumerate(calibration_chunks(evaluator, builtin_texts(), ctx, chunks)):
                evaluator.evaluate_chunk(chunk)
                print(f"  collected chunk {index + 1}/{chunks}", flush=True)
            evaluator.finish_spill()
    return SpilledInputs(folder, tag)


def _covariance(rows: np.ndarray) -> np.ndarray:
    import torch

    values = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
    return (values.T @ values).to(torch.float64).numpy()


def _float_rows(records: np.ndarray) -> np.ndarray:
    exponents = records[:, 0].view(np.int16).astype(np.int32)
    values = records[:, 1:].view(np.float16).astype(np.float32)
    return np.ldexp(values, exponents[:, None]).astype(np.float32)


def _error(weights: np.ndarray, decoded: np.ndarray, covariance: np.ndarray) -> float:
    error = weights.astype(np.float64) - decoded
    return float(np.einsum("ij,jk,ik->", error, covariance, error, optimize=True))


def _shrunk(covariance: np.ndarray, shrink: float) -> np.ndarray:
    if shrink == 0:
        return covariance
    return (1 - shrink) * covariance + shrink * np.diag(np.diag(covariance))


def ledoit_wolf_diagonal(rows: np.ndarray) -> float:
    """The shrinkage intensity toward the diagonal that minimises the expected squared (Frobenius) error of the
    second-moment matrix estimated from `rows` (Schäfer and Strimmer's target D, Ledoit and Wolf's estimate)."""
    import torch

    values = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(torch.float64)
    count = values.shape[0]
    moment = (values.T @ values) / count
    squares = values.square()
    norms = squares.sum(dim=1)
    off_fourth = float((norms.square() - squares.square().sum(dim=1)).mean())
    off_squares = float(moment.square().sum() - moment.diagonal().square().sum())
    variance = (off_fourth - off_squares) / count
    return float(min(max(variance / off_squares, 0.0), 1.0)) if off_squares > 0 else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen-1.5b", choices=sorted(REAL_MODELS))
    parser.add_argument("--layers", default="3,14,25")
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--types", default="q4_K,q3_K")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--damping", default="0.01,0.1")
    parser.add_argument("--shrink", default="0,0.1")
    parser.add_argument("--inputs", default="", help="comma-separated input roles to keep (attn_k, attn_output, "
                        "ffn_gate, ffn_down); all when empty")
    parser.add_argument("--fit-share", type=float, default=0.5, help="share of the chunks H_fit is made from")
    args = parser.parse_args()

    from native.error_feedback import prepare_inputs, quantize_with_feedback
    from native.kernels import dequantize_rows, quantize_rows

    paths = prepare_real_model(args.model, DEFAULT_REAL_CACHE)
    reference, imatrix_path = paths.reference, paths.imatrix
    matrix = read_imatrix(imatrix_path)
    layers = {int(x) for x in args.layers.split(",")}
    folder = DEFAULT_REAL_CACHE / args.model / f"generalization-{'-'.join(map(str, sorted(layers)))}-{args.chunks}"
    started = time.monotonic()
    spilled = _collect(reference, folder, layers, args.chunks, args.ctx)
    print(f"inputs collected in {time.monotonic() - started:.0f} s ({spilled.tokens} tokens)")
    weights = _ReferenceWeights(reference)
    types = args.types.split(",")
    dampings = [float(x) for x in args.damping.split(",")]
    shrinks = [float(x) for x in args.shrink.split(",")]
    print("| input | n_in | weight | type | damping | shrink | ratio in-sample | ratio held out | ratio, fit on all "
          "(today) |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|")
    roles = [role for role in args.inputs.split(",") if role]
    for entry in spilled.inputs:
        if roles and not any(f".{role}." in entry.weights[0] for role in roles):
            continue
        records = spilled.rows(entry)
        half = int(records.shape[0] * args.fit_share)
        fit_rows = _float_rows(np.asarray(records[:half]))
        print(f"{entry.weights[0]}: Ledoit-Wolf shrinkage toward the diagonal {ledoit_wolf_diagonal(fit_rows):.3f}",
              flush=True)
        fit = _covariance(fit_rows)
        del fit_rows
        held = _covariance(_float_rows(np.asarray(records[half:])))
        whole = fit + held
        for name in entry.weights:
            n_rows = weights.shape(name)[1]
            picked = np.unique(np.linspace(0, n_rows - 1, min(args.rows, n_rows)).astype(np.int64))
            rows = weights.rows(name, picked)
            vector = matrix.entries[name].mean_squares()[: rows.shape[1]] if name in matrix.entries else None
            for type_ in types:
                plain = dequantize_rows(quantize_rows(rows, type_, vector), type_, rows.shape[0], rows.shape[1])
                base_fit, base_held, base_whole = (_error(rows, plain, h) for h in (fit, held, whole))
                for damping in dampings:
                    for shrink in shrinks:
                        prepared = prepare_inputs(_shrunk(fit, shrink), damping)
                        fed = dequantize_rows(quantize_with_feedback(rows, type_, prepared, vector), type_,
                                              rows.shape[0], rows.shape[1])
                        whole_prepared = prepare_inputs(_shrunk(whole, shrink), damping)
                        fed_whole = dequantize_rows(quantize_with_feedback(rows, type_, whole_prepared, vector),
                                                    type_, rows.shape[0], rows.shape[1])
                        print(f"| {entry.weights[0].removesuffix('.weight')} | {entry.n_in} | "
                              f"{name.removesuffix('.weight')} | {type_} | {damping:g} | {shrink:g} | "
                              f"{_error(rows, fed, fit) / base_fit:.3f} | {_error(rows, fed, held) / base_held:.3f} | "
                              f"{_error(rows, fed_whole, whole) / base_whole:.3f} |", flush=True)
    print(f"done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
