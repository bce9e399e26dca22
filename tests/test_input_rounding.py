"""The rounding of a product's inputs by llama.cpp's CPU kernels: its error, and its collection during evaluation."""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import numpy as np

from native.activations import FINAL_NORM_INPUT, ModelEvaluator
from native.ggml import ggml
from native.input_rounding import INPUT_BLOCK_OF_TYPE, INPUT_BLOCKS, InputRounding, rounding_square_sums
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
