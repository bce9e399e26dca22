"""Quantized checkpoints as conversion sources: each format → GGUF (f32) → llama.cpp logits == transformers logits.

The reference is transformers computing with the weights the format stands for: bitsandbytes and
compressed-tensors checkpoints loaded by transformers through their own libraries and dequantized there; GPTQ and
AWQ (whose libraries do not run here) through the float twin the builder writes beside the packed checkpoint
(see tests/builders/quantized.py). Both sides then compute in float32, so the logits agree to rounding
(≤ 1e-3 of the logit scale, argmax identical); a wrong bit order, zero-point offset, group index or scale shows
as an error of order 1e-1.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import safetensors.torch

from converters.core.errors import CheckpointError, UnsupportedModelError
from converters.writing.convert import SOURCE_QUANTIZATION_KEY, convert_checkpoint
from tests.builders.checkpoints import build_tiny_checkpoint
from tests.builders.quantized import (
    COMPRESSED_SCHEMES,
    build_awq,
    build_bitsandbytes,
    build_block_fp8,
    build_compressed_tensors,
    build_gptq,
    float_twin,
)
from tests.test_convert_architectures import assert_logits_match, llama_cpp_logits, prompt, transformers_logits

SIZES = {"hidden_size": 128, "intermediate_size": 256}
"""Rows of 128 and 256: every group size and bitsandbytes' 64-value blocks divide them."""
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("base"), "llama", tied=False, sizes=SIZES)


def _converted(source: Path, tmp_path: Path) -> tuple[Path, str]:
    result = convert_checkpoint(source, tmp_path / "out.gguf", outtype="f32")
    reader = gguf.GGUFReader(result.path)
    recorded = reader.fields[SOURCE_QUANTIZATION_KEY].contents()
    assert recorded == result.source_quantization
    return result.path, recorded


GPTQ_CASES = {
    "4bit-g32": {"bits": 4, "group_size": 32},
    "3bit-g32-act-order-asym": {"bits": 3, "group_size": 32, "act_order": True, "symmetric": False},
    "2bit-g64-asym": {"bits": 2, "group_size": 64, "symmetric": False},
    "8bit-per-channel-v2": {"bits": 8, "group_size": -1, "checkpoint_format": "gptq_v2"},
}


@pytest.mark.parametrize("case", GPTQ_CASES, ids=list(GPTQ_CASES))
def test_gptq_logits_match_transformers(case: str, base: Path, tmp_path: Path) -> None:
    packed, weights = build_gptq(base, tmp_path / "gptq", **GPTQ_CASES[case])
    ids = prompt()
    reference = transformers_logits(float_twin(packed, tmp_path / "twin", weights), ids)
    path, recorded = _converted(packed, tmp_path)
    assert recorded.startswith(f"GPTQ {GPTQ_CASES[case]['bits']}-bit")
    assert_logits_match(llama_cpp_logits(path, ids), reference)


def test_awq_logits_match_transformers(base: Path, tmp_path: Path) -> None:
    packed, weights = build_awq(base, tmp_path / "awq", group_size=32)
    ids = prompt()
    reference = transformers_logits(float_twin(packed, tmp_path / "twin", weights), ids)
    path, recorded = _converted(packed, tmp_path)
    assert recorded == "AWQ 4-bit GEMM, group size 32"
    assert_logits_match(llama_cpp_logits(path, ids), reference)


def _dequantized_by_transformers(folder: Path, ids: list[int], **options: object) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", device_map="cpu", **options)
    model.dequantize()
    model = model.float()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_bitsandbytes_logits_match_transformers(kind: str, base: Path, tmp_path: Path) -> None:
    packed = build_bitsandbytes(base, tmp_path / kind, kind)
    ids = prompt()
    reference = _dequantized_by_transformers(packed, ids)
    path, recorded = _converted(packed, tmp_path)
    assert recorded.startswith("bitsandbytes")
    assert_logits_match(llama_cpp_logits(path, ids), reference)


@pytest.mark.parametrize("scheme", COMPRESSED_SCHEMES, ids=list(COMPRESSED_SCHEMES))
def test_compressed_tensors_logits_match_transformers(scheme: str, base: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    packed = build_compressed_tensors(base, tmp_path / scheme, scheme)
    ids = prompt()
    model = AutoModelForCausalLM.from_pretrained(packed, dtype=torch.float32, attn_implementation="eager",
                                                 quantization_config=CompressedTensorsConfig(run_compressed=False))
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()
    path, recorded = _converted(packed, tmp_path)
    assert recorded.startswith("compressed-tensors")
    assert_logits_match(llama_cpp_logits(path, ids), reference)


def test_block_fp8_logits_match_transformers(base: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    packed = build_block_fp8(base, tmp_path / "fp8")
    ids = prompt()
    model = AutoModelForCausalLM.from_pretrained(packed, attn_implementation="eager")  # no GPU: dequantized on load
    model = model.float()
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()
    path, recorded = _converted(packed, tmp_path)
    assert recorded == "FP8 E4M3, blocks of 32×32"
    assert_logits_match(llama_cpp_logits(path, ids), reference)


# --- bad input: one sentence, nothing written ------------------------------------------------------------------

def _edit_config(folder: Path, **changes: object) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"].update(changes)
    path.write_text(json.dumps(config))


def _edit_tensor(folder: Path, name: str, edit) -> None:
    path = folder / "model.safetensors"
    state = safetensors.torch.load_file(path)
    state[name] = edit(state[name]).contiguous()
    safetensors.torch.save_file(state, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def gptq_source(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gptq(base, tmp_path_factory.mktemp("gptq-source") / "gptq", bits=4, group_size=32,
                      act_order=True)[0]


def _copy(folder: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, tmp_path / folder.name))


def _refused(source: Path, tmp_path: Path, error: type[Exception], *words: str) -> None:
    output = tmp_path / "out" / "model.gguf"
    output.parent.mkdir()
    with pytest.raises(error) as raised:
        convert_checkpoint(source, output, outtype="f16")
    message = str(raised.value)
    assert all(word in message for word in words), message
    assert message.count(". ") == 0 and message.endswith("."), message
    assert list(output.parent.iterdir()) == []


def test_an_unknown_bit_width_is_one_sentence(gptq_source: Path, tmp_path: Path) -> None:
    source = _copy(gptq_source, tmp_path)
    _edit_config(source, bits=5)
    _refused(source, tmp_path, UnsupportedModelError, "5-bit", "GPTQ")


def test_a_truncated_packed_tensor_is_one_sentence(gptq_source: Path, tmp_path: Path) -> None:
    source = _copy(gptq_source, tmp_path)
    _edit_tensor(source, "model.layers.1.mlp.down_proj.qweight", lambda t: t[:-1])
    _refused(source, tmp_path, CheckpointError, "model.layers.1.mlp.down_proj.qweight", "damaged")


def test_group_indices_out_of_range_leave_nothing_behind(gptq_source: Path, tmp_path: Path) -> None:
    source = _copy(gptq_source, tmp_path)
    _edit_tensor(source, "model.layers.1.self_attn.o_proj.g_idx", lambda t: t + 100)
    _refused(source, tmp_path, CheckpointError, "g_idx", "groups outside")


def test_mismatched_scales_are_one_sentence(gptq_source: Path, tmp_path: Path) -> None:
    source = _copy(gptq_source, tmp_path)
    _edit_tensor(source, "model.layers.0.mlp.up_proj.scales", lambda t: t[:, :-8])
    _refused(source, tmp_path, CheckpointError, "model.layers.0.mlp.up_proj.scales", "shape")


@pytest.mark.parametrize("method", ["hqq", "exl2", "aqlm"])
def test_a_format_qdesk_cannot_read_is_named(method: str, gptq_source: Path, tmp_path: Path) -> None:
    source = _copy(gptq_source, tmp_path)
    _edit_config(source, quant_method=method)
    _refused(source, tmp_path, UnsupportedModelError, method, "GPTQ", "AWQ")


def test_awq_for_another_kernel_is_one_sentence(base: Path, tmp_path: Path) -> None:
    packed, _ = build_awq(base, tmp_path / "awq")
    _edit_config(packed, version="gemv")
    _refused(packed, tmp_path, UnsupportedModelError, "gemv", "GEMM")


def test_cli_names_the_source_format_and_info_shows_it(gptq_source: Path, tmp_path: Path) -> None:
    output = tmp_path / "gptq.gguf"
    env = {"PYTHONPATH": str(ROOT)}
    converted = subprocess.run([sys.executable, "-m", "qdesk", "convert", str(gptq_source), "-o", str(output)],
                               capture_output=True, text=True, env=env, cwd=ROOT)
    assert converted.returncode == 0, converted.stderr
    assert "dequantized from GPTQ 4-bit, group size 32, act-order" in converted.stdout
    info = subprocess.run([sys.executable, "-m", "qdesk", "info", str(output), "--json"], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    assert json.loads(info.stdout)["general"]["source.quantization"] == "GPTQ 4-bit, group size 32, act-order"
    text = subprocess.run([sys.executable, "-m", "qdesk", "info", str(output)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    assert re.search(r"dequantized from +GPTQ 4-bit, group size 32, act-order\n", text.stdout)


def test_cli_refusal_is_one_line_and_exit_1(gptq_source: Path, tmp_path: Path) -> None:
    source = _copy(gptq_source, tmp_path)
    _edit_config(source, bits=7)
    output = tmp_path / "x.gguf"
    run = subprocess.run([sys.executable, "-m", "qdesk", "convert", str(source), "-o", str(output)],
                         capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert run.returncode == 1
    assert len(run.stderr.strip().splitlines()) == 1 and "7-bit" in run.stderr
    assert not output.exists()


def test_the_quantize_view_sizes_a_quantized_checkpoint_by_its_float_tensors(gptq_source: Path) -> None:
    from qdesk.quantization.sizes import read_source

    source = read_source(gptq_source)
    names = {tensor.name: tensor for tensor in source.tensors}
    assert "model.layers.0.mlp.down_proj.weight" in names and not any("qweight" in name for name in names)
    assert names["model.layers.0.mlp.down_proj.weight"].shape == (256, 128)


@pytest.mark.parametrize("bits", range(1, 9))
def test_the_bit_stream_reader_unpacks_what_compressed_tensors_packs(bits: int) -> None:
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from converters.reading.quantized.bits import unpack_bits

    values = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (6, 70), dtype=torch.int8,
                           generator=torch.Generator().manual_seed(bits))
    offset = 1 << (bits - 1)
    along_rows = unpack_bits(pack_to_int32(values, bits).numpy(), bits, 70, axis=1).astype(int) - offset
    along_columns = unpack_bits(pack_to_int32(values.T.contiguous(), bits, packed_dim=0).numpy(), bits, 70,
                                axis=0).astype(int) - offset
    assert (along_rows == values.numpy()).all() and (along_columns == values.T.numpy()).all()
