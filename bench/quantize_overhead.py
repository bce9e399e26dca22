"""What qdesk's `quantize` adds to a bare `llama_model_quantize` call for the same input and preset.

    python bench/quantize_overhead.py [MODEL.gguf | --synthetic] [--preset Q4_K_M] [--imatrix FILE] [--repeat 3]

MODEL defaults to the test cache's SmolLM2-135M F16 GGUF (run the test suite once to make it);
`--synthetic` builds (once, under .cache/bench/) a random 0.6B-parameter Llama at F16, where the fixed
cost of qdesk's checks and child process weighs as it would on a real model. Both
sides get the same importance matrix when --imatrix is given (qdesk reads the file; the peer gets the
already-loaded data, so reading it counts against qdesk). Runs alternate; the median of each is printed
with the ratio qdesk/peer. The target is at most 1.1x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import llama_cpp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from converters.calibration.imatrix import read_imatrix  # noqa: E402
from converters.quantization.presets import preset_named  # noqa: E402
from converters.quantization.quantize import quantize  # noqa: E402
from tests.builders.llama_quantizer import bare_llama_quantize  # noqa: E402

DEFAULT_MODEL = REPO / ".cache" / "tests" / "smollm2-135m-f16.gguf"
SYNTHETIC_MODEL = REPO / ".cache" / "bench" / "random-llama-0.6b-f16.gguf"
SYNTHETIC_SIZES = {"hidden_size": 1536, "intermediate_size": 6144, "num_hidden_layers": 16, "num_attention_heads": 16}


def synthetic_model() -> Path:
    if not SYNTHETIC_MODEL.is_file():
        from converters.writing.convert import convert_checkpoint
        from tests.builders.checkpoints import build_tiny_checkpoint

        SYNTHETIC_MODEL.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=SYNTHETIC_MODEL.parent) as scratch:
            checkpoint = build_tiny_checkpoint(Path(scratch) / "hf", "llama", tied=False, sizes=SYNTHETIC_SIZES)
            convert_checkpoint(checkpoint, SYNTHETIC_MODEL, outtype="f16")
    return SYNTHETIC_MODEL
_silence = llama_cpp.llama_log_callback(lambda level, text, data: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?", default=DEFAULT_MODEL)
    parser.add_argument("--synthetic", action="store_true", help="a random 0.6B Llama instead of MODEL")
    parser.add_argument("--preset", default="Q4_K_M")
    parser.add_argument("--imatrix", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.synthetic:
        args.model = synthetic_model()
    llama_cpp.llama_log_set(_silence, None)
    preset = preset_named(args.preset)
    peer_matrix = read_imatrix(args.imatrix).quantizer_data() if args.imatrix else None

    ours: list[float] = []
    peer: list[float] = []
    with tempfile.TemporaryDirectory(dir=args.model.parent) as scratch:
        for _ in range(args.repeat):
            start = time.perf_counter()
            bare_llama_quantize(args.model, Path(scratch) / "peer.gguf", preset.ftype, peer_matrix)
            peer.append(time.perf_counter() - start)
            start = time.perf_counter()
            quantize(args.model, Path(scratch) / "ours.gguf", preset.name, args.imatrix or "none")
            ours.append(time.perf_counter() - start)
    size = args.model.stat().st_size / 1e6
    print(f"model: {args.model.name} ({size:.0f} MB), preset {preset.name}, "
          f"imatrix: {args.imatrix.name if args.imatrix else 'none'}, {args.repeat} runs each")
    print(f"bare llama_model_quantize: median {statistics.median(peer):.2f} s  (runs: "
          + ", ".join(f"{t:.2f}" for t in peer) + ")")
    print(f"qdesk quantize:            median {statistics.median(ours):.2f} s  (runs: "
          + ", ".join(f"{t:.2f}" for t in ours) + ")")
    print(f"ratio qdesk/peer: {statistics.median(ours) / statistics.median(peer):.3f}x (target <= 1.1x)")


if __name__ == "__main__":
    main()
