"""Where a mix plan's time goes, piece by piece: the parts of the sensitivity's probing, the damage table, and
(given a plan's spill folder) the feedback ratios of one layer. Prints seconds; never passes or fails.

    .venv/bin/python bench/plan_profile.py REFERENCE.gguf IMATRIX.gguf [--layer 10] [--spill FOLDER]

`bench/plan_time.py` gives a whole plan's stage times; this times what one step of each stage costs, so that a
stage's time can be taken apart (on the 1.5B: one probe evaluation, one group's round trip, one layer's damages):

* the probe: loading the reference with writable weights, evaluating and encoding the probe text's reference logits
  (`_Probe.open`, 5 chunks of the default context), one chunk's evaluation, its scoring, one whole probe
  (`mean_kld`), and one group's round trip (the layer's ffn_down through q4_K: read, convert, encode, decode, write);
* the damage table: every candidate type on the layer's seven matrices (256 sampled rows), and opening the file
  with gguf-py's reader, which `native.kernels.measure_gguf` does once;
* with `--spill` (the `.qdesk-spill-…` folder a plan left in its scratch folder, e.g. `bench/plan_time.py`'s): for
  the layer's attention and feed-forward-down inputs, the fit covariance, its factor, and each feedback type's two
  encodings of `RATIO_SAMPLE_ROWS` rows and their held-out ratio (`converters.mix.feedback`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from converters.calibration.divergence import compare_candidate  # noqa: E402
from converters.calibration.imatrix import read_imatrix  # noqa: E402
from converters.core.hyperparameters import check_model_gguf  # noqa: E402
from converters.mix import sensitivity  # noqa: E402
from native.activations import ModelEvaluator  # noqa: E402

LAYER_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def timed(label: str, work: Callable[[], object]) -> object:
    started = time.monotonic()
    result = work()
    print(f"{label}: {time.monotonic() - started:.2f} s", flush=True)
    return result


def profile_probe(reference: Path, importance: dict[str, np.ndarray] | None, layer: int) -> None:
    shapes = {tensor.name: tuple(tensor.shape) for tensor in check_model_gguf(reference).tensors}
    started = time.monotonic()
    with ModelEvaluator(reference, n_ctx=sensitivity.DEFAULT_PROBE_CTX, collect=False,
                        editable_weights=True) as evaluator:
        print(f"loading the reference with writable weights: {time.monotonic() - started:.2f} s", flush=True)
        probe = timed(f"the probe text's reference logits ({sensitivity.DEFAULT_PROBE_CHUNKS} chunks evaluated and "
                      "encoded)", lambda: sensitivity._Probe.open(evaluator, None, sensitivity.DEFAULT_PROBE_CTX,
                                                                  sensitivity.DEFAULT_PROBE_CHUNKS))
        assert isinstance(probe, sensitivity._Probe)
        chunk = probe._chunks[0]
        logits = timed(f"one chunk's logits ({len(chunk)} tokens)", lambda: probe.logits(chunk))
        assert isinstance(logits, np.ndarray)
        timed("its scoring against the reference", lambda: compare_candidate(
            logits, probe._references[0], np.asarray(chunk[probe._first + 1 :])))
        timed(f"one probe (mean KLD over {probe.tokens} tokens)", probe.mean_kld)
        name = f"blk.{layer}.ffn_down.weight"
        vector = importance.get(name) if importance is not None else None

        def round_trip() -> None:
            original = evaluator.read_weight(name)
            source_type = evaluator.weight_type(name)
            values = sensitivity._as_float(original, source_type, shapes[name])
            evaluator.write_weight(name, sensitivity._stored(sensitivity._round_trip(values, "q4_K", vector),
                                                             source_type))
            evaluator.write_weight(name, original)

        timed(f"{name} through q4_K and back into the model", round_trip)


def profile_damages(reference: Path, importance: dict[str, np.ndarray] | None, layer: int) -> None:
    from gguf import GGUFReader

    from native.kernels import measure_gguf

    reader = timed("opening the file with gguf-py's reader", lambda: GGUFReader(str(reference)))
    names = [f"blk.{layer}.{matrix}.weight" for matrix in LAYER_MATRICES]
    timed(f"the damage table of layer {layer}: {len(sensitivity.CANDIDATE_TYPES)} types × 7 matrices × "
          f"{sensitivity.DEFAULT_SAMPLE_ROWS} rows", lambda: measure_gguf(
              reader, list(sensitivity.CANDIDATE_TYPES), importance, sample_rows=sensitivity.DEFAULT_SAMPLE_ROWS,
              tensors=names, skip_needing_importance=True))


def profile_ratios(reference: Path, matrix: object, spill: Path, layer: int) -> None:
    import torch

    from converters.mix import feedback
    from native.error_feedback import FEEDBACK_TYPES
    from native.input_spill import SpilledInputs

    tag = bytes.fromhex(json.loads((spill / "manifest.json").read_text(encoding="utf-8"))["tag"])
    spilled = SpilledInputs(spill, tag)
    sources = feedback._ReferenceWeights(reference)
    for weight in (f"blk.{layer}.attn_q.weight", f"blk.{layer}.ffn_down.weight"):
        entry = spilled.input_of(weight)
        if entry is None:
            print(f"{weight}: no spilled input", flush=True)
            continue
        covariance = timed(f"{weight}'s input ({entry.n_in} wide): the fit covariance",
                           lambda entry=entry: spilled.covariance(entry, part="fit"))
        assert isinstance(covariance, np.ndarray)
        prepared = timed("its factor", lambda covariance=covariance, entry=entry: feedback._prepared(
            covariance, spilled.part_rows(entry, "fit")))
        held_out = feedback._HeldOut(rows=torch.cat(list(spilled.row_blocks(
            entry, torch.device("cpu"), part="held-out"))).numpy())
        rows = feedback._sample_rows(sources, weight, feedback.RATIO_SAMPLE_ROWS)
        vector = feedback._importance_vector(matrix, weight)  # type: ignore[arg-type]
        started = time.monotonic()
        for type_ in FEEDBACK_TYPES:
            plain, fed = feedback._both_encodings(rows, type_, prepared, vector, None)  # type: ignore[arg-type]
            feedback._ratio(held_out, rows, plain, fed)
        print(f"{len(FEEDBACK_TYPES)} types × {rows.shape[0]} rows encoded both ways, with their ratios: "
              f"{time.monotonic() - started:.2f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("imatrix", type=Path)
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--spill", type=Path, help="a plan's spill folder, for the feedback ratios' pieces")
    args = parser.parse_args()
    matrix = read_imatrix(args.imatrix)
    importance = sensitivity._importance(matrix)
    profile_probe(args.reference, importance, args.layer)
    profile_damages(args.reference, importance, args.layer)
    if args.spill is not None:
        profile_ratios(args.reference, matrix, args.spill, args.layer)


if __name__ == "__main__":
    main()
