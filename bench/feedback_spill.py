"""How many calibration tokens error feedback's covariances need, and in which format their rows are spilled.

    python bench/feedback_spill.py REFERENCE.gguf [--tokens 2048 4096 8192 16384] [--layers 3] [--held-out 8]

Collects the inputs of every weight matrix on the built-in calibration text (`native.input_spill`, the format the
pipeline uses: float16 with a power-of-two scale per row) and, for the matrices of `--layers` evenly spaced
layers, also the exact covariances (float32 rows summed in float64) and those of bfloat16-rounded rows of the first
`--format-tokens` tokens. Then each of those matrices is encoded with error feedback from the covariances of the
first N tokens (and, at `--format-tokens`, from each format's), and
the product error tr(E H Eᵀ) is measured on held-out text (`resources/eval/text`, `--held-out` chunks of 512),
over that of ggml's own rounding (lower is better; 1.0 means feedback saved nothing out of sample). Also prints
the disk the spill takes per token and the time to form one layer's covariances from it. Prints figures; never passes or
fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from native.input_spill import InputSpillWriter, SpilledInputs, spill_tag

CTX = 512


class ExactAlongside(InputSpillWriter):
    """The pipeline's spill, plus exact (float32 rows) and bfloat16-rounded covariances of chosen inputs, summed
    per chunk boundary so that prefixes of N tokens can be compared."""

    def __init__(self, folder: Path, tag: bytes, watched: set[str], boundaries: list[int]) -> None:
        super().__init__(folder, tag)
        self.watched = watched
        self.boundaries = boundaries
        self.exact: dict[str, dict[int, np.ndarray]] = {}
        self.bf16: dict[str, dict[int, np.ndarray]] = {}
        self._running: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
        self._pending: dict[str, list[np.ndarray]] = {}

    def add(self, name: str, rows: np.ndarray) -> None:
        super().add(name, rows)
        if name in self.watched:
            self._pending.setdefault(name, []).append(np.array(rows.reshape(-1, rows.shape[-1]), dtype=np.float32))

    def commit(self) -> None:
        super().commit()
        for name, pieces in self._pending.items():
            rows = np.concatenate(pieces)
            bf16 = (rows.view(np.uint32) + 0x8000 & 0xFFFF0000).view(np.float32)
            exact, rounded, count = self._running.get(name, (0.0, 0.0, 0))
            exact = exact + (rows.T @ rows).astype(np.float64)
            rounded = rounded + (bf16.T @ bf16).astype(np.float64)
            count += rows.shape[0]
            self._running[name] = (exact, rounded, count)
            if count in self.boundaries:
                self.exact.setdefault(name, {})[count] = exact
                self.bf16.setdefault(name, {})[count] = rounded
        self._pending = {}

    def discard(self) -> None:
        super().discard()
        self._pending = {}


def collect(reference: Path, folder: Path, texts: list, chunks: int, watched: set[str] | None = None,
            boundaries: list[int] | None = None) -> tuple[SpilledInputs, InputSpillWriter, float]:
    from converters.calibration.calibrate import calibration_chunks
    from converters.core.gguf_file import file_fingerprint
    from native.activations import ModelEvaluator

    tag = spill_tag(file_fingerprint(reference))
    writer = (ExactAlongside(folder, tag, watched, boundaries or []) if watched
              else InputSpillWriter(folder, tag))
    started = time.monotonic()
    with ModelEvaluator(reference, n_ctx=CTX, covariance_chunks=chunks, spill=writer) as evaluator:
        for chunk in calibration_chunks(evaluator, texts, CTX, chunks):
            evaluator.evaluate_chunk(chunk)
        evaluator.finish_spill()
    return SpilledInputs(folder, tag), writer, time.monotonic() - started


def prefix_covariance(spilled: SpilledInputs, name: str, tokens: int) -> np.ndarray:
    import torch

    entry = spilled.input_of(name)
    total = torch.zeros((entry.n_in, entry.n_in), dtype=torch.float64)
    seen = 0
    for block in spilled.row_blocks(entry, torch.device("cpu")):
        block = block[: tokens - seen]
        total += (block.T @ block).double()
        seen += block.shape[0]
        if seen >= tokens:
            break
    return total.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--held-out", type=int, default=8)
    parser.add_argument("--format-tokens", type=int, default=4096, help="where the spill formats are compared")
    parser.add_argument("--scratch", type=Path, default=None, help="where to spill (default: beside the reference)")
    args = parser.parse_args()

    from converters.calibration.calibrate import CalibrationText, builtin_texts, resources_folder
    from converters.core.gguf_file import check_gguf
    from converters.mix.feedback import _output_error, _ReferenceWeights
    from native.error_feedback import prepare_inputs, quantize_with_feedback, supports_feedback
    from native.kernels import dequantize_rows, quantize_rows

    header = check_gguf(args.reference)
    n_layers = 1 + max(int(t.name.split(".")[1]) for t in header.tensors if t.name.startswith("blk."))
    layers = sorted({round(i * (n_layers - 1) / max(args.layers - 1, 1)) for i in range(args.layers)})
    classes = ("attn_q", "attn_output", "ffn_up", "ffn_down")
    names = [f"blk.{layer}.{part}.weight" for layer in layers for part in classes]
    watched = {f"blk.{layer}.{part}.weight" for layer in layers
               for part in (*classes, "attn_k", "attn_v", "ffn_gate")}  # whichever of a shared input's readers owns it
    held_texts = [CalibrationText(path.stem, tuple(p for p in path.read_text(encoding="utf-8").split("\n\n")
                                                   if p.strip()))
                  for path in sorted((resources_folder() / "eval" / "text").glob("*.txt"))]
    top = max(args.tokens)
    with tempfile.TemporaryDirectory(dir=args.scratch or args.reference.parent) as scratch:
        train_folder, held_folder = Path(scratch) / "train", Path(scratch) / "held"
        train_folder.mkdir()
        held_folder.mkdir()
        train, writer, seconds = collect(args.reference, train_folder, builtin_texts(), top // CTX, watched,
                                         [args.format_tokens])
        size = sum(entry.path.stat().st_size for entry in train.inputs)
        print(f"{args.reference.name}: {train.tokens} calibration tokens spilled in {seconds:.1f} s "
              f"(calibration pass included), {size / 1e9:.2f} GB = {size / train.tokens / 1e3:.1f} kB per token; "
              f"load average {os.getloadavg()[0]:.2f}")
        middle = {train.input_of(f"blk.{layers[len(layers) // 2]}.{part}.weight").key: part for part in classes}
        for entry in train.inputs:
            if entry.key in middle:
                for tokens in args.tokens:
                    started = time.monotonic()
                    prefix_covariance(train, entry.weights[0], tokens)
                    print(f"  forming the covariance of {middle[entry.key]}'s input ({entry.n_in} wide) from "
                          f"{tokens} tokens: {time.monotonic() - started:.2f} s", flush=True)
        held, _, _ = collect(args.reference, held_folder, held_texts, args.held_out)
        weights = _ReferenceWeights(args.reference)
        results: dict[tuple[str, int], list[float]] = {}
        for name in names:
            if name not in weights:
                continue
            held_h = held.covariance(held.input_of(name))
            rows = weights.rows(name, slice(None))
            n_in = rows.shape[1]
            type_ = "q4_K" if supports_feedback("q4_K", n_in) else "q4_0"
            plain = dequantize_rows(quantize_rows(rows, type_), type_, *rows.shape)
            baseline = _output_error(rows, plain, held_h)
            owner = next(w for w in train.input_of(name).weights if w in writer.exact)
            for tokens in args.tokens:
                variants = {"float16 spill": prefix_covariance(train, name, tokens)}
                if tokens == args.format_tokens:
                    variants.update({"float32 rows": writer.exact[owner][tokens],
                                     "bfloat16 rows": writer.bf16[owner][tokens]})
                for label, covariance in variants.items():
                    fed = quantize_with_feedback(rows, type_, prepare_inputs(covariance))
                    error = _output_error(rows, dequantize_rows(fed, type_, *rows.shape), held_h)
                    results.setdefault((label, tokens), []).append(error / baseline)
            print(f"  {name} ({type_}, {rows.shape[0]}×{n_in}) measured", flush=True)
    print("held-out tr(E H Eᵀ), feedback over ggml's rounding (geometric mean over matrices):")
    for (label, tokens), ratios in sorted(results.items(), key=lambda item: (item[0][1], item[0][0])):
        print(f"  {tokens:6d} tokens  {label:14s}  {np.exp(np.mean(np.log(ratios))):.4f}  "
              f"(worst {max(ratios):.4f}, {len(ratios)} matrices)")


if __name__ == "__main__":
    main()
