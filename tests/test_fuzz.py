"""The fault and fuzz suite: mutated GGUF headers and metadata, safetensors headers, index files and configs,
importance matrices in both of llama.cpp's formats, and plan files, each given to the command that reads it.

For every mutated input the run must exit 0 (the input was still good) or 1 with one sentence on stderr and no
traceback (never 0 for an input known to be bad, never a signal), write no output when it refuses, leave no
partial file, and leave its inputs byte-identical (`tests.fuzz_support.Contract`). The CLI runs in this process
(`qdesk.cli.main`), so a few hundred cases fit in a few minutes; `test_a_sample_through_real_processes` runs some
as real processes to see the exit status a signal would leave. Cases that defects were found with stay as
`@example`s. Every target's example count is fixed (QDESK_FUZZ_SCALE scales them); the session prints how many
cases ran (tests/conftest.py).

llama.cpp is reached only through its quantizer, which runs in a child process; importance matrices are made once
by `qdesk calibrate` in a child process too. No target here loads a model with llama.cpp in this process.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from converters.calibration.imatrix import read_imatrix, write_legacy_imatrix
from converters.core.gguf_file import check_gguf
from tests.cli_support import run_in_process, run_process
from tests.fuzz_support import (
    JSON_ODDITIES,
    ByteEdit,
    Contract,
    Slot,
    case,
    environment,
    examples,
    gguf_edits,
    gguf_slots,
    interesting_ints,
    read_safetensors,
    write_safetensors,
)

pytestmark = pytest.mark.fuzz


# --- the inputs mutated, made once -------------------------------------------------------------------------------

class Layout:
    """A base file, its bytes, its header's integer fields and where its data starts and ends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.content = path.read_bytes()
        self.slots, self.data_offset = gguf_slots(path)
        self.data_end = check_gguf(path).data_end

    def mutated(self, edits: list[ByteEdit], target: Path) -> bool:
        """Write the base with `edits` applied to `target`; True when the result is certainly incomplete."""
        content = bytearray(self.content)
        for edit in sorted(edits, key=lambda edit: edit.cut):  # cuts last, so nothing is appended after them
            content = edit.apply(content)
        target.write_bytes(bytes(content))
        return len(content) < self.data_end


@pytest.fixture(scope="module")
def model_layout(kquant_f16: Path) -> Layout:
    return Layout(kquant_f16)


@pytest.fixture(scope="module")
def imatrix_files(kquant_f16: Path, test_cache: Path) -> tuple[Path, Path]:
    """An importance matrix of the tiny Llama, in llama.cpp's GGUF format and its legacy .dat, made once by
    `qdesk calibrate` in a child process."""
    made = test_cache / "kquant-tiny-llama-v1.imatrix.gguf"
    legacy = made.with_name("kquant-tiny-llama-v1.imatrix.dat")
    if not made.is_file():
        run = run_process("calibrate", kquant_f16, "-o", made, "--chunks", "2", "--ctx", "64")
        assert run.code == 0, run.stderr
    if not legacy.is_file():
        write_legacy_imatrix(read_imatrix(made), legacy)
    return made, legacy


@pytest.fixture(scope="module")
def plan_document(kquant_f16: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The per-tensor plan of Q4_K_M for the tiny Llama, as `quantize --plan-out` writes it."""
    folder = tmp_path_factory.mktemp("plan")
    run = run_in_process("quantize", kquant_f16, "-o", folder / "q.gguf", "--preset", "Q4_K_M", "--imatrix", "none",
                         "--plan-out", folder / "plan.json")
    assert run.code == 0, run.stderr
    return json.loads((folder / "plan.json").read_text())


@pytest.fixture(scope="module")
def secret(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file outside every checkpoint folder that no conversion may read: a valid safetensors file."""
    import numpy as np
    import safetensors.numpy

    path = tmp_path_factory.mktemp("elsewhere") / "secret.safetensors"
    safetensors.numpy.save_file({"model.norm.weight": np.full(64, 7.25, dtype=np.float32)}, str(path))
    return path


def _checkpoint_copy(source: Path, work: Path) -> Path:
    folder = work / "checkpoint"
    shutil.copytree(source, folder)
    return folder


# --- GGUF headers and metadata -----------------------------------------------------------------------------------

@hypothesis_settings(max_examples=examples(150))
@given(data=st.data())
def test_gguf_headers_through_info(model_layout: Layout, data: st.DataObject) -> None:
    edits = data.draw(gguf_edits(model_layout.slots, model_layout.data_offset, len(model_layout.content)))
    with case("GGUF header: info") as work:
        mutated = work / "model.gguf"
        incomplete = model_layout.mutated(edits, mutated)
        Contract.around([mutated], [], work, lambda: run_in_process("info", mutated, "--json"),
                        must_refuse=incomplete)


@hypothesis_settings(max_examples=examples(80))
@given(data=st.data())
def test_gguf_headers_through_models_import(model_layout: Layout, data: st.DataObject) -> None:
    edits = data.draw(gguf_edits(model_layout.slots, model_layout.data_offset, len(model_layout.content)))
    with case("GGUF header: models import") as work:
        mutated = work / "model.gguf"
        incomplete = model_layout.mutated(edits, mutated)
        models = work / "models"
        with environment(QDESK_MODELS_DIR=str(models)):
            run = Contract.around([mutated], [], work, lambda: run_in_process("models", "import", mutated),
                                  must_refuse=incomplete)
        kept = sorted(path.name for path in models.iterdir())
        assert kept == (["library.sqlite3", "model.gguf"] if run.code == 0 else ["library.sqlite3"])


@hypothesis_settings(max_examples=examples(25))
@given(data=st.data())
def test_gguf_headers_through_quantize(model_layout: Layout, data: st.DataObject) -> None:
    """The quantizer is llama.cpp's, in its own process: a header the checks pass reaches it there, never here."""
    edits = data.draw(gguf_edits(model_layout.slots, model_layout.data_offset, len(model_layout.content)))
    with case("GGUF header: quantize --imatrix none") as work:
        mutated, out = work / "model.gguf", work / "out.gguf"
        incomplete = model_layout.mutated(edits, mutated)
        Contract.around([mutated], [out], work, lambda: run_in_process(
            "quantize", mutated, "-o", out, "--preset", "Q8_0", "--imatrix", "none"), must_refuse=incomplete)


# --- safetensors headers, index files and configs: the converter -------------------------------------------------

def _safetensors_mutation(header: dict[str, Any]) -> st.SearchStrategy[tuple[str, Any]]:
    names = sorted(name for name in header if name != "__metadata__")
    field = st.tuples(st.just("field"), st.sampled_from(names), st.sampled_from(["dtype", "shape", "data_offsets"]),
                      st.one_of(JSON_ODDITIES, st.sampled_from(["F16", "BF16", "I8", "F64", "U8", "F8_E4M3"])))
    dimension = st.tuples(st.just("dimension"), st.sampled_from(names), st.integers(0, 2),
                          st.one_of(interesting_ints(64, 4), st.sampled_from([-1, -64, 2**40])))
    offset = st.tuples(st.just("offset"), st.sampled_from(names), st.integers(0, 1), st.integers(-64, 64))
    other = st.tuples(st.sampled_from(["drop", "duplicate", "rename", "length", "top-level", "truncate-json"]),
                      st.sampled_from(names), st.integers(-3, 3), JSON_ODDITIES)
    return st.one_of(field, dimension, offset, offset, other)


def _apply_safetensors(path: Path, mutation: tuple[str, Any, Any, Any]) -> None:
    """Apply one mutation to the file's header; one that no longer applies (an earlier mutation replaced the part
    it changes) leaves the file as it is."""
    try:
        header, data = read_safetensors(path)
        _mutate_header(path, header, data, mutation)
    except (TypeError, KeyError, AttributeError, IndexError, ValueError, struct.error):
        pass


def _mutate_header(path: Path, header: Any, data: bytes, mutation: tuple[str, Any, Any, Any]) -> None:
    kind, name, where, value = mutation
    declared = None
    if kind == "field":
        header[name][where] = value
    elif kind == "dimension":
        shape = header[name]["shape"]
        if where < len(shape):
            shape[where] = value
        else:
            shape.append(value)
    elif kind == "offset":
        header[name]["data_offsets"][where] += value
    elif kind == "drop":
        del header[name]
    elif kind == "duplicate":
        header[name + ".copy"] = dict(header[name])
    elif kind == "rename":
        header["model.layers.0.mystery.weight"] = header.pop(name)
    elif kind == "length":
        declared = len(json.dumps(header).encode()) + where * 7
    elif kind == "top-level":
        header = value
    elif kind == "truncate-json":
        encoded = json.dumps(header).encode()[:-1 - abs(where)]
        path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
        return
    write_safetensors(path, header, data, declared)


def _library_refuses(path: Path) -> bool:
    """Whether the safetensors library itself refuses the file (its header checks)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as opened:
            opened.keys()
    except Exception:  # SafetensorError, or the library's own complaint about the JSON
        return True
    return False


@hypothesis_settings(max_examples=examples(120))
@given(data=st.data())
def test_safetensors_headers_through_convert(tiny_llama_hf: Path, data: st.DataObject) -> None:
    header, _ = read_safetensors(tiny_llama_hf / "model.safetensors")
    mutations = data.draw(st.lists(_safetensors_mutation(header), min_size=1, max_size=2))
    with case("safetensors header: convert") as work:
        folder = _checkpoint_copy(tiny_llama_hf, work)
        for mutation in mutations:
            _apply_safetensors(folder / "model.safetensors", mutation)
        out = work / "out.gguf"
        refused_by_library = _library_refuses(folder / "model.safetensors")
        run = Contract.around([folder], [out], work, lambda: run_in_process("convert", folder, "-o", out),
                              must_refuse=refused_by_library)
        if run.code == 0:
            check_gguf(out)


_SHARD_NAMES = ["../secret.safetensors", "SECRET", "missing.safetensors", "", 5, None, [], "sub/../model.safetensors",
                "./model.safetensors", "/dev/zero", "/proc/self/environ", "linked.safetensors", "model.safetensors"]


@hypothesis_settings(max_examples=examples(60))
@given(shards=st.dictionaries(st.integers(0, 19), st.sampled_from(_SHARD_NAMES), min_size=1, max_size=3),
       whole=st.one_of(st.none(), JSON_ODDITIES))
def test_index_files_through_convert(tiny_llama_hf: Path, secret: Path, shards: dict[int, Any], whole: Any) -> None:
    """Shard names in model.safetensors.index.json, and links among the shards, may not lead outside the folder."""
    with case("safetensors index: convert") as work:
        folder = _checkpoint_copy(tiny_llama_hf, work)
        (folder / "sub").mkdir()
        (folder / "linked.safetensors").symlink_to(secret)
        header, _ = read_safetensors(folder / "model.safetensors")
        weight_map: dict[str, Any] = {name: "model.safetensors" for name in header if name != "__metadata__"}
        names = sorted(weight_map)
        outside = False
        for index, shard in shards.items():
            shard = str(secret) if shard == "SECRET" else shard
            weight_map[names[index % len(names)]] = shard
            if isinstance(shard, str) and shard:
                resolved = (folder / shard).resolve()
                outside |= not resolved.is_relative_to(folder.resolve())
        document: Any = {"metadata": {}, "weight_map": weight_map if whole is None else whole}
        (folder / "model.safetensors.index.json").write_text(json.dumps(document))
        out = work / "out.gguf"
        run = Contract.around([folder, secret], [out], work, lambda: run_in_process("convert", folder, "-o", out),
                              must_refuse=outside)
        if run.code == 0:
            assert b"\x00\x00\xe8\x40" * 64 not in out.read_bytes()  # 7.25 as float32: the secret's values


_CONFIG_KEYS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                "architectures", "model_type", "rope_parameters"]


@hypothesis_settings(max_examples=examples(80))
@given(changes=st.dictionaries(st.sampled_from(_CONFIG_KEYS),
                               st.one_of(JSON_ODDITIES, interesting_ints(64, 4), st.floats(allow_nan=False)),
                               min_size=1, max_size=3),
       removed=st.sets(st.sampled_from(_CONFIG_KEYS), max_size=2))
@example(changes={"max_position_embeddings": -1}, removed=set()).via("a negative integer was an internal error")
@example(changes={"num_hidden_layers": 2.5}, removed=set()).via("a fractional layer count was accepted")
@example(changes={"hidden_size": "64"}, removed=set()).via("a number written as text")
@example(changes={"architectures": True}, removed=set()).via("architectures not a list was an internal error")
@example(changes={"num_hidden_layers": 4294967295}, removed=set()).via("a huge layer count hung the converter")
@example(changes={"intermediate_size": -math.inf}, removed=set()).via("an infinite size was an internal error")
@example(changes={"head_dim": 10**400}, removed=set()).via("an integer no float holds")
def test_configs_through_convert(tiny_llama_hf: Path, changes: dict[str, Any], removed: set[str]) -> None:
    with case("config.json: convert") as work:
        folder = _checkpoint_copy(tiny_llama_hf, work)
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        for key in removed:
            config.pop(key, None)
        (folder / "config.json").write_text(json.dumps(config))
        out = work / "out.gguf"
        run = Contract.around([folder], [out], work, lambda: run_in_process("convert", folder, "-o", out))
        if run.code == 0:
            check_gguf(out)


# --- importance matrices, both formats ---------------------------------------------------------------------------

def _legacy_slots(content: bytes) -> list[Slot]:
    """The integer fields of a legacy .dat importance matrix: counts, name lengths, call and value counts."""
    slots = [Slot(0, 4, struct.unpack_from("<i", content, 0)[0], "entry count")]
    position = 4
    for _ in range(slots[0].value):
        name_length = struct.unpack_from("<i", content, position)[0]
        slots.append(Slot(position, 4, name_length, "name length"))
        position += 4 + name_length
        ncall, nval = struct.unpack_from("<ii", content, position)
        slots += [Slot(position, 4, ncall, "call count"), Slot(position + 4, 4, nval, "value count")]
        position += 8 + 4 * nval
    if position + 8 <= len(content):
        slots.append(Slot(position, 4, struct.unpack_from("<i", content, position)[0], "chunk count"))
        slots.append(Slot(position + 4, 4, struct.unpack_from("<i", content, position + 4)[0], "dataset name length"))
    return slots


_ODD_FLOATS = [math.nan, math.inf, -math.inf, -1.0, 0.0, 1e38, -0.0, 1e-45]


@dataclass(frozen=True)
class MatrixLayout:
    """An importance-matrix file to mutate: its bytes, its integer fields, where its values start, and below which
    length a cut file is certainly incomplete."""

    content: bytes
    slots: list[Slot]
    values_start: int
    incomplete_below: int


@pytest.fixture(scope="module")
def matrix_layouts(imatrix_files: tuple[Path, Path]) -> dict[bool, MatrixLayout]:
    """By `legacy`: the GGUF importance matrix and the legacy .dat one."""
    made, legacy = imatrix_files
    slots, data_offset = gguf_slots(made)
    legacy_content = legacy.read_bytes()
    return {
        False: MatrixLayout(made.read_bytes(), slots, data_offset, check_gguf(made).data_end),
        # a legacy cut between the entries and the optional dataset trailer leaves a good file
        True: MatrixLayout(legacy_content, _legacy_slots(legacy_content), 4, 0),
    }


@hypothesis_settings(max_examples=examples(60))
@given(data=st.data(), legacy=st.booleans())
def test_importance_matrices_through_quantize(matrix_layouts: dict[bool, MatrixLayout], kquant_f16: Path,
                                              data: st.DataObject, legacy: bool) -> None:
    layout = matrix_layouts[legacy]
    content = layout.content
    value_edit = st.builds(lambda at, value: ByteEdit(at - at % 4, struct.pack("<f", value)),
                           st.integers(layout.values_start, len(content) - 4), st.sampled_from(_ODD_FLOATS))
    edits = data.draw(st.one_of(gguf_edits(layout.slots, len(content) if legacy else layout.values_start,
                                           len(content)),
                                st.lists(value_edit, min_size=1, max_size=3)))
    with case("importance matrix: quantize --imatrix FILE") as work:
        mutated = work / ("m.imatrix.dat" if legacy else "m.imatrix.gguf")
        buffer = bytearray(content)
        for edit in sorted(edits, key=lambda edit: edit.cut):
            buffer = edit.apply(buffer)
        mutated.write_bytes(bytes(buffer))
        model, out = work / "model.gguf", work / "out.gguf"
        shutil.copyfile(kquant_f16, model)
        Contract.around([mutated, model], [out], work, lambda: run_in_process(
            "quantize", model, "-o", out, "--preset", "Q4_K_M", "--imatrix", mutated),
            must_refuse=len(buffer) < layout.incomplete_below)


# --- plan files --------------------------------------------------------------------------------------------------

_TYPE_NAMES = ["q4_K", "q6_K", "q8_0", "f16", "f32", "q2_K", "q4_0", "iq2_xxs", "tq1_0", "Q4_K", "q3_k", "nope",
               "bf16", "q5_1", "i8", "mxfp4"]


def _plan_mutation(document: dict[str, Any]) -> st.SearchStrategy[tuple[str, Any, Any]]:
    count = len(document["tensors"])
    tensor_field = st.tuples(st.sampled_from(["type", "shape", "name", "source_type", "gain", "predicted_kld"]),
                             st.integers(0, count - 1), st.one_of(JSON_ODDITIES, st.sampled_from(_TYPE_NAMES)))
    retype = st.tuples(st.just("type"), st.integers(0, count - 1), st.sampled_from(_TYPE_NAMES))
    dimension = st.tuples(st.just("dimension"), st.integers(0, count - 1), interesting_ints(256, 4))
    top = st.tuples(st.sampled_from(["format", "base", "label", "tensors", "bytes", "bpw", "encoder"]),
                    st.just(None), st.one_of(JSON_ODDITIES, st.sampled_from(["Q4_K_M", "Q8_0", "ggml", "F16"])))
    structure = st.tuples(st.sampled_from(["drop", "duplicate", "whole"]), st.integers(0, count - 1), JSON_ODDITIES)
    return st.one_of(retype, retype, tensor_field, dimension, top, structure)


def _apply_plan(document: Any, mutation: tuple[str, Any, Any]) -> Any:
    """The document with one mutation applied; one that no longer applies (an earlier mutation replaced the part
    it changes) leaves it as it is."""
    try:
        return _mutate_plan(document, mutation)
    except (TypeError, KeyError, IndexError, AttributeError):
        return document


def _mutate_plan(document: Any, mutation: tuple[str, Any, Any]) -> Any:
    kind, index, value = mutation
    tensors = document["tensors"] if isinstance(document, dict) and isinstance(document.get("tensors"), list) else []
    if kind == "whole":
        return value
    if kind in ("format", "base", "label", "tensors", "bytes", "bpw", "encoder"):
        if kind == "encoder" and value == "feedback":
            value = "ggml"  # feedback calibrates with llama.cpp in this process (until child isolation lands)
        document[kind] = value
    elif not tensors:
        return document
    elif kind == "dimension":
        tensors[index % len(tensors)]["shape"][0] = value
    elif kind == "drop":
        del tensors[index % len(tensors)]
    elif kind == "duplicate":
        tensors.append(dict(tensors[index % len(tensors)]))
    else:
        tensors[index % len(tensors)][kind] = value
    return document


@hypothesis_settings(max_examples=examples(50))
@given(mutations=st.data())
def test_plans_through_quantize(plan_document: dict[str, Any], kquant_f16: Path, mutations: st.DataObject) -> None:
    chosen = mutations.draw(st.lists(_plan_mutation(plan_document), min_size=1, max_size=2))
    with case("plan: quantize --plan") as work:
        document: Any = json.loads(json.dumps(plan_document))
        for mutation in chosen:
            document = _apply_plan(document, mutation)
        plan, model, out = work / "plan.json", work / "model.gguf", work / "out.gguf"
        plan.write_text(json.dumps(document))
        shutil.copyfile(kquant_f16, model)
        Contract.around([plan, model], [out], work, lambda: run_in_process(
            "quantize", model, "-o", out, "--plan", plan, "--imatrix", "none"))


# --- a sample through real processes: the exit status a crash would leave --------------------------------------

@hypothesis_settings(max_examples=examples(6))
@given(data=st.data())
def test_a_sample_through_real_processes(model_layout: Layout, tiny_llama_hf: Path, data: st.DataObject) -> None:
    edits = data.draw(gguf_edits(model_layout.slots, model_layout.data_offset, len(model_layout.content)))
    header, _ = read_safetensors(tiny_llama_hf / "model.safetensors")
    mutation = data.draw(_safetensors_mutation(header))
    with case("real process: info") as work:
        mutated = work / "model.gguf"
        incomplete = model_layout.mutated(edits, mutated)
        Contract.around([mutated], [], work, lambda: run_process("info", mutated), must_refuse=incomplete)
    with case("real process: convert") as work:
        folder = _checkpoint_copy(tiny_llama_hf, work)
        _apply_safetensors(folder / "model.safetensors", mutation)
        out = work / "out.gguf"
        Contract.around([folder], [out], work, lambda: run_process("convert", folder, "-o", out),
                        must_refuse=_library_refuses(folder / "model.safetensors"))


def test_the_contract_catches_what_it_should(tmp_path: Path) -> None:
    """The checks above can fail: a crash's status, two lines, a traceback and a changed input are each caught."""
    from tests.cli_support import CliRun

    victim = tmp_path / "input.bin"
    victim.write_bytes(b"before")
    for bad in (CliRun(134, "", ""), CliRun(-6, "", ""), CliRun(1, "", "qdesk: one.\nqdesk: two.\n"),
                CliRun(1, "", "Traceback (most recent call last):\n"),
                CliRun(1, "", "qdesk: internal error (KeyError: 'x'); run again with --debug.\n")):
        with pytest.raises(AssertionError):
            Contract.around([victim], [], tmp_path, lambda bad=bad: bad)
    with pytest.raises(AssertionError):
        Contract.around([victim], [], tmp_path, lambda: (victim.write_bytes(b"after"), CliRun(0, "", ""))[1])
    with pytest.raises(AssertionError):
        Contract.around([victim], [], tmp_path, lambda: CliRun(0, "", ""), must_refuse=True)
