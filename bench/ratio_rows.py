"""How many rows the feedback ratios need: the mixes chosen with ratios measured on 32 and on 64 rows of each
matrix, valued with ratios on 128. Prints figures; never passes or fails.

    .venv/bin/python bench/ratio_rows.py REFERENCE.gguf IMATRIX.gguf SENSITIVITY.json SPILL_FOLDER [--bpw 3.9,4.9,5.7]

`converters.mix.feedback.feedback_sensitivity` scales each damage by what error feedback leaves of it, measured on
`RATIO_SAMPLE_ROWS` (64) evenly spaced rows of the matrix: tr(E H Eᵀ) on held-out inputs of the feedback encoding
over ggml's. On the 1.5B that stage takes 22 minutes, a third of it in those encodings (bench/README.md, "where the
1.5B's plan time goes"). This measures every ratio three ways from the spill folder a plan left behind (its inputs,
and its kept factors where the folder has them): on the plan's 64 rows, on 64 other rows (the midpoints between
them), and on every other of the plan's rows (32). The reference value is the ratio over all 128 rows (both sets'
errors summed). The sensitivity (a remembered sensitivity file, e.g. the same plan's) gives the gains and damages;
each row set's ratios scale it, the allocation chooses a mix at each budget, and the mix is valued with the
128-row ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from converters.calibration.imatrix import read_imatrix  # noqa: E402
from converters.mix import feedback  # noqa: E402
from converters.mix.allocate import allocate  # noqa: E402
from converters.mix.factor_store import FactorStore  # noqa: E402
from converters.mix.sensitivity import Sensitivity, _read_cached  # noqa: E402
from native.error_feedback import supports_feedback  # noqa: E402
from native.input_spill import SpilledInputs  # noqa: E402

ROW_SETS = ("plan's 64", "other 64", "32")


def row_sets(n_rows: int, sample_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The plan's evenly spaced rows, and the rows halfway between them."""
    plan = np.unique(np.linspace(0, n_rows - 1, min(sample_rows, n_rows)).astype(np.int64))
    other = np.unique(np.clip(plan + max(1, (n_rows // max(1, plan.size)) // 2), 0, n_rows - 1))
    return plan, other


def row_errors(inputs: np.ndarray, weights: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """Each row's Σ_x ((w − q) · x)² over the held-out inputs (the per-row terms of `feedback._HeldOut.error`)."""
    products = inputs @ (weights.astype(np.float64) - decoded).T.astype(np.float32)
    return np.square(products, dtype=np.float64).sum(axis=0)


def measured_ratios(reference: Path, matrix: object, sensitivity: Sensitivity, spill: Path
                    ) -> dict[str, dict[str, dict[str, float]]]:
    """Row set (and "128") → weight → type → ratio."""
    tag = bytes.fromhex(json.loads((spill / "manifest.json").read_text(encoding="utf-8"))["tag"])
    spilled = SpilledInputs(spill, tag)
    store = FactorStore(spill / "factors", tag, 0)
    sources = feedback._ReferenceWeights(reference)
    wanted = {tensor.name: [option.type for option in tensor.options
                            if option.damage > 0 and supports_feedback(option.type, tensor.shape[0])]
              for tensor in sensitivity.tensors if len(tensor.shape) == 2}
    result: dict[str, dict[str, dict[str, float]]] = {name: {} for name in (*ROW_SETS, "128")}
    started = time.monotonic()
    for entry in spilled.inputs:
        names = [name for name in entry.weights if wanted.get(name)]
        if not names:
            continue
        kept = store.load(entry.key, entry.n_in)
        prepared = kept.expanded() if kept is not None else feedback._prepared(
            spilled.covariance(entry, part="fit"), spilled.part_rows(entry, "fit"))
        held_out_rows = torch.cat(list(spilled.row_blocks(entry, torch.device("cpu"), part="held-out"))).numpy()
        for name in names:
            plan_rows, other_rows = row_sets(sources.shape(name)[1], feedback.RATIO_SAMPLE_ROWS)
            vector = feedback._importance_vector(matrix, name)  # type: ignore[arg-type]
            for type_ in wanted[name]:
                errors = {}
                for label, picked in (("plan", plan_rows), ("other", other_rows)):
                    rows = sources.rows(name, picked)
                    plain, fed = feedback._both_encodings(rows, type_, prepared, vector, None)
                    errors[label] = (row_errors(held_out_rows, rows, plain), row_errors(held_out_rows, rows, fed))
                (plan_plain, plan_fed), (other_plain, other_fed) = errors["plan"], errors["other"]

                def ratio(plain: np.ndarray, fed: np.ndarray) -> float:
                    return float(fed.sum() / plain.sum()) if plain.sum() > 0 else 1.0

                result["plan's 64"].setdefault(name, {})[type_] = ratio(plan_plain, plan_fed)
                result["other 64"].setdefault(name, {})[type_] = ratio(other_plain, other_fed)
                result["32"].setdefault(name, {})[type_] = ratio(plan_plain[::2], plan_fed[::2])
                result["128"].setdefault(name, {})[type_] = ratio(np.concatenate([plan_plain, other_plain]),
                                                                  np.concatenate([plan_fed, other_fed]))
        print(f"{entry.key}: {', '.join(names)} {time.monotonic() - started:.0f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("imatrix", type=Path)
    parser.add_argument("sensitivity", type=Path)
    parser.add_argument("spill", type=Path)
    parser.add_argument("--bpw", default="3.9,4.9,5.7")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    sensitivity = _read_cached(args.sensitivity)
    if sensitivity is None:
        raise SystemExit(f"{args.sensitivity} is not a sensitivity file this version reads")
    ratios = measured_ratios(args.reference, read_imatrix(args.imatrix), sensitivity, args.spill)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(ratios), encoding="utf-8")
    scaled = {label: [feedback._scaled(tensor, ratios[label].get(tensor.name, {})) for tensor in sensitivity.tensors]
              for label in ratios}
    truth = scaled["128"]
    parameters = sum(int(np.prod(tensor.shape)) for tensor in sensitivity.tensors)
    spread = {label: np.abs(np.log([ratios[label][name][type_] / ratios["128"][name][type_]
                                    for name in ratios["128"] for type_ in ratios["128"][name]
                                    if ratios[label][name][type_] > 0 and ratios["128"][name][type_] > 0]))
              for label in ROW_SETS}
    for label in ROW_SETS:
        print(f"ratios on the {label} rows against the 128: median {np.exp(np.median(spread[label])):.3f}×, "
              f"90th percentile {np.exp(np.quantile(spread[label], 0.9)):.3f}×")
    for bpw in (float(value) for value in args.bpw.split(",")):
        budget = int(parameters * bpw / 8)
        best = allocate(truth, budget)
        best_kld = sum(tensor.predicted_kld(best[tensor.name]) for tensor in truth)
        for label in ROW_SETS:
            chosen = allocate(scaled[label], budget)
            kld = sum(tensor.predicted_kld(chosen[tensor.name]) for tensor in truth)
            print(f"{bpw} bpw: the mix from the {label} rows' ratios, valued with the 128 rows': {kld:.5f} against "
                  f"{best_kld:.5f} ({kld / best_kld:.4f}×), {sum(best[n] != chosen[n] for n in best)} tensors "
                  "typed otherwise", flush=True)


if __name__ == "__main__":
    main()
