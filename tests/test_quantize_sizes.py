"""Preset sizes before anything runs: llama.cpp's own plan, for a GGUF and for a checkpoint through its skeleton."""

from __future__ import annotations

from pathlib import Path

from converters.core.gguf_file import check_gguf
from converters.writing.convert import write_skeleton
from qdesk.quantization.sizes import preview_sizes


def test_a_checkpoint_is_sized_by_each_presets_own_rules(smollm2_hf: Path, smollm2_f16: Path) -> None:
    presets = ("Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M")
    from_checkpoint = preview_sizes(smollm2_hf, presets)
    from_gguf = preview_sizes(smollm2_f16, presets)
    sizes = {name: choice.file_bytes for name, choice in from_checkpoint.presets.items()}
    assert sizes == {name: choice.file_bytes for name, choice in from_gguf.presets.items()}
    assert len(set(sizes.values())) == len(presets)  # the per-family guess gave Q3_K_S/M/L and Q4_K_S/M one size each
    assert sizes["Q4_K_M"] > sizes["Q4_K_S"] and all(choice.exact for choice in from_checkpoint.presets.values())


def test_the_skeleton_has_the_converted_header_and_no_data(smollm2_hf: Path, smollm2_f16: Path,
                                                            tmp_path: Path) -> None:
    skeleton = write_skeleton(smollm2_hf, tmp_path / "skeleton.gguf")
    header, converted = check_gguf(skeleton), check_gguf(smollm2_f16)
    assert [(t.name, tuple(t.shape), t.type) for t in header.tensors] == [
        (t.name, tuple(t.shape), t.type) for t in converted.tensors]
    assert skeleton.stat().st_size == smollm2_f16.stat().st_size
    assert skeleton.stat().st_blocks * 512 < skeleton.stat().st_size // 10  # the data is a hole, not written zeros
