"""Quantized-source benchmark: converting a GPTQ checkpoint to GGUF, qdesk against llama.cpp's converter.

Writes (once, then reuses) a synthetic Llama checkpoint of at least --size-gb GiB of BF16 weights with 7B shapes,
packs every decoder matrix as GPTQ 4-bit (group size 128, the layout AutoGPTQ and transformers write), then
converts that GPTQ folder to an F16 GGUF with `qdesk convert` and with llama.cpp's own convert_hf_to_gguf.py (from
the pinned llama-cpp-python source distribution), and prints wall time, CPU time and peak RSS of each process tree,
the ratios ours/peer, and whether the two outputs hold the same matrices. Figures only: nothing passes or fails.

    .venv/bin/python bench/convert_quantized.py [--size-gb 1.5] [--keep] [--cache DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import psutil
from _support.measure import Measurement, MiB, run_measured
from _support.peer import PEER_VERSION, peer_command, peer_converter
from _support.synthetic import GIB, REPO_ROOT, synthetic_llama

GROUP_SIZE = 128
BITS = 4
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COMPARED = ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_down.weight", "output.weight")


def gptq_checkpoint(source: Path, cache: Path) -> Path:
    """The GPTQ 4-bit twin of `source` (shard by shard, so the builder's memory stays at one shard)."""
    import safetensors.torch
    import torch

    folder = cache / f"{source.name}-gptq{BITS}-g{GROUP_SIZE}"
    if (folder / "config.json").is_file():
        return folder
    staging = cache / f".{folder.name}.building"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    index = json.loads((source / "model.safetensors.index.json").read_text())
    weight_map: dict[str, str] = {}
    for shard in sorted(set(index["weight_map"].values())):
        print(f"  packing {shard}", flush=True)
        tensors = safetensors.torch.load_file(source / shard)
        packed: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and module.endswith(LINEAR):
                packed.update({f"{module}.{key}": torch.from_numpy(np.ascontiguousarray(value))
                               for key, value in _pack(tensor.float().numpy()).items()})
            else:
                packed[name] = tensor
        safetensors.torch.save_file(packed, staging / shard, metadata={"format": "pt"})
        weight_map.update({name: shard for name in packed})
        del tensors, packed
    (staging / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": BITS, "group_size": GROUP_SIZE,
                                     "desc_act": False, "sym": True, "checkpoint_format": "gptq"}
    config["dtype"] = config["torch_dtype"] = "float16"
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    own = ("config.json", "model.safetensors.index.json")
    for extra in source.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in own:
            shutil.copy(extra, staging / extra.name)
    staging.rename(folder)
    return folder


def _pack(weight: np.ndarray) -> dict[str, np.ndarray]:
    """Symmetric GPTQ 4-bit of one [out, in] matrix: qweight, qzeros, scales, g_idx."""
    rows, columns = weight.shape
    groups = weight.reshape(rows, columns // GROUP_SIZE, GROUP_SIZE)
    scale = (np.abs(groups).max(axis=2) * 2 / 15).astype(np.float16)
    scale[scale == 0] = np.float16(1e-4)
    codes = np.clip(np.round(groups / scale.astype(np.float32)[..., None]) + 8, 0, 15).astype(np.uint32)
    codes = codes.reshape(rows, columns).T  # [in, out]
    shifts = (np.arange(8, dtype=np.uint32) * 4)[None, :, None]
    qweight = (codes.reshape(columns // 8, 8, rows) << shifts).sum(axis=1, dtype=np.uint32)
    zero = np.full((columns // GROUP_SIZE, rows // 8, 8), 7, dtype=np.uint32)  # 8 − 1, the gptq layout
    qzeros = (zero << (np.arange(8, dtype=np.uint32) * 4)).sum(axis=2, dtype=np.uint32)
    return {"qweight": qweight.view(np.int32), "qzeros": qzeros.view(np.int32), "scales": scale.T.copy(),
            "g_idx": (np.arange(columns) // GROUP_SIZE).astype(np.int32)}


def measure(label: str, command: list[str], env: dict[str, str], output: Path, log: Path) -> Measurement:
    output.unlink(missing_ok=True)
    print(f"\n$ {' '.join(command)}", flush=True)
    result = run_measured(command, log=log, env=env, cwd=REPO_ROOT)
    print(f"  {label}: exit {result.returncode}, {result.wall_s:.1f} s, peak RSS {result.peak_rss / MiB:.0f} MiB",
          flush=True)
    if result.returncode != 0:
        print("  " + "\n  ".join(log.read_text(errors="replace").splitlines()[-15:]))
    return result


def same_matrices(ours: Path, peer: Path) -> str:
    import gguf

    mine = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(peer).tensors}
    lines = []
    for name in COMPARED:
        if name in mine and name in theirs:
            a = np.asarray(mine[name].data, dtype=np.float32)
            b = np.asarray(theirs[name].data, dtype=np.float32)
            lines.append(f"{name}: max |Δ| {np.abs(a - b).max():.3g} (largest |w| {np.abs(b).max():.3g})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.5, help="BF16 weights of the float model, GiB")
    parser.add_argument("--keep", action="store_true", help="keep both GGUFs")
    parser.add_argument("--cache", type=Path, default=REPO_ROOT / ".cache" / "formats" / "bench",
                        help="where the checkpoints, the peer converter and the outputs live")
    args = parser.parse_args(argv)
    cache: Path = args.cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    source = synthetic_llama(cache, args.size_gb)
    gptq = gptq_checkpoint(source, cache)
    peer_folder = peer_converter(cache)
    memory = psutil.virtual_memory()
    print(f"\nGPTQ conversion benchmark, {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; "
          f"{psutil.cpu_count()} cores, {memory.total / GIB:.1f} GiB RAM ({memory.available / GIB:.1f} available), "
          f"load average {os.getloadavg()[0]:.1f}")
    packed = sum(p.stat().st_size for p in gptq.glob("*.safetensors"))
    print(f"source: {gptq.name}, {packed / GIB:.2f} GiB of packed weights")
    ours_out, peer_out = cache / "ours-F16.gguf", cache / "peer-F16.gguf"
    ours = measure("qdesk convert", [sys.executable, "-m", "qdesk", "convert", str(gptq), "-o", str(ours_out),
                                     "--outtype", "f16"], {"PYTHONPATH": str(REPO_ROOT)}, ours_out, cache / "ours.log")
    command, env = peer_command(peer_folder, gptq, peer_out, "f16")
    peer = measure(f"llama.cpp convert_hf_to_gguf.py ({PEER_VERSION})", command, env, peer_out, cache / "peer.log")
    print("\n|                              | qdesk convert | llama.cpp | ours/peer |\n|---|---:|---:|---:|")
    for label, get in (("wall time (s)", lambda m: m.wall_s), ("CPU time (s)", lambda m: m.cpu_s),
                       ("peak RSS, process tree (MiB)", lambda m: m.peak_rss / MiB)):
        print(f"| {label} | {get(ours):.1f} | {get(peer):.1f} | {get(ours) / max(get(peer), 1e-9):.2f} |")
    if ours_out.is_file() and peer_out.is_file():
        print(f"\noutputs: ours {ours_out.stat().st_size / GIB:.2f} GiB, peer {peer_out.stat().st_size / GIB:.2f} GiB")
        print(same_matrices(ours_out, peer_out))
    if not args.keep:
        ours_out.unlink(missing_ok=True)
        peer_out.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
