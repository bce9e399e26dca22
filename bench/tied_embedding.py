"""How the mix should value a tied token embedding under error feedback: an experiment on the benchmark's models.

    .venv/bin/python bench/tied_embedding.py original|broken LABEL=MB [LABEL=MB …]

The feedback ratio of a tied token embedding is measured on its output role (the only product it has a covariance
for), but its probed damage covers the lookup role too, which feedback does not help. For each budget (file MB) this
plans the mix three ways, with the embedding's damage scaled by the ratio as `feedback_sensitivity` does ("now"),
by half of it ("half") and not at all ("unscaled"), then quantizes each distinct plan with error feedback and
evaluates it as bench/mix_quality.py does (16 held-out chunks × 512 tokens against the F32 reference). Uses
bench/mix_quality.py's cache (models, importance matrices, sensitivity). Prints figures; never passes or fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench.mix_quality as mix_quality  # sets QDESK_CACHE_DIR to the benchmark's cache
from bench._support.mix_models import Timings, prepare_models
from converters.mix.sensitivity import Sensitivity

EMBEDDING = "token_embd.weight"
BLENDS = {"now": 0.0, "half": 0.5, "unscaled": 1.0}
"""Share of the embedding's damage left as ggml's rounding makes it (the rest scaled by the feedback ratio)."""


def blended(fed: Sensitivity, plain: Sensitivity, share: float) -> Sensitivity:
    plain_embedding = next(t for t in plain.tensors if t.name == EMBEDDING)
    tensors = []
    for tensor in fed.tensors:
        if tensor.name == EMBEDDING:
            options = tuple(replace(option, damage=share * unscaled.damage + (1 - share) * option.damage)
                            for option, unscaled in zip(tensor.options, plain_embedding.options, strict=True))
            tensor = replace(tensor, options=options)
        tensors.append(tensor)
    return replace(fed, tensors=tuple(tensors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("original", "broken"))
    parser.add_argument("budgets", nargs="+", help="LABEL=MB, e.g. 5bpw=85.82 Q3_K_M=93.51")
    args = parser.parse_args()

    from converters.calibration.imatrix import read_imatrix
    from converters.core.gguf_file import check_gguf
    from converters.mix.allocate import MixBudget, plan_mix
    from converters.mix.feedback import FEEDBACK_CHUNKS, collect_input_covariances, feedback_sensitivity
    from converters.quantization.quantize import quantize
    from qdesk.evaluation.evaluate import evaluate

    model = prepare_models(mix_quality.DEFAULT_CACHE, mix_quality.REPO_ROOT / ".cache" / "tests", [args.model], 48,
                           Timings({}))[0]
    reference, matrix = model.reference, read_imatrix(model.imatrix)
    header = check_gguf(reference)
    if any(tensor.name == "output.weight" for tensor in header.tensors):
        parser.error(f"{args.model}'s token embedding is not tied to the output")
    plain = mix_quality.mix_sensitivity(reference, matrix)
    fed = feedback_sensitivity(plain, reference, collect_input_covariances(reference, chunks=FEEDBACK_CHUNKS), matrix)
    variants = {name: blended(fed, plain, share) for name, share in BLENDS.items()}
    scratch = reference.parent / "variants"
    scratch.mkdir(exist_ok=True)
    for budget in args.budgets:
        label, megabytes = budget.split("=")
        planned: dict[tuple[tuple[str, str], ...], str] = {}
        for name, sensitivity in variants.items():
            mix = plan_mix(reference, header, MixBudget(size_bytes=int(float(megabytes) * 1e6)), sensitivity)
            types = tuple(sorted(mix.plan.types().items()))
            if types in planned:
                print(f"{label} {name}: the same plan as {planned[types]}", flush=True)
                continue
            planned[types] = name
            output = scratch / f"tied-{label}-{name}.gguf"
            started = time.monotonic()
            quantize(reference, output, mix.plan, imatrix=matrix, encoder="feedback")
            candidate = evaluate(reference, [output], chunks=16, ctx=512, memory_ctx=None).candidates[0]
            output.unlink()
            assert candidate.divergence is not None
            print(f"{label} {name}: {candidate.model.bytes / 1e6:.2f} MB, {candidate.model.bpw:.3f} bpw, "
                  f"token_embd {mix.plan.types()[EMBEDDING]}, KLD {candidate.divergence.mean:.5f}, "
                  f"predicted {mix.predicted_kld:.5f} ({time.monotonic() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
