"""The rounding of a product's inputs by llama.cpp's CPU kernels: its error, and its collection during evaluation."""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from native.activations import FINAL_NORM_INPUT, ModelEvaluator
from native.ggml import ggml
from native.input_rounding import INPUT_BLOCK_OF_TYPE, INPUT_BLOCKS, InputRounding, rounded_rows, rounding_square_sums
from native.kernels import dequantize_rows, quantize_rows


class _CpuTraits(ctypes.Structure):
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


def test_each_types_input_block_is_the_one_ggmls_cpu_kernel_rounds_to() -> None:
    cpu = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"))
    cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_CpuTraits)
    cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    lib = ggml()
    for name, block in INPUT_BLOCK_OF_TYPE.items():
        input_type = cpu.ggml_get_type_traits_cpu(lib.type_id(name)).contents.vec_dot_type
        assert lib.type_name(input_type).startswith("q8_"), name
        assert lib.traits(input_type).blck_size == block, name


def test_blocks_of_32_round_as_ggmls_q8_0_encoder() -> None:
    rows = np.random.default_rng(3).standard_t(3, size=(40, 512)).astype(np.float32)
    decoded = dequantize_rows(quantize_rows(rows, "q8_0"), "q8_0", 40, 512)
    assert np.array_equal(rounding_square_sums(rows, 32), np.square(rows - decoded, dtype=np.float64).sum(axis=0))


def test_one_large_input_coarsens_its_whole_block() -> None:
    rows = np.random.default_rng(4).standard_normal((16, 512)).astype(np.float32)
    rows[:, 5] = 200.0
    small, large = rounding_square_sums(rows, 32), rounding_square_sums(rows, 256)
    assert large[40:256].mean() > 20 * small[40:256].mean()  # same block of 256 as the outlier, not of 32
    assert large[300:].mean() < 4 * small[300:].mean()
    assert not rounding_square_sums(np.zeros((3, 256), np.float32), 256).any()
    assert not rounding_square_sums(rows[:, :96], 256).any()  # 256 does not divide 96: no such kernel


def test_the_observer_sees_every_matrix_input_and_the_output_products(kquant_f16: Path) -> None:
    observer = InputRounding()
    with ModelEvaluator(kquant_f16, n_ctx=64, input_observer=observer) as evaluator:
        evaluator.evaluate_chunk(list(range(1, 65)))
        evaluator.evaluate_chunk(list(range(65, 129)))
        output = evaluator.output_weight
    assert output == "output.weight"
    stats = observer.stats({FINAL_NORM_INPUT: output})
    assert output in stats and "blk.0.attn_q.weight" in stats and "blk.7.ffn_down.weight" in stats
    for name, found in stats.items():
        assert found.rows == 128, name
        assert found.mean_squares.shape[0] == len(INPUT_BLOCKS)
        assert (found.of_block(256) >= 0).all() and found.of_block(256).sum() > found.of_block(32).sum() > 0


def _logits(evaluator: ModelEvaluator, tokens: list[int]) -> np.ndarray:
    rows: list[np.ndarray] = []
    evaluator.evaluate_logits(tokens, 0, lambda _position, logits: rows.append(logits.copy()))
    return np.concatenate(rows)


@pytest.mark.parametrize(("name", "type_"), [("blk.1.ffn_down.weight", "q8_0"), ("blk.2.attn_output.weight", "q6_K"),
                                             ("output.weight", "q4_K")])
def test_rounding_a_products_inputs_in_an_f16_evaluator_reproduces_llamas_quantized_kernel(
    kquant_f16: Path, tmp_path: Path, name: str, type_: str
) -> None:
    """One matrix quantized, the rest F16: its decoded weights in the F16 model miss most of what the quantized
    model computes, and adding W δ (δ: its inputs' 8-bit rounding) to its products recovers most of it. (One matrix
    at a time: with two, the second's rounding flips with the first's tiny differences, as any upstream change
    would.)"""
    from dataclasses import replace

    from converters.quantization.plan import QuantPlan
    from converters.quantization.quantize import preset_plan, quantize

    base = preset_plan(kquant_f16, "Q8_0")
    plan = QuantPlan(tuple(replace(t, type=type_ if t.name == name else t.source_type) for t in base.tensors),
                     "Q8_0", f"{name} as {type_}, the rest F16")
    quantized = tmp_path / "one.gguf"
    quantize(kquant_f16, quantized, plan, None, encoder="ggml")
    tokens = list(range(3, 131))
    with ModelEvaluator(quantized, n_ctx=128, collect=False) as evaluator:
        expected = _logits(evaluator, tokens)

    with ModelEvaluator(kquant_f16, n_ctx=128, collect=False, editable_weights=True) as evaluator:
        _logits(evaluator, tokens)  # the first decode shows where the weights live
        n_in = next(t.shape[0] for t in base.tensors if t.name == name)
        values = evaluator.read_weight(name).view(np.float16).astype(np.float32).reshape(-1, n_in)
        decoded = dequantize_rows(quantize_rows(values, type_), type_, values.shape[0], n_in)
        evaluator.write_weight(name, decoded.astype(np.float16))
        weights_only = _logits(evaluator, tokens)

        def round_inputs(product: str, rows: np.ndarray, output: np.ndarray) -> None:
            assert product == name
            output += (rounded_rows(rows, INPUT_BLOCK_OF_TYPE[type_]) - rows) @ decoded.T

        with evaluator.adjusting_products([name], round_inputs):
            emulated = _logits(evaluator, tokens)
        again = _logits(evaluator, tokens)

    assert np.array_equal(again, weights_only)  # the adjustment ends with its block
    missed = np.abs(weights_only - expected).mean()
    assert missed > 1e-3
    assert np.abs(emulated - expected).mean() < 0.25 * missed


def test_an_adjustment_that_fails_fails_the_decode_and_leaves_the_evaluator_usable(kquant_f16: Path) -> None:
    def broken(_name: str, _rows: np.ndarray, _output: np.ndarray) -> None:
        raise ZeroDivisionError("adjustment failed")

    tokens = list(range(3, 67))
    with ModelEvaluator(kquant_f16, n_ctx=64, collect=False, editable_weights=True) as evaluator:
        before = _logits(evaluator, tokens)
        with evaluator.adjusting_products(["blk.3.ffn_up.weight"], broken), pytest.raises(ZeroDivisionError):
            _logits(evaluator, tokens)
        assert np.array_equal(_logits(evaluator, tokens), before)
