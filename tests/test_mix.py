"""The sensitivity-based mix: allocation under a budget, and whole quantizations through the function and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np
import pytest

from converters.mix.allocate import MixBudget, MixError, allocate
from converters.mix.report import (
    BLOCK_CLASSES,
    plan_heatmap,
    recorded_prediction,
    render_grid,
    save_plan,
    summary_lines,
)
from converters.mix.sensitivity import (
    TensorSensitivity,
    TypeCost,
    _read_cached,
    cached_sensitivity,
    effort_named,
    tensor_group,
)
from converters.quantization.plan import QuantPlan
from converters.quantization.quantize import preset_plan, quantize

if TYPE_CHECKING:
    from native.activations import ModelEvaluator


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("QDESK_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _tensor(name: str, gain: float, options: dict[str, tuple[int, float]]) -> TensorSensitivity:
    costs = tuple(TypeCost(type_name, size, damage) for type_name, (size, damage) in options.items())
    return TensorSensitivity(name, (256, 4), "f16", name, gain, costs)


LADDER = {"q2_K": (100, 9.0), "q4_K": (200, 3.0), "q6_K": (300, 1.0), "q5_0": (290, 2.5), "f16": (800, 0.0)}


def _predicted(tensors: list[TensorSensitivity], types: dict[str, str]) -> float:
    return sum(tensor.predicted_kld(types[tensor.name]) for tensor in tensors)


def _bytes(tensors: list[TensorSensitivity], types: dict[str, str]) -> int:
    return sum(tensor.option(types[tensor.name]).bytes for tensor in tensors)


def test_allocation_spends_bytes_where_they_buy_the_most() -> None:
    tensors = [_tensor("sensitive", 10.0, LADDER), _tensor("robust", 0.1, LADDER)]
    types = allocate(tensors, 450)
    assert types == {"sensitive": "q6_K", "robust": "q2_K"}
    assert allocate(tensors, 500) == {"sensitive": "q6_K", "robust": "q4_K"}


def test_allocation_respects_every_budget_and_improves_with_it() -> None:
    tensors = [_tensor(f"t{i}", gain, LADDER) for i, gain in enumerate((0.2, 1.0, 3.0, 7.0, 0.05))]
    previous = float("inf")
    for budget in range(500, 4001, 250):
        types = allocate(tensors, budget)
        assert _bytes(tensors, types) <= budget
        predicted = _predicted(tensors, types)
        assert predicted <= previous + 1e-12
        previous = predicted
    assert all(t == "f16" for t in allocate(tensors, 4000).values())


def test_a_tied_embedding_is_charged_for_its_lookup_as_well_as_its_output() -> None:
    output_only = TensorSensitivity("token_embd.weight", (256, 4), "f16", "token_embd", 1.0,
                                    (TypeCost("q4_0", 100, 1.0, 8.0), TypeCost("q8_0", 200, 0.5, 0.5)))
    both_roles = replace(output_only, lookup_gain=1.0)
    assert both_roles.predicted_kld("q4_0") == pytest.approx(9.0)
    assert output_only.predicted_kld("q4_0") == pytest.approx(1.0)
    other = _tensor("blk.0.ffn_down.weight", 1.0, {"q4_0": (100, 4.0), "q8_0": (200, 1.0)})
    assert allocate([output_only, other], 300)["token_embd.weight"] == "q4_0"
    assert allocate([both_roles, other], 300)["token_embd.weight"] == "q8_0"


def test_allocation_below_the_smallest_types_says_so() -> None:
    with pytest.raises(MixError, match="smallest types need"):
        allocate([_tensor("a", 1.0, LADDER)], 50)


def test_tensors_are_grouped_by_class_and_band_of_layers() -> None:
    assert tensor_group("blk.0.ffn_down.weight", 30, 4) == "ffn_down@first"
    assert tensor_group("blk.29.ffn_down.weight", 30, 4) == "ffn_down@last"
    assert tensor_group("blk.1.attn_q.weight", 30, 4) == "attn_q@0"
    assert tensor_group("blk.28.attn_q.weight", 30, 4) == "attn_q@3"
    assert tensor_group("blk.8.attn_q.weight", 30, 4) == "attn_q@1"
    assert tensor_group("token_embd.weight", 30, 4) == "token_embd"


def test_a_layer_far_from_its_bands_damage_is_probed_on_its_own() -> None:
    from converters.mix.sensitivity import OUTLIER_DAMAGE_FACTOR, probe_groups

    def options(damage: float) -> tuple[TypeCost, ...]:
        return (TypeCost("q4_K", 100, damage), TypeCost("q8_0", 200, damage / 10))

    band = {f"blk.{layer}.ffn_up.weight": options(10.0) for layer in range(1, 7)}
    band["blk.3.ffn_up.weight"] = options(10.0 * OUTLIER_DAMAGE_FACTOR * 1.01)
    band["blk.4.ffn_up.weight"] = options(10.0 * OUTLIER_DAMAGE_FACTOR * 0.99)
    band["blk.0.ffn_up.weight"] = options(1000.0)  # the first and the last layer are groups of their own anyway
    band["blk.7.ffn_up.weight"] = options(1000.0)
    groups = probe_groups(band, 1)
    assert groups == {"ffn_up@0": [f"blk.{layer}.ffn_up.weight" for layer in (1, 2, 4, 5, 6)],
                      "ffn_up@layer3": ["blk.3.ffn_up.weight"], "ffn_up@first": ["blk.0.ffn_up.weight"],
                      "ffn_up@last": ["blk.7.ffn_up.weight"]}
    pair = {f"blk.{layer}.attn_q.weight": options(1.0 if layer != 2 else 100.0) for layer in range(4)}
    band_of_two = ["blk.1.attn_q.weight", "blk.2.attn_q.weight"]
    assert probe_groups(pair, 1)["attn_q@0"] == band_of_two  # no median to stand out from


@pytest.fixture(scope="module")
def calibrated(kquant_f16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from converters.calibration.calibrate import calibrate

    path = tmp_path_factory.mktemp("mix") / "tiny.imatrix.gguf"
    calibrate(kquant_f16, path, chunks=4, ctx=128)
    return path


@pytest.mark.slow
def test_like_a_preset_is_no_larger_and_records_the_mix(kquant_f16: Path, calibrated: Path, tmp_path: Path,
                                                        private_cache: Path) -> None:
    from converters.calibration.imatrix import read_imatrix

    matrix = read_imatrix(calibrated)
    plan_path = tmp_path / "plan.json"
    result = quantize(kquant_f16, tmp_path / "mix.gguf", MixBudget(like="Q4_K_M"), matrix, plan_out=plan_path)
    preset = preset_plan(kquant_f16, "Q4_K_M", matrix)
    assert result.plan.n_bytes <= preset.n_bytes
    reader = gguf.GGUFReader(result.path)
    keys = {key for key in reader.fields if key.startswith("qdesk.mix.")}
    assert {"qdesk.mix.budget", "qdesk.mix.predicted_kld", "qdesk.mix.method"} <= keys
    saved = QuantPlan.load(plan_path)
    quantized = [t for t in saved.tensors if t.predicted_kld is not None]
    assert quantized and all(t.gain is not None and t.gain >= 0 for t in quantized)
    assert saved.types() == {t.name: gguf.GGMLQuantizationType(t.tensor_type).name.lower().replace("_k", "_K")
                             for t in reader.tensors}

    again = quantize(kquant_f16, tmp_path / "again.gguf", saved, matrix)
    assert again.plan.types() == saved.types()

    (stored,) = (private_cache / "sensitivity").glob("*.json")
    default = effort_named("default")
    first = cached_sensitivity(kquant_f16, matrix, layer_bands=default.layer_bands, probe_chunks=default.probe_chunks,
                               probe_ctx=default.probe_ctx, gpu_layers=0)
    assert first.seconds == json.loads(stored.read_text())["seconds"]
    smaller = quantize(kquant_f16, tmp_path / "smaller.gguf", MixBudget(like="Q3_K_M"), matrix)
    assert smaller.plan.n_bytes < result.plan.n_bytes
    assert len(list((private_cache / "sensitivity").glob("*.json"))) == 1


def qdesk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qdesk", *args], capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
def test_cli_target_bpw_writes_a_mix_within_budget(kquant_f16: Path, calibrated: Path, tmp_path: Path) -> None:
    output = tmp_path / "bpw.gguf"
    result = qdesk("quantize", str(kquant_f16), "-o", str(output), "--target-bpw", "5.5", "--imatrix", str(calibrated))
    assert result.returncode == 0, result.stderr
    assert "predicted KLD" in result.stdout
    header = gguf.GGUFReader(output)
    bits = 8 * sum(int(t.n_bytes) for t in header.tensors) / sum(int(t.n_elements) for t in header.tensors)
    assert bits <= 5.5


@pytest.mark.parametrize("budget", ["1KB", "10GB"])
def test_cli_a_budget_out_of_range_gives_the_range(budget: str, kquant_f16: Path, calibrated: Path,
                                                   tmp_path: Path) -> None:
    output = tmp_path / "never.gguf"
    result = qdesk("quantize", str(kquant_f16), "-o", str(output), "--target-size", budget, "--imatrix",
                   str(calibrated))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "bpw" in lines[0] and "range" in lines[0]
    assert not output.exists() and not list(tmp_path.glob(".never*"))


def test_cli_like_needs_a_preset_name(kquant_f16: Path, tmp_path: Path) -> None:
    result = qdesk("quantize", str(kquant_f16), "-o", str(tmp_path / "x.gguf"), "--like", "Q9_Z")
    assert result.returncode == 2


STARTER_LAYERS = 30


def test_the_plan_report_grids_bits_per_weight_by_class_and_layer(smollm2_f16: Path, tmp_path: Path) -> None:
    plan = preset_plan(smollm2_f16, "Q4_K_M")
    report = plan_heatmap(plan)
    assert report.classes == BLOCK_CLASSES and report.n_layers == STARTER_LAYERS
    assert set(report.other) == {"token_embd"}  # SmolLM2 ties its output matrix to the embedding
    for tensor_class in BLOCK_CLASSES:
        for layer, cell in enumerate(report.grid[tensor_class]):
            planned = plan.tensor(f"blk.{layer}.{tensor_class}.weight")
            assert cell is not None and cell.type == planned.type
            assert cell.bpw == pytest.approx(8 * planned.n_bytes / planned.n_elements)
    down = report.grid["ffn_down"]
    assert report.class_summary("ffn_down").bpw == pytest.approx(sum(c.bpw for c in down if c) / STARTER_LAYERS)
    assert report.predicted_kld is None and report.class_summary("attn_q").predicted_kld is None

    grid = render_grid(report).splitlines()
    assert [line.split()[0] for line in grid[2:2 + len(BLOCK_CLASSES)]] == list(BLOCK_CLASSES)
    assert any(line.startswith("layer bpw") for line in grid) and "pred. KLD" not in grid[1]

    path = tmp_path / "plan.json"
    save_plan(plan, path)
    saved = json.loads(path.read_text())["report"]
    assert saved["layers"] == STARTER_LAYERS and len(saved["grid"]["attn_v"]) == STARTER_LAYERS
    assert saved["grid"]["attn_v"][0]["type"] == plan.tensor("blk.0.attn_v.weight").type
    assert len(saved["by_layer"]) == STARTER_LAYERS and set(saved["by_class"]) == set(BLOCK_CLASSES)
    assert QuantPlan.load(path).types() == plan.types()


def test_the_plan_report_sums_predicted_kld_per_class_and_layer(smollm2_f16: Path) -> None:
    document = preset_plan(smollm2_f16, "Q4_K_M").to_json()
    for tensor in document["tensors"]:
        if len(tensor["shape"]) == 2:
            layer = int(tensor["name"].split(".")[1]) if tensor["name"].startswith("blk.") else -1
            tensor["predicted_kld"] = 0.01 if layer < 0 else 1e-4 * (layer + 1)
    report = plan_heatmap(QuantPlan.from_json(document))
    layers_total = 1e-4 * STARTER_LAYERS * (STARTER_LAYERS + 1) / 2
    assert report.class_summary("attn_q").predicted_kld == pytest.approx(layers_total)
    assert report.layer_summary(3).predicted_kld == pytest.approx(len(BLOCK_CLASSES) * 4e-4)
    assert report.predicted_kld == pytest.approx(len(BLOCK_CLASSES) * layers_total + 0.01)
    assert report.other["token_embd"].predicted_kld == pytest.approx(0.01)
    assert "KLD ×1e-4" in render_grid(report)
    lines = summary_lines(report)
    assert len(lines) == len(BLOCK_CLASSES) + 1 and all("predicted KLD" in line for line in lines)


@pytest.fixture(scope="module")
def starter_imatrix(smollm2_f16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from converters.calibration.calibrate import calibrate

    path = tmp_path_factory.mktemp("starter-mix") / "starter.imatrix.gguf"
    calibrate(smollm2_f16, path, chunks=4, ctx=128)
    return path


@pytest.mark.slow
def test_a_starter_mix_reports_its_plan_and_eval_shows_predicted_against_measured(
        smollm2_f16: Path, starter_imatrix: Path, tmp_path: Path) -> None:
    output, plan_path = tmp_path / "mix.gguf", tmp_path / "plan.json"
    result = qdesk("quantize", str(smollm2_f16), "-o", str(output), "--like", "Q4_K_M", "--mix-effort", "fast",
                   "--imatrix", str(starter_imatrix), "--plan-out", str(plan_path), "--chunks", "4")
    assert result.returncode == 0, result.stderr
    summary = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert summary == [*BLOCK_CLASSES, "token_embd"]
    assert "error feedback" in result.stdout and json.loads(plan_path.read_text())["encoder"] == "feedback"

    report = json.loads(plan_path.read_text())["report"]
    predicted = recorded_prediction(output)
    assert predicted is not None and predicted > 0
    assert report["predicted_kld"] == pytest.approx(predicted)
    assert sum(row["predicted_kld"] for row in report["by_class"].values()) \
        + report["other"]["token_embd"]["predicted_kld"] == pytest.approx(predicted)

    preset = quantize(smollm2_f16, tmp_path / "preset.gguf", "Q8_0", imatrix="none").path
    assert recorded_prediction(preset) is None
    evaluated = qdesk("eval", "--ref", str(smollm2_f16), str(output), str(preset), "--ctx", "64", "--chunks", "2",
                      "--memory-ctx", "0", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    mix, q8 = json.loads(evaluated.stdout)["candidates"]
    assert mix["predicted_kld"] == pytest.approx(predicted) and mix["kld_mean"] > 0
    assert q8["predicted_kld"] is None
    table = qdesk("eval", "--ref", str(smollm2_f16), str(output), "--ctx", "64", "--chunks", "2", "--memory-ctx", "0")
    header = next(line for line in table.stdout.splitlines() if line.startswith("variant"))
    assert "pred. KLD" in header
    row = next(line for line in table.stdout.splitlines() if line.startswith(output.name))
    assert f"{predicted:.5f}" in row.split()


@pytest.mark.slow
def test_the_tied_embedding_is_probed_in_each_role_and_inputs_rounding_is_charged(
        smollm2_f16: Path, starter_imatrix: Path) -> None:
    from converters.calibration.imatrix import read_imatrix
    from converters.mix.sensitivity import LOOKUP_ROLE, measure_sensitivity

    sensitivity = measure_sensitivity(smollm2_f16, read_imatrix(starter_imatrix),
                                      candidate_types=("q4_0", "q6_K", "q8_0", "f16"), layer_bands=1, probe_chunks=1,
                                      probe_ctx=128)
    for tensor in sensitivity.tensors:  # the CPU kernels round inputs for quantized types, not for f16
        assert tensor.option("q8_0").input_damage > 0 and tensor.option("f16").input_damage == 0, tensor.name
    down = sensitivity.tensor("blk.3.ffn_down.weight")  # rows of 1536: q6_K's kernel rounds blocks of 256
    assert down.option("q6_K").input_damage > down.option("q8_0").input_damage
    assert sensitivity.tensor("token_embd.weight").option("q8_0").input_damage > 0  # its output product
    embedding = sensitivity.tensor("token_embd.weight")
    assert sensitivity.group_kld["token_embd"] > 0 and sensitivity.group_kld["token_embd" + LOOKUP_ROLE] > 0
    assert embedding.gain > 0 and embedding.lookup_gain > 0
    q4 = embedding.option("q4_0")
    assert q4.lookup_damage > 0
    assert embedding.predicted_kld("q4_0") == pytest.approx(embedding.gain * (q4.damage + q4.input_damage)
                                                            + embedding.lookup_gain * q4.lookup_damage)
    others = [tensor for tensor in sensitivity.tensors if tensor.name != "token_embd.weight"]
    assert all(tensor.lookup_gain == 0 and tensor.option("q8_0").lookup_damage == 0 for tensor in others)


@pytest.mark.slow
def test_i_quants_join_a_remembered_measurement_and_take_the_mix_below_q2_k(
        kquant_f16: Path, calibrated: Path, tmp_path: Path, private_cache: Path) -> None:
    from converters.calibration.imatrix import read_imatrix
    from converters.mix.sensitivity import I_QUANT_TYPES, K_AND_LEGACY_TYPES, WRITTEN_ONLY_WITH_IMPORTANCE
    from native.activations import ModelEvaluator

    matrix = read_imatrix(calibrated)
    settings = {"layer_bands": 4, "probe_chunks": 2, "probe_ctx": 256, "gpu_layers": 0}
    k_only = cached_sensitivity(kquant_f16, matrix, candidate_types=K_AND_LEGACY_TYPES, **settings)
    assert not any(option.type in I_QUANT_TYPES for tensor in k_only.tensors for option in tensor.options)
    extended = cached_sensitivity(kquant_f16, matrix, **settings)
    assert extended.group_kld == k_only.group_kld and extended.probe_tokens == k_only.probe_tokens
    assert [tensor.gain for tensor in extended.tensors] == [tensor.gain for tensor in k_only.tensors]
    (stored,) = (private_cache / "sensitivity").glob("*.json")
    assert set(I_QUANT_TYPES) <= set(json.loads(stored.read_text())["candidate_types"])
    assert cached_sensitivity(kquant_f16, matrix, **settings) == extended  # remembered with the new types
    for tensor in extended.tensors:
        types = {option.type for option in tensor.options}
        assert {"iq4_nl", "iq4_xs", "iq3_s", "iq3_xxs"} <= types, tensor.name
        assert (types >= WRITTEN_ONLY_WITH_IMPORTANCE) == (tensor.name in matrix.entries), tensor.name
        iq4, q4 = tensor.option("iq4_xs"), tensor.option("q4_K")
        assert iq4.bytes < q4.bytes and iq4.damage > 0
        assert iq4.input_damage == q4.input_damage  # both kernels round inputs in blocks of 256
        assert tensor.option("iq4_nl").input_damage == tensor.option("q4_0").input_damage

    q2_k = preset_plan(kquant_f16, "Q2_K", matrix)
    below = 0.85 * 8 * q2_k.n_bytes / q2_k.n_elements
    result = quantize(kquant_f16, tmp_path / "low.gguf", MixBudget(bpw=below), matrix, encoder="ggml")
    assert result.plan.n_bytes < q2_k.n_bytes
    assert set(result.plan.type_counts()) & set(I_QUANT_TYPES)
    with ModelEvaluator(result.path, n_ctx=64, collect=False) as evaluator:
        logits: list[float] = []
        evaluator.evaluate_logits(list(range(1, 65)), 62, lambda _p, row: logits.append(float(row.max())))
    assert logits and all(value == value for value in logits)


@pytest.mark.slow
def test_a_measurement_probed_on_other_text_keeps_its_damages_and_each_probing_is_remembered(
        kquant_f16: Path, calibrated: Path, private_cache: Path) -> None:
    from converters.calibration.imatrix import read_imatrix

    matrix = read_imatrix(calibrated)
    one_chunk = {"layer_bands": 2, "probe_chunks": 1, "probe_ctx": 128, "gpu_layers": 0}
    measured = cached_sensitivity(kquant_f16, matrix, **one_chunk)
    assert measured.probed_on is not None and measured.probed_on.first_scored == 16
    assert measured.probe_tokens == 128 - 1 - 16
    (stored,) = (private_cache / "sensitivity").glob("*.json")
    document = json.loads(stored.read_text())
    tensor = document["tensors"][0]
    marked_option = next(o for o in tensor["options"] if o[0] != document["probe_types"][tensor["group"]])
    marked_option[2] *= 2  # marks the damages (not the probe type's: that would move the groups)
    document["probed_on"] = None  # as a measurement remembered before the probe's text was recorded
    stored.write_text(json.dumps(document))
    marked = _read_cached(stored)
    assert marked is not None

    three_chunks = cached_sensitivity(kquant_f16, matrix, **{**one_chunk, "probe_chunks": 3})
    assert three_chunks.probe_tokens == 3 * (128 - 1 - 16)
    assert [t.options for t in three_chunks.tensors] == [
        tuple(replace(o, input_damage=n.input_damage) for o, n in zip(t.options, new.options, strict=True))
        for t, new in zip(marked.tensors, three_chunks.tensors, strict=True)]
    assert three_chunks.input_scales is not None and three_chunks.group_kld != measured.group_kld
    assert len(list((private_cache / "sensitivity").glob("*.json"))) == 2

    reprobed_one = cached_sensitivity(kquant_f16, matrix, **one_chunk)
    assert reprobed_one.group_kld == pytest.approx(measured.group_kld, rel=1e-6)
    assert cached_sensitivity(kquant_f16, matrix, **{**one_chunk, "probe_chunks": 3}) == three_chunks
    assert cached_sensitivity(kquant_f16, matrix, **one_chunk) == reprobed_one


@pytest.mark.slow
def test_a_measurement_grouped_otherwise_is_probed_again_and_keeps_its_damages(
        kquant_f16: Path, calibrated: Path, private_cache: Path) -> None:
    from converters.calibration.imatrix import read_imatrix

    matrix = read_imatrix(calibrated)
    settings = {"layer_bands": 2, "probe_chunks": 1, "probe_ctx": 128, "gpu_layers": 0}
    measured = cached_sensitivity(kquant_f16, matrix, **settings)
    (stored,) = (private_cache / "sensitivity").glob("*.json")
    document = json.loads(stored.read_text())
    for tensor in document["tensors"]:  # as an older grouping stored it: one group per tensor class
        tensor["group"] = tensor["group"].split("@")[0] + "@all"
        tensor["gain"] = 1.0
    stored.write_text(json.dumps(document))

    upgraded = cached_sensitivity(kquant_f16, matrix, **settings)
    assert [t.group for t in upgraded.tensors] == [t.group for t in measured.tensors]
    assert [t.gain for t in upgraded.tensors] == pytest.approx([t.gain for t in measured.tensors], rel=1e-6)
    for old, new in zip(measured.tensors, upgraded.tensors, strict=True):
        assert [o.damage for o in new.options] == [o.damage for o in old.options]
        assert [o.input_damage for o in new.options] == pytest.approx([o.input_damage for o in old.options], rel=1e-6)
    assert [t["group"] for t in json.loads(stored.read_text())["tensors"]] == [t.group for t in measured.tensors]


@pytest.mark.slow
def test_the_measured_input_charge_predicts_llamas_kernels_better_than_the_formula(
        smollm2_f16: Path, tmp_path: Path) -> None:
    """On the real starter, every ffn_down (rows of 1536) stored as q8_0 and the rest F16: the prediction with the
    probed input charge is near what llama.cpp's q8_0 kernel costs; the formula alone says 4-5x more."""
    from converters.calibration.calibrate import builtin_texts, calibration_chunks
    from converters.calibration.divergence import compare_candidate, encode_reference
    from converters.mix.sensitivity import input_kind
    from native.activations import ModelEvaluator

    sensitivity = cached_sensitivity(smollm2_f16, None, layer_bands=2, probe_chunks=2, probe_ctx=256, gpu_layers=0)
    assert sensitivity.input_scales is not None
    chosen = [tensor for tensor in sensitivity.tensors if input_kind(tensor.name) == "ffn_down"]
    scale = sensitivity.input_scales["ffn_down/32"]
    weights_part = sum(tensor.gain * tensor.option("q8_0").damage for tensor in chosen)
    input_part = sum(tensor.gain * tensor.option("q8_0").input_damage for tensor in chosen)
    probed, formula = weights_part + input_part, weights_part + input_part / scale

    names = {tensor.name for tensor in chosen}
    base = preset_plan(smollm2_f16, "Q8_0")
    plan = QuantPlan(tuple(replace(t, type="q8_0" if t.name in names else t.source_type) for t in base.tensors),
                     "Q8_0", "ffn_down as q8_0, the rest F16")
    candidate = tmp_path / "down-q8.gguf"
    quantize(smollm2_f16, candidate, plan, None, encoder="ggml")
    klds = []
    with ModelEvaluator(smollm2_f16, n_ctx=256, collect=False) as reference, \
            ModelEvaluator(candidate, n_ctx=256, collect=False) as quantized:
        for chunk in calibration_chunks(reference, builtin_texts(), 256, 6)[2:]:  # not the probe's own chunks
            targets = np.asarray(chunk[129:])
            expected = encode_reference(_logits_from(reference, chunk, 128), targets)
            klds.append(compare_candidate(_logits_from(quantized, chunk, 128), expected, targets).kld)
    measured = float(np.concatenate(klds).mean())
    assert formula > 2 * probed
    assert abs(np.log(measured / probed)) < abs(np.log(measured / formula))
    assert 0.4 < measured / probed < 2.5


def _logits_from(evaluator: ModelEvaluator, chunk: list[int], first: int) -> np.ndarray:
    """The logits of positions `first` … the one before the last: those predicting chunk[first + 1:]."""
    rows: list[np.ndarray] = []
    evaluator.evaluate_logits(chunk, first, lambda _position, logits: rows.append(logits.copy()))
    return np.concatenate(rows)[:-1]
