"""Converted GGUFs on a GPU build of llama.cpp: every tiny architecture, all layers offloaded, against
transformers on the CPU. Prints the agreement; run it where a CUDA (or Metal, Vulkan) build is installed.

    python bench/gpu_offload.py [--layers -1]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

if "--compare" in sys.argv:
    # Seen on a CUDA build: numpy (or torch, or sentencepiece) loaded before llama_cpp crashes model loading.
    import llama_cpp  # noqa: F401

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPT_LENGTH = 64
KV_TYPES = {"f32": 0, "f16": 1}
OUTTYPES = ("f32", "f16")


def transformers_logits(folder: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def llama_cpp_logits(path: Path, ids: list[int], gpu_layers: int, kv_type: str) -> np.ndarray:
    import llama_cpp

    model = llama_cpp.Llama(
        str(path), n_ctx=128, n_batch=128, logits_all=True, n_gpu_layers=gpu_layers,
        type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type], verbose=False,
    )
    try:
        model.eval(ids)
        return np.array(model.scores[: len(ids)], dtype=np.float32)
    finally:
        model.close()


def prepare(scratch: Path, ids: list[int]) -> list[str]:
    """Build, convert and compute the transformers references (this process imports torch)."""
    sys.path.insert(0, str(REPO_ROOT))
    from converters.writing.convert import convert_checkpoint
    from tests.builders.checkpoints import TINY_FAMILIES, build_tiny_checkpoint

    for family in TINY_FAMILIES:
        folder = build_tiny_checkpoint(scratch / family, family)
        np.save(scratch / f"{family}.reference.npy", transformers_logits(folder, ids))
        for outtype in OUTTYPES:
            convert_checkpoint(folder, scratch / f"{family}-{outtype}.gguf", outtype=outtype)
    return list(TINY_FAMILIES)


def compare(scratch: Path, families: list[str], ids: list[int], gpu_layers: int, kv_type: str) -> None:
    """Run every GGUF on the accelerator in a process that imports only numpy and llama_cpp.

    Seen on a CUDA build: torch's CUDA libraries, or sentencepiece (which gguf's vocab module imports),
    loaded before llama_cpp in the same process make loading a model crash.
    """
    import llama_cpp

    print(f"llama-cpp-python {llama_cpp.__version__}, GPU offload supported: {llama_cpp.llama_supports_gpu_offload()}")
    print(f"KV cache {kv_type}, layers offloaded: {gpu_layers}")
    print(f"{'family':<13} {'type':<5} {'max|Δ|/scale':>13} {'argmax agree':>13}")
    for family in families:
        reference = np.load(scratch / f"{family}.reference.npy")
        for outtype in OUTTYPES:
            ours = llama_cpp_logits(scratch / f"{family}-{outtype}.gguf", ids, gpu_layers, kv_type)
            relative = float(np.abs(ours - reference).max() / np.abs(reference).max())
            agree = float(np.mean(ours.argmax(-1) == reference.argmax(-1)))
            print(f"{family:<13} {outtype:<5} {relative:>13.2e} {agree:>13.3f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=-1, help="layers to offload (-1: all)")
    parser.add_argument("--kv", choices=tuple(KV_TYPES), default="f32", help="KV cache type (default f32)")
    parser.add_argument("--compare", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--families", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    ids = np.random.default_rng(7).integers(0, 256, PROMPT_LENGTH).tolist()
    if args.compare:
        compare(args.compare, args.families, ids, args.layers, args.kv)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        families = prepare(Path(scratch), ids)
        status = 0
        for kv_type in dict.fromkeys((args.kv, "f16")):
            command = [sys.executable, "-X", "faulthandler", __file__, "--compare", scratch,
                       "--layers", str(args.layers), "--kv", kv_type, "--families", *families]
            returncode = subprocess.run(command, check=False).returncode
            if returncode:
                print(f"the comparison with a {kv_type} KV cache exited with status {returncode}")
                status = status or returncode
        return status


if __name__ == "__main__":
    raise SystemExit(main())
