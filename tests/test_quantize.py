"""`quantize`: presets tensor for tensor as llama.cpp's own quantizer makes them, plans applied exactly,
and one clear sentence, with nothing left behind, for every kind of bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from converters.calibration.imatrix import ImatrixEntry, ImatrixError, ImportanceMatrix, read_imatrix
from converters.core.errors import Cancelled, GGUFFileError
from converters.core.gguf_file import check_gguf
from converters.core.jobs import CancelToken, Progress
from converters.mix.report import save_plan
from converters.quantization.plan import PlanError, QuantPlan
from converters.quantization.presets import PRESETS
from converters.quantization.quantize import QuantizeError, matrix_data, preset_plan, quantize
from tests.builders.llama_quantizer import bare_llama_quantize

REQUIRED_PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
                    "Q8_0")


@pytest.fixture(scope="module", autouse=True)
def quiet_llama() -> None:
    import llama_cpp

    global _silence
    _silence = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(_silence, None)


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.type.name for t in check_gguf(path).tensors}


def tensor_data(path: Path) -> dict[str, bytes]:
    return {t.name: bytes(t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".partial")


@pytest.mark.parametrize("preset", REQUIRED_PRESETS)
def test_preset_matches_llama_cpp_tensor_for_tensor(preset: str, kquant_f16: Path, tmp_path: Path) -> None:
    ours = quantize(kquant_f16, tmp_path / "ours.gguf", preset, imatrix="none")
    peer = tmp_path / "peer.gguf"
    bare_llama_quantize(kquant_f16, peer, PRESETS[preset].ftype)

    assert tensor_types(ours.path) == tensor_types(peer)
    assert ours.plan.n_bytes == sum(t.n_bytes for t in check_gguf(peer).tensors)
    metadata_bytes = sum(len(k) + len(str(v)) + 32 for k, v in _qdesk_keys(ours.path).items())
    assert 0 < ours.bytes - peer.stat().st_size <= metadata_bytes + 64  # the same but for qdesk's own keys
    assert tensor_data(ours.path) == tensor_data(peer)
    assert preset_plan(kquant_f16, preset).types() == ours.plan.types()


def _qdesk_keys(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith(("qdesk.", "quantize."))}


def test_presets_differ_as_llama_cpp_says(kquant_f16: Path) -> None:
    q4 = preset_plan(kquant_f16, "Q4_K_M")
    q3 = preset_plan(kquant_f16, "Q3_K_S")
    assert q4.tensor("blk.0.attn_q.weight").type == "q4_K"
    assert q4.tensor("blk.0.attn_v.weight").type == "q6_K"  # Q4_K_M keeps some attn_v at Q6_K
    assert q3.n_bytes < q4.n_bytes < preset_plan(kquant_f16, "Q8_0").n_bytes
    assert q4.tensor("output_norm.weight").type == "f32"


def test_plan_is_applied_exactly_and_recorded(kquant_f16: Path, tmp_path: Path) -> None:
    plan = preset_plan(kquant_f16, "Q4_K_M").with_types(
        {"blk.3.ffn_down.weight": "q8_0", "blk.0.attn_q.weight": "q2_K", "token_embd.weight": "q5_K"},
        label="hand-made test mix",
    )
    result = quantize(kquant_f16, tmp_path / "mix.gguf", plan, imatrix="none", plan_out=tmp_path / "mix.plan.json")
    assert result.plan.types() == plan.types()
    assert tensor_types(result.path)["blk.3.ffn_down.weight"] == "Q8_0"
    assert tensor_types(result.path)["blk.0.attn_q.weight"] == "Q2_K"
    assert sum(t.n_bytes for t in check_gguf(result.path).tensors) == plan.n_bytes
    assert QuantPlan.load(tmp_path / "mix.plan.json").types() == plan.types()
    assert _qdesk_keys(result.path)["qdesk.plan"] == "hand-made test mix"


def test_imatrix_is_used_and_recorded(kquant_f16: Path, tmp_path: Path) -> None:
    header = check_gguf(kquant_f16)
    rng = np.random.default_rng(7)
    entries = {
        t.name: ImatrixEntry(rng.gamma(0.5, 2.0, size=(1, t.shape[0])) * 100, np.array([100]))
        for t in header.tensors if t.name.startswith("blk.") and len(t.shape) == 2
    }
    matrix = ImportanceMatrix(entries, ["test-text"], chunk_count=1, chunk_size=100)
    ours = quantize(kquant_f16, tmp_path / "ours.gguf", "Q4_K_M", imatrix=matrix)
    peer = tmp_path / "peer.gguf"
    bare_llama_quantize(kquant_f16, peer, PRESETS["Q4_K_M"].ftype, matrix.quantizer_data())
    without = quantize(kquant_f16, tmp_path / "plain.gguf", "Q4_K_M", imatrix="none")

    assert tensor_data(ours.path) == tensor_data(peer)
    assert tensor_data(ours.path)["blk.0.attn_q.weight"] != tensor_data(without.path)["blk.0.attn_q.weight"]
    keys = _qdesk_keys(ours.path)
    assert keys["quantize.imatrix.entries_count"] == len(entries)
    assert keys["quantize.imatrix.chunks_count"] == 1
    assert keys["quantize.imatrix.dataset"] == "test-text"
    assert ours.imatrix is not None and ours.imatrix.entries == len(entries)


def test_hf_folder_is_converted_on_the_fly(tmp_path: Path) -> None:
    from tests.builders.checkpoints import build_tiny_checkpoint

    folder = build_tiny_checkpoint(tmp_path / "tiny", "llama", dtype="bfloat16")
    result = quantize(folder, None, "Q8_0", imatrix="none")
    assert result.path.parent == folder and result.path.name.endswith("-Q8_0.gguf")
    assert {t.type.name for t in check_gguf(result.path).tensors} <= {"Q8_0", "F32"}
    assert leftovers(folder) == []


def test_preset_that_needs_a_matrix_without_one(kquant_f16: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match="needs an importance matrix"):
        quantize(kquant_f16, tmp_path / "out.gguf", "IQ2_XS", imatrix="none")
    assert list(tmp_path.iterdir()) == []


def test_truncated_gguf_is_refused_before_llama_cpp_sees_it(kquant_f16: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(kquant_f16.read_bytes()[: kquant_f16.stat().st_size // 2])
    with pytest.raises(GGUFFileError, match="truncated"):
        quantize(damaged, tmp_path / "out.gguf", "Q4_K_M", imatrix="none")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.gguf"]


def test_imatrix_of_another_model_is_refused(kquant_f16: Path, tmp_path: Path) -> None:
    wrong_names = ImportanceMatrix({"blk.0.other.weight": ImatrixEntry(np.ones((1, 256)), np.array([1]))}, [], 1, 1)
    with pytest.raises(ImatrixError, match="another model"):
        quantize(kquant_f16, tmp_path / "out.gguf", "Q4_K_M", imatrix=wrong_names)
    wrong_size = ImportanceMatrix({"blk.0.attn_q.weight": ImatrixEntry(np.ones((1, 576)), np.array([1]))}, [], 1, 1)
    with pytest.raises(ImatrixError, match="576"):
        quantize(kquant_f16, tmp_path / "out.gguf", "Q4_K_M", imatrix=wrong_size)
    assert list(tmp_path.iterdir()) == []


def test_type_that_does_not_fit_a_row(smollm2_f16: Path) -> None:
    plan = preset_plan(smollm2_f16, "Q4_K_M")
    assert plan.tensor("blk.0.attn_q.weight").type != "q4_K"  # rows of 576: llama.cpp falls back
    with pytest.raises(PlanError, match="576"):
        plan.with_types({"blk.0.attn_q.weight": "q4_K"})


def test_plan_of_another_model_is_refused(kquant_f16: Path, smollm2_f16: Path, tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="another model"):
        quantize(kquant_f16, tmp_path / "out.gguf", preset_plan(smollm2_f16, "Q8_0"), imatrix="none")
    assert list(tmp_path.iterdir()) == []


def test_cancel_leaves_nothing_behind(smollm2_f16: Path, tmp_path: Path) -> None:
    cancel = CancelToken()

    def cancel_after_first_tensor(step: Progress) -> None:
        if step.message == "quantizing" and step.done >= 1:
            cancel.cancel()

    with pytest.raises(Cancelled):
        quantize(smollm2_f16, tmp_path / "out.gguf", "Q4_K_M", imatrix="none", progress=cancel_after_first_tensor,
                 cancel=cancel)
    assert list(tmp_path.iterdir()) == []


def test_requantizing_warns(starter_gguf: Path, tmp_path: Path) -> None:
    copy = tmp_path / "starter.gguf"
    shutil.copyfile(starter_gguf, copy)
    result = quantize(copy, tmp_path / "out.gguf", "Q8_0", imatrix="none")
    assert any("already quantized" in warning for warning in result.warnings)
    assert tensor_types(result.path)["blk.0.attn_q.weight"] == "Q8_0"


def qdesk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qdesk", *args], capture_output=True, text=True, timeout=300)


def test_cli_bad_input_is_one_sentence_and_leaves_nothing(kquant_f16: Path, smollm2_f16: Path,
                                                          tmp_path: Path) -> None:
    truncated = tmp_path / "inputs" / "truncated.gguf"
    truncated.parent.mkdir()
    truncated.write_bytes(kquant_f16.read_bytes()[:100_000])
    foreign_matrix = tmp_path / "inputs" / "foreign.imatrix.gguf"
    from converters.calibration.imatrix import write_imatrix

    write_imatrix(ImportanceMatrix({"blk.0.attn_q.weight": ImatrixEntry(np.ones((1, 576)), np.array([4]))},
                                   ["x"], 1, 4), foreign_matrix)
    misfit = preset_plan(smollm2_f16, "Q8_0").to_json()
    next(t for t in misfit["tensors"] if t["name"] == "blk.0.attn_q.weight")["type"] = "q4_K"
    misfit_plan = tmp_path / "inputs" / "misfit.plan.json"
    misfit_plan.write_text(json.dumps(misfit))
    out = tmp_path / "out"
    out.mkdir()
    cases = {
        "truncated": [str(truncated), "--preset", "Q4_K_M", "--imatrix", "none"],
        "another model": [str(kquant_f16), "--preset", "Q4_K_M", "--imatrix", str(foreign_matrix)],
        "needs an importance matrix": [str(kquant_f16), "--preset", "IQ2_XS", "--imatrix", "none"],
        "does not fit": [str(smollm2_f16), "--plan", str(misfit_plan), "--imatrix", "none"],
        "not a quantization preset": [str(kquant_f16), "--preset", "Q7_X", "--imatrix", "none"],
    }
    for expected, args in cases.items():
        result = qdesk("quantize", *args, "-o", str(out / "model.gguf"))
        assert result.returncode == 1, (expected, result.stderr)
        assert result.stdout == "" and result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr
        assert list(out.iterdir()) == []


def test_cli_applies_a_saved_plan(kquant_f16: Path, tmp_path: Path) -> None:
    plan = preset_plan(kquant_f16, "Q4_K_S").with_types({"blk.1.ffn_up.weight": "q8_0"})
    save_plan(plan, tmp_path / "edited.plan.json")
    result = qdesk("quantize", str(kquant_f16), "--plan", str(tmp_path / "edited.plan.json"), "--imatrix", "none",
                   "-o", str(tmp_path / "out.gguf"))
    assert result.returncode == 0, result.stderr
    assert tensor_types(tmp_path / "out.gguf") == {name: type_.upper() for name, type_ in plan.types().items()}


@pytest.fixture(scope="module")
def tiny_matrix(kquant_f16: Path, tmp_path_factory: pytest.TempPathFactory) -> ImportanceMatrix:
    from converters.calibration.calibrate import calibrate

    path = tmp_path_factory.mktemp("iq") / "tiny.imatrix.gguf"
    calibrate(kquant_f16, path, chunks=2, ctx=64)
    return read_imatrix(path)


@pytest.mark.parametrize("preset", [name for name in PRESETS if name.startswith("IQ")])
def test_an_i_quant_preset_is_llama_cpps_with_the_same_matrix(preset: str, kquant_f16: Path,
                                                              tiny_matrix: ImportanceMatrix, tmp_path: Path) -> None:
    ours = quantize(kquant_f16, tmp_path / "ours.gguf", preset, tiny_matrix)
    peer = tmp_path / "peer.gguf"
    bare_llama_quantize(kquant_f16, peer, PRESETS[preset].ftype, imatrix=matrix_data(tiny_matrix))
    assert tensor_types(ours.path) == tensor_types(peer)
    assert any(name.startswith("IQ") for name in tensor_types(peer).values())
    assert tensor_data(ours.path) == tensor_data(peer)
