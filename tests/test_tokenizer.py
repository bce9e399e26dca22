"""Tokenizer export: built tokenizers of each family style, written to vocab-only GGUFs, must tokenize in
llama.cpp exactly as in transformers; bad or unsupported tokenizer files must give a TokenizerError."""

from __future__ import annotations

import ctypes
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import llama_cpp
import pytest

from converters.core.errors import TokenizerError
from converters.reading.tokenizer import TokenizerSummary, export_tokenizer
from tests.builders.tokenizers import MIXED_TEXT, write_bpe_tokenizer, write_spm_tokenizer

BUILDERS: dict[str, Callable[[Path], int]] = {
    "llama-bpe": lambda folder: write_bpe_tokenizer(folder, "llama-bpe"),
    "qwen2": lambda folder: write_bpe_tokenizer(folder, "qwen2"),
    "smollm": lambda folder: write_bpe_tokenizer(folder, "smollm"),
    "gpt2": lambda folder: write_bpe_tokenizer(folder, "gpt2"),
    "spm-llama": lambda folder: write_spm_tokenizer(folder, "llama"),
    "spm-gemma": lambda folder: write_spm_tokenizer(folder, "gemma"),
}
EXPECTED_MODEL_AND_PRE: dict[str, tuple[str, str | None]] = {
    "llama-bpe": ("gpt2", "llama-bpe"),
    "qwen2": ("gpt2", "qwen2"),
    "smollm": ("gpt2", "smollm"),
    "gpt2": ("gpt2", "gpt-2"),
    "spm-llama": ("llama", None),
    "spm-gemma": ("llama", None),
}


def write_vocab_only_gguf(folder: Path, path: Path, vocab_rows: int | None = None) -> TokenizerSummary:
    """A GGUF holding the minimal llama hyperparameters plus the exported tokenizer, and no tensors."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(512)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_layer_norm_rms_eps(1e-5)
    summary = export_tokenizer(folder, writer, vocab_rows)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return summary


def load_vocab(path: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def llama_ids(model: llama_cpp.Llama, text: str, *, special: bool) -> list[int]:
    return model.tokenize(text.encode("utf-8"), add_bos=False, special=special)


def llama_text(model: llama_cpp.Llama, ids: list[int]) -> str:
    """llama.cpp's own detokenizer (leading-space and clean-up rules included), special tokens kept."""
    tokens = (llama_cpp.llama_token * len(ids))(*ids)
    vocab = model._model.vocab
    size = 4 * len(MIXED_TEXT) + 256
    buffer = ctypes.create_string_buffer(size)
    written = llama_cpp.llama_detokenize(vocab, tokens, len(ids), buffer, size, False, True)
    assert written >= 0
    return buffer.raw[:written].decode("utf-8")


def add_flags(model: llama_cpp.Llama) -> tuple[bool, bool]:
    return model._model.add_bos_token(), model._model.add_eos_token()


@dataclass(frozen=True)
class Exported:
    style: str
    folder: Path
    summary: TokenizerSummary
    model: llama_cpp.Llama
    hf: Any
    reader: gguf.GGUFReader

    def token_type(self, token_id: int) -> gguf.TokenType:
        field = self.reader.fields["tokenizer.ggml.token_type"]
        return gguf.TokenType(int(field.parts[field.data[token_id]][0]))

    def special_tokens(self) -> list[str]:
        return [token.content for token in self.hf.added_tokens_decoder.values() if token.special]


@pytest.fixture(scope="module")
def transformers_auto() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer


@pytest.fixture(scope="module", params=list(BUILDERS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, transformers_auto: Any):
    style: str = request.param
    folder = tmp_path_factory.mktemp(style)
    BUILDERS[style](folder)
    path = folder.parent / f"{style}.gguf"
    summary = write_vocab_only_gguf(folder, path)
    model = load_vocab(path)
    yield Exported(style, folder, summary, model, transformers_auto.from_pretrained(folder), gguf.GGUFReader(path))
    model.close()


def test_summary_names_the_tokenizer(exported: Exported) -> None:
    model, pre = EXPECTED_MODEL_AND_PRE[exported.style]
    assert exported.summary == TokenizerSummary(
        model=model,
        pre=pre,
        token_count=len(exported.hf),
        has_chat_template=exported.hf.chat_template is not None,
    )
    assert exported.model.n_vocab() == len(exported.hf)


def test_mixed_text_gets_the_same_ids(exported: Exported) -> None:
    expected = exported.hf(MIXED_TEXT, add_special_tokens=False).input_ids
    assert llama_ids(exported.model, MIXED_TEXT, special=False) == expected


def test_ids_decode_back_to_the_text(exported: Exported) -> None:
    ids = llama_ids(exported.model, MIXED_TEXT, special=False)
    assert llama_text(exported.model, ids) == MIXED_TEXT


def test_special_tokens_in_plain_text_stay_text(exported: Exported) -> None:
    text = " and ".join(f"x{token}y" for token in exported.special_tokens())
    expected = exported.hf(text, add_special_tokens=False, split_special_tokens=True).input_ids
    assert llama_ids(exported.model, text, special=False) == expected


def test_special_tokens_parse_when_asked(exported: Exported, transformers_auto: Any) -> None:
    """llama.cpp's SentencePiece tokenizer puts the "▁" prefix before every text run that follows a special
    token, as SentencePiece itself and transformers' `legacy=True` do; `legacy=False` (this Llama style's
    config) prefixes only the start of the whole text, so the Llama style compares with legacy=True."""
    specials = exported.special_tokens()
    text = f"{specials[-1]}Hello world{specials[0]}\nnumbers 123 {specials[-1]}done"
    reference = exported.hf
    if exported.style == "spm-llama":
        reference = transformers_auto.from_pretrained(exported.folder, legacy=True)
        assert reference(text, add_special_tokens=False).input_ids != exported.hf(text).input_ids[1:]
    expected = reference(text, add_special_tokens=False).input_ids
    assert llama_ids(exported.model, text, special=True) == expected


def test_bos_eos_and_add_flags_match_transformers(exported: Exported) -> None:
    hf = exported.hf
    if hf.bos_token_id is not None:
        assert exported.model.token_bos() == hf.bos_token_id
    assert exported.model.token_eos() == hf.eos_token_id
    with_specials = hf("Hello", add_special_tokens=True).input_ids
    without = hf("Hello", add_special_tokens=False).input_ids
    adds_bos = with_specials[: len(with_specials) - len(without)] == [hf.bos_token_id]
    adds_eos = with_specials[len(without) :] == [hf.eos_token_id] and not adds_bos
    assert add_flags(exported.model) == (adds_bos, adds_eos)
    config = json.loads((exported.folder / "tokenizer_config.json").read_text())
    if "add_bos_token" in config:
        assert add_flags(exported.model)[0] == config["add_bos_token"]


def test_token_types_follow_the_added_tokens(exported: Exported) -> None:
    for token_id, token in exported.hf.added_tokens_decoder.items():
        if exported.summary.model == "llama" and token.content == exported.hf.unk_token:
            assert exported.token_type(token_id) == gguf.TokenType.UNKNOWN
        elif token.special:
            assert exported.token_type(token_id) == gguf.TokenType.CONTROL
        else:
            assert exported.token_type(token_id) == gguf.TokenType.USER_DEFINED
    if exported.summary.model == "llama":
        byte_id = exported.hf.convert_tokens_to_ids("<0x0A>")
        assert exported.token_type(byte_id) == gguf.TokenType.BYTE


def test_qwen_tool_tags_are_user_defined_and_always_matched(tmp_path: Path, transformers_auto: Any) -> None:
    write_bpe_tokenizer(tmp_path / "qwen", "qwen2")
    summary = write_vocab_only_gguf(tmp_path / "qwen", tmp_path / "qwen.gguf")
    model = load_vocab(tmp_path / "qwen.gguf")
    try:
        hf = transformers_auto.from_pretrained(tmp_path / "qwen")
        text = "<tool_call>{}</tool_call> <|im_end|>"
        tool_call = hf.convert_tokens_to_ids("<tool_call>")
        expected = hf(text, add_special_tokens=False, split_special_tokens=True).input_ids
        assert tool_call in expected
        assert llama_ids(model, text, special=False) == expected
        assert summary.pre == "qwen2"
    finally:
        model.close()


@pytest.fixture()
def spm_llama_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "spm-llama"
    write_spm_tokenizer(folder, "llama")
    return folder


def test_converted_sentencepiece_tokenizer_json_alone(spm_llama_folder: Path, transformers_auto: Any) -> None:
    """Without tokenizer.model, the byte-fallback BPE in tokenizer.json is exported as "llama" with scores
    from the merge ranks, and llama.cpp still tokenizes as transformers does."""
    (spm_llama_folder / "tokenizer.model").unlink()
    path = spm_llama_folder.parent / "json-only.gguf"
    summary = write_vocab_only_gguf(spm_llama_folder, path)
    hf = transformers_auto.from_pretrained(spm_llama_folder)
    model = load_vocab(path)
    try:
        assert (summary.model, summary.pre) == ("llama", None)
        assert llama_ids(model, MIXED_TEXT, special=False) == hf(MIXED_TEXT, add_special_tokens=False).input_ids
        assert add_flags(model) == (True, False)
    finally:
        model.close()


LEGACY_SPM_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
    ],
}


def test_legacy_converted_sentencepiece_tokenizer_json(spm_llama_folder: Path) -> None:
    """The form most Llama 2 / Mistral repositories ship (a Prepend + Replace normalizer, no pre-tokenizer),
    compared with the `tokenizers` library directly: transformers 5 would swap in its own pre-tokenizer."""
    from tokenizers import Tokenizer

    (spm_llama_folder / "tokenizer.model").unlink()
    edit_tokenizer_json(spm_llama_folder, lambda data: data.update(normalizer=LEGACY_SPM_NORMALIZER))
    edit_tokenizer_json(spm_llama_folder, lambda data: data.update(pre_tokenizer=None))
    path = spm_llama_folder.parent / "legacy.gguf"
    write_vocab_only_gguf(spm_llama_folder, path)
    reference = Tokenizer.from_file(str(spm_llama_folder / "tokenizer.json"))
    model = load_vocab(path)
    try:
        for text in (MIXED_TEXT, "</s>Hello<unk> world\n</s>  two"):
            assert llama_ids(model, text, special=True) == reference.encode(text, add_special_tokens=False).ids
    finally:
        model.close()


def test_chatml_fine_tune_of_a_sentencepiece_model(spm_llama_folder: Path, transformers_auto: Any) -> None:
    """Added tokens past the SentencePiece vocabulary (saved by transformers, which writes tokenizer.json
    only): special ones are CONTROL, plain ones USER_DEFINED and matched even when specials are not parsed.
    Compared with `legacy=True` for the "▁" after each added token (see the special-token test above)."""
    tokenizer = transformers_auto.from_pretrained(spm_llama_folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens(["<think>", "</think>"])
    folder = spm_llama_folder.parent / "fine-tune"
    tokenizer.save_pretrained(folder)
    path = folder.parent / "fine-tune.gguf"
    summary = write_vocab_only_gguf(folder, path)
    reference = transformers_auto.from_pretrained(folder, legacy=True)
    model = load_vocab(path)
    try:
        assert summary.token_count == len(reference) == len(tokenizer)
        text = "<|im_start|>user\nHi <think>maybe</think>yes<|im_end|>\n"
        assert llama_ids(model, text, special=True) == reference(text, add_special_tokens=False).input_ids
        plain = reference(text, add_special_tokens=False, split_special_tokens=True).input_ids
        assert llama_ids(model, text, special=False) == plain
        assert reference.convert_tokens_to_ids("<think>") in plain
    finally:
        model.close()


# --- padding ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["qwen2", "spm-gemma"])
def test_vocabulary_pads_up_to_the_embedding_rows(style: str, tmp_path: Path) -> None:
    size = BUILDERS[style](tmp_path / style)
    summary = write_vocab_only_gguf(tmp_path / style, tmp_path / "padded.gguf", vocab_rows=size + 37)
    assert summary.token_count == size + 37
    model = load_vocab(tmp_path / "padded.gguf")
    try:
        assert model.n_vocab() == size + 37
        last = model._model.token_get_text(size + 36)
        assert last == f"[PAD{size + 36}]"
        assert all(token < size for token in llama_ids(model, MIXED_TEXT, special=False))
    finally:
        model.close()


def test_more_tokens_than_embedding_rows_is_refused(tmp_path: Path) -> None:
    size = write_bpe_tokenizer(tmp_path, "smollm")
    writer = gguf.GGUFWriter(tmp_path / "never.gguf", "llama")
    with pytest.raises(TokenizerError, match=rf"{size} tokens but .* only {size - 1} rows"):
        export_tokenizer(tmp_path, writer, size - 1)


# --- errors -----------------------------------------------------------------------------------------------


def export_into_scratch(folder: Path) -> TokenizerSummary:
    return export_tokenizer(folder, gguf.GGUFWriter(folder / "scratch.gguf", "llama"), None)


def test_missing_tokenizer_is_explained(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"has no tokenizer \(tokenizer\.json or tokenizer\.model\)"):
        export_into_scratch(tmp_path)


def test_malformed_tokenizer_json_is_explained(tmp_path: Path) -> None:
    write_bpe_tokenizer(tmp_path, "gpt2")
    text = (tmp_path / "tokenizer.json").read_text()
    (tmp_path / "tokenizer.json").write_text(text[: len(text) // 2])
    with pytest.raises(TokenizerError, match=r"tokenizer\.json is not valid JSON .*download it again"):
        export_into_scratch(tmp_path)


def test_malformed_tokenizer_config_is_explained(tmp_path: Path) -> None:
    write_spm_tokenizer(tmp_path, "gemma")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json is not valid JSON"):
        export_into_scratch(tmp_path)


def edit_tokenizer_json(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads((folder / "tokenizer.json").read_text())
    edit(data)
    (folder / "tokenizer.json").write_text(json.dumps(data))


UNKNOWN_PRE_TOKENIZERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "whitespace": lambda data: data.update(pre_tokenizer={"type": "Whitespace"}),
    "prefix-space": lambda data: data["pre_tokenizer"].update(add_prefix_space=True),
    "other-regex": lambda data: data["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\p{L}+|\s+"),
    "lowercase": lambda data: data.update(normalizer={"type": "Lowercase"}),
}


@pytest.mark.parametrize("edit", list(UNKNOWN_PRE_TOKENIZERS))
def test_unknown_pre_tokenizer_is_refused_not_guessed(edit: str, tmp_path: Path) -> None:
    write_bpe_tokenizer(tmp_path, "gpt2" if edit == "prefix-space" else "qwen2")
    edit_tokenizer_json(tmp_path, UNKNOWN_PRE_TOKENIZERS[edit])
    unsupported = r"in a way qdesk does not support yet \(pre-tokenizer: .+; normalizer: .+\)"
    with pytest.raises(TokenizerError, match=unsupported):
        export_into_scratch(tmp_path)


def test_non_bpe_tokenizer_json_is_refused(tmp_path: Path) -> None:
    write_bpe_tokenizer(tmp_path, "gpt2")
    edit_tokenizer_json(tmp_path, lambda data: data["model"].update(type="WordPiece"))
    with pytest.raises(TokenizerError, match=r"holds a WordPiece tokenizer, which qdesk does not support yet"):
        export_into_scratch(tmp_path)


def test_two_tokens_with_one_text_are_refused_before_llama_cpp_aborts(tmp_path: Path) -> None:
    size = write_bpe_tokenizer(tmp_path, "gpt2")
    duplicate = {"id": size, "content": "a", "special": False, "normalized": False}
    edit_tokenizer_json(tmp_path, lambda data: data["added_tokens"].append(duplicate))
    with pytest.raises(TokenizerError, match=rf"same text 'a' to tokens \d+ and {size}, which llama.cpp cannot"):
        export_into_scratch(tmp_path)


def test_unigram_sentencepiece_is_refused(tmp_path: Path) -> None:
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(MIXED_TEXT.splitlines() * 4),
        model_writer=model,
        vocab_size=400,
        hard_vocab_limit=False,
        model_type="unigram",
        byte_fallback=True,
        minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    with pytest.raises(TokenizerError, match=r"SentencePiece unigram model, which qdesk does not support yet"):
        export_into_scratch(tmp_path)


# --- the real SmolLM2 tokenizer -----------------------------------------------------------------------------


@pytest.fixture()
def smollm2_tokenizer(smollm2_hf: Path, tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "smollm2"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (smollm2_hf / name).is_file():
            shutil.copy(smollm2_hf / name, folder / name)
    yield folder


@pytest.mark.slow
def test_real_smollm2_tokenizer(smollm2_tokenizer: Path, transformers_auto: Any) -> None:
    path = smollm2_tokenizer.parent / "smollm2.gguf"
    summary = write_vocab_only_gguf(smollm2_tokenizer, path, vocab_rows=49152)
    hf = transformers_auto.from_pretrained(smollm2_tokenizer)
    model = load_vocab(path)
    try:
        assert (summary.model, summary.pre, summary.token_count) == ("gpt2", "smollm", 49152)
        assert llama_ids(model, MIXED_TEXT, special=False) == hf(MIXED_TEXT, add_special_tokens=False).input_ids
        assert llama_text(model, llama_ids(model, MIXED_TEXT, special=False)) == MIXED_TEXT
    finally:
        model.close()
