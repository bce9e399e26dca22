"""Where the mix's predicted KLD parts from the measured one: the prediction taken apart, one assumption at a time.

    .venv/bin/python bench/prediction_gap.py REFERENCE IMATRIX (--like PRESET | --preset PRESET | --plan PLAN.json)
        [--chunks 4] [--ctx 512] [--groups] [--probe-types] [--effort default] [--json-out FILE]

For one plan of the F16/F32 `REFERENCE` (the mix at a preset's size with llama.cpp's rounding, a preset's own types,
or a saved plan) it measures on the held-out text (`--chunks` × `--ctx`, as `qdesk eval` scores them):

* predicted: Σ g·(E + I) over the tensors (the sum the plan records), and Σ g·E without the input-rounding
  charge I (what the simulation can see), in all and per probe group;
* simulated: the reference in writable memory with every planned weight replaced by its round trip through its
  planned type (ggml's encoder with the importance matrix), evaluated in the reference's own precision;
* file: the quantized file llama.cpp writes for the plan (its kernels quantize the activations of each product
  to 8 bits, which the simulation does not), evaluated the same way;
* with `--halves`: the first and the second half of the layers alone (the token embedding with the first, the
  output with the second), so their sum against `simulated` shows whether errors of early and late layers add;
* with `--groups`: each probe group alone at its planned types (simulated), so Σ groups against `simulated` shows
  whether the contributions add, and each group's measured against predicted shows which ones are off;
* with `--probe-types`: each group alone at its probe type on this text, i.e. its gain re-measured on held-out text
  with the benchmark's context, against the gain probed on the calibration text.

The reference's distributions stay in memory (n_vocab × 2 bytes per scored token). Prints figures; never fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from converters.calibration.divergence import ReferenceRows, compare_candidate, encode_reference  # noqa: E402
from converters.calibration.imatrix import ImportanceMatrix, read_imatrix  # noqa: E402
from converters.core.gguf_file import check_gguf  # noqa: E402
from converters.mix.sensitivity import (  # noqa: E402
    Sensitivity,
    TensorSensitivity,
    _as_float,
    _importance,
    _round_trip,
    _stored,
    cached_sensitivity,
    effort_named,
)
from converters.quantization.plan import QuantPlan  # noqa: E402
from native.activations import ModelEvaluator  # noqa: E402
from qdesk.evaluation.text import TokenChunks  # noqa: E402

Logits = Callable[[ModelEvaluator, int], np.ndarray]


def scored_logits(evaluator: ModelEvaluator, chunks: TokenChunks, index: int) -> np.ndarray:
    first = chunks.first_scored
    rows: list[np.ndarray] = []
    evaluator.evaluate_logits(chunks.ids[index], first, lambda _p, logits: rows.append(logits.copy()))
    return np.concatenate(rows)[: chunks.scored_per_chunk]


def reference_rows(evaluator: ModelEvaluator, chunks: TokenChunks) -> list[ReferenceRows]:
    return [encode_reference(scored_logits(evaluator, chunks, index), chunks.next_tokens(index))
            for index in range(chunks.count)]


def mean_kld(evaluator: ModelEvaluator, chunks: TokenChunks, references: list[ReferenceRows]) -> float:
    values = [compare_candidate(scored_logits(evaluator, chunks, index), references[index],
                                chunks.next_tokens(index)).kld for index in range(chunks.count)]
    return float(np.concatenate(values).mean())


class EditableReference:
    """The reference loaded with writable weights; `degraded(types)` round-trips those weights for one evaluation."""

    def __init__(self, evaluator: ModelEvaluator, shapes: Mapping[str, tuple[int, ...]],
                 importance: Mapping[str, np.ndarray] | None) -> None:
        self.evaluator, self.shapes, self.importance = evaluator, shapes, importance

    @contextlib.contextmanager
    def degraded(self, types: Mapping[str, str]) -> Iterator[None]:
        """Within the block, each named weight holds its round trip through its type; afterwards its own data."""
        originals = {name: self.evaluator.read_weight(name) for name in types}
        try:
            for name, type_ in types.items():
                source_type = self.evaluator.weight_type(name)
                if type_ == source_type:
                    continue
                values = _as_float(originals[name], source_type, self.shapes[name])
                vector = self.importance.get(name) if self.importance is not None else None
                self.evaluator.write_weight(name, _stored(_round_trip(values, type_, vector), source_type))
            yield
        finally:
            for name, raw in originals.items():
                self.evaluator.write_weight(name, raw)

    def kld_with(self, types: Mapping[str, str], chunks: TokenChunks, references: list[ReferenceRows]) -> float:
        with self.degraded(types):
            return mean_kld(self.evaluator, chunks, references)


def weights_only(tensor: TensorSensitivity, type_name: str) -> float:
    """The prediction without the input-rounding charge, which the simulation (F16 products) does not incur."""
    option = tensor.option(type_name)
    return tensor.gain * option.damage + tensor.lookup_gain * option.lookup_damage


def chosen_plan(args: argparse.Namespace, reference: Path, matrix: ImportanceMatrix,
                sensitivity: Sensitivity | None) -> tuple[QuantPlan, str]:
    from converters.mix.allocate import MixBudget, plan_mix
    from converters.quantization.quantize import preset_plan

    if args.plan is not None:
        return QuantPlan.load(args.plan), f"plan {args.plan}"
    if args.preset is not None:
        return preset_plan(reference, args.preset, matrix), f"preset {args.preset}"
    assert sensitivity is not None
    like_bytes = preset_plan(reference, args.like, matrix).n_bytes
    mix = plan_mix(reference, check_gguf(reference), MixBudget(like=args.like), sensitivity, like_bytes)
    return mix.plan, f"mix like {args.like} (ggml rounding)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("imatrix", type=Path)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--like", help="the mix at this preset's size, with llama.cpp's rounding")
    which.add_argument("--preset", help="the preset's own types")
    which.add_argument("--plan", type=Path, help="a saved plan")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--effort", default="default")
    parser.add_argument("--groups", action="store_true")
    parser.add_argument("--halves", action="store_true",
                        help="the layers' first and second halves alone: do the halves' KLDs add up?")
    parser.add_argument("--predict", action="store_true", help="measure the sensitivity for the prediction")
    parser.add_argument("--probe-types", action="store_true")
    parser.add_argument("--no-file", action="store_true", help="skip quantizing and evaluating the file")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)

    from converters.quantization.quantize import quantize
    from qdesk.evaluation.evaluate import prepare_chunks

    started = time.monotonic()
    reference = args.reference
    header = check_gguf(reference)
    matrix = read_imatrix(args.imatrix)
    effort = effort_named(args.effort)
    sensitivity = cached_sensitivity(reference, matrix, None, gpu_layers=0, layer_bands=effort.layer_bands,
                                     probe_chunks=effort.probe_chunks, probe_ctx=effort.probe_ctx) \
        if args.like or args.groups or args.probe_types or args.predict else None
    plan, label = chosen_plan(args, reference, matrix, sensitivity)
    types = {t.name: t.type for t in plan.tensors}
    quantizable = {t.name for t in plan.tensors if len(t.shape) >= 2 and t.type != t.source_type}
    measured = {t.name: t for t in sensitivity.tensors} if sensitivity is not None else {}
    planned = {name: types[name] for name in (measured or quantizable)}
    predicted = {name: measured[name].predicted_kld(type_) for name, type_ in planned.items()} if measured else {}
    weights_predicted = {name: weights_only(measured[name], type_) for name, type_ in planned.items()} \
        if measured else {}
    chunks = prepare_chunks(reference, ctx=args.ctx, chunks=args.chunks)
    print(f"{reference.name}: {label}, {plan.bits_per_weight:.3f} bpw; held-out text {chunks.count} × {chunks.ctx} "
          f"({chunks.scored_tokens} scored tokens)", flush=True)
    report: dict[str, object] = {"reference": str(reference), "plan": label, "bpw": plan.bits_per_weight,
                                 "chunks": chunks.count, "ctx": chunks.ctx,
                                 "predicted": sum(predicted.values()) if predicted else None,
                                 "predicted_weights_only": sum(weights_predicted.values()) if predicted else None}

    shapes = {t.name: tuple(t.shape) for t in header.tensors}
    with ModelEvaluator(reference, n_ctx=args.ctx, collect=False, editable_weights=True) as evaluator:
        references = reference_rows(evaluator, chunks)
        editable = EditableReference(evaluator, shapes, _importance(matrix))
        report["simulated"] = editable.kld_with(planned, chunks, references)
        print(f"predicted {report['predicted']} (weights alone {report['predicted_weights_only']})  "
              f"simulated (all planned weights round-tripped) "
              f"{report['simulated']:.5f}", flush=True)
        if args.halves:
            layer_of = {name: int(name.split(".")[1]) if name.startswith("blk.") else -1 for name in planned}
            depth = max(layer_of.values()) + 1
            early = {n: t for n, t in planned.items() if layer_of[n] < depth // 2 and n != "output.weight"}
            late = {n: t for n, t in planned.items() if n not in early}
            halves = {"early": editable.kld_with(early, chunks, references),
                      "late": editable.kld_with(late, chunks, references)}
            if predicted:
                halves["early_predicted"] = sum(predicted[n] for n in early)
                halves["late_predicted"] = sum(predicted[n] for n in late)
            report["halves"] = halves
            print(f"halves (simulated): early {halves['early']:.5f} + late {halves['late']:.5f} = "
                  f"{halves['early'] + halves['late']:.5f} against together {report['simulated']:.5f}", flush=True)
        groups: dict[str, list[str]] = {}
        for tensor in sensitivity.tensors if sensitivity is not None else ():
            groups.setdefault(tensor.group, []).append(tensor.name)
        rows = []
        if sensitivity is not None and (args.groups or args.probe_types):
            for group, names in sorted(groups.items()):
                row: dict[str, object] = {"group": group, "predicted": sum(predicted[n] for n in names),
                                          "predicted_weights_only": sum(weights_predicted[n] for n in names),
                                          "types": sorted({planned[n] for n in names})}
                if args.groups:
                    row["simulated"] = editable.kld_with({n: planned[n] for n in names}, chunks, references)
                if args.probe_types:
                    probe = sensitivity.probe_types[group]
                    damage = sum(measured[n].option(probe).damage for n in names)
                    row["probe_kld_here"] = editable.kld_with({n: probe for n in names}, chunks, references)
                    row["probe_kld_calibration"] = sensitivity.group_kld[group]
                    row["probe_damage"] = damage
                rows.append(row)
                print("  " + "  ".join(f"{k} {v:.5f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                      flush=True)
            report["groups"] = rows
            if args.groups:
                report["sum_of_groups"] = sum(float(r["simulated"]) for r in rows)  # type: ignore[arg-type]
    if not args.no_file:
        with tempfile.TemporaryDirectory(dir=reference.parent, prefix=".gap-") as folder:
            output = Path(folder) / "variant.gguf"
            quantize(reference, output, plan, matrix, encoder="ggml")
            with ModelEvaluator(output, n_ctx=args.ctx, collect=False) as evaluator:
                report["file"] = mean_kld(evaluator, chunks, references)
    report["seconds"] = time.monotonic() - started
    print(json.dumps({k: v for k, v in report.items() if k != "groups"}, indent=1))
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(report, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
