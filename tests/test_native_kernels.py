"""ggml's quantizers and decoders reached through `native.kernels`, checked against gguf-py's independent numpy
codecs, and the error measurements built on them (per matrix, sampled, and over whole GGUF files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from native.errors import Stopped
from native.kernels import (
    QuantError,
    bytes_per_row,
    dequantize_rows,
    fits,
    measure_gguf,
    quantizable_weight,
    quantization_error,
    quantize_rows,
)

LADDER = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0")
CANDIDATES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0", "q4_0")


def gaussian_rows(rows: int, n_per_row: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, n_per_row)).astype(np.float32)


def squared_error(weights: np.ndarray, decoded: np.ndarray, importance: np.ndarray | None = None) -> float:
    errors = np.square(decoded.astype(np.float64) - weights.astype(np.float64))
    return float((errors @ importance).sum() if importance is not None else errors.sum())


@pytest.mark.parametrize("type_name", ["q8_0", "q4_0", "q4_k", "q6_k", "q2_k"])
def test_ggml_decoder_agrees_with_gguf_py(type_name: str) -> None:
    weights = gaussian_rows(48, 256, seed=1)
    packed = quantize_rows(weights, type_name)
    assert packed.shape == (48, bytes_per_row(type_name, 256))
    ours = dequantize_rows(packed, type_name, 48, 256)
    theirs = gguf_dequantize(packed, GGMLQuantizationType[type_name.upper()])
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    # Bytes decode the same whatever container they come in.
    np.testing.assert_array_equal(dequantize_rows(packed.tobytes(), type_name, 48, 256), ours)


def test_q8_0_bytes_equal_gguf_py_encoder() -> None:
    weights = gaussian_rows(32, 256, seed=2)
    ours = quantize_rows(weights, "q8_0")
    theirs = gguf_quantize(weights, GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(ours, theirs)


def test_threaded_slices_give_the_same_bytes_as_one_call() -> None:
    weights = gaussian_rows(1500, 512, seed=3)  # several slices of rows
    one = quantize_rows(weights, "q4_k", threads=1)
    many = quantize_rows(weights, "q4_k", threads=4)
    np.testing.assert_array_equal(one, many)
    np.testing.assert_array_equal(dequantize_rows(one, "q4_k", 1500, 512, threads=1),
                                  dequantize_rows(one, "q4_k", 1500, 512, threads=3))


def test_error_falls_as_bits_rise() -> None:
    weights = gaussian_rows(256, 512, seed=4)
    errors = [quantization_error(weights, type_name) for type_name in LADDER]
    relative = [error.relative_error for error in errors]
    assert relative == sorted(relative, reverse=True)
    assert len(set(relative)) == len(relative)
    bits = [error.bits_per_weight for error in errors]
    assert bits == sorted(bits)
    assert errors[-1].bits_per_weight == 8.5


def test_measurement_matches_a_direct_computation() -> None:
    weights = gaussian_rows(300, 256, seed=5)
    importance = np.random.default_rng(5).uniform(0.1, 3.0, 256).astype(np.float32)
    error = quantization_error(weights, "q4_k", importance=importance)
    decoded = dequantize_rows(quantize_rows(weights, "q4_k", importance), "q4_k", 300, 256)
    assert error.rows == error.total_rows == 300
    assert not error.sampled
    assert error.weighted
    assert error.squared_error == pytest.approx(squared_error(weights, decoded), rel=1e-5)
    assert error.weighted_squared_error == pytest.approx(squared_error(weights, decoded, importance), rel=1e-5)
    assert error.reference_squares == pytest.approx(float(np.square(weights.astype(np.float64)).sum()), rel=1e-6)
    assert error.weighted_reference_squares == pytest.approx(
        float((np.square(weights.astype(np.float64)) @ importance.astype(np.float64)).sum()), rel=1e-6)
    assert error.bytes_per_row == 144
    unweighted = quantization_error(weights, "q4_k")
    assert not unweighted.weighted
    assert unweighted.weighted_squared_error == unweighted.squared_error
    assert unweighted.weighted_reference_squares == unweighted.reference_squares


@pytest.mark.parametrize("type_name", ["q3_k", "q4_k"])
def test_importance_lowers_the_error_where_it_points(type_name: str) -> None:
    weights = gaussian_rows(256, 256, seed=6)
    importance = np.full(256, 1e-3, dtype=np.float32)
    importance[::32] = 100.0  # one heavily used column in every block of 32
    guided = quantization_error(weights, type_name, importance=importance)
    decoded_blind = dequantize_rows(quantize_rows(weights, type_name), type_name, 256, 256)
    blind_weighted = squared_error(weights, decoded_blind, importance)
    assert guided.weighted_squared_error < 0.8 * blind_weighted
    # The price is paid on the columns nobody uses.
    assert guided.squared_error > squared_error(weights, decoded_blind)


def heavy_tailed_rows(rows: int, n_per_row: int, seed: int) -> np.ndarray:
    """Rows with log-normal scales and a few rows holding outliers, like trained weights (a hard case to sample)."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((rows, n_per_row)).astype(np.float32)
    weights *= rng.lognormal(0.0, 0.5, (rows, 1)).astype(np.float32)
    outlier_rows = rng.choice(rows, 6, replace=False)
    weights[outlier_rows, rng.integers(0, n_per_row, 6)] = 40.0
    return weights


@pytest.mark.parametrize("type_name", ["q4_0", "q4_k"])
def test_sampled_rows_estimate_the_whole_tensor(type_name: str) -> None:
    weights = heavy_tailed_rows(4096, 256, seed=7)
    importance = np.random.default_rng(7).uniform(0.1, 2.0, 256).astype(np.float32)
    full = quantization_error(weights, type_name, importance=importance)
    sampled = quantization_error(weights, type_name, importance=importance, sample_rows=256)
    assert sampled.rows == 256
    assert sampled.total_rows == full.total_rows == 4096
    assert sampled.sampled
    assert sampled.reference_squares == pytest.approx(full.reference_squares, rel=1e-9)
    assert sampled.squared_error == pytest.approx(full.squared_error, rel=0.10)
    assert sampled.weighted_squared_error == pytest.approx(full.weighted_squared_error, rel=0.10)
    assert sampled.relative_error == pytest.approx(full.relative_error, rel=0.10)


def test_types_that_do_not_fit_or_do_not_exist_are_refused() -> None:
    rows = gaussian_rows(4, 576)
    assert fits("q8_0", 576)
    assert fits("Q4_0", 576)
    assert not fits("q4_k", 576)
    assert fits("q4_k", 1536)
    for call in (lambda: quantize_rows(rows, "q4_k"), lambda: quantization_error(rows, "q4_k"),
                 lambda: dequantize_rows(bytes(4 * 324), "q4_k", 4, 576), lambda: bytes_per_row("q6_k", 576)):
        with pytest.raises(ValueError, match="do not divide rows of 576"):
            call()
    with pytest.raises(ValueError, match="unknown ggml type"):
        fits("q4_z", 256)
    with pytest.raises(ValueError, match="cannot encode"):
        quantize_rows(gaussian_rows(2, 256), "q8_k")
    with pytest.raises(ValueError, match="importance"):
        quantize_rows(gaussian_rows(2, 256), "iq2_xxs")
    with pytest.raises(ValueError, match="importance vector has 8 values"):
        quantization_error(gaussian_rows(2, 256), "q4_k", importance=np.ones(8, dtype=np.float32))
    with pytest.raises(ValueError, match="take 288 bytes"):
        dequantize_rows(bytes(100), "q4_k", 2, 256)


def weight_names(path: Path) -> list[str]:
    return [tensor.name for tensor in GGUFReader(path).tensors
            if len(tensor.shape) == 2 and tensor.name.endswith(".weight")]


def test_whole_gguf_table_covers_every_weight_at_every_type(kquant_f16: Path) -> None:
    updates: list[tuple[int, int]] = []
    table = measure_gguf(kquant_f16, CANDIDATES, progress=lambda done, total: updates.append((done, total)))
    names = weight_names(kquant_f16)
    assert sorted(tensor.name for tensor in table.tensors) == sorted(names)
    assert len(table.errors) == len(names) * len(CANDIDATES)
    assert table.skipped() == ()
    for tensor in table.tensors:
        assert tensor.source_type == "f16"
        assert table.fitting_types(tensor.name) == CANDIDATES
        errors = [table.error(tensor.name, type_name) for type_name in LADDER]
        assert all(isinstance(error, QuantError) for error in errors)
        assert errors[0].relative_error > errors[-1].relative_error > 0
        assert errors[0].total_rows == tensor.total_rows
    assert updates[0] == (0, len(table.errors))
    assert updates[-1] == (len(table.errors), len(table.errors))
    assert [done for done, _ in updates] == list(range(len(table.errors) + 1))
    document = json.loads(json.dumps(table.to_json()))
    assert len(document["tensors"]) == len(names)
    assert set(document["tensors"][0]["errors"]) == set(CANDIDATES)


def test_stop_request_stops_the_measurement(kquant_f16: Path) -> None:
    calls = 0

    def stop_after_a_few() -> bool:
        nonlocal calls
        calls += 1
        return calls > 3

    with pytest.raises(Stopped):
        measure_gguf(kquant_f16, CANDIDATES, should_stop=stop_after_a_few)


def bf16_bits(values: np.ndarray) -> np.ndarray:
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType | None]]) -> Path:
    writer = GGUFWriter(path, "llama")
    for name, (data, raw_type) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_whole_gguf_table_skips_types_that_do_not_fit(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "wide.gguf", {
        "blk.0.attn_q.weight": (gaussian_rows(64, 576).astype(np.float16), None),
        "blk.0.ffn_down.weight": (gaussian_rows(64, 1536).astype(np.float16), None),
    })
    table = measure_gguf(path, ("q4_k", "q8_0"))
    assert table.fitting_types("blk.0.attn_q.weight") == ("q8_0",)
    assert table.fitting_types("blk.0.ffn_down.weight") == ("q4_k", "q8_0")
    assert table.skipped() == (("blk.0.attn_q.weight", "q4_k"),)
    assert table.error("blk.0.attn_q.weight", "q4_k") is None


def test_quantized_source_is_decoded_by_ggml(tmp_path: Path) -> None:
    weights = gaussian_rows(64, 256, seed=9)
    stored = quantize_rows(weights, "q4_1")
    path = write_gguf(tmp_path / "q4_1.gguf", {"blk.0.attn_q.weight": (stored, GGMLQuantizationType.Q4_1)})
    table = measure_gguf(path, ("q8_0", "q4_0"))
    tensor = table.tensors[0]
    assert (tensor.source_type, tensor.rows, tensor.n_per_row) == ("q4_1", 64, 256)
    decoded = dequantize_rows(stored, "q4_1", 64, 256)
    assert_same(table.error(tensor.name, "q8_0"), quantization_error(decoded, "q8_0"))
    assert 0 < table.error(tensor.name, "q8_0").relative_error < table.error(tensor.name, "q4_0").relative_error


def test_float_sources_experts_and_importance_measure_like_in_memory_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    dense = rng.standard_normal((96, 256)).astype(np.float32)
    brain = bf16_bits(rng.standard_normal((64, 512)))
    experts = rng.standard_normal((3, 40, 256)).astype(np.float16)
    path = write_gguf(tmp_path / "mixed.gguf", {
        "blk.0.attn_q.weight": (dense, None),
        "blk.0.ffn_up.weight": (brain.view(np.uint8), GGMLQuantizationType.BF16),
        "blk.0.ffn_down_exps.weight": (experts, None),
        "blk.0.attn_norm.weight": (np.ones(256, dtype=np.float32), None),
        "blk.0.ffn_gate_inp.weight": (np.ones((3, 256), dtype=np.float32), None),
    })

    dense_importance = rng.uniform(0.5, 2.0, 256).astype(np.float32)
    expert_importance = rng.uniform(0.5, 2.0, (3, 256)).astype(np.float32)
    table = measure_gguf(path, ("q4_k", "q8_0"), sample_rows=None,
                         importance={"blk.0.attn_q.weight": dense_importance,
                                     "blk.0.ffn_down_exps.weight": expert_importance.reshape(-1)})
    assert quantizable_weight("blk.0.attn_q.weight", 2)
    assert [tensor.name for tensor in table.tensors] == [
        "blk.0.attn_q.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down_exps.weight"]
    by_name = {tensor.name: tensor for tensor in table.tensors}
    assert by_name["blk.0.ffn_up.weight"].source_type == "bf16"
    assert (by_name["blk.0.ffn_down_exps.weight"].experts, by_name["blk.0.ffn_down_exps.weight"].rows) == (3, 40)

    brain_floats = (brain.astype(np.uint32) << 16).view(np.float32)
    for type_name in ("q4_k", "q8_0"):
        assert_same(table.error("blk.0.attn_q.weight", type_name),
                    quantization_error(dense, type_name, importance=dense_importance))
        assert_same(table.error("blk.0.ffn_up.weight", type_name), quantization_error(brain_floats, type_name))
        per_expert = [quantization_error(experts[index].astype(np.float32), type_name,
                                         importance=expert_importance[index]) for index in range(3)]
        assert_same(table.error("blk.0.ffn_down_exps.weight", type_name),
                    per_expert[0].combined(per_expert[1]).combined(per_expert[2]))


def assert_same(measured: QuantError | None, expected: QuantError) -> None:
    assert measured is not None
    assert (measured.rows, measured.total_rows, measured.weighted) == (expected.rows, expected.total_rows,
                                                                        expected.weighted)
    for field in ("squared_error", "weighted_squared_error", "reference_squares", "weighted_reference_squares"):
        assert getattr(measured, field) == pytest.approx(getattr(expected, field), rel=1e-6), field


def test_bad_requests_are_refused_before_any_work(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "one.gguf", {"blk.0.attn_q.weight": (gaussian_rows(8, 256), None)})
    with pytest.raises(ValueError, match="has 7 values; expected 256"):
        measure_gguf(path, ("q8_0",), importance={"blk.0.attn_q.weight": np.ones(7, dtype=np.float32)})
    with pytest.raises(ValueError, match=r"no tensor named blk\.9\.attn_q\.weight"):
        measure_gguf(path, ("q8_0",), tensors=["blk.9.attn_q.weight"])
    with pytest.raises(ValueError, match="iq2_xxs only with an importance matrix"):
        measure_gguf(path, ("q8_0", "iq2_xxs"))
    with pytest.raises(ValueError, match="must not repeat"):
        measure_gguf(path, ("q8_0", "Q8_0"))
    weighted = measure_gguf(path, ("iq2_xxs",), importance={"blk.0.attn_q.weight": np.ones(256, dtype=np.float32)})
    assert weighted.error("blk.0.attn_q.weight", "iq2_xxs").weighted
