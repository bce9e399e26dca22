"""The model library: imports, registered folders, the persisted index, grouping, and clear errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from converters.core.errors import GGUFFileError, UserError
from converters.core.jobs import Progress
from converters.core.paths import MODELS_DIR_ENV
from converters.quantization.quantize import quantize
from qdesk.app.starter import starter_model_path
from qdesk.library.info import read_model_info
from qdesk.library.store import INDEX_NAME, Library, LibraryEntry, LibraryError, render_text


@pytest.fixture(scope="module", autouse=True)
def quiet_llama() -> None:
    import llama_cpp

    global _silence
    _silence = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(_silence, None)


@pytest.fixture(scope="module")
def variants(kquant_f16: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Llama as F16 and quantized to Q8_0 and Q4_K_M by qdesk (read-only for tests)."""
    folder = tmp_path_factory.mktemp("variants")
    made = {"F16": folder / "tiny-F16.gguf"}
    shutil.copy2(kquant_f16, made["F16"])
    for preset in ("Q8_0", "Q4_K_M"):
        made[preset] = quantize(made["F16"], folder / f"tiny-{preset}.gguf", preset, imatrix="none").path
    return made


def by_id(library: Library) -> dict[str, LibraryEntry]:
    return {entry.id: entry for entry in library.entries()}


def gguf_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != INDEX_NAME)


def one_sentence(error: BaseException) -> str:
    message = str(error)
    assert message.endswith((".", "?")) and "\n" not in message and "Traceback" not in message
    return message


# --- importing ----------------------------------------------------------------------------------

def test_import_copies_the_file_and_records_its_facts(kquant_f16: Path, tmp_path: Path) -> None:
    library = Library(tmp_path / "models")
    entry = library.import_model(kquant_f16)

    assert entry.path == tmp_path / "models" / kquant_f16.name
    assert entry.path.is_file() and not entry.path.is_symlink()
    assert entry.path.read_bytes() == kquant_f16.read_bytes()
    assert (entry.source, entry.read_only, entry.status, entry.problem) == ("imported", False, "ok", None)
    info = read_model_info(kquant_f16)
    assert (entry.name, entry.architecture, entry.file_type) == (info.name, info.architecture, info.file_type)
    assert (entry.parameters, entry.context_length, entry.bytes) == (info.parameters, info.context_length,
                                                                     info.file_bytes)
    assert entry.bpw == pytest.approx(info.bits_per_weight, abs=1e-3)
    assert entry.has_chat_template == info.has_chat_template
    assert entry.variant == "F16"
    assert entry.id == kquant_f16.stem
    assert json.loads(json.dumps(entry.to_json()))["path"] == str(entry.path)

    again = library.import_model(kquant_f16)  # the same unchanged source: the existing entry, no second copy
    assert again.id == entry.id
    assert gguf_files(tmp_path / "models") == [kquant_f16.name]
    assert library.import_model(entry.path).id == entry.id  # a file already in the library: the same


def test_import_link_points_at_the_original(kquant_f16: Path, tmp_path: Path) -> None:
    original = tmp_path / "elsewhere" / "tiny.gguf"
    original.parent.mkdir()
    shutil.copy2(kquant_f16, original)
    library = Library(tmp_path / "models")

    entry = library.import_model(original, link=True)
    assert entry.path.is_symlink() and entry.path.resolve() == original.resolve()
    assert entry.status == "ok" and entry.parameters == read_model_info(original).parameters

    library.remove(entry.id)  # removing a linked import removes the link, never the original
    assert not entry.path.exists() and not entry.path.is_symlink()
    assert original.is_file()
    assert library.entries() == []


def test_import_of_a_name_already_taken_gets_its_own_name(kquant_f16: Path, tmp_path: Path) -> None:
    other = tmp_path / "other" / kquant_f16.name
    other.parent.mkdir()
    shutil.copyfile(kquant_f16, other)  # same name, another file (newer mtime)
    library = Library(tmp_path / "models")
    first, second = library.import_model(kquant_f16), library.import_model(other)
    assert first.id != second.id and first.path != second.path
    assert second.id == f"{kquant_f16.stem}-2"


def test_importing_what_is_not_gguf_copies_nothing(tmp_path: Path) -> None:
    library = Library(tmp_path / "models")
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "llama"}')
    with pytest.raises(GGUFFileError) as raised:
        library.import_model(config)
    assert "JSON" in one_sentence(raised.value)
    with pytest.raises(GGUFFileError) as raised:
        library.import_model(tmp_path / "nowhere.gguf")
    assert "does not exist" in one_sentence(raised.value)
    assert gguf_files(tmp_path / "models") == []
    assert library.entries() == []


def test_remove_of_an_unknown_name_lists_close_names(kquant_f16: Path, tmp_path: Path) -> None:
    library = Library(tmp_path / "models")
    entry = library.import_model(kquant_f16)
    with pytest.raises(LibraryError) as raised:
        library.remove(entry.id[:-1] + "x")
    assert entry.id in one_sentence(raised.value)
    with pytest.raises(UserError) as raised:
        Library(tmp_path / "empty").remove("anything")
    assert "empty" in one_sentence(raised.value)


# --- grouping -----------------------------------------------------------------------------------

def test_variants_of_one_model_are_grouped_largest_first(variants: dict[str, Path], tmp_path: Path) -> None:
    library = Library(tmp_path / "models")
    for path in variants.values():
        library.import_model(path)
    groups = library.groups()

    assert list(groups) == ["Hf"]  # the tiny model's general.name; quantizing keeps general.*
    assert [entry.variant for entry in groups["Hf"]] == ["F16", "Q8_0", "Q4_K_M"]
    q4 = by_id(library)["tiny-Q4_K_M"]
    assert q4.file_type == "Q4_K_M"
    assert q4.provenance["qdesk.plan"] == "preset Q4_K_M"
    assert q4.provenance["qdesk.source"] == "tiny-F16.gguf"
    assert q4.provenance["qdesk.imatrix"] == "none"
    assert by_id(library)["tiny-F16"].provenance == {}

    text = render_text(groups)
    assert "Hf: F16, Q8_0, Q4_K_M" in text
    assert render_text(library.entries()) == text
    lines = [line for line in text.splitlines() if line.startswith("  tiny-")]
    assert len(lines) == 3 and len({line.index("imported") for line in lines}) == 1  # aligned columns


def test_a_plan_of_its_own_is_a_mix_variant(variants: dict[str, Path], tmp_path: Path) -> None:
    from converters.quantization.quantize import preset_plan

    plan = preset_plan(variants["F16"], "Q4_K_M").with_types({"blk.0.attn_q.weight": "q8_0"}, label="test mix")
    mixed = quantize(variants["F16"], tmp_path / "tiny-mix.gguf", plan, imatrix="none").path
    library = Library(tmp_path / "models")
    for path in (variants["F16"], mixed):
        library.import_model(path, link=True)
    entry = by_id(library)["tiny-mix"]
    assert entry.provenance["qdesk.plan"] == "test mix"
    assert entry.variant == f"mix-{entry.bpw:.1f}bpw"
    assert [e.variant for e in library.groups()["Hf"]] == ["F16", entry.variant]


@pytest.mark.slow
def test_base_model_follows_the_gguf_naming_keys(smollm2_f16: Path, tmp_path: Path) -> None:
    library = Library(tmp_path / "models")
    entry = library.import_model(smollm2_f16, link=True)
    assert entry.base_model == "SmolLM2-135M-Instruct"
    assert entry.variant == "F16"


# --- the index ----------------------------------------------------------------------------------

def test_the_index_persists_and_unchanged_files_are_not_read_again(variants: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    root = tmp_path / "models"
    first = Library(root)
    for path in variants.values():
        first.import_model(path, link=True)
    before = first.entries()

    second = Library(root)
    summary = second.refresh()
    assert summary.read == 0 and summary.missing == 0
    assert second.entries() == before


def test_models_dir_env_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MODELS_DIR_ENV, str(tmp_path / "chosen"))
    assert Library().root == tmp_path / "chosen"
    assert (tmp_path / "chosen" / INDEX_NAME).is_file()


def test_a_file_deleted_or_changed_behind_the_apps_back_is_noticed(variants: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    library = Library(tmp_path / "models")
    f16 = library.import_model(variants["F16"])
    q8 = library.import_model(variants["Q8_0"])

    f16.path.unlink()
    assert by_id(library)[f16.id].status == "missing"
    assert "deleted or moved" in (by_id(library)[f16.id].problem or "")
    assert library.refresh().missing == 1
    assert by_id(library)[f16.id].status == "missing"

    shutil.copyfile(variants["Q4_K_M"], q8.path)  # other bytes under the same name
    changed = by_id(library)[q8.id]
    assert changed.status == "changed" and changed.file_type == "Q8_0"  # noticed, not yet trusted
    assert library.refresh().read == 1
    reread = by_id(library)[q8.id]
    assert (reread.status, reread.file_type, reread.variant) == ("ok", "Q4_K_M", "Q4_K_M")

    shutil.copyfile(variants["F16"], f16.path)  # put back: read again
    library.refresh()
    assert by_id(library)[f16.id].status == "ok"


def test_broken_files_in_a_registered_folder_are_listed_with_the_reason(kquant_f16: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    shutil.copy2(kquant_f16, folder / "sub" / "good.gguf")
    data = kquant_f16.read_bytes()
    (folder / "truncated.gguf").write_bytes(data[: len(data) // 2])
    (folder / "notes.gguf").write_text("not a model")
    (folder / "readme.txt").write_text("ignored")

    library = Library(tmp_path / "models")
    found = {entry.id: entry for entry in library.register_folder(folder, "mine")}
    assert set(found) == {"good", "truncated", "notes"}
    assert found["good"].status == "ok" and found["good"].source == "registered:mine" and found["good"].read_only
    assert found["truncated"].status == "broken" and "truncated" in (found["truncated"].problem or "")
    assert found["notes"].status == "broken" and "not a GGUF file" in (found["notes"].problem or "")
    assert "broken: " in render_text(library.entries())

    (folder / "notes.gguf").unlink()
    shutil.copy2(kquant_f16, folder / "later.gguf")
    reports: list[Progress] = []
    summary = library.refresh(reports.append)
    assert summary.read == 1 and summary.missing == 1 and summary.broken == 1
    assert reports[-1].done == reports[-1].total == 1
    assert by_id(library)["later"].status == "ok"

    library.remove("good")  # registered: forgotten, never deleted, and not found again by a refresh
    assert (folder / "sub" / "good.gguf").is_file()
    library.refresh()
    assert "good" not in by_id(library)


def test_registering_what_is_not_a_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LibraryError) as raised:
        Library(tmp_path / "models").register_folder(tmp_path / "nowhere")
    assert "not a folder" in one_sentence(raised.value)


def test_a_gguf_dropped_into_the_models_folder_is_picked_up(kquant_f16: Path, tmp_path: Path) -> None:
    library = Library(tmp_path / "models")
    shutil.copy2(kquant_f16, tmp_path / "models" / "dropped.gguf")
    assert library.import_model(tmp_path / "models" / "dropped.gguf").id == "dropped"  # not a second copy
    assert gguf_files(tmp_path / "models") == ["dropped.gguf"]
    library.refresh()
    assert by_id(library)["dropped"].source == "imported"


# --- other applications' folders ----------------------------------------------------------------

def test_known_folders_are_discovered(kquant_f16: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    data = kquant_f16.read_bytes()

    hf_repo = home / ".cache" / "huggingface" / "hub" / "models--someone--tiny-GGUF"
    blob = hf_repo / "blobs" / "0123abcd"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    for revision in ("aaaa", "bbbb"):  # two snapshots linking the same blob: one model
        snapshot = hf_repo / "snapshots" / revision
        snapshot.mkdir(parents=True)
        (snapshot / "tiny-F16.gguf").symlink_to(blob)

    lmstudio = home / ".lmstudio" / "models" / "publisher" / "tiny-repo"
    lmstudio.mkdir(parents=True)
    (lmstudio / "tiny-lm-F16.gguf").write_bytes(data)

    ollama = home / ".ollama" / "models"
    (ollama / "blobs").mkdir(parents=True)
    model_digest = "1" * 64
    (ollama / "blobs" / f"sha256-{model_digest}").write_bytes(data)
    (ollama / "blobs" / f"sha256-{'2' * 64}").write_text('{"template": "not a model"}')
    manifest = ollama / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{model_digest}"},
        {"mediaType": "application/vnd.ollama.image.template", "digest": f"sha256:{'2' * 64}"},
    ]}))

    library = Library(tmp_path / "models")
    assert library.register_known_folders(home=home) == ["hf-cache", "lmstudio", "ollama"]
    entries = library.entries()
    assert sorted((e.id, e.source) for e in entries) == [
        ("tiny-F16", "registered:hf-cache"),
        ("tiny-lm-F16", "registered:lmstudio"),
        ("tiny:latest", "registered:ollama"),
    ]
    assert all(e.status == "ok" and e.read_only for e in entries)
    assert len(library.groups()) == 1

    library.remove("tiny:latest")
    assert (ollama / "blobs" / f"sha256-{model_digest}").is_file()
    assert Library(tmp_path / "empty").register_known_folders(home=tmp_path / "nobody") == []


def test_the_hf_cache_is_the_one_named_now_and_a_damaged_repository_still_counts(
        kquant_f16: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_CACHE is read when the library looks (huggingface_hub's constant was fixed at its import); the cache
    is read through huggingface_hub's scan_cache_dir, which drops a repository with one dangling link entirely:
    that one is walked instead."""
    cache = tmp_path / "elsewhere" / "hub"
    for repo, name in (("models--a--sound-GGUF", "sound-F16.gguf"), ("models--b--damaged-GGUF", "damaged-F16.gguf")):
        blob = cache / repo / "blobs" / f"{len(name):040x}"
        blob.parent.mkdir(parents=True)
        shutil.copyfile(kquant_f16, blob)
        snapshot = cache / repo / "snapshots" / ("1" * 40)
        snapshot.mkdir(parents=True)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (cache / "models--b--damaged-GGUF" / "snapshots" / ("1" * 40) / "gone.json").symlink_to("../../blobs/nothing")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))

    library = Library(tmp_path / "models")
    assert library.register_known_folders() == ["hf-cache"]
    entries = library.entries()
    assert sorted(entry.id for entry in entries) == ["damaged-F16", "sound-F16"]
    assert all(entry.source == "registered:hf-cache" and entry.status == "ok" for entry in entries)


# --- the starter model --------------------------------------------------------------------------

def test_the_starter_is_registered_once_in_place(tmp_path: Path) -> None:
    root = tmp_path / "models"
    library = Library(root)
    entry = library.ensure_starter()
    assert entry is not None
    assert entry.path == starter_model_path()
    assert (entry.source, entry.read_only, entry.status) == ("starter", True, "ok")
    assert (entry.base_model, entry.variant, entry.file_type) == ("SmolLM2-135M-Instruct", "Q4_1", "Q4_1")
    assert entry.architecture == "llama" and entry.has_chat_template and entry.context_length == 8192
    assert gguf_files(root) == []  # not copied

    again = Library(root)
    assert again.ensure_starter() == entry
    assert again.refresh().read == 0
    assert [e.id for e in again.entries()] == [entry.id]

    again.remove(entry.id)  # forgotten, kept on disk, and not offered again
    assert starter_model_path().is_file()
    assert again.ensure_starter() is None
    assert again.entries() == []


def test_an_unwritable_models_folder_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(LibraryError) as raised:
        Library(blocker / "models")
    assert "choose a models folder" in one_sentence(raised.value)


def test_an_index_from_a_newer_qdesk_is_refused(tmp_path: Path) -> None:
    import sqlite3

    root = tmp_path / "models"
    Library(root)
    with sqlite3.connect(root / INDEX_NAME) as connection:
        connection.execute("PRAGMA user_version = 99")
    connection.close()
    with pytest.raises(LibraryError) as raised:
        Library(root)
    assert "newer qdesk" in one_sentence(raised.value)
    assert os.path.exists(root / INDEX_NAME)


# --- two processes at once, and an index that is not qdesk's -------------------------------------

_IMPORT_WHEN_TOLD = """
import os, sys, time
from pathlib import Path
from qdesk.cli import main
import qdesk.library.store
go = Path(sys.argv[1])
(go.parent / f"ready-{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.001)
sys.exit(main(["models", "import", *sys.argv[2:]]))
"""


@pytest.mark.parametrize("link", [False, True], ids=["copy", "link"])
def test_imports_of_one_name_at_once_keep_every_model(variants: dict[str, Path], tmp_path: Path,
                                                          link: bool) -> None:
    """Three real processes import different files called model.gguf at the same moment: all succeed, and the
    library holds the three files, each under its own name and each the file that was imported."""
    import subprocess
    import sys
    import time

    sources = []
    for preset in ("F16", "Q8_0", "Q4_K_M"):
        source = tmp_path / preset / "model.gguf"
        source.parent.mkdir()
        shutil.copyfile(variants[preset], source)
        sources.append(source)
    go = tmp_path / "go"
    env = {**os.environ, MODELS_DIR_ENV: str(tmp_path / "models")}
    Library(tmp_path / "models")  # the index exists before the race, as it does for a user
    processes = [subprocess.Popen([sys.executable, "-c", _IMPORT_WHEN_TOLD, str(go), str(source),
                                   *(["--link"] if link else [])],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for source in sources]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < len(processes):  # every process has started and waits for the word
        assert time.monotonic() < deadline and all(process.poll() is None for process in processes)
        time.sleep(0.01)
    go.touch()
    results = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], results
    names = ["model-2.gguf", "model-3.gguf", "model.gguf"]
    assert gguf_files(tmp_path / "models") == names
    placed = {(tmp_path / "models" / name).read_bytes() for name in names}
    assert placed == {source.read_bytes() for source in sources}
    entries = Library(tmp_path / "models").entries()
    assert sorted(entry.id for entry in entries) == ["model", "model-2", "model-3"]
    assert {entry.status for entry in entries} == {"ok"}


@pytest.mark.parametrize("kind", ["garbage", "foreign-schema", "foreign-schema-at-our-version"])
def test_an_index_that_is_not_qdesks_gets_a_way_out_and_nothing_is_deleted(kquant_f16: Path, tmp_path: Path,
                                                                           kind: str) -> None:
    import sqlite3
    import subprocess
    import sys

    root = tmp_path / "models"
    Library(root).import_model(kquant_f16)
    index = root / INDEX_NAME
    index.unlink()
    if kind == "garbage":
        index.write_bytes(bytes(range(256)) * 64)
    else:
        with sqlite3.connect(index) as connection:
            connection.execute("CREATE TABLE files (name TEXT, blob BLOB)")
            connection.execute("INSERT INTO files VALUES ('theirs', x'00')")
            if kind == "foreign-schema-at-our-version":
                connection.execute("PRAGMA user_version = 1")
        connection.close()
    before = index.read_bytes()
    with pytest.raises(LibraryError) as raised:
        Library(root).entries()
    assert "qdesk models scan --rebuild" in one_sentence(raised.value)
    env = {**os.environ, MODELS_DIR_ENV: str(root)}
    listed = subprocess.run([sys.executable, "-m", "qdesk", "models", "list"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 1 and "Traceback" not in listed.stderr and "internal error" not in listed.stderr
    assert len(listed.stderr.strip().splitlines()) == 1 and "--rebuild" in listed.stderr
    assert index.read_bytes() == before  # refusing changed nothing

    rebuilt = subprocess.run([sys.executable, "-m", "qdesk", "models", "scan", "--rebuild"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stderr
    kept = [path for path in root.iterdir() if path.name.startswith(INDEX_NAME + ".set-aside-")]
    assert len(kept) == 1 and kept[0].read_bytes() == before  # set aside, never deleted
    assert [entry.path.name for entry in Library(root).entries() if entry.source == "imported"] == [kquant_f16.name]


def test_a_rebuild_keeps_the_registered_folders_of_a_readable_index(kquant_f16: Path, tmp_path: Path) -> None:
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    shutil.copyfile(kquant_f16, shelf / "kept.gguf")
    Library(tmp_path / "models").register_folder(shelf)
    library, kept = Library.rebuilt(tmp_path / "models")
    assert kept is not None and kept.is_file()
    assert [entry.path for entry in library.entries() if entry.source.startswith("registered")] == [
        shelf.absolute() / "kept.gguf"]
