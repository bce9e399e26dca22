"""Faults that used to end in "internal error (…)" or in a sentence that blamed the wrong thing: each now gets the
sentence that says what is wrong and what to do, and leaves nothing behind."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from converters.core.errors import OutputError
from converters.core.jobs import Progress
from converters.quantization.quantize import quantize
from tests.cli_support import assert_refused, digests, leftovers, run_in_process


@pytest.fixture
def model(kquant_f16: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "tiny-F16.gguf"
    shutil.copyfile(kquant_f16, copy)
    return copy


@pytest.mark.parametrize("document", ["[1, 2]", '"plan"', "3", "null", '{"format": "qdesk.plan/1", "tensors": [{}]}',
                                      '{"format": "qdesk.plan/1", "base": "Q8_0", "tensors": '
                                      '[{"name": "x", "shape": [], "source_type": "f16", "type": "q8_0"}]}',
                                      '{"format": "qdesk.plan/1", "base": "Q8_0", "tensors": '
                                      '[{"name": "x", "shape": [1e400], "source_type": "f16", "type": "q8_0"}]}'],
                         ids=["list", "string", "number", "null", "empty-tensor", "no-dimensions", "infinite"])
def test_a_plan_that_is_not_a_plan(model: Path, tmp_path: Path, document: str) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(document)
    assert_refused(run_in_process("quantize", model, "-o", tmp_path / "out.gguf", "--plan", plan), "plan")
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1"])
def test_a_bits_per_weight_that_is_no_number_of_bits(model: Path, tmp_path: Path, value: str) -> None:
    run = run_in_process("quantize", model, "-o", tmp_path / "out.gguf", f"--target-bpw={value}")
    assert run.code == 2  # bad usage, as for every option argparse accepts but qdesk cannot use
    assert "internal error" not in run.stderr and "Traceback" not in run.stderr
    assert "--target-bpw takes a positive number" in run.stderr
    assert not (tmp_path / "out.gguf").exists()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 24 MB tmpfs: a disk that really fills up (needs root; skipped elsewhere)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount_point)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_a_disk_that_fills_during_quantize_is_blamed_not_the_input(model: Path, small_disk: Path) -> None:
    """Another program fills the disk after the free-space check, while llama.cpp's quantizer (in its own process,
    whose errno is lost) writes: the sentence names the full disk, not the input, and nothing is left."""
    filler = small_disk / "other-program.bin"

    def fill_disk_once(step: Progress) -> None:
        if step.message == "quantizing" and not filler.exists():
            with filler.open("wb") as handle:
                try:
                    while True:
                        handle.write(b"\0" * 1_000_000)
                except OSError:
                    pass

    before = digests([model])
    with pytest.raises(OutputError) as raised:
        quantize(model, small_disk / "out.gguf", "Q8_0", "none", progress=fill_disk_once)
    message = str(raised.value)
    assert "disk is full" in message and "input" not in message, message
    assert [path.name for path in small_disk.iterdir()] == [filler.name]
    assert digests([model]) == before
    assert leftovers(model.parent) == []


# --- no code from a model folder ever runs ----------------------------------------------------------------------

class _RunsCodeWhenUnpickled:
    """What a malicious pytorch_model.bin holds: unpickling it would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_unrun(tiny_llama_hf: Path, tmp_path: Path) -> None:
    import torch

    from tests.cli_support import run_process

    folder = tmp_path / "checkpoint"
    shutil.copytree(tiny_llama_hf, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "the-code-ran"
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 4), "payload": _RunsCodeWhenUnpickled(marker)},
               folder / "pytorch_model.bin")
    sentence = assert_refused(run_process("convert", folder, "-o", tmp_path / "out.gguf"),
                              "holds Python objects other than tensors")
    assert "never runs code from a model folder" in sentence
    assert not marker.exists() and not (tmp_path / "out.gguf").exists()


def test_a_chat_template_cannot_reach_python(tmp_path: Path) -> None:
    """Calibration renders conversations through the model's own chat template, in Jinja2's sandbox."""
    from converters.calibration.calibrate import render_conversation

    marker = tmp_path / "the-template-ran-code"
    template = ("{{ ''.__class__.__mro__[1].__subclasses__() }}"
                f"{{{{ cycler.__init__.__globals__.os.system('touch {marker}') }}}}")
    rendered = render_conversation([{"role": "user", "content": "hello"}], template)
    assert rendered == "user: hello"  # the sandbox refused; the plain rendering stands in
    assert not marker.exists()


def test_a_reader_that_stops_reading_is_no_internal_error(kquant_f16: Path) -> None:
    """`qdesk info MODEL --types | head -1`: stdout's reader goes away; qdesk stops quietly."""
    import sys

    from tests.cli_support import REPO_ROOT

    process = subprocess.Popen([sys.executable, "-m", "qdesk", "info", kquant_f16, "--types", "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT)
    assert process.stdout is not None
    process.stdout.close()  # gone before qdesk writes a byte
    _, stderr = process.communicate(timeout=120)
    assert process.returncode in (0, 1)
    assert b"internal error" not in stderr and b"Traceback" not in stderr, stderr
