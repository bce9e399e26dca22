"""How close `qdesk.memory.estimate_memory` comes to what llama.cpp really allocates.

    python bench/memory_estimate.py [MODEL.gguf ...] [--ctx 512,2048,8192] [--kv f16,q8_0] [--variants]

For each GGUF (default: the starter model), each context length and each KV cache type, the estimate is set
beside `measure_allocation` (the model loaded by `llama_cpp.Llama` in a child process, as the engine loads it,
buffer sizes read from llama.cpp's log), part by part, in MiB, with the ratio estimate/actual. Everything runs on
the CPU: GPU splits are not measured here. `--variants` adds Q8_0, Q4_0 and Q4_K_M quantizations of SmolLM2's
F16 reference (the tests' one when built, else built once under `.cache/bench/memory/`). Prints a Markdown table.
"""

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qdesk.app.starter import starter_model_path  # noqa: E402
from qdesk.memory import MemoryEstimate, MemorySplit, estimate_memory, measure_allocation  # noqa: E402

CACHE = REPO / ".cache" / "bench" / "memory"
TEST_REFERENCE = REPO / ".cache" / "tests" / "smollm2-135m-f16.gguf"
"""The F16 reference the tests build (fixture `smollm2_f16`), used when present."""
VARIANT_TYPES = ("Q8_0", "Q4_0", "Q4_K_M")
PARTS = (("weights", "weights_bytes"), ("KV", "kv_bytes"), ("compute", "compute_bytes"), ("total", "total_bytes"))
MiB = 1 << 20


def _variants() -> list[Path]:
    from converters.quantization.quantize import quantize
    from converters.writing.convert import convert_checkpoint
    from tests.builders.starter import smollm2_checkpoint

    CACHE.mkdir(parents=True, exist_ok=True)
    reference = TEST_REFERENCE if TEST_REFERENCE.is_file() else CACHE / "smollm2-135m-f16.gguf"
    if not reference.is_file():
        convert_checkpoint(smollm2_checkpoint(CACHE), reference, outtype="f16")
    paths = [reference]
    for preset in VARIANT_TYPES:
        target = CACHE / f"smollm2-135m-{preset}.gguf"
        if not target.is_file():
            quantize(reference, target, preset, imatrix="none")
        paths.append(target)
    return paths


def _cell(estimate: MemorySplit, actual: MemorySplit, attribute: str) -> tuple[str, str]:
    guess, real = getattr(estimate, attribute), getattr(actual, attribute)
    ratio = f"{guess / real:.3f}" if real else ("1.000" if guess == 0 else "-")
    return f"{guess / MiB:.2f} / {real / MiB:.2f}", ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="*", help="GGUF files (default: the starter model)")
    parser.add_argument("--ctx", default="512,2048,8192", help="context lengths, comma-separated")
    parser.add_argument("--kv", default="f16,q8_0", help="KV cache types, comma-separated")
    parser.add_argument("--variants", action="store_true", help="add SmolLM2 F16, Q8_0, Q4_0 and Q4_K_M")
    args = parser.parse_args()
    models = list(args.models) or [starter_model_path()]
    if args.variants:
        models += _variants()
    contexts = [int(n) for n in args.ctx.split(",")]
    kv_types = args.kv.split(",")

    header = ["model", "n_ctx", "KV type"]
    for label, _ in PARTS:
        header += [f"{label} est / act (MiB)", "ratio"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|")
    worst = 0.0
    started = time.perf_counter()
    for model in models:
        for n_ctx in contexts:
            for kv_type in kv_types:
                estimate: MemoryEstimate = estimate_memory(model, n_ctx=n_ctx, kv_type=kv_type)
                actual = measure_allocation(model, n_ctx=n_ctx, kv_type=kv_type)
                row = [model.name, f"{n_ctx:,}", kv_type + (" (FA)" if estimate.flash_attention else "")]
                for _, attribute in PARTS:
                    row += list(_cell(estimate, actual, attribute))
                worst = max(worst, abs(estimate.total_bytes / actual.total_bytes - 1))
                print("| " + " | ".join(row) + " |", flush=True)
    print(f"\nlargest total error: {worst:.1%}; {time.perf_counter() - started:.0f} s. "
          "FA: flash attention, which llama.cpp needs for a quantized V cache.")


if __name__ == "__main__":
    main()
