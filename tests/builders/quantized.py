"""Quantized checkpoints made from a tiny float checkpoint, one per format qdesk reads as a conversion source.

bitsandbytes and compressed-tensors checkpoints are made by their own libraries on CPU (transformers quantizes and
saves bitsandbytes; compressed-tensors compresses a model whose scales are set from each weight's range), so
their layout is the real one. GPTQ's and AWQ's libraries need a GPU or a newer torch than the project pins, so
their checkpoints are packed here from the formats' specification, written independently of the reader in
`converters/reading/quantized`; `float_twin` then writes the float checkpoint holding exactly the weights the
format stands for, which transformers runs as the reference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def copy_tokenizer(base: Path, folder: Path) -> None:
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy(base / name, folder / name)


def _float_state(base: Path) -> dict[str, Any]:
    import safetensors.torch

    return safetensors.torch.load_file(base / "model.safetensors")


def _linear_modules(state: dict[str, Any]) -> list[str]:
    return [name.removesuffix(".weight") for name in state
            if name.endswith(".weight") and name.removesuffix(".weight").endswith(LINEAR_SUFFIXES)]


def _pack_stream(values: np.ndarray, bits: int) -> np.ndarray:
    """[n, count] unsigned values → [n, count·bits/32] int32 words holding them as a little-endian bit stream."""
    n, count = values.shape
    bit_planes = (values[..., None].astype(np.uint32) >> np.arange(bits, dtype=np.uint32)) & 1
    stream = bit_planes.reshape(n, count * bits).astype(np.uint8)
    padding = (-stream.shape[1]) % 32
    stream = np.pad(stream, ((0, 0), (0, padding)))
    return np.packbits(stream, axis=1, bitorder="little").view("<u4").view(np.int32)


def _write(folder: Path, base: Path, state: dict[str, Any], quantization_config: dict[str, Any]) -> Path:
    import safetensors.torch

    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = quantization_config
    config["dtype"] = "float16"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors",
                                metadata={"format": "pt"})
    copy_tokenizer(base, folder)
    return folder


def float_twin(quantized: Path, folder: Path, weights: dict[str, np.ndarray]) -> Path:
    """A float checkpoint beside a packed one: the same config without quantization and the dequantized weights
    in place of the packed tensors, every other tensor as it was."""
    import safetensors.torch
    import torch

    state = safetensors.torch.load_file(quantized / "model.safetensors")
    packed_leaves = (".qweight", ".qzeros", ".scales", ".g_idx")
    state = {k: v for k, v in state.items() if not k.endswith(packed_leaves)}
    state.update({f"{module}.weight": torch.from_numpy(values) for module, values in weights.items()})
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((quantized / "config.json").read_text())
    config.pop("quantization_config")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    safetensors.torch.save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    copy_tokenizer(quantized, folder)
    return folder


def build_gptq(base: Path, folder: Path, *, bits: int = 4, group_size: int = 32, act_order: bool = False,
               symmetric: bool = True, checkpoint_format: str = "gptq", seed: int = 0) -> tuple[Path, dict]:
    """A GPTQ checkpoint of every decoder linear layer of `base`, and the float16 weights it stands for.

    Round-to-nearest with min/max scales (GPTQ's error correction changes which codes are chosen, not how they
    are stored). With `act_order` the input channels are grouped in a random order, as desc_act does. Zero points
    are at least 1: the original layout stores zero − 1, so a zero of 0 cannot be written there.
    """
    import torch

    rng = np.random.default_rng(seed)
    state = _float_state(base)
    top = (1 << bits) - 1
    weights: dict[str, np.ndarray] = {}
    for module in _linear_modules(state):
        weight = state.pop(f"{module}.weight").float().numpy()
        in_features = weight.shape[1]
        size = in_features if group_size <= 0 else group_size
        order = rng.permutation(in_features) if act_order else np.arange(in_features)
        g_idx = np.empty(in_features, dtype=np.int32)
        g_idx[order] = np.arange(in_features) // size
        groups = in_features // size
        low = np.minimum(np.stack([weight[:, g_idx == g].min(axis=1) for g in range(groups)]), 0)
        high = np.maximum(np.stack([weight[:, g_idx == g].max(axis=1) for g in range(groups)]), 0)
        if symmetric:
            scale = (np.maximum(-low, high) * 2 / top).astype(np.float16)
            zero = np.full(scale.shape, (top + 1) // 2, dtype=np.int64)
        else:
            scale = ((high - low) / top).astype(np.float16)
            zero = np.clip(np.round(-low / scale.astype(np.float32)), 1, top).astype(np.int64)
        scale = np.where(scale == 0, np.float16(1e-4), scale)
        per_input_scale = scale.astype(np.float32)[g_idx]  # [in, out]
        codes = np.clip(np.round(weight.T / per_input_scale) + zero[g_idx], 0, top).astype(np.int64)  # [in, out]
        stored_zero = (zero - 1) & top if checkpoint_format == "gptq" else zero
        state[f"{module}.qweight"] = torch.from_numpy(_pack_stream(codes.T, bits).T.copy())
        state[f"{module}.qzeros"] = torch.from_numpy(_pack_stream(stored_zero, bits))
        state[f"{module}.scales"] = torch.from_numpy(scale)
        state[f"{module}.g_idx"] = torch.from_numpy(g_idx)
        dequantized = (scale[g_idx].astype(np.float32) * (codes - zero[g_idx])).astype(np.float16)
        weights[module] = dequantized.T.copy()
    settings = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order,
                "sym": symmetric, "checkpoint_format": checkpoint_format, "damp_percent": 0.01}
    return _write(folder, base, state, settings), weights


def build_awq(base: Path, folder: Path, *, group_size: int = 32) -> tuple[Path, dict]:
    """An AWQ GEMM checkpoint (4-bit, zero points) of every decoder linear layer of `base`, and its float16
    weights."""
    import torch

    state = _float_state(base)
    weights: dict[str, np.ndarray] = {}
    for module in _linear_modules(state):
        weight_t = state.pop(f"{module}.weight").float().numpy().T  # [in, out]
        in_features, out_features = weight_t.shape
        grouped = weight_t.reshape(in_features // group_size, group_size, out_features)
        low, high = grouped.min(axis=1), grouped.max(axis=1)
        scale = np.maximum((high - low) / 15, 1e-5).astype(np.float16)
        zero = np.clip(np.round(-low / scale.astype(np.float32)), 0, 15).astype(np.int64)
        group = np.arange(in_features) // group_size
        codes = np.clip(np.round(weight_t / scale[group].astype(np.float32)) + zero[group], 0, 15).astype(np.int64)

        def pack(values: np.ndarray) -> np.ndarray:
            words = np.zeros((values.shape[0], values.shape[1] // 8), dtype=np.uint32)
            for nibble, column in enumerate(AWQ_ORDER):
                words |= values[:, column::8].astype(np.uint32) << np.uint32(4 * nibble)
            return words.view(np.int32)

        state[f"{module}.qweight"] = torch.from_numpy(pack(codes))
        state[f"{module}.qzeros"] = torch.from_numpy(pack(zero))
        state[f"{module}.scales"] = torch.from_numpy(scale)
        weights[module] = ((codes - zero[group]) * scale[group].astype(np.float32)).astype(np.float16).T.copy()
    settings = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    return _write(folder, base, state, settings), weights


def build_bitsandbytes(base: Path, folder: Path, kind: str) -> Path:
    """`kind` nf4 (double-quantized, bfloat16 output), fp4 (float16 output) or int8, quantized and saved by
    transformers and bitsandbytes."""
    import torch
    import transformers

    settings = {
        "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                "bnb_4bit_compute_dtype": torch.bfloat16},
        "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": torch.float16},
        "int8": {"load_in_8bit": True},
    }[kind]
    dtype = {"nf4": torch.bfloat16, "fp4": torch.float16, "int8": torch.float32}[kind]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        base, dtype=dtype, device_map="cpu", quantization_config=transformers.BitsAndBytesConfig(**settings))
    model.save_pretrained(folder)
    copy_tokenizer(base, folder)
    return folder


def build_block_fp8(base: Path, folder: Path, *, block: tuple[int, int] = (32, 32)) -> Path:
    """A block-scaled FP8 checkpoint (`quant_method: fp8`, as DeepSeek V3 and Qwen3 FP8 releases are stored) of
    every decoder linear layer of `base`, packed here from the format's description (transformers quantizes to it
    only on a GPU): E4M3 weights, one float32 scale per block (the block's largest magnitude over 448), a bfloat16
    model."""
    import torch

    state = _float_state(base)
    height, width = block
    for module in _linear_modules(state):
        weight = state.pop(f"{module}.weight").float()
        rows, columns = weight.shape
        blocks = weight.reshape(rows // height, height, columns // width, width)
        scale = blocks.abs().amax(dim=(1, 3)) / 448.0
        scaled = blocks / scale[:, None, :, None]
        state[f"{module}.weight"] = scaled.reshape(rows, columns).to(torch.float8_e4m3fn)
        state[f"{module}.weight_scale_inv"] = scale.to(torch.float32)
    for name in list(state):
        if state[name].dtype == torch.float32:
            state[name] = state[name].to(torch.bfloat16)
    folder = _write(folder, base, state, {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                          "weight_block_size": list(block)})
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


COMPRESSED_SCHEMES: dict[str, tuple[dict[str, Any], str]] = {
    "int4-group": ({"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
                   "pack-quantized"),
    "int4-asym": ({"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32},
                  "pack-quantized"),
    "int8-channel": ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}, "pack-quantized"),
    "fp8-tensor": ({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor"}, "float-quantized"),
    "fp8-channel": ({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}, "float-quantized"),
    "fp8-block": ({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block", "block_structure": [32, 64]},
                  "float-quantized"),
    "int8-naive": ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}, "int-quantized"),
}


def build_compressed_tensors(base: Path, folder: Path, scheme: str) -> Path:
    """Every decoder linear layer of `base` quantized with `scheme` (see COMPRESSED_SCHEMES) by compressed-tensors,
    scales and zero points from each weight's range, compressed and saved in the library's format (bfloat16
    model, so the scales are bfloat16 as in released checkpoints)."""
    import torch
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    weights, compression_format = COMPRESSED_SCHEMES[scheme]
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))},
        ignore=["lm_head"])
    apply_quantization_config(model, config)
    for module in model.modules():
        scheme_of_module = getattr(module, "quantization_scheme", None)
        if scheme_of_module is None:
            continue
        args, weight = scheme_of_module.weights, module.weight.data
        if args.strategy == "tensor":
            low, high = weight.min().reshape(1), weight.max().reshape(1)
        elif args.strategy == "channel":
            low, high = weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
        elif args.strategy == "block":
            height, width = args.block_structure
            blocks = weight.reshape(weight.shape[0] // height, height, weight.shape[1] // width, width)
            low, high = blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))
        else:
            grouped = weight.reshape(weight.shape[0], -1, args.group_size)
            low, high = grouped.amin(2), grouped.amax(2)
        scale, zero = calculate_qparams(low, high, args)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=compression_format)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(str(folder))
    copy_tokenizer(base, folder)
    return folder



__all__ = ["COMPRESSED_SCHEMES", "build_awq", "build_bitsandbytes", "build_block_fp8", "build_compressed_tensors",
           "build_gptq", "float_twin"]
