"""LoRA adapters: PEFT folder → GGUF adapter, applied by llama.cpp at load time or merged into a float GGUF.

The reference is transformers with PEFT applying the same adapter (float32, eager attention), so the logits agree
to rounding (≤ 1e-3 of the logit scale, argmax identical). The adapters' B matrices are random, not PEFT's zeros,
so an adapter converted wrongly (A/B swapped, q/k rows not reordered, scale off) moves the logits by whole units.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from converters.core.errors import CheckpointError, UnsupportedModelError
from converters.writing.convert import convert_checkpoint
from converters.writing.lora import convert_adapter
from converters.writing.lora_merge import MergeError, merge_adapters
from qdesk.chat.compare import compare
from qdesk.chat.engine import LoadOptions, SamplingOptions, load_model
from qdesk.chat.lora import AdapterError, LoraChoice, parse_lora, parse_model_spec
from tests.builders.adapters import build_lora_adapter, peft_logits
from tests.builders.checkpoints import build_tiny_checkpoint
from tests.test_convert_architectures import (
    CONTEXT,
    GGML_TYPE_F32,
    RELATIVE_TOLERANCE,
    assert_logits_match,
    llama_cpp_logits,
    prompt,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("base"), "llama", tied=False)


@pytest.fixture(scope="module")
def base_gguf(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_checkpoint(base, tmp_path_factory.mktemp("gguf") / "base-F32.gguf", outtype="f32").path


@pytest.fixture(scope="module")
def adapter(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lora_adapter(base, tmp_path_factory.mktemp("adapter") / "style", base_model_name_or_path=str(base))


@pytest.fixture(scope="module")
def adapter_gguf(adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_adapter(adapter, tmp_path_factory.mktemp("adapter-gguf") / "style-F32-LoRA.gguf",
                           outtype="f32").path


def logits_with_adapter(model: Path, adapter: Path, ids: list[int], scale: float) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(str(model), n_ctx=CONTEXT, n_batch=CONTEXT, logits_all=True, type_k=GGML_TYPE_F32,
                          type_v=GGML_TYPE_F32, n_threads=1, verbose=False, lora_path=str(adapter), lora_scale=scale)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_adapter_logits_match_peft(scale: float, base: Path, base_gguf: Path, adapter: Path,
                                   adapter_gguf: Path) -> None:
    ids = prompt()
    reference = peft_logits(base, adapter, ids, scale)
    assert np.abs(reference - llama_cpp_logits(base_gguf, ids)).max() > 100 * RELATIVE_TOLERANCE * \
        np.abs(reference).max(), "the adapter must change the model for this test to mean anything"
    assert_logits_match(logits_with_adapter(base_gguf, adapter_gguf, ids, scale), reference)


def test_rslora_with_rank_and_alpha_patterns_matches_peft(base: Path, base_gguf: Path, tmp_path: Path) -> None:
    folder = build_lora_adapter(base, tmp_path / "rs", r=8, lora_alpha=12, use_rslora=True,
                                rank_pattern={"down_proj": 4}, alpha_pattern={"q_proj": 3.0},
                                target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
    converted = convert_adapter(folder, tmp_path / "rs.gguf", base=base, outtype="f32")
    ids = prompt()
    assert_logits_match(logits_with_adapter(base_gguf, converted.path, ids, 1.0), peft_logits(base, folder, ids))


def test_the_adapter_file_is_llama_cpps_format(adapter_gguf: Path, base: Path) -> None:
    reader = gguf.GGUFReader(adapter_gguf)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == 16.0
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["general.base_model.0.name"].contents() == base.name
    shapes = {tensor.name: tuple(int(d) for d in tensor.shape) for tensor in reader.tensors}
    assert shapes["blk.0.attn_q.weight.lora_a"] == (64, 8)  # ggml order: ne0 = the layer's input
    assert shapes["blk.0.attn_q.weight.lora_b"] == (8, 64)
    assert shapes["blk.1.ffn_down.weight.lora_b"] == (8, 64)
    assert len(shapes) == 2 * 7 * 2
    from qdesk.library.info import read_model_info, render_text

    described = render_text(read_model_info(adapter_gguf))
    assert re.search(rf"LoRA adapter for +{base.name}\n", described) and re.search(r"file type +F32\n", described)


def test_merged_into_a_float_gguf_matches_peft(base: Path, base_gguf: Path, adapter: Path, adapter_gguf: Path,
                                               tmp_path: Path) -> None:
    result = merge_adapters(base_gguf, [(adapter_gguf, 0.5)], tmp_path / "merged.gguf")
    assert result.merged_tensors == 14
    reader = gguf.GGUFReader(result.path)
    assert reader.fields["general.source.lora"].contents() == "style-F32-LoRA.gguf×0.5"
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    ids = prompt()
    assert_logits_match(llama_cpp_logits(result.path, ids), peft_logits(base, adapter, ids, 0.5))


def test_convert_with_lora_merges_from_the_checkpoint(base: Path, adapter: Path, adapter_gguf: Path,
                                                      tmp_path: Path) -> None:
    output = tmp_path / "out" / "merged.gguf"
    output.parent.mkdir()
    run = subprocess.run([sys.executable, "-m", "qdesk", "convert", str(base), "--outtype", "f32", "--lora",
                          str(adapter_gguf), "-o", str(output)], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert [path.name for path in output.parent.iterdir()] == ["merged.gguf"]
    ids = prompt()
    assert_logits_match(llama_cpp_logits(output, ids), peft_logits(base, adapter, ids))


def test_cli_converts_an_adapter_folder_beside_itself(adapter: Path, tmp_path: Path) -> None:
    import shutil

    folder = Path(shutil.copytree(adapter, tmp_path / "style"))
    run = subprocess.run([sys.executable, "-m", "qdesk", "convert", str(folder)], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "LoRA adapter for llama: 14 matrices, rank 8, alpha 16" in run.stdout
    assert (folder / "style-F16-LoRA.gguf").is_file()


# --- applied by the engine: chat and compare -------------------------------------------------------------------

def test_compare_puts_base_and_base_with_adapter_side_by_side(base_gguf: Path, adapter_gguf: Path) -> None:
    greedy = SamplingOptions(temperature=0.0, max_tokens=12)
    load = LoadOptions(n_ctx=128, n_threads=1)
    comparison = compare([base_gguf, base_gguf, base_gguf], "tell me a story", sampling=greedy, load=load,
                         adapters=[(), (LoraChoice(adapter_gguf, 0.0),), (LoraChoice(adapter_gguf),)],
                         concurrent=False)
    plain, switched_off, adapted = comparison.answers
    assert switched_off.result.token_ids == plain.result.token_ids  # scale 0: the adapter changes nothing
    assert adapted.result.token_ids != plain.result.token_ids
    assert adapted.name == f"{base_gguf.name} + {adapter_gguf.name}"
    assert comparison.to_json()["variants"][2]["loras"] == [{"path": str(adapter_gguf), "scale": 1.0}]


def test_chat_cli_takes_lora(base_gguf: Path, adapter_gguf: Path) -> None:
    def answer(*extra: str) -> str:
        run = subprocess.run([sys.executable, "-m", "qdesk", "chat", str(base_gguf), "--prompt", "hello", "--temp",
                              "0", "--max-tokens", "8", "--ctx", "128", *extra], capture_output=True, text=True,
                             env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
        assert run.returncode == 0, run.stderr
        return run.stdout

    assert answer("--lora", f"{adapter_gguf}:0") == answer()
    assert answer("--lora", str(adapter_gguf)) != answer()


def test_serve_applies_an_adapter_to_the_models_it_serves(base_gguf: Path, adapter_gguf: Path, tmp_path: Path) -> None:
    import openai

    from qdesk.serve.server import ServeOptions, start_server

    def completion(*loras: LoraChoice) -> list[str]:
        options = ServeOptions(models=(str(base_gguf),), port=0, load=LoadOptions(n_ctx=128, n_threads=1, loras=loras))
        with start_server(options, library_root=tmp_path / "library") as running:
            client = openai.OpenAI(base_url=running.url, api_key="unused", max_retries=0, timeout=120)
            answer = client.completions.create(model=running.models[0], prompt="once upon a time", max_tokens=8,
                                               temperature=0)
        return [answer.choices[0].text]

    plain = completion()
    assert completion(LoraChoice(adapter_gguf, 0.0)) == plain  # scale 0: the adapter changes nothing
    assert completion(LoraChoice(adapter_gguf)) != plain


def test_an_adapter_for_another_architecture_is_refused_before_loading(base_gguf: Path,
                                                                       tmp_path_factory: pytest.TempPathFactory
                                                                       ) -> None:
    other = build_tiny_checkpoint(tmp_path_factory.mktemp("qwen"), "qwen2")
    folder = build_lora_adapter(other, tmp_path_factory.mktemp("qwen-adapter") / "qwen-style")
    converted = convert_adapter(folder, folder / "q.gguf", base=other)
    with pytest.raises(AdapterError, match=r"adapts a qwen2 model but base-F32\.gguf is a llama model"):
        load_model(base_gguf, LoadOptions(n_ctx=64, loras=(LoraChoice(converted.path),)))
    with pytest.raises(AdapterError, match="is not a LoRA adapter GGUF"):
        load_model(base_gguf, LoadOptions(n_ctx=64, loras=(LoraChoice(base_gguf),)))
    with pytest.raises(MergeError, match="adapts a qwen2 model"):
        merge_adapters(base_gguf, [(converted.path, 1.0)], tmp_path_factory.mktemp("m") / "m.gguf")


def test_spellings() -> None:
    assert parse_lora("a.gguf") == LoraChoice(Path("a.gguf"), 1.0)
    assert parse_lora("dir/a.gguf:0.25") == LoraChoice(Path("dir/a.gguf"), 0.25)
    assert parse_lora("C:/x/a.gguf") == LoraChoice(Path("C:/x/a.gguf"), 1.0)
    assert parse_model_spec("m.gguf+a.gguf:0.5+b.gguf") == (
        Path("m.gguf"), (LoraChoice(Path("a.gguf"), 0.5), LoraChoice(Path("b.gguf"))))


# --- bad adapters: one sentence, nothing written ---------------------------------------------------------------

def _edited_adapter(adapter: Path, tmp_path: Path, **changes: object) -> Path:
    import shutil

    folder = Path(shutil.copytree(adapter, tmp_path / "edited"))
    settings = json.loads((folder / "adapter_config.json").read_text())
    settings.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    return folder


@pytest.mark.parametrize(("changes", "error", "words"), [
    ({"use_dora": True}, UnsupportedModelError, "DoRA"),
    ({"peft_type": "IA3"}, UnsupportedModelError, "IA3"),
    ({"bias": "all"}, UnsupportedModelError, "biases"),
    ({"base_model_name_or_path": "nobody/nothing"}, CheckpointError, "nobody/nothing"),
])
def test_bad_adapters_are_one_sentence(changes: dict, error: type, words: str, adapter: Path,
                                       tmp_path: Path) -> None:
    folder = _edited_adapter(adapter, tmp_path, **changes)
    with pytest.raises(error, match=words) as raised:
        convert_adapter(folder, tmp_path / "out.gguf")
    assert str(raised.value).endswith(".") and ". " not in str(raised.value)
    assert not (tmp_path / "out.gguf").exists()


def test_an_adapter_for_another_base_is_refused(adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    wider = build_tiny_checkpoint(tmp_path_factory.mktemp("wide"), "llama", sizes={"hidden_size": 128})
    wider_gguf = convert_checkpoint(wider, tmp_path_factory.mktemp("wide-gguf") / "wide.gguf").path
    converted = convert_adapter(adapter, tmp_path_factory.mktemp("a") / "a.gguf")
    output = tmp_path_factory.mktemp("merged") / "m.gguf"
    refusal = (r"a\.gguf does not fit wide\.gguf: it adapts blk\.0\.attn_\w\.weight with the shape 64×\d+ but "
               r"wide\.gguf holds it with the shape 128×\d+")
    with pytest.raises(MergeError, match=refusal):
        merge_adapters(wider_gguf, [(converted.path, 1.0)], output)
    assert list(output.parent.iterdir()) == []
    with pytest.raises(AdapterError, match=refusal) as raised:
        load_model(wider_gguf, LoadOptions(n_ctx=64, loras=(LoraChoice(converted.path),)))
    assert "\n" not in str(raised.value)


def test_the_library_shows_an_adapter_under_its_base_model(base_gguf: Path, adapter_gguf: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from qdesk.library.store import Library, render_text

    monkeypatch.setenv("QDESK_CONFIG_DIR", str(tmp_path / "config"))
    library = Library(tmp_path / "models")
    model = library.import_model(base_gguf, link=True)
    adapter = library.import_model(adapter_gguf, link=True)
    assert adapter.is_adapter and adapter.variant == "LoRA" and not model.is_adapter
    groups = library.model_groups()
    assert len(groups) == 1
    assert [entry.id for entry in groups[0].entries] == [model.id, adapter.id]
    assert groups[0].name == model.base_model
    assert f"{model.base_model}: F32, LoRA" in render_text(library.groups())


def test_quantize_with_lora_merges_before_quantizing(base: Path, adapter_gguf: Path, tmp_path: Path) -> None:
    output = tmp_path / "out" / "adapted-Q8_0.gguf"
    output.parent.mkdir()
    run = subprocess.run([sys.executable, "-m", "qdesk", "quantize", str(base), "--lora", f"{adapter_gguf}:0.5",
                          "-o", str(output), "--preset", "Q8_0", "--imatrix", "none"], capture_output=True,
                         text=True, env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert [path.name for path in output.parent.iterdir()] == [output.name]  # the merged float model is gone
    reader = gguf.GGUFReader(output)
    assert reader.fields["general.source.lora"].contents() == "style-F32-LoRA.gguf×0.5"
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
