"""Is the mix's charge for llama.cpp rounding each product's inputs to 8 bits right? Predicted against measured.

    .venv/bin/python bench/input_rounding_check.py [--model qwen-1.5b] [--roles output,attn_output,ffn_down]
        [--chunks 8] [--ctx 512]

The sensitivity mix charges every weight, besides the damage of its own rounding, the output error of the CPU
kernel rounding its inputs (q8_K: 256-wide blocks for the k-quants; q8_0: 32-wide for the legacy types;
`converters.mix.sensitivity._input_damage`), valued at the gain probed for the weight's own errors. On a real model
that charge is what sends the output matrix and most attention-output matrices to q5_0/q8_0. This isolates it:
each variant keeps the F16 reference's weights except one role (every layer's matrices of that role, or the one
output matrix), stored as q6_K (q8_K inputs, small weight error) or as q8_0 (q8_0 inputs, smaller weight error).
The two differ almost only in the inputs' rounding, so the measured KLD difference is what that rounding costs,
and it is printed against the sensitivity's prediction with and without the charge.

Uses the real model's reference, importance matrix and cached sensitivity of `bench/mix_quality_real.py` (run that
first); results are kept with its other results. Prints figures; never passes or fails.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("QDESK_CACHE_DIR", str(REPO_ROOT / ".cache" / "bench" / "mix" / "qdesk-cache"))

from bench._support.mix_models import Timings  # noqa: E402
from bench._support.real_models import REAL_MODELS  # noqa: E402
from bench.mix_quality import ResultStore, RunSettings, Variant, measure, model_context  # noqa: E402
from bench.mix_quality_real import prepare  # noqa: E402
from converters.mix.sensitivity import K_AND_LEGACY_TYPES, cached_sensitivity, effort_named  # noqa: E402
from converters.quantization.plan import QuantPlan  # noqa: E402
from converters.quantization.quantize import quantize  # noqa: E402

TYPES = ("q6_K", "q8_0")


def _role_of(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if parts[0] == "blk" else parts[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen-1.5b", choices=sorted(REAL_MODELS))
    parser.add_argument("--roles", default="output,attn_output,ffn_down")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=512)
    args = parser.parse_args()

    model = prepare(args.model, 48, Timings({}))
    context = model_context(model)
    effort = effort_named("default")
    sensitivity = cached_sensitivity(model.reference, context.matrix, None, gpu_layers=0,
                                     layer_bands=effort.layer_bands, probe_chunks=effort.probe_chunks,
                                     probe_ctx=effort.probe_ctx, candidate_types=K_AND_LEGACY_TYPES)
    settings = RunSettings(args.chunks, args.ctx, None, False)
    store = ResultStore(model.reference.parent / f"results-real-{args.chunks}x{args.ctx}.json",
                        {"chunks": args.chunks, "ctx": args.ctx})
    unchanged = {t.name: t.source_type for t in context.base_plan.tensors}
    print("| role | type | tensors | predicted KLD | predicted without the input charge | measured KLD |")
    print("|---|---|---:|---:|---:|---:|")
    for role in args.roles.split(","):
        chosen = [t for t in sensitivity.tensors if _role_of(t.name) == role]
        for type_ in TYPES:
            types = {**unchanged, **{t.name: type_ for t in chosen}}
            plan = QuantPlan(tuple(t.__class__(t.name, t.shape, t.source_type, types[t.name])
                                   for t in context.base_plan.tensors), "Q8_0", f"{role} as {type_}, rest F16")

            def build(output: Path, plan: QuantPlan = plan) -> None:
                quantize(model.reference, output, plan, model.imatrix, encoder="ggml")

            predicted = sum(t.predicted_kld(type_) for t in chosen)
            weights_only = sum(t.gain * t.option(type_).damage for t in chosen)
            variant = Variant(f"{role} {type_}", "input rounding", context.fingerprint(types, True), build)
            result = measure(variant, context, store, settings, {})
            print(f"| {role} | {type_} | {len(chosen)} | {predicted:.5f} | {weights_only:.5f} | "
                  f"{result.kld_mean:.5f} |", flush=True)


if __name__ == "__main__":
    main()
