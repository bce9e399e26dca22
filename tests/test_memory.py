"""The memory estimate: against what llama.cpp really allocates, its GPU split rules, fit verdicts and `qdesk info`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from qdesk.memory import (
    DEFAULT_RAM_HEADROOM,
    DEFAULT_VRAM_HEADROOM,
    MiB,
    check_fit,
    estimate_memory,
    max_gpu_layers,
    measure_allocation,
    parse_allocation_log,
    read_model_shape,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 0.10
ESTIMATE_KEYS = {"n_ctx", "n_gpu_layers", "kv_type", "weights_bytes", "kv_bytes", "compute_bytes", "ram_bytes",
                 "vram_bytes", "total_bytes", "cpu", "gpu"}


def _qdesk(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qdesk", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120, check=False)


def _assert_close(estimate: object, actual: object, context: str) -> None:
    """Total within 10%; each part within 10% or 1 MiB (tiny parts are logged to 0.01 MiB)."""
    for part in ("weights_bytes", "kv_bytes", "compute_bytes", "total_bytes"):
        guess, real = getattr(estimate, part), getattr(actual, part)
        assert abs(guess - real) <= max(TOLERANCE * real, MiB), f"{context}: {part} {guess:,} vs {real:,}"


# --- against llama.cpp --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n_ctx", "kv_type"), [(512, "f16"), (2048, "q8_0"), (8192, "f16")])
def test_estimate_matches_llama_cpp_for_the_starter_model(starter_gguf: Path, n_ctx: int, kv_type: str) -> None:
    actual = measure_allocation(starter_gguf, n_ctx=n_ctx, kv_type=kv_type)
    estimate = estimate_memory(starter_gguf, n_ctx=n_ctx, kv_type=kv_type)
    _assert_close(estimate, actual, f"starter at {n_ctx} {kv_type}")
    assert actual.n_ctx == estimate.n_cells == n_ctx
    assert actual.vram_bytes == 0 and actual.buffers["model"]


@pytest.mark.slow
def test_estimate_matches_llama_cpp_for_other_variants(smollm2_f16: Path, tmp_path: Path) -> None:
    from converters.quantization.quantize import quantize

    q4_0 = tmp_path / "smollm2-Q4_0.gguf"
    quantize(smollm2_f16, q4_0, "Q4_0", imatrix="none")
    for path, n_ctx, kv_type in [(smollm2_f16, 1000, "f16"), (smollm2_f16, 4096, "q4_0"), (q4_0, 2048, "f16")]:
        actual = measure_allocation(path, n_ctx=n_ctx, kv_type=kv_type)
        estimate = estimate_memory(path, n_ctx=n_ctx, kv_type=kv_type)
        _assert_close(estimate, actual, f"{path.name} at {n_ctx} {kv_type}")
        assert actual.n_ctx == estimate.n_cells
    if "CPU_REPACK" in actual.buffers["model"]:  # CPUs with the SIMD for it repack Q4_0 weights
        assert actual.repack_duplicate_bytes > 0
    assert actual.weights_bytes == pytest.approx(read_model_shape(q4_0).tensor_bytes, rel=0.01)


# --- llama.cpp's log ----------------------------------------------------------------------------------------------

SAMPLE_LOG = """\
load_tensors: loading model tensors, this can take a while... (load_mode = mmap)
load_tensors:   CPU_Mapped model buffer size =    85.30 MiB
load_tensors:        CUDA0 model buffer size =  1024.00 MiB
load_tensors:   CPU_REPACK model buffer size =    56.95 MiB
.repack: repack tensor blk.0.attn_q.weight with q4_0_8x8
repack: repack tensor blk.0.attn_k.weight with q4_0_8x8
llama_context:  CUDA_Host  output buffer size =     0.19 MiB
llama_kv_cache:      CUDA0 KV buffer size =    64.00 MiB
llama_kv_cache:        CPU KV buffer size =    26.00 MiB
sched_reserve: reserving ...
sched_reserve:      CUDA0 compute buffer size =   500.00 MiB
sched_reserve: reserving ...
sched_reserve:      CUDA0 compute buffer size =    99.38 MiB
sched_reserve:  CUDA_Host compute buffer size =     9.00 MiB
~llama_context:      CUDA0 compute buffer size is  99.3770 MiB, matches expectation of  99.3770 MiB
"""


def test_parse_allocation_log() -> None:
    log = parse_allocation_log(SAMPLE_LOG)
    assert log.buffers["model"] == {"CPU_Mapped": round(85.30 * MiB), "CUDA0": 1024 * MiB,
                                    "CPU_REPACK": round(56.95 * MiB)}
    assert log.buffers["kv"] == {"CUDA0": 64 * MiB, "CPU": 26 * MiB}
    assert log.buffers["compute"] == {"CUDA0": round(99.38 * MiB), "CUDA_Host": 9 * MiB}  # the last reservation
    assert log.buffers["output"] == {"CUDA_Host": round(0.19 * MiB)}
    assert log.repacked_tensors == ("blk.0.attn_q.weight", "blk.0.attn_k.weight")


# --- the rules, from the header alone -----------------------------------------------------------------------------

def test_gpu_split_follows_llama_cpp_layer_placement(starter_gguf: Path) -> None:
    shape = read_model_shape(starter_gguf)
    assert (shape.n_layer, shape.offloadable_layers, shape.tied_output_bytes > 0) == (30, 31, True)
    block = shape.layer_bytes[-1]

    cpu_only = estimate_memory(starter_gguf, n_gpu_layers=0)
    assert cpu_only.vram_bytes == 0
    assert cpu_only.weights_cpu == shape.tensor_bytes

    output_only = estimate_memory(starter_gguf, n_gpu_layers=1)  # llama.cpp offloads the output layer first
    assert output_only.weights_gpu == shape.output_bytes + shape.tied_output_bytes  # a copy of the tied embedding
    assert output_only.weights_cpu == shape.tensor_bytes - shape.output_bytes
    assert output_only.kv_gpu == 0 and output_only.compute_gpu > 0

    two = estimate_memory(starter_gguf, n_gpu_layers=2)  # then the last repeating block
    assert two.weights_gpu - output_only.weights_gpu == block
    assert two.kv_gpu == cpu_only.kv_bytes // shape.n_layer

    everything = estimate_memory(starter_gguf, n_gpu_layers=31)
    assert everything.weights_cpu == shape.input_bytes  # the token embedding stays on the CPU
    assert everything.kv_cpu == 0 and everything.kv_gpu == cpu_only.kv_bytes
    assert estimate_memory(starter_gguf, n_gpu_layers=-1) == estimate_memory(starter_gguf, n_gpu_layers=99) \
        == everything
    assert everything.n_gpu_layers == 31


def test_kv_cache_sizes(starter_gguf: Path) -> None:
    shape = read_model_shape(starter_gguf)
    per_cell_f16 = shape.n_layer * 2 * shape.n_head_kv[0] * shape.head_dim_k * 2
    f16 = estimate_memory(starter_gguf, n_ctx=1000)
    assert f16.n_cells == 1024 and f16.kv_bytes == 1024 * per_cell_f16  # llama.cpp pads to 256 cells
    assert estimate_memory(starter_gguf, n_ctx=1000, kv_type="q8_0").kv_bytes == f16.kv_bytes * 34 // 64
    assert estimate_memory(starter_gguf, n_ctx=1000, kv_type="q4_0").kv_bytes == f16.kv_bytes * 18 // 64
    assert estimate_memory(starter_gguf, n_ctx=0).n_ctx == 8192  # 0: the trained context
    with pytest.raises(ValueError, match="flash attention"):
        estimate_memory(starter_gguf, kv_type="q8_0", flash_attention=False)
    with pytest.raises(ValueError, match="unknown KV cache type"):
        estimate_memory(starter_gguf, kv_type="q3")


def _write_varied_gguf(path: Path) -> Path:
    """Two layers with different KV head counts (an array), explicit key/value lengths, untied output."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(512)
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_array("llama.attention.head_count_kv", [2, 1])
    writer.add_key_length(32)
    writer.add_value_length(32)
    writer.add_token_list([f"t{i}" for i in range(100)])
    writer.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float16))
    writer.add_tensor("output.weight", np.zeros((100, 64), dtype=np.float16))
    for layer in range(2):
        writer.add_tensor(f"blk.{layer}.attn_q.weight", np.zeros((128, 64), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_per_layer_kv_heads(tmp_path: Path) -> None:
    path = _write_varied_gguf(tmp_path / "varied.gguf")
    shape = read_model_shape(path)
    assert shape.n_head_kv == (2, 1) and shape.n_vocab == 100 and shape.tied_output_bytes == 0
    cells = 256
    # Without flash attention V is stored transposed and every layer's V as wide as the widest.
    f16 = 2
    assert estimate_memory(path, n_ctx=cells).kv_bytes == cells * f16 * (64 + 64 + 32 + 64)
    assert estimate_memory(path, n_ctx=cells, flash_attention=True).kv_bytes == cells * f16 * (64 + 64 + 32 + 32)
    all_on_gpu = estimate_memory(path, n_ctx=cells, n_gpu_layers=3)
    assert all_on_gpu.weights_gpu == 100 * 64 * 2 + 2 * 128 * 64 * 2 and all_on_gpu.weights_cpu == 100 * 64 * 2


def test_max_gpu_layers_grows_with_vram(starter_gguf: Path) -> None:
    full = estimate_memory(starter_gguf, n_gpu_layers=-1).vram_bytes + DEFAULT_VRAM_HEADROOM
    counts = [max_gpu_layers(starter_gguf, vram_bytes=size) for size in range(0, full + 64 * MiB, 32 * MiB)]
    assert counts == sorted(counts)
    assert counts[0] == 0 and counts[-1] == 31
    assert max_gpu_layers(starter_gguf, vram_bytes=full) == 31
    assert max_gpu_layers(starter_gguf, vram_bytes=full - 1) < 31
    layers = max_gpu_layers(starter_gguf, vram_bytes=full - 40 * MiB)
    assert 0 < layers < 31
    assert estimate_memory(starter_gguf, n_gpu_layers=layers).vram_bytes + DEFAULT_VRAM_HEADROOM <= full - 40 * MiB
    assert max_gpu_layers(starter_gguf, vram_bytes=64 * 2**30, n_ctx=8192, kv_type="q4_0") == 31


def test_fit_verdicts(starter_gguf: Path) -> None:
    needed = estimate_memory(starter_gguf).ram_bytes
    roomy = check_fit(starter_gguf, ram_bytes=16 * 2**30, vram_bytes=0)
    assert roomy.fits and roomy.fits_in_ram_alone and roomy.gpu_layers == 0 and roomy.ram_needed == needed
    assert "fits" in roomy.summary and roomy.summary.count(".") >= 1 and "\n" not in roomy.summary

    cramped = check_fit(starter_gguf, ram_bytes=needed // 2, vram_bytes=0)
    assert not cramped.fits and not cramped.fits_in_ram_alone and "choose a smaller variant" in cramped.summary

    gpu = check_fit(starter_gguf, ram_bytes=needed // 2 + DEFAULT_RAM_HEADROOM, vram_bytes=8 * 2**30)
    assert gpu.gpu_layers == 31 and gpu.fits and not gpu.fits_in_ram_alone
    assert gpu.summary.startswith("All 31 layers fit on the GPU")
    assert set(gpu.to_json()) >= {"gpu_layers", "fits", "summary", "ram_needed", "vram_needed"}

    partial = check_fit(starter_gguf, ram_bytes=16 * 2**30, vram_bytes=DEFAULT_VRAM_HEADROOM + 200 * MiB)
    assert 0 < partial.gpu_layers < 31 and partial.summary.startswith(f"{partial.gpu_layers} of 31 layers fit")


def test_estimate_json_keys(starter_gguf: Path) -> None:
    document = estimate_memory(starter_gguf, n_gpu_layers=10).to_json()
    assert set(document) == ESTIMATE_KEYS
    assert set(document["cpu"]) == set(document["gpu"]) == {"weights", "kv", "compute"}
    assert document["total_bytes"] == document["ram_bytes"] + document["vram_bytes"]
    assert document["ram_bytes"] == sum(document["cpu"].values())


# --- qdesk info ---------------------------------------------------------------------------------------------------

def test_cli_json_has_memory(starter_gguf: Path) -> None:
    result = _qdesk("info", starter_gguf, "--json", "--ctx", "8192", "--kv-type", "q8_0", "--ram", "16GB",
                    "--vram", "2GiB")
    assert result.returncode == 0, result.stderr
    memory = json.loads(result.stdout)["memory"]
    assert set(memory) == ESTIMATE_KEYS | {"fit"}
    assert memory == {**estimate_memory(starter_gguf, n_ctx=8192, kv_type="q8_0").to_json(), "fit": memory["fit"]}
    assert memory["fit"]["gpu_layers"] == 31 and memory["fit"]["ram_available"] == 16 * 10**9


def test_cli_text_has_memory_section(starter_gguf: Path) -> None:
    result = _qdesk("info", starter_gguf, "--gpu-layers", "10", "--vram", "700MB")
    assert result.returncode == 0, result.stderr
    assert "memory at 4,096 tokens (f16 KV cache), 10 of 31 layers on the GPU:" in result.stdout
    for row in ("weights", "KV cache", "compute", "total"):
        assert f"\n  {row} " in result.stdout
    assert "layers fit on the GPU" in result.stdout.splitlines()[-1]


def test_cli_bad_size(starter_gguf: Path) -> None:
    result = _qdesk("info", starter_gguf, "--ram", "8XB")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == ["qdesk: --ram '8XB' is not a memory size; write it like 8GB, "
                                                  "1.5GiB or 512MB."]
