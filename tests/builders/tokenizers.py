"""Small real tokenizers built from scratch, one per model family style, for converter tests.

Each style copies its family's real tokenizer configuration (normalizer, pre-tokenizer, decoder,
post-processor, special tokens, tokenizer_config.json, chat template) and trains a vocabulary of a few
hundred tokens on `TRAINING_TEXT`. Training runs once per style per process; later calls copy the files.

- `write_bpe_tokenizer`: byte-level BPE (`tokenizers`): "llama-bpe" (Llama 3), "qwen2" (Qwen2/Qwen3),
  "smollm" (SmolLM2), "gpt2" (GPT-2).
- `write_spm_tokenizer`: SentencePiece BPE with byte fallback: "llama" (Llama 2 / Mistral), "gemma" (Gemma).
  tokenizer.json beside tokenizer.model comes from transformers' own conversion, as real repositories ship.
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away into the forest.
Hello world! Hello there, how are you today? I'm fine, thanks. We're going to the market at noon.
She said that they'd arrive before dinner, but the train was late again and everyone waited.
Language models read text as tokens: words, pieces of words, digits and single bytes.
def tokenize(text: str) -> list[int]:
    ids = []
    for index, word in enumerate(text.split()):
        ids.append(hash(word) % 1000)
    return ids

class Counter:
    def __init__(self, start=0):
        self.value = start

    def increment(self, step=1):
        self.value += step
        return self.value

for (int i = 0; i < 10; i++) { printf("%d\\n", i * 2); }
SELECT name, price FROM products WHERE price > 100 ORDER BY price DESC;
{"name": "qdesk", "version": "0.1.0", "tags": ["gguf", "llama", "quantize"]}
Café au lait, crème brûlée, naïve façade, déjà vu, señor, über, Straße, smörgåsbord.
Le café est très chaud ce matin, et la crème est fraîche. El niño comió una manzana roja.
Emoji are everywhere now 😀 😂 🚀 🎉 👍 ❤️ and people use them in chat all the time 😀🚀.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048 65536 3.14159 2.71828 1,000,000.
Dates like 2024-05-17 and times like 12:30:45 appear in logs: [INFO] 2024-05-17 12:30:45 started.
Prices went from $19.99 to $24.50, a rise of 22.6 percent in one year.
Whitespace matters:  two spaces,   three spaces,\ttabs\tand
newlines.

Indented code keeps its    alignment    in columns.
"""

MIXED_TEXT = (
    "Hello world! The quick brown fox jumps over the lazy dog.\n"
    "def add(a, b):\n    return a + b  # sum of two numbers\n\n"
    "Café, naïve, déjà vu, Ångström, São Paulo, Zürich.\n"
    "Emoji: 😀🚀 and 👍🏽 and 🧪\n"
    "Numbers: 3.14159, 1234567890, 2024-05-17, 007\n"
    "Tabs\tand   multiple   spaces   then\n\n\nthree newlines.\n"
    "Don't stop, we're done; I'LL GO and she'd see.\n"
    "中文 текст ελληνικά"
)
"""Text a test can tokenize with both Hugging Face and llama.cpp: every domain above, plus characters the
training text lacks (falling back to bytes). It avoids " ." and " '" because clean-up of tokenization
spaces would change those when decoding."""

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}{% else %}"
    "{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
    "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

BPE_VOCAB_SIZE = 560
SPM_VOCAB_SIZE = 640

STARCODER_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>", "<filename>",
    "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
    "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>",
)  # fmt: skip
LLAMA3_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
)  # fmt: skip


@dataclass(frozen=True)
class BpeStyle:
    """A byte-level BPE family: its pipeline (built lazily: `tokenizers` objects), tokens and config."""

    pipeline: Callable[[], dict[str, Any]]
    """normalizer, pre_tokenizer, decoder and post_processor; the post-processor may name special tokens."""
    leading_specials: tuple[str, ...] = ()
    """Special tokens given the first ids by the trainer (StarCoder-style vocabularies)."""
    trailing_specials: tuple[str, ...] = ()
    """Special tokens appended after the trained vocabulary (Llama 3, Qwen, GPT-2)."""
    trailing_plain: tuple[str, ...] = ()
    """Non-special added tokens appended last (Qwen's tool-call tags)."""
    ignore_merges: bool = False
    config: dict[str, Any] = field(default_factory=dict)


def _byte_level_pipeline(
    pre_steps: Callable[[], list[Any]], normalizer: Callable[[], Any] | None = None
) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        from tokenizers import decoders, pre_tokenizers, processors

        steps = pre_steps()
        return {
            "normalizer": normalizer() if normalizer else None,
            "pre_tokenizer": steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps),
            "decoder": decoders.ByteLevel(),
            "post_processor": processors.ByteLevel(trim_offsets=False),
        }

    return build


def _split(regex: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)


def _byte_level(use_regex: bool) -> Any:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


def _digits() -> Any:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Digits(individual_digits=True)


def _nfc() -> Any:
    from tokenizers import normalizers

    return normalizers.NFC()


def _llama3_pipeline() -> dict[str, Any]:
    from tokenizers import processors

    pipeline = _byte_level_pipeline(lambda: [_split(LLAMA3_REGEX), _byte_level(use_regex=False)])()
    pipeline["post_processor"] = processors.Sequence(
        [
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                special_tokens=[("<|begin_of_text|>", 0)],  # the real id is filled in once it is known
            ),
        ]
    )
    return pipeline


BPE_STYLES: dict[str, BpeStyle] = {
    "llama-bpe": BpeStyle(
        pipeline=_llama3_pipeline,
        trailing_specials=LLAMA3_SPECIALS,
        ignore_merges=True,
        config={
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "clean_up_tokenization_spaces": True,
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 131072,
            "chat_template": LLAMA3_TEMPLATE,
        },
    ),
    "qwen2": BpeStyle(
        pipeline=_byte_level_pipeline(lambda: [_split(QWEN2_REGEX), _byte_level(use_regex=False)], _nfc),
        trailing_specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        trailing_plain=("<tool_call>", "</tool_call>"),
        config={
            "tokenizer_class": "Qwen2Tokenizer",
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "errors": "replace",
            "split_special_tokens": False,
            "model_max_length": 131072,
            "chat_template": CHATML_TEMPLATE,
        },
    ),
    "smollm": BpeStyle(
        pipeline=_byte_level_pipeline(lambda: [_digits(), _byte_level(use_regex=True)]),
        leading_specials=STARCODER_SPECIALS,
        config={
            "tokenizer_class": "GPT2Tokenizer",
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "pad_token": "<|im_end|>",
            "unk_token": "<|endoftext|>",
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "model_max_length": 8192,
            "chat_template": CHATML_TEMPLATE,
        },
    ),
    "gpt2": BpeStyle(
        pipeline=_byte_level_pipeline(lambda: [_byte_level(use_regex=True)]),
        trailing_specials=("<|endoftext|>",),
        config={
            "tokenizer_class": "GPT2Tokenizer",
            "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "add_prefix_space": False,
            "model_max_length": 1024,
        },
    ),
}


def _fill_template_ids(value: Any, ids: dict[str, int]) -> Any:
    """Give TemplateProcessing's special tokens their real ids in a tokenizer.json post-processor."""
    if isinstance(value, dict):
        if "special_tokens" in value and isinstance(value["special_tokens"], dict):
            for name, entry in value["special_tokens"].items():
                entry["ids"] = [ids[name]]
        return {key: _fill_template_ids(member, ids) for key, member in value.items()}
    if isinstance(value, list):
        return [_fill_template_ids(member, ids) for member in value]
    return value


@functools.cache
def _bpe_files(style_name: str) -> dict[str, str]:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

    style = BPE_STYLES[style_name]
    tokenizer = Tokenizer(models.BPE())
    for part, value in style.pipeline().items():
        if value is not None:
            setattr(tokenizer, part, value)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=list(style.leading_specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True), trainer)
    tokenizer.add_special_tokens(list(style.trailing_specials))
    tokenizer.add_tokens([AddedToken(text, special=False, normalized=False) for text in style.trailing_plain])
    data = json.loads(tokenizer.to_str())
    data["model"]["ignore_merges"] = style.ignore_merges
    data = _fill_template_ids(data, tokenizer.get_vocab())
    config = {"add_bos_token": False, "add_eos_token": False} if style_name != "llama-bpe" else {}
    config |= dict(style.config)
    config["added_tokens_decoder"] = {
        str(entry["id"]): {key: value for key, value in entry.items() if key != "id"} for entry in data["added_tokens"]
    }
    return {
        "tokenizer.json": json.dumps(data, ensure_ascii=False, indent=2),
        "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2),
    }


def write_bpe_tokenizer(folder: Path, style: str) -> int:
    """Write a byte-level BPE tokenizer of `style` into `folder`; returns its vocabulary size."""
    if style not in BPE_STYLES:
        raise ValueError(f"unknown BPE tokenizer style {style!r}; choose one of {sorted(BPE_STYLES)}")
    return _write_files(Path(folder), _bpe_files(style))


@dataclass(frozen=True)
class SpmStyle:
    """A SentencePiece family: trainer settings and tokenizer_config.json."""

    trainer: dict[str, Any]
    config: dict[str, Any]
    chat_template_file: str | None = None
    special_user_symbols: tuple[str, ...] = ()
    """User-defined pieces Hugging Face treats as special tokens (Gemma's mask and turn markers)."""


SPM_STYLES: dict[str, SpmStyle] = {
    "llama": SpmStyle(
        trainer={"add_dummy_prefix": True, "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1},
        config={
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": None,
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 4096,
            "chat_template": LLAMA2_TEMPLATE,
        },
    ),
    "gemma": SpmStyle(
        trainer={
            "add_dummy_prefix": False,
            "pad_id": 0,
            "eos_id": 1,
            "bos_id": 2,
            "unk_id": 3,
            "pad_piece": "<pad>",
            "eos_piece": "<eos>",
            "bos_piece": "<bos>",
            "unk_piece": "<unk>",
            "user_defined_symbols": ["<mask>", "<start_of_turn>", "<end_of_turn>"],
        },
        config={
            "tokenizer_class": "GemmaTokenizer",
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "mask_token": "<mask>",
            "add_bos_token": True,
            "add_eos_token": False,
            "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
            "clean_up_tokenization_spaces": False,
            "spaces_between_special_tokens": False,
            "model_max_length": 8192,
        },
        chat_template_file=GEMMA_TEMPLATE,
        special_user_symbols=("<mask>", "<start_of_turn>", "<end_of_turn>"),
    ),
}


def _added_token_entry(content: str) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


@functools.cache
def _spm_files(style_name: str) -> dict[str, str | bytes]:
    import tempfile

    import sentencepiece

    style = SPM_STYLES[style_name]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT.splitlines()),
        model_writer=model,
        vocab_size=SPM_VOCAB_SIZE,
        hard_vocab_limit=False,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        minloglevel=2,
        **style.trainer,
    )
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    special_ids = [
        index
        for index in range(processor.get_piece_size())
        if processor.is_control(index)
        or processor.is_unknown(index)
        or processor.id_to_piece(index) in style.special_user_symbols
    ]
    config = dict(style.config)
    config["added_tokens_decoder"] = {
        str(index): _added_token_entry(processor.id_to_piece(index)) for index in special_ids
    }
    files: dict[str, str | bytes] = {
        "tokenizer.model": model.getvalue(),
        "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2),
    }
    if style.chat_template_file is not None:
        files["chat_template.jinja"] = style.chat_template_file
    with tempfile.TemporaryDirectory() as scratch:
        _write_files(Path(scratch), files)
        files["tokenizer.json"] = _converted_tokenizer_json(Path(scratch))
    return files


def _converted_tokenizer_json(folder: Path) -> str:
    """tokenizer.json as transformers converts it from tokenizer.model (what real repositories ship)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return tokenizer.backend_tokenizer.to_str(pretty=True)


def write_spm_tokenizer(folder: Path, style: str) -> int:
    """Write a SentencePiece tokenizer of `style` into `folder`; returns its vocabulary size."""
    if style not in SPM_STYLES:
        raise ValueError(f"unknown SentencePiece tokenizer style {style!r}; choose one of {sorted(SPM_STYLES)}")
    return _write_files(Path(folder), _spm_files(style))


def _write_files(folder: Path, files: dict[str, str] | dict[str, str | bytes]) -> int:
    """Write `files` into `folder`; returns the vocabulary size their tokenizer.json or .model holds."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            (folder / name).write_text(content, encoding="utf-8")
    if "tokenizer.json" in files:
        data = json.loads(files["tokenizer.json"])
        ids = list(data["model"]["vocab"].values()) + [entry["id"] for entry in data["added_tokens"]]
        return max(ids) + 1
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()
