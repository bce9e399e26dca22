"""How many probe tokens, from how many texts, the sensitivity's gains need: each group's probe KLD per token.

    .venv/bin/python bench/probe_tokens.py REFERENCE IMATRIX [--chunks 10] [--ctx 256] [--effort default]
        [--groups output,ffn_down@0] [--sensitivity FILE.json] --out FILE.npz

The sensitivity probes each group (one tensor class in a band of layers) by putting its weights through the probe
type and measuring the mean KLD on a few chunks of the built-in calibration text. This records, for every group, the
KLD of every position of `--chunks` calibration chunks (taken in turn from each built-in text, as the probe takes
them), so that any probe setting (how many chunks, scored from which position) can be compared afterwards without
re-evaluating: per text and per stretch of positions, against the same groups' probe KLD on the held-out text
(`bench/prediction_gap.py --probe-types`). Uses the cached sensitivity of the same reference (its groups, probe
types and damages), or with `--sensitivity` a remembered one read from its file (one a plan measured with an
importance matrix that was not kept, say). Prints figures; never fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.prediction_gap import EditableReference  # noqa: E402
from converters.calibration.calibrate import builtin_texts, calibration_chunks  # noqa: E402
from converters.calibration.divergence import compare_candidate, encode_reference  # noqa: E402
from converters.calibration.imatrix import read_imatrix  # noqa: E402
from converters.core.gguf_file import check_gguf  # noqa: E402
from converters.mix.sensitivity import _importance, _read_cached, cached_sensitivity, effort_named  # noqa: E402
from native.activations import ModelEvaluator  # noqa: E402


def chunk_logits(evaluator: ModelEvaluator, chunk: list[int]) -> np.ndarray:
    """The logits of every position but the last (each predicts the next token)."""
    rows: list[np.ndarray] = []
    evaluator.evaluate_logits(chunk, 0, lambda _p, row: rows.append(row.copy()))
    return np.concatenate(rows)[: len(chunk) - 1]


def position_klds(evaluator: ModelEvaluator, chunks: list[list[int]], references: list) -> np.ndarray:
    """KLD from the reference at every position (1 … ctx-1) of every chunk: chunks × (ctx - 1)."""
    rows = []
    for chunk, reference in zip(chunks, references, strict=True):
        scored = compare_candidate(chunk_logits(evaluator, chunk), reference, np.asarray(chunk[1:]))
        rows.append(scored.kld)
    return np.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("imatrix", type=Path)
    parser.add_argument("--chunks", type=int, default=10)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--effort", default="default")
    parser.add_argument("--groups", help="comma-separated groups to probe (default: all)")
    parser.add_argument("--sensitivity", type=Path, help="a remembered sensitivity file to take the groups from")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    effort = effort_named(args.effort)
    matrix = read_imatrix(args.imatrix)
    if args.sensitivity is not None:
        sensitivity = _read_cached(args.sensitivity)
        if sensitivity is None:
            raise SystemExit(f"{args.sensitivity} is not a sensitivity file this version reads")
    else:
        sensitivity = cached_sensitivity(args.reference, matrix, None, gpu_layers=0, layer_bands=effort.layer_bands,
                                         probe_chunks=effort.probe_chunks, probe_ctx=effort.probe_ctx)
    shapes = {t.name: tuple(t.shape) for t in check_gguf(args.reference).tensors}
    groups: dict[str, list[str]] = {}
    for tensor in sensitivity.tensors:
        groups.setdefault(tensor.group, []).append(tensor.name)
    klds: dict[str, np.ndarray] = {}
    started = time.monotonic()
    with ModelEvaluator(args.reference, n_ctx=args.ctx, collect=False, editable_weights=True) as evaluator:
        editable = EditableReference(evaluator, shapes, _importance(matrix))
        chunks = calibration_chunks(evaluator, builtin_texts(), args.ctx, args.chunks)
        references = [encode_reference(chunk_logits(evaluator, chunk), np.asarray(chunk[1:])) for chunk in chunks]
        klds["@baseline"] = position_klds(evaluator, chunks, references)
        wanted = set(args.groups.split(",")) if args.groups else set(groups)
        for group, names in sorted(groups.items()):
            if group not in wanted:
                continue
            with editable.degraded({name: sensitivity.probe_types[group] for name in names}):
                klds[group] = position_klds(evaluator, chunks, references)
            print(f"{group}: {klds[group][:, args.ctx // 2:].mean():.5f} (all positions {klds[group].mean():.5f}) "
                  f"{time.monotonic() - started:.0f} s", flush=True)
    damages = {group: sum(sensitivity.tensor(name).option(sensitivity.probe_types[group]).damage for name in names)
               for group, names in groups.items() if group in klds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **klds)
    args.out.with_suffix(".json").write_text(json.dumps({"damages": damages, "group_kld": dict(sensitivity.group_kld),
                                                         "chunks": len(chunks), "ctx": args.ctx}), encoding="utf-8")


if __name__ == "__main__":
    main()
