"""Error-feedback quantization: ggml's block formats with rounding errors compensated against input correlations."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from converters.calibration.calibrate import builtin_texts, calibration_chunks
from converters.quantization.plan import QuantPlan
from converters.quantization.quantize import quantize
from native.activations import ModelEvaluator
from native.block_layouts import LAYOUTS
from native.compute_device import DEVICE_VARIABLE, DeviceUnavailable
from native.error_feedback import (
    FEEDBACK_TYPES,
    PRODUCT_ROWS,
    PreparedInputs,
    accumulate_inputs,
    new_input_sum,
    prepare_inputs,
    quantize_with_feedback,
    shrinkage_for,
    supports_feedback,
)
from native.kernels import dequantize_rows, quantize_rows

LEGACY = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
K_QUANTS = ("q2_K", "q3_K", "q4_K", "q5_K", "q6_K")
BACKENDS = ("torch", "numpy")


def _correlated_inputs(n_in: int, seed: int = 0) -> np.ndarray:
    """Second moments of inputs whose columns are correlated and of very different scales, like activations."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((n_in, n_in)) * 0.15 + np.eye(n_in)
    inputs = rng.standard_normal((4 * n_in, n_in)) @ mixing * np.exp(rng.standard_normal(n_in))
    return inputs.T @ inputs


def _output_error(weights: np.ndarray, decoded: np.ndarray, inputs: np.ndarray) -> float:
    error = weights.astype(np.float64) - decoded
    return float(np.einsum("ij,jk,ik->", error, inputs, error, optimize=True))


@pytest.mark.parametrize("type_name", FEEDBACK_TYPES)
def test_feedback_cuts_the_product_error_on_correlated_inputs(type_name: str) -> None:
    rng = np.random.default_rng(1)
    weights = rng.standard_normal((64, 512)).astype(np.float32)
    inputs = _correlated_inputs(512)
    importance = (np.diag(inputs) / 2048).astype(np.float32)
    plain = dequantize_rows(quantize_rows(weights, type_name, importance), type_name, 64, 512)
    encoded = quantize_with_feedback(weights, type_name, inputs, importance)
    assert encoded.shape == (64, quantize_rows(weights[:1], type_name).shape[1])
    fed = dequantize_rows(encoded, type_name, 64, 512)
    assert _output_error(weights, fed, inputs) < 0.75 * _output_error(weights, plain, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("type_name", K_QUANTS)
def test_with_uncorrelated_inputs_k_quants_are_exactly_ggmls_encoding(type_name: str, backend: str) -> None:
    """With H = I nothing is fed forward, so each weight is rounded on ggml's grid as ggml rounds it: the same bytes,
    which checks the packing of every bit of the layout."""
    weights = np.random.default_rng(2).standard_normal((16, 512)).astype(np.float32)
    encoded = quantize_with_feedback(weights, type_name, np.eye(512), backend=backend)
    np.testing.assert_array_equal(encoded, quantize_rows(weights, type_name))


@pytest.mark.parametrize("type_name", K_QUANTS)
def test_with_uncorrelated_inputs_and_an_importance_vector_both_precisions_are_ggmls_encoding(type_name: str) -> None:
    """The working precision (the GPU's too) and float64: the same bytes as ggml when nothing is fed forward, with
    an importance vector too."""
    weights = np.random.default_rng(7).standard_normal((16, 512)).astype(np.float32)
    importance = np.exp(np.random.default_rng(8).standard_normal(512)).astype(np.float32)
    for dtype in (torch.float32, torch.float64):
        prepared = prepare_inputs(np.eye(512), device="cpu", dtype=dtype)
        encoded = quantize_with_feedback(weights, type_name, prepared, importance)
        np.testing.assert_array_equal(encoded, quantize_rows(weights, type_name, importance))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("type_name", LEGACY)
def test_with_uncorrelated_inputs_legacy_types_round_as_well_as_ggml(type_name: str, backend: str) -> None:
    weights = np.random.default_rng(3).standard_normal((16, 256)).astype(np.float32)
    ours = dequantize_rows(quantize_with_feedback(weights, type_name, np.eye(256), backend=backend), type_name, 16,
                           256)
    ggml = dequantize_rows(quantize_rows(weights, type_name), type_name, 16, 256)
    assert np.square(weights - ours).sum() <= 1.001 * np.square(weights - ggml).sum()


@pytest.fixture(scope="module")
def wide_inputs() -> np.ndarray:
    """The second moments of a 1536-wide input (the hidden size of a 1.5B model)."""
    return _correlated_inputs(1536, seed=5)


@pytest.fixture(scope="module")
def wide_prepared(wide_inputs: np.ndarray) -> dict[torch.dtype, PreparedInputs]:
    return {dtype: prepare_inputs(wide_inputs, device="cpu", dtype=dtype) for dtype in (torch.float64, torch.float32)}


@pytest.mark.parametrize("type_name", FEEDBACK_TYPES)
def test_torch_on_the_cpu_writes_the_references_bytes_and_float32_comes_within_tolerance(
        type_name: str, wide_inputs: np.ndarray, wide_prepared: dict[torch.dtype, PreparedInputs]) -> None:
    """Real-shaped rows (1536 wide: 6 super-blocks, several update batches), a realistic H and an importance vector.

    In float64 torch computes what the numpy reference computes, to the byte, though the reference feeds errors
    forward through H⁻¹'s factor and torch through H's own. In float32 (the working precision, on
    the CPU and on a GPU alike) the rounding of a weight near a level's midpoint can go the other way, and the row
    then continues on a slightly different path: the tolerance is ≥ 85 % of blocks identical (90–99 % measured) and
    tr(E H Eᵀ) within 0.5 % of the reference's (0.25 % at most measured), where feedback is 35–46 % below ggml's
    rounding."""
    rows, n_in = 48, wide_inputs.shape[0]
    weights = np.random.default_rng(6).standard_normal((rows, n_in)).astype(np.float32)
    importance = (np.diag(wide_inputs) / (4 * n_in)).astype(np.float32)
    reference = quantize_with_feedback(weights, type_name, wide_inputs, importance, backend="numpy")
    exact = quantize_with_feedback(weights, type_name, wide_prepared[torch.float64], importance)
    np.testing.assert_array_equal(exact, reference)

    single = quantize_with_feedback(weights, type_name, wide_prepared[torch.float32], importance)
    block_bytes = LAYOUTS[type_name.lower()].block_bytes
    same_blocks = np.all(single.reshape(rows, -1, block_bytes) == reference.reshape(rows, -1, block_bytes), axis=2)
    assert same_blocks.mean() >= 0.85
    errors = {name: _output_error(weights, dequantize_rows(encoded, type_name, rows, n_in), wide_inputs)
              for name, encoded in (("reference", reference), ("float32", single),
                                    ("ggml", quantize_rows(weights, type_name, importance)))}
    assert abs(errors["float32"] / errors["reference"] - 1) < 0.005
    assert errors["reference"] < 0.8 * errors["ggml"]


def test_a_row_length_that_ends_inside_an_update_batch(wide_inputs: np.ndarray) -> None:
    """576 = 2 × 256 + 64 (SmolLM2's rows): the last batch of updates is partial."""
    inputs = wide_inputs[:576, :576]
    weights = np.random.default_rng(9).standard_normal((32, 576)).astype(np.float32)
    prepared = prepare_inputs(inputs, device="cpu", dtype=torch.float64)
    for type_name in ("q4_0", "q5_1"):
        reference = quantize_with_feedback(weights, type_name, inputs, backend="numpy")
        np.testing.assert_array_equal(quantize_with_feedback(weights, type_name, prepared), reference)


def test_the_device_is_chosen_by_argument_or_by_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = _correlated_inputs(256, seed=10)
    weights = np.random.default_rng(11).standard_normal((8, 256)).astype(np.float32)
    monkeypatch.setenv(DEVICE_VARIABLE, "cpu")
    prepared = prepare_inputs(inputs)
    assert prepared.device.type == "cpu" and prepared.feed.dtype == torch.float32 and prepared.n_in == 256
    by_variable = quantize_with_feedback(weights, "q4_K", inputs)
    np.testing.assert_array_equal(by_variable, quantize_with_feedback(weights, "q4_K", prepared))
    monkeypatch.setenv(DEVICE_VARIABLE, "no-such-device")
    np.testing.assert_array_equal(by_variable, quantize_with_feedback(weights, "q4_K", inputs, device="cpu"))
    np.testing.assert_array_equal(by_variable, quantize_with_feedback(weights, "q4_K", prepared))
    if not torch.cuda.is_available():
        monkeypatch.setenv(DEVICE_VARIABLE, "cuda")
        with pytest.raises(DeviceUnavailable, match="torch sees no CUDA GPU"):
            quantize_with_feedback(weights, "q4_K", inputs)


def test_the_feed_matrix_factors_the_damped_inputs() -> None:
    """feed = Rᵀ with unit diagonal for H = R Rᵀ (R upper triangular): G = feedᵀ makes G⁻¹ H G⁻ᵀ diagonal."""
    inputs = _correlated_inputs(300, seed=12)
    inputs[7, :] = inputs[:, 7] = 0
    prepared = prepare_inputs(inputs, damping=0.05, device="cpu", dtype=torch.float64)
    feed = prepared.feed.numpy()
    assert np.array_equal(feed, np.tril(feed)) and np.allclose(np.diag(feed), 1)
    damped = inputs.copy()
    damped[7, 7] = 1
    live = np.arange(300) != 7
    damped[np.diag_indices(300)] += 0.05 * np.diag(damped)[live].mean()
    unit = np.linalg.inv(feed)
    whitened = unit.T @ damped @ unit
    off_diagonal = whitened - np.diag(np.diag(whitened))
    assert np.abs(off_diagonal).max() < 1e-9 * np.abs(whitened).max()
    assert prepared.dead.tolist() == [index == 7 for index in range(300)]
    assert prepared.block_inverses.shape == (2, 256, 256)
    np.testing.assert_allclose(prepared.block_inverses[0].numpy(), unit[:256, :256], atol=1e-9)
    np.testing.assert_allclose(prepared.block_inverses[1, :44, :44].numpy(), unit[256:, 256:], atol=1e-9)


def test_shrinkage_takes_the_inputs_toward_their_diagonal_by_how_few_tokens_estimate_them() -> None:
    inputs = _correlated_inputs(300, seed=13)
    shrunk = prepare_inputs(inputs, damping=0.05, shrinkage=0.4, device="cpu", dtype=torch.float64)
    by_hand = 0.6 * inputs + 0.4 * np.diag(np.diag(inputs))
    expected = prepare_inputs(by_hand, damping=0.05, device="cpu", dtype=torch.float64)
    np.testing.assert_allclose(shrunk.feed.numpy(), expected.feed.numpy(), atol=1e-12)
    independent = prepare_inputs(inputs, shrinkage=1.0, device="cpu", dtype=torch.float64)
    assert np.array_equal(independent.feed.numpy(), np.eye(300))  # nothing left to feed errors through
    assert shrinkage_for(1536, 12288) == pytest.approx(0.75 * math.sqrt(1536 / 12288))
    assert shrinkage_for(1536, 12288) < shrinkage_for(8960, 12288) < shrinkage_for(8960, 4096) == 1.0
    assert shrinkage_for(512, 0) == 1.0
    with pytest.raises(ValueError, match="shrinkage must lie in"):
        prepare_inputs(inputs, shrinkage=1.5)


def test_what_feedback_cannot_write_is_refused() -> None:
    assert supports_feedback("q4_0", 576) and not supports_feedback("q4_K", 576)
    assert supports_feedback("q2_K", 512) and supports_feedback("q3_k", 1536) and not supports_feedback("q3_K", 576)
    assert not supports_feedback("f16", 512) and not supports_feedback("iq4_xs", 512)
    with pytest.raises(ValueError, match="does not fit rows of 576"):
        quantize_with_feedback(np.zeros((2, 576), np.float32), "q6_K", np.eye(576))
    with pytest.raises(ValueError, match="rows have 64 weights"):
        quantize_with_feedback(np.zeros((2, 64), np.float32), "q8_0", prepare_inputs(np.eye(32)))
    with pytest.raises(ValueError, match="rows have 64 weights"):
        quantize_with_feedback(np.zeros((2, 64), np.float32), "q8_0", np.eye(32), backend="numpy")
    with pytest.raises(ValueError, match="pass H"):
        quantize_with_feedback(np.zeros((2, 64), np.float32), "q8_0", prepare_inputs(np.eye(64)), backend="numpy")
    with pytest.raises(ValueError, match="unknown backend"):
        quantize_with_feedback(np.zeros((2, 64), np.float32), "q8_0", np.eye(64), backend="fortran")  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_that_never_carried_a_signal_are_stored_as_zero(backend: str) -> None:
    inputs = _correlated_inputs(64)
    inputs[:, 5] = inputs[5, :] = 0
    weights = np.random.default_rng(4).standard_normal((8, 64)).astype(np.float32)
    fed = dequantize_rows(quantize_with_feedback(weights, "q8_0", inputs, backend=backend), "q8_0", 8, 64)
    assert np.all(fed[:, 5] == 0) and np.isfinite(fed).all()


def test_read_only_rows_such_as_a_memory_map_are_read_in_place(tmp_path: Path) -> None:
    weights = np.random.default_rng(15).standard_normal((8, 256)).astype(np.float32)
    weights.tofile(tmp_path / "rows.bin")
    mapped = np.memmap(tmp_path / "rows.bin", dtype=np.float32, mode="r", shape=(8, 256))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        encoded = quantize_with_feedback(mapped, "q4_K", _correlated_inputs(256, seed=16))
    np.testing.assert_array_equal(encoded, quantize_with_feedback(weights, "q4_K", _correlated_inputs(256, seed=16)))


def test_a_stop_request_is_seen_before_the_next_block() -> None:
    weights = np.random.default_rng(13).standard_normal((16, 1024)).astype(np.float32)
    polls: list[int] = []

    def stop_on_the_third_poll() -> bool:
        polls.append(1)
        return len(polls) >= 3

    with pytest.raises(InterruptedError, match="stopped"):
        quantize_with_feedback(weights, "q4_K", np.eye(1024), should_stop=stop_on_the_third_poll)
    assert len(polls) == 3
    with pytest.raises(InterruptedError, match="stopped"):
        quantize_with_feedback(weights, "q4_K", np.eye(1024), should_stop=lambda: True, backend="numpy")


def test_input_sums_accumulate_chunk_by_chunk_as_in_float64() -> None:
    rng = np.random.default_rng(14)
    chunks = [(rng.standard_normal((rows, 96)) * np.exp(rng.standard_normal(96))).astype(np.float32)
              for rows in (5, PRODUCT_ROWS + 300, 700)]
    exact = sum(chunk.astype(np.float64).T @ chunk.astype(np.float64) for chunk in chunks)
    on_device = new_input_sum(96, device="cpu")
    in_numpy = np.zeros((96, 96))
    for chunk in chunks:
        accumulate_inputs(on_device, chunk)
        accumulate_inputs(in_numpy, torch.from_numpy(chunk))
    assert on_device.dtype == torch.float64
    scale = np.sqrt(np.outer(np.diag(exact), np.diag(exact)))
    assert np.abs(on_device.numpy() - exact).max() / scale.max() < 1e-6
    np.testing.assert_allclose(in_numpy, on_device.numpy(), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="square float64"):
        accumulate_inputs(np.zeros((96, 96), np.float32), chunks[0])
    with pytest.raises(ValueError, match="do not fit"):
        accumulate_inputs(in_numpy, chunks[0][:, :64])


@pytest.fixture(scope="module")
def starter_covariances(smollm2_f16: Path) -> dict[str, np.ndarray]:
    with ModelEvaluator(smollm2_f16, n_ctx=128, covariance_chunks=2) as evaluator:
        for chunk in calibration_chunks(evaluator, builtin_texts(), 128, 3):
            evaluator.evaluate_chunk(chunk)
        longer = evaluator.stats()
    assert longer.matrices["blk.0.attn_q.weight"].counts[0] == 3 * 128
    with ModelEvaluator(smollm2_f16, n_ctx=128, covariance_chunks=2) as evaluator:
        for chunk in calibration_chunks(evaluator, builtin_texts(), 128, 2):
            evaluator.evaluate_chunk(chunk)
        stats = evaluator.stats()
    for name in ("blk.0.attn_q.weight", "blk.29.ffn_down.weight", "token_embd.weight"):  # the first two chunks only
        np.testing.assert_allclose(longer.covariances[name], stats.covariances[name], rtol=1e-9, err_msg=name)
    for name, matrix in stats.matrices.items():
        np.testing.assert_allclose(np.diag(stats.covariances[name]), matrix.sums[0], rtol=1e-4, err_msg=name)
    return stats.covariances


def test_covariances_are_shared_by_matrices_that_read_the_same_input(
        starter_covariances: dict[str, np.ndarray]) -> None:
    q, k, v = (starter_covariances[f"blk.3.attn_{part}.weight"] for part in "qkv")
    assert q is k is v and q.shape == (576, 576)
    assert starter_covariances["blk.3.ffn_gate.weight"] is starter_covariances["blk.3.ffn_up.weight"]
    assert starter_covariances["blk.3.ffn_down.weight"].shape == (1536, 1536)
    assert starter_covariances["blk.3.attn_output.weight"] is not q
    embedding = starter_covariances["token_embd.weight"]  # SmolLM2 ties its output product to the embedding
    assert embedding.shape == (576, 576) and embedding is not q and np.all(np.diag(embedding) > 0)
    np.testing.assert_allclose(q, q.T, rtol=1e-6)


def test_feedback_cuts_the_product_error_of_a_starter_model_matrix(
        smollm2_f16: Path, starter_covariances: dict[str, np.ndarray]) -> None:
    reader = gguf.GGUFReader(smollm2_f16)
    (tensor,) = [t for t in reader.tensors if t.name == "blk.10.ffn_up.weight"]
    weights = np.asarray(tensor.data, dtype=np.float32).reshape(-1, 576)
    inputs = starter_covariances[tensor.name]
    for type_name in ("q4_0", "q5_1"):
        plain = dequantize_rows(quantize_rows(weights, type_name), type_name, *weights.shape)
        fed = dequantize_rows(quantize_with_feedback(weights, type_name, inputs), type_name, *weights.shape)
        assert _output_error(weights, fed, inputs) < 0.8 * _output_error(weights, plain, inputs), type_name


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    return {t.name: bytes(t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.slow
def test_a_preset_with_feedback_keeps_llamas_layout_and_measures_closer(smollm2_f16: Path, tmp_path: Path) -> None:
    from qdesk.evaluation.evaluate import evaluate

    plain = quantize(smollm2_f16, tmp_path / "plain.gguf", "Q4_0", imatrix="none")
    fed = quantize(smollm2_f16, tmp_path / "fed.gguf", "Q4_0", imatrix="none", encoder="feedback", chunks=4,
                   ctx=256, plan_out=tmp_path / "plan.json")
    assert fed.plan.types() == plain.plan.types() and fed.bytes == plain.bytes
    assert fed.plan.encoder == "feedback" and QuantPlan.load(tmp_path / "plan.json").encoder == "feedback"
    reader = gguf.GGUFReader(fed.path)
    assert reader.fields["qdesk.encoder"].contents() == "error-feedback/2"
    before, after = _tensor_bytes(plain.path), _tensor_bytes(fed.path)
    changed = {name for name in before if before[name] != after[name]}
    assert "blk.0.attn_q.weight" in changed and "token_embd.weight" in changed
    assert not any(name.endswith("norm.weight") for name in changed)

    result = evaluate(smollm2_f16, [plain.path, fed.path], chunks=3, ctx=128, memory_ctx=None)
    plain_kld, fed_kld = (candidate.divergence.mean for candidate in result.candidates)
    assert fed_kld < 0.9 * plain_kld


def qdesk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qdesk", *args], capture_output=True, text=True, timeout=600)


def test_cli_refuses_a_plan_with_an_unknown_encoder(smollm2_f16: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    qdesk_plan = quantize(smollm2_f16, tmp_path / "q8.gguf", "Q8_0", imatrix="none", plan_out=plan)
    assert qdesk_plan.plan.encoder == "ggml"
    document = json.loads(plan.read_text())
    document["encoder"] = "magic"
    plan.write_text(json.dumps(document))
    output = tmp_path / "never.gguf"
    result = qdesk("quantize", str(smollm2_f16), "-o", str(output), "--plan", str(plan))
    assert result.returncode == 1
    assert "encoder 'magic'" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not output.exists()


def test_cancel_while_re_encoding_leaves_nothing_behind(kquant_f16: Path, tmp_path: Path) -> None:
    from converters.core.errors import Cancelled
    from converters.core.jobs import CancelToken, Progress

    cancel = CancelToken()
    seen: list[int] = []

    def cancel_after_the_first_tensor(step: Progress) -> None:
        if step.message == "error feedback":
            seen.append(step.done)
            if step.done >= 1:
                cancel.cancel()

    output = tmp_path / "out.gguf"
    with pytest.raises(Cancelled):
        quantize(kquant_f16, output, "Q4_K_M", imatrix="none", encoder="feedback", chunks=2, ctx=128,
                 progress=cancel_after_the_first_tensor, cancel=cancel)
    assert seen[:2] == [0, 1]
    assert list(tmp_path.iterdir()) == []
