"""The real SmolLM2-135M-Instruct checkpoint converts to a GGUF that computes the same numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from converters.core.jobs import Progress
from converters.writing.convert import convert_checkpoint

pytestmark = pytest.mark.slow

MIXED_TEXT = (
    "Hello, world! The café's crème brûlée costs €4.50 — naïve façade. 😀🚀👍🏽\n"
    "def add(a, b):\n    return a + b  # 12345 + 678 = 13023\n\tTabs\t and   spaces\n"
    "Numbers: 3.14159, 1e-9, 0x1F; emoji 🇫🇷; CJK 漢字; Ελληνικά; русский."
)
PROMPT = "The quick brown fox jumps over the lazy dog. In 1969, humans first walked on the"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, smollm2_hf: Path) -> tuple[Path, list[Progress]]:
    """SmolLM2 converted at f16 under its default GGUF name, with the progress reports it made (into a folder of
    its own: a checkpoint folder of links to files elsewhere is refused, since qdesk reads only the folder given)."""
    reports: list[Progress] = []
    result = convert_checkpoint(smollm2_hf, None, outtype="f16", output_folder=tmp_path_factory.mktemp("work"),
                                progress=reports.append)
    return result.path, reports


@pytest.fixture(scope="module")
def hf_model(smollm2_hf: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32, attn_implementation="eager")
    return model.eval(), AutoTokenizer.from_pretrained(smollm2_hf)


def test_default_name_follows_gguf_naming_convention(converted: tuple[Path, list[Progress]]) -> None:
    path, _ = converted
    assert path.name == "SmolLM2-135M-Instruct-F16.gguf"


def test_progress_is_monotonic_and_complete(converted: tuple[Path, list[Progress]]) -> None:
    _, reports = converted
    done = [report.done for report in reports]
    assert done == sorted(done)
    assert reports[-1].done == reports[-1].total > 134_000_000


def test_general_metadata(converted: tuple[Path, list[Progress]]) -> None:
    reader = gguf.GGUFReader(converted[0])

    def value(key: str):
        return reader.fields[key].contents()

    assert value("general.architecture") == "llama"
    assert value("general.basename") == "SmolLM2"
    assert value("general.size_label") == "135M"
    assert value("general.finetune") == "Instruct"
    assert value("general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert value("general.quantization_version") == gguf.GGML_QUANT_VERSION
    assert value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.ggml.pre") == "smollm"
    assert "<|im_start|>" in value("tokenizer.chat_template")
    assert value("llama.context_length") == 8192
    assert value("llama.attention.head_count_kv") == 3
    types = {tensor.tensor_type for tensor in reader.tensors}
    assert types == {gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32}
    assert "output.weight" not in {tensor.name for tensor in reader.tensors}


def test_logits_match_transformers(converted: tuple[Path, list[Progress]], hf_model) -> None:
    import torch
    from llama_cpp import Llama

    model, tokenizer = hf_model
    tokens = tokenizer(PROMPT, add_special_tokens=False).input_ids
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0].numpy()

    llm = Llama(model_path=str(converted[0]), n_ctx=128, logits_all=True, n_threads=2, verbose=False)
    llm.eval(tokens)
    actual = np.asarray(llm.scores[: len(tokens)], dtype=np.float32)

    scale = float(np.abs(expected).max())
    worst = float(np.abs(actual - expected).max())
    agreement = float(np.mean(actual.argmax(-1) == expected.argmax(-1)))
    assert agreement >= 0.99, f"argmax agreement {agreement:.3f}"
    assert worst < 0.005 * scale, f"max |Δlogit| {worst:.4f} against logit scale {scale:.2f}"


def test_tokenization_matches_hf_token_for_token(converted: tuple[Path, list[Progress]], hf_model) -> None:
    from llama_cpp import Llama

    _, tokenizer = hf_model
    vocab = Llama(model_path=str(converted[0]), vocab_only=True, verbose=False)
    ours = vocab.tokenize(MIXED_TEXT.encode("utf-8"), add_bos=False, special=False)
    assert ours == tokenizer(MIXED_TEXT, add_special_tokens=False).input_ids
    assert vocab.detokenize(ours).decode("utf-8") == MIXED_TEXT


def test_chat_answers_paris(converted: tuple[Path, list[Progress]]) -> None:
    from llama_cpp import Llama

    llm = Llama(model_path=str(converted[0]), n_ctx=256, seed=0, n_threads=2, verbose=False)
    reply = llm.create_chat_completion(
        messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0.0, max_tokens=32
    )
    assert "Paris" in reply["choices"][0]["message"]["content"]


@pytest.mark.parametrize("outtype", ["q8_0", "bf16"])
def test_other_outtypes_load_and_agree(
    tmp_path: Path, smollm2_hf: Path, converted: tuple[Path, list[Progress]], outtype: str
) -> None:
    from llama_cpp import Llama

    result = convert_checkpoint(smollm2_hf, tmp_path / f"model-{outtype}.gguf", outtype=outtype)
    reader = gguf.GGUFReader(result.path)
    declared = {tensor.tensor_type.name for tensor in reader.tensors}
    assert outtype.upper() in declared

    tokens = Llama(model_path=str(converted[0]), vocab_only=True, verbose=False).tokenize(PROMPT.encode())
    logits = []
    for path in (converted[0], result.path):
        llm = Llama(model_path=str(path), n_ctx=128, logits_all=True, n_threads=2, verbose=False)
        llm.eval(tokens)
        logits.append(np.asarray(llm.scores[: len(tokens)]))
    agreement = float(np.mean(logits[0].argmax(-1) == logits[1].argmax(-1)))
    assert agreement >= 0.9


def test_cli_convert_prints_result_and_info_reads_it(tmp_path: Path, smollm2_hf: Path) -> None:
    out = tmp_path / "smol.gguf"
    result = subprocess.run(
        [sys.executable, "-m", "qdesk", "convert", str(smollm2_hf), "-o", str(out), "--outtype", "q8_0"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    assert result.stderr == ""
    info = subprocess.run(
        [sys.executable, "-m", "qdesk", "info", str(out), "--json"], capture_output=True, text=True, timeout=120
    )
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["architecture"] == "llama"
