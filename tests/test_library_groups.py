"""Library groups by the model's identity: architecture, shape and normalised family name; groups can be renamed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from qdesk.cli import main
from qdesk.library.identity import display_name, group_entries
from qdesk.library.store import Library


@pytest.fixture
def library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Library:
    monkeypatch.setenv("QDESK_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("QDESK_MODELS_DIR", str(tmp_path / "models"))
    return Library(tmp_path / "models")


def test_one_model_under_two_names_is_one_group(library: Library, starter_gguf: Path, smollm2_f16: Path,
                                                kquant_f16: Path) -> None:
    starter = library.ensure_starter()
    f16 = library.import_model(smollm2_f16, link=True)
    other = library.import_model(kquant_f16, link=True)
    assert starter is not None and starter.family_key == f16.family_key == "smollm2"
    assert starter.shape_key == f16.shape_key != other.shape_key
    # The same checkpoint converted from a folder named "smollm2-135M" (gguf-py names it so: basename smollm2).
    from_folder = dataclasses.replace(f16, id="smollm2-135M-F16", base_model="smollm2-135M")
    groups = group_entries([starter, from_folder, other])
    assert len(groups) == 2
    smol = next(group for group in groups if starter in group.entries)
    assert set(smol.entries) == {starter, from_folder} and smol.entries[0] == from_folder  # largest first
    assert smol.name == "SmolLM2-135M-Instruct"
    assert display_name(starter, smol.name) == "SmolLM2-135M-Instruct · Q4_1"


def test_a_renamed_group_keeps_its_name(library: Library, starter_gguf: Path, smollm2_f16: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    library.ensure_starter()
    f16 = library.import_model(smollm2_f16, link=True)
    group = library.group_of(f16.id)
    library.rename_group(group.key, "  My   SmolLM  ")
    again = Library(library.root)
    assert list(again.groups()) == ["My SmolLM"]
    assert len(again.groups()["My SmolLM"]) == 2

    assert main(["models", "rename", f16.id]) == 0  # no name: back to what the files say
    assert "now shown as SmolLM2-135M-Instruct" in capsys.readouterr().out
    assert list(Library(library.root).groups()) == ["SmolLM2-135M-Instruct"]
