"""No command writes over its own input: an output that is an input (by path, link or hard link) or another
output is refused before any work, for every command that writes, from the CLI and from the functions the desktop
app calls; and outputs go only into folders that exist and take files, checked before the long steps."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from converters.calibration.calibrate import calibrate
from converters.core.errors import OutputError
from converters.core.jobs import Progress
from converters.quantization.quantize import quantize
from converters.writing.convert import convert_checkpoint
from qdesk.evaluation.report import write_report
from tests.cli_support import assert_refused, digests, leftovers, run_in_process, run_process


@pytest.fixture
def model(kquant_f16: Path, tmp_path: Path) -> Path:
    """A copy of the tiny Llama F16 GGUF, named as qdesk names variants."""
    copy = tmp_path / "tiny-F16.gguf"
    shutil.copyfile(kquant_f16, copy)
    return copy


@pytest.fixture
def checkpoint(tiny_llama_hf: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "tiny-hf"
    shutil.copytree(tiny_llama_hf, copy)
    return copy


def _unchanged_after(inputs: list[Path], folder: Path, *args: str | Path, fragment: str = "Refusing to write") -> str:
    """Run `qdesk ARGS` in this process: refused in one sentence, inputs byte-identical, no new file in `folder`."""
    before, files = digests(inputs), sorted(folder.rglob("*"))
    sentence = assert_refused(run_in_process(*args), fragment)
    assert digests(inputs) == before
    assert sorted(folder.rglob("*")) == files
    return sentence


# --- each command that writes, from the command line ----------------------------------------------------------

def test_convert_onto_a_checkpoint_file(checkpoint: Path, tmp_path: Path) -> None:
    for output in ("model.safetensors", "config.json", "tokenizer.json"):
        sentence = _unchanged_after([checkpoint], tmp_path, "convert", checkpoint, "-o", checkpoint / output)
        assert f"the input {checkpoint / output}" in sentence
    os.link(checkpoint / "model.safetensors", tmp_path / "hard-link.gguf")
    sentence = _unchanged_after([checkpoint], tmp_path, "convert", checkpoint, "-o", tmp_path / "hard-link.gguf")
    assert "links to one file" in sentence


@pytest.mark.parametrize("spelling", ["same", "dot-slash", "symbolic-link", "hard-link"])
def test_quantize_onto_its_source(model: Path, tmp_path: Path, spelling: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    output = {"same": model, "dot-slash": Path(".") / model.name, "symbolic-link": tmp_path / "alias.gguf",
              "hard-link": tmp_path / "twin.gguf"}[spelling]
    if spelling == "symbolic-link":
        output.symlink_to(model)
    if spelling == "hard-link":
        os.link(model, output)
    _unchanged_after([model], tmp_path, "quantize", model, "-o", output, "--preset", "Q8_0", "--imatrix", "none")


def test_quantize_default_name_that_is_the_source(model: Path, tmp_path: Path) -> None:
    """Requantizing X-Q8_0.gguf to Q8_0 would name the output X-Q8_0.gguf: the source itself."""
    source = model.rename(tmp_path / "tiny-Q8_0.gguf")
    _unchanged_after([source], tmp_path, "quantize", source, "--preset", "Q8_0", "--imatrix", "none")


def test_quantize_plan_and_imatrix_and_text_are_inputs_too(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    plan, text, matrix = tmp_path / "plan.json", tmp_path / "text.txt", tmp_path / "m.imatrix.gguf"
    assert run_in_process("quantize", model, "-o", out, "--preset", "Q8_0", "--imatrix", "none",
                          "--plan-out", plan).code == 0
    text.write_text("Some calibration text.\n\n" * 50)
    shutil.copyfile(model, matrix)  # never read: the outputs are checked first
    inputs = [model, plan, text, matrix]
    out.unlink()
    _unchanged_after(inputs, tmp_path, "quantize", model, "-o", out, "--plan", plan, "--plan-out", plan)
    _unchanged_after(inputs, tmp_path, "quantize", model, "-o", out, "--preset", "Q4_K_M", "--text", text,
                     "--plan-out", text)
    _unchanged_after(inputs, tmp_path, "quantize", model, "-o", matrix, "--preset", "Q4_K_M", "--imatrix", matrix)
    sentence = _unchanged_after(inputs, tmp_path, "quantize", model, "-o", out, "--preset", "Q8_0", "--imatrix",
                                "none", "--plan-out", out, fragment="Two outputs are the same file")
    assert str(out) in sentence
    _unchanged_after(inputs, tmp_path, "quantize", model, "-o", out, "--preset", "Q8_0", "--imatrix", "none",
                     "--plan-out", model)


def test_calibrate_onto_its_model_or_text(model: Path, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("Some calibration text.\n\n" * 50)
    _unchanged_after([model, text], tmp_path, "calibrate", model, "-o", model)
    _unchanged_after([model, text], tmp_path, "calibrate", model, "-o", model, "--legacy-dat")
    _unchanged_after([model, text], tmp_path, "calibrate", model, "-o", text, "--text", text)


def test_eval_report_onto_a_model(model: Path, tmp_path: Path) -> None:
    candidate = tmp_path / "tiny-Q8_0.gguf"
    shutil.copyfile(model, candidate)
    _unchanged_after([model, candidate], tmp_path, "eval", "--ref", model, candidate, "--report", model)
    _unchanged_after([model, candidate], tmp_path, "eval", "--ref", model, candidate, "--report", candidate)


def test_a_refusal_through_the_real_command_line(model: Path, tmp_path: Path) -> None:
    before = digests([model])
    assert_refused(run_process("quantize", model, "-o", model, "--preset", "Q8_0", "--imatrix", "none"),
                   "Refusing to write")
    assert digests([model]) == before


# --- the functions the desktop app calls ------------------------------------------------------------------------

def test_the_job_functions_refuse_as_well(model: Path, checkpoint: Path, tmp_path: Path) -> None:
    """The GUI calls these directly, so the check is theirs, not only the command line's."""
    before = digests([model, checkpoint])
    with pytest.raises(OutputError, match="Refusing to write"):
        quantize(model, model, "Q8_0", "none")
    with pytest.raises(OutputError, match="Refusing to write"):
        convert_checkpoint(checkpoint, checkpoint / "model.safetensors")
    with pytest.raises(OutputError, match="Refusing to write"):
        calibrate(model, model)
    document = {"reference": {"path": str(model), "name": model.name}, "candidates": []}
    with pytest.raises(OutputError, match="Refusing to write"):
        write_report(document, model)
    assert digests([model, checkpoint]) == before
    assert leftovers(tmp_path) == []


# --- output folders, checked before the long steps -----------------------------------------------------------

def _no_work(progress: list[Progress]) -> None:
    assert progress == [], f"work started before the refusal: {progress[:3]}"


def test_a_missing_output_folder_is_refused_before_any_work(model: Path, checkpoint: Path, tmp_path: Path) -> None:
    steps: list[Progress] = []
    missing = tmp_path / "missing"
    for call in (lambda: quantize(checkpoint, missing / "out.gguf", "Q8_0", "none", progress=steps.append),
                 lambda: quantize(model, tmp_path / "out.gguf", "Q8_0", "none", plan_out=missing / "plan.json",
                                  progress=steps.append),
                 lambda: calibrate(model, missing / "m.imatrix.gguf", progress=steps.append)):
        with pytest.raises(OutputError, match="does not exist"):
            call()
    _no_work(steps)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-F16.gguf", "tiny-hf"]
    assert leftovers(checkpoint) == []
    sentence = assert_refused(run_in_process("quantize", checkpoint, "-o", missing / "out.gguf", "--preset", "Q8_0",
                                             "--imatrix", "none"), "does not exist")
    assert str(missing) in sentence


@pytest.fixture
def read_only_folder(tmp_path: Path):
    """A folder no file can be created in, even by root: a read-only tmpfs (needs root; skipped elsewhere)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a read-only tmpfs failed here")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def test_a_read_only_output_folder_is_refused_before_any_work(checkpoint: Path, model: Path,
                                                              read_only_folder: Path) -> None:
    steps: list[Progress] = []
    with pytest.raises(OutputError, match="permission denied"):
        quantize(checkpoint, read_only_folder / "out.gguf", "Q8_0", "none", progress=steps.append)
    with pytest.raises(OutputError, match="permission denied"):
        quantize(model, model.with_name("out.gguf"), "Q8_0", "none", plan_out=read_only_folder / "p.json",
                 progress=steps.append)
    _no_work(steps)
    assert list(read_only_folder.iterdir()) == []
    assert_refused(run_in_process("quantize", checkpoint, "-o", read_only_folder / "out.gguf", "--preset", "Q8_0",
                                  "--imatrix", "none"), "permission denied")


def test_plan_out_into_a_missing_folder_fails_before_the_output_is_written(model: Path, tmp_path: Path) -> None:
    run = run_in_process("quantize", model, "-o", tmp_path / "out.gguf", "--preset", "Q8_0", "--imatrix", "none",
                         "--plan-out", tmp_path / "nowhere" / "plan.json")
    assert_refused(run, "nowhere", "does not exist")
    assert not (tmp_path / "out.gguf").exists()
