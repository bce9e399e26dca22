"""Tokenizer export: a Hugging Face checkpoint's tokenizer files become GGUF tokenizer metadata.

Three kinds of tokenizer are understood, chosen from the files present:

- `tokenizer.model` (SentencePiece BPE with byte fallback): GGUF tokenizer model "llama";
- `tokenizer.json` holding a BPE with byte fallback (a SentencePiece tokenizer converted by Hugging Face):
  also "llama", with merge ranks turned into the scores llama.cpp merges by;
- `tokenizer.json` holding a byte-level BPE: GGUF tokenizer model "gpt2", plus the `tokenizer.ggml.pre`
  name that tells llama.cpp which pre-tokenizer regexes to split text with. That name is looked up in
  `BPE_PRE_TOKENIZERS` from the tokenizer's own pre-tokenizer and normalizer; an unknown one is refused
  rather than guessed, since a wrong guess silently changes every token id.

Token types follow the Hugging Face files: added tokens marked `special` become CONTROL (matched in text
only when the caller asks for special tokens), other added tokens USER_DEFINED (always matched), byte
pieces BYTE. Rows of the embedding matrix past the tokenizer's last token get UNUSED `[PAD{id}]` tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from gguf.vocab import SentencePieceVocab, SpecialVocab

from converters.core.errors import TokenizerError

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"

SPECIAL_TOKEN_KINDS = ("bos", "eos", "unk", "sep", "pad", "mask")
ADDED_TOKEN_SCORE = -1000.0
PADDING_SCORE = -1000.0
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SENTENCEPIECE_SPACE = "\u2581"
SENTENCEPIECE_BPE = 2  # TrainerSpec.ModelType.BPE in sentencepiece_model.proto


@dataclass(frozen=True)
class TokenizerSummary:
    """What `export_tokenizer` wrote: GGUF tokenizer model, pre-tokenizer name, token count."""

    model: str
    pre: str | None
    token_count: int
    has_chat_template: bool


# --- which llama.cpp pre-tokenizer a byte-level BPE needs ------------------------------------------------

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_step(regex: str) -> Mapping[str, Any]:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def _byte_level_step(use_regex: bool) -> Mapping[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "use_regex": use_regex}


DIGITS_STEP: Mapping[str, Any] = {"type": "Digits", "individual_digits": True}


@dataclass(frozen=True)
class PreTokenizerStyle:
    """A byte-level BPE pre-tokenizer llama.cpp knows, as it appears in tokenizer.json.

    `steps` are the pre-tokenizer's steps in order (a lone step or the members of a `Sequence`); each
    lists the fields that must match, other fields (such as `trim_offsets`) do not matter. `normalizers`
    are the normalizer types accepted alongside (None: no normalizer).
    """

    pre: str
    steps: tuple[Mapping[str, Any], ...]
    normalizers: tuple[str | None, ...] = (None,)


BPE_PRE_TOKENIZERS: tuple[PreTokenizerStyle, ...] = (
    PreTokenizerStyle("llama-bpe", (_split_step(LLAMA3_REGEX), _byte_level_step(use_regex=False))),
    # llama.cpp does not apply Qwen's NFC normalizer; text that is already NFC (nearly all) is unaffected.
    PreTokenizerStyle(
        "qwen2", (_split_step(QWEN2_REGEX), _byte_level_step(use_regex=False)), normalizers=(None, "NFC")
    ),
    PreTokenizerStyle("smollm", (DIGITS_STEP, _byte_level_step(use_regex=True))),
    PreTokenizerStyle("gpt-2", (_byte_level_step(use_regex=True),)),
)


def _steps(pre_tokenizer: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    if pre_tokenizer is None:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return [step for member in pre_tokenizer.get("pretokenizers") or [] for step in _steps(member)]
    return [pre_tokenizer]


def _normalizer_type(normalizer: Mapping[str, Any] | None) -> str | None:
    if normalizer is None:
        return None
    if normalizer.get("type") == "Sequence":
        members = normalizer.get("normalizers") or []
        if not members:
            return None
        if len(members) == 1:
            return _normalizer_type(members[0])
        return "Sequence[" + ", ".join(str(_normalizer_type(member)) for member in members) + "]"
    return str(normalizer.get("type"))


def _step_matches(found: Mapping[str, Any], expected: Mapping[str, Any]) -> bool:
    return all(found.get(key) == value for key, value in expected.items())


def _describe_step(step: Mapping[str, Any]) -> str:
    fields = []
    for key, value in step.items():
        if key == "pattern" and isinstance(value, Mapping) and len(value) == 1:
            kind, text = next(iter(value.items()))
            fields.append(f"{str(kind).lower()}={text!r}")
        elif key != "type":
            fields.append(f"{key}={value!r}")
    return f"{step.get('type')}({', '.join(fields)})"


def find_pre_tokenizer(tokenizer_json: Mapping[str, Any]) -> str:
    """The llama.cpp pre-tokenizer name (`tokenizer.ggml.pre`) for a byte-level BPE's tokenizer.json."""
    steps = _steps(tokenizer_json.get("pre_tokenizer"))
    normalizer = _normalizer_type(tokenizer_json.get("normalizer"))
    for style in BPE_PRE_TOKENIZERS:
        if (
            normalizer in style.normalizers
            and len(steps) == len(style.steps)
            and all(_step_matches(found, expected) for found, expected in zip(steps, style.steps, strict=True))
        ):
            return style.pre
    found = " then ".join(_describe_step(step) for step in steps) or "none"
    raise TokenizerError(
        f"tokenizer.json prepares text in a way qdesk does not support yet (pre-tokenizer: {found}; "
        f"normalizer: {normalizer}), so this model cannot be converted with correct token ids; please "
        "report the model to the qdesk developers."
    )


# --- reading the files -----------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise TokenizerError(f"{path} cannot be read ({error}); check the file, or download it again.") from error
    except json.JSONDecodeError as error:
        raise TokenizerError(
            f"{path} is not valid JSON ({error}); the download is probably damaged, download it again."
        ) from error
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} does not hold a JSON object; download the tokenizer files again.")
    return value


def _read_optional_json(path: Path) -> dict[str, Any]:
    return _read_json(path) if path.is_file() else {}


def _token_content(entry: Any) -> str | None:
    """A special token as tokenizer_config.json gives it: a string or an AddedToken-like object."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, Mapping) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


@dataclass(frozen=True)
class AddedToken:
    """A token Hugging Face matches in text before the model runs; `special` ones only when asked."""

    content: str
    special: bool


def _hf_added_tokens(tokenizer_json: Mapping[str, Any], config: Mapping[str, Any]) -> dict[int, AddedToken]:
    """Added tokens by id: tokenizer.json's `added_tokens`, else tokenizer_config.json's decoder table."""
    found: dict[int, AddedToken] = {}
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, Mapping):
        for key, entry in decoder.items():
            content = _token_content(entry)
            if str(key).isdigit() and content is not None:
                found[int(key)] = AddedToken(content, bool(entry.get("special", False)))
    for entry in tokenizer_json.get("added_tokens") or []:
        if isinstance(entry, Mapping) and isinstance(entry.get("id"), int) and isinstance(entry.get("content"), str):
            found[entry["id"]] = AddedToken(entry["content"], bool(entry.get("special", False)))
    return found


def _added_token_type(token: AddedToken) -> gguf.TokenType:
    return gguf.TokenType.CONTROL if token.special else gguf.TokenType.USER_DEFINED


# --- the vocabulary, however it was read -----------------------------------------------------------------


@dataclass
class Vocabulary:
    """Tokens by id, as GGUF stores them; ids nobody claims are filled when the table is laid out."""

    model: str
    pre: str | None
    texts: dict[int, str]
    types: dict[int, gguf.TokenType]
    scores: dict[int, float] | None
    add_space_prefix: bool | None
    """SentencePiece's "▁" before the text (None: not a SentencePiece-style tokenizer, key left out)."""
    add_bos_by_default: bool
    """What the tokenizer does when neither tokenizer.json nor tokenizer_config.json says."""
    fallback_special_ids: dict[str, int]
    """Special token ids the tokenizer model itself names (SentencePiece), used when the configs do not."""

    @property
    def size(self) -> int:
        return max(self.texts, default=-1) + 1

    def laid_out(self, count: int) -> tuple[list[str], list[int], list[float] | None]:
        """Token texts, types and scores for ids 0..count-1, holes and padding as UNUSED `[PAD{id}]`."""
        texts = [self.texts.get(index, f"[PAD{index}]") for index in range(count)]
        types = [int(self.types.get(index, gguf.TokenType.UNUSED)) for index in range(count)]
        scores = None
        if self.scores is not None:
            scores = [self.scores.get(index, PADDING_SCORE) for index in range(count)]
        _refuse_duplicates(texts)
        return texts, types, scores

    def ids_by_text(self) -> dict[str, int]:
        return {text: index for index, text in sorted(self.texts.items(), reverse=True)}


def _refuse_duplicates(texts: Sequence[str]) -> None:
    seen: dict[str, int] = {}
    for index, text in enumerate(texts):
        if text in seen:
            raise TokenizerError(
                f"The tokenizer gives the same text {text!r} to tokens {seen[text]} and {index}, which "
                "llama.cpp cannot load, so qdesk cannot convert it yet; please report the model to the qdesk "
                "developers."
            )
        seen[text] = index


def _bpe_vocab_entries(tokenizer_model: Mapping[str, Any]) -> dict[int, str]:
    vocab = tokenizer_model.get("vocab")
    if not isinstance(vocab, Mapping) or not vocab:
        raise TokenizerError("tokenizer.json has no BPE vocabulary; download the tokenizer files again.")
    texts: dict[int, str] = {}
    for text, index in vocab.items():
        if not isinstance(index, int) or index < 0:
            raise TokenizerError(
                f"tokenizer.json gives token {text!r} the id {index!r}; download the tokenizer files again."
            )
        texts[index] = text
    return texts


def _merge_pairs(tokenizer_model: Mapping[str, Any]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for merge in tokenizer_model.get("merges") or []:
        if isinstance(merge, str) and " " in merge[1:]:
            split_at = merge.index(" ", 1)
            pairs.append((merge[:split_at], merge[split_at + 1 :]))
        elif isinstance(merge, list) and len(merge) == 2:
            pairs.append((str(merge[0]), str(merge[1])))
    return pairs


def _byte_level_vocabulary(tokenizer_json: Mapping[str, Any], config: Mapping[str, Any]) -> Vocabulary:
    pre = find_pre_tokenizer(tokenizer_json)
    tokenizer_model = tokenizer_json["model"]
    if not _merge_pairs(tokenizer_model):
        raise TokenizerError("tokenizer.json has a BPE without merges; download the tokenizer files again.")
    texts = _bpe_vocab_entries(tokenizer_model)
    types = dict.fromkeys(texts, gguf.TokenType.NORMAL)
    for index, token in _hf_added_tokens(tokenizer_json, config).items():
        texts[index] = token.content
        types[index] = _added_token_type(token)
    return Vocabulary("gpt2", pre, texts, types, None, None, False, {})


def _space_prefix_of_converted_spm(tokenizer_json: Mapping[str, Any]) -> bool:
    """Whether a Hugging Face-converted SentencePiece tokenizer puts "▁" before the text.

    Recognised: the legacy normalizer (Prepend "▁", Replace " " by "▁"), Gemma's (Replace only), and the
    Metaspace pre-tokenizer; anything else splits or rewrites text in ways llama.cpp does not.
    """
    normalizer = tokenizer_json.get("normalizer")
    members = []
    if normalizer is not None:
        members = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    prepends = False
    replaces_spaces = False
    for member in members:
        if member.get("type") == "Prepend" and member.get("prepend") == SENTENCEPIECE_SPACE:
            prepends = True
        elif member.get("type") == "Replace" and member.get("content") == SENTENCEPIECE_SPACE:
            replaces_spaces = True
        else:
            _refuse_converted_spm(f"normalizer {_describe_step(member)}")
    for step in _steps(tokenizer_json.get("pre_tokenizer")):
        if step.get("type") == "Metaspace" and step.get("replacement") == SENTENCEPIECE_SPACE:
            replaces_spaces = True
            prepends = prepends or step.get("prepend_scheme", "always") in ("always", "first")
        elif not (step.get("type") == "Split" and step.get("pattern") == {"String": " "}):
            _refuse_converted_spm(f"pre-tokenizer {_describe_step(step)}")
    if not replaces_spaces:
        _refuse_converted_spm("no space-to-\u2581 replacement")
    return prepends


def _refuse_converted_spm(what: str) -> None:
    raise TokenizerError(
        f"tokenizer.json holds a byte-fallback BPE with a {what}, which qdesk does not support yet, so this "
        "model cannot be converted with correct token ids; please report the model to the qdesk developers."
    )


def _byte_fallback_vocabulary(tokenizer_json: Mapping[str, Any], config: Mapping[str, Any]) -> Vocabulary:
    tokenizer_model = tokenizer_json["model"]
    add_space_prefix = _space_prefix_of_converted_spm(tokenizer_json)
    texts = _bpe_vocab_entries(tokenizer_model)
    ids = {text: index for index, text in texts.items()}
    types = {
        index: gguf.TokenType.BYTE if BYTE_TOKEN.fullmatch(text) else gguf.TokenType.NORMAL
        for index, text in texts.items()
    }
    if sum(1 for kind in types.values() if kind == gguf.TokenType.BYTE) < 256:
        raise TokenizerError(
            "tokenizer.json uses byte fallback but lacks some of the 256 byte tokens <0x00>..<0xFF>, which "
            "llama.cpp needs; download the tokenizer files again."
        )
    unknown = tokenizer_model.get("unk_token")
    if isinstance(unknown, str) and unknown in ids:
        types[ids[unknown]] = gguf.TokenType.UNKNOWN
    # llama.cpp merges the adjacent pair whose joined text scores highest; the earliest merge must win.
    scores = dict.fromkeys(texts, 0.0)
    ranked: set[int] = set()
    for rank, (left, right) in enumerate(_merge_pairs(tokenizer_model)):
        merged = ids.get(left + right)
        if merged is not None and merged not in ranked:
            ranked.add(merged)
            scores[merged] = -float(rank)
    for index, token in _hf_added_tokens(tokenizer_json, config).items():
        if types.get(index) in (gguf.TokenType.UNKNOWN, gguf.TokenType.BYTE):
            continue
        texts[index] = token.content
        types[index] = _added_token_type(token)
        scores[index] = ADDED_TOKEN_SCORE
    return Vocabulary("llama", None, texts, types, scores, add_space_prefix, True, {})


def _load_sentencepiece_proto(path: Path) -> Any | None:
    """The parsed ModelProto, or None when the file is not a SentencePiece model (e.g. a tiktoken file)."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except (DecodeError, OSError):
        return None
    return proto if len(proto.pieces) > 0 else None


def _sentencepiece_vocabulary(
    folder: Path, proto: Any, tokenizer_json: Mapping[str, Any], config: Mapping[str, Any]
) -> Vocabulary:
    if proto.trainer_spec.model_type != SENTENCEPIECE_BPE:
        kind = proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type).lower()
        raise TokenizerError(
            f"tokenizer.model is a SentencePiece {kind} model, which qdesk does not support yet (only BPE); "
            "please report the model to the qdesk developers."
        )
    try:
        pieces = SentencePieceVocab(folder)
    except (ValueError, RuntimeError, OSError) as error:
        raise TokenizerError(
            f"tokenizer.model or added_tokens.json in {folder} cannot be used ({error}); download them again."
        ) from error
    texts: dict[int, str] = {}
    types: dict[int, gguf.TokenType] = {}
    scores: dict[int, float] = {}
    for index, (text, score, kind) in enumerate(pieces.all_tokens()):
        texts[index] = text.decode("utf-8")
        types[index] = kind
        scores[index] = score
    for index, piece in enumerate(proto.pieces):
        if piece.type == gguf.TokenType.USER_DEFINED:
            types[index] = gguf.TokenType.USER_DEFINED
    if sum(1 for kind in types.values() if kind == gguf.TokenType.BYTE) < 256:
        raise TokenizerError(
            "tokenizer.model was trained without byte fallback, which qdesk does not support yet because "
            "llama.cpp cannot encode characters outside its vocabulary; please report the model to the "
            "qdesk developers."
        )
    for index, token in _hf_added_tokens(tokenizer_json, config).items():
        if types.get(index, gguf.TokenType.NORMAL) not in (gguf.TokenType.NORMAL, gguf.TokenType.USER_DEFINED):
            continue
        texts.setdefault(index, token.content)
        types[index] = _added_token_type(token)
        scores.setdefault(index, ADDED_TOKEN_SCORE)
    model_ids = {
        "bos": proto.trainer_spec.bos_id,
        "eos": proto.trainer_spec.eos_id,
        "unk": proto.trainer_spec.unk_id,
        "pad": proto.trainer_spec.pad_id,
    }
    fallback = {kind: index for kind, index in model_ids.items() if index >= 0}
    add_space_prefix = bool(proto.normalizer_spec.add_dummy_prefix)
    return Vocabulary("llama", None, texts, types, scores, add_space_prefix, True, fallback)


def read_vocabulary(folder: Path) -> Vocabulary:
    """The checkpoint's tokenizer as GGUF sees it, chosen from the files present (see the module doc)."""
    folder = Path(folder)
    json_path = folder / TOKENIZER_JSON
    spm_path = folder / SENTENCEPIECE_MODEL
    if not json_path.is_file() and not spm_path.is_file():
        raise TokenizerError(
            f"{folder} has no tokenizer ({TOKENIZER_JSON} or {SENTENCEPIECE_MODEL}); download the complete "
            "checkpoint, including its tokenizer files."
        )
    config = _read_optional_json(folder / TOKENIZER_CONFIG)
    tokenizer_json = _read_optional_json(json_path)
    proto = _load_sentencepiece_proto(spm_path) if spm_path.is_file() else None
    if proto is not None:
        return _sentencepiece_vocabulary(folder, proto, tokenizer_json, config)
    if not tokenizer_json:
        raise TokenizerError(
            f"{spm_path} is not a SentencePiece model and there is no {TOKENIZER_JSON}; download the "
            "tokenizer files again."
        )
    tokenizer_model = tokenizer_json.get("model")
    if not isinstance(tokenizer_model, Mapping):
        raise TokenizerError(f"{json_path} has no `model` section; download the tokenizer files again.")
    if tokenizer_model.get("type") != "BPE":
        raise TokenizerError(
            f"tokenizer.json holds a {tokenizer_model.get('type')} tokenizer, which qdesk does not support yet "
            "(only BPE); please report the model to the qdesk developers."
        )
    if tokenizer_model.get("byte_fallback"):
        return _byte_fallback_vocabulary(tokenizer_json, config)
    return _byte_level_vocabulary(tokenizer_json, config)


# --- writing ---------------------------------------------------------------------------------------------


def _special_vocab(folder: Path, vocabulary: Vocabulary, count: int) -> SpecialVocab:
    try:
        special = SpecialVocab(
            folder,
            load_merges=vocabulary.model == "gpt2",
            special_token_types=SPECIAL_TOKEN_KINDS,
            n_vocab=count,
        )
    except (ValueError, OSError) as error:
        raise TokenizerError(
            f"The tokenizer files in {folder} cannot be read ({error}); download them again."
        ) from error
    config = _read_optional_json(folder / TOKENIZER_CONFIG)
    ids = vocabulary.ids_by_text()
    for kind in SPECIAL_TOKEN_KINDS:
        if kind in special.special_token_ids:
            continue
        content = _token_content(config.get(f"{kind}_token"))
        if content in ids:
            special.special_token_ids[kind] = ids[content]
        elif kind in vocabulary.fallback_special_ids and f"{kind}_token" not in config:
            special.special_token_ids[kind] = vocabulary.fallback_special_ids[kind]
    special.add_special_token.setdefault("bos", vocabulary.add_bos_by_default)
    special.add_special_token.setdefault("eos", False)
    return special


def export_tokenizer(folder: Path, writer: gguf.GGUFWriter, vocab_rows: int | None) -> TokenizerSummary:
    """Add the tokenizer of the checkpoint in `folder` to `writer`'s metadata.

    `vocab_rows` is the embedding matrix's row count: the vocabulary is padded up to it, and a tokenizer
    with more tokens than rows is refused. None keeps the tokenizer's own size.
    """
    vocabulary = read_vocabulary(Path(folder))
    count = vocabulary.size if vocab_rows is None else vocab_rows
    if vocabulary.size > count:
        raise TokenizerError(
            f"The tokenizer has {vocabulary.size} tokens but the model's embedding matrix has only {count} "
            "rows, so the tokenizer files do not belong to this checkpoint; download the matching ones."
        )
    special = _special_vocab(Path(folder), vocabulary, count)
    if vocabulary.model == "gpt2" and not special.merges:
        raise TokenizerError("tokenizer.json has a BPE without merges; download the tokenizer files again.")
    texts, types, scores = vocabulary.laid_out(count)

    writer.add_tokenizer_model(vocabulary.model)
    if vocabulary.pre is not None:
        writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(texts)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    if vocabulary.add_space_prefix is not None:
        writer.add_add_space_prefix(vocabulary.add_space_prefix)
    special.add_to_gguf(writer, quiet=True)
    return TokenizerSummary(
        model=vocabulary.model,
        pre=vocabulary.pre,
        token_count=count,
        has_chat_template=special.chat_template is not None,
    )


__all__ = [
    "BPE_PRE_TOKENIZERS",
    "PreTokenizerStyle",
    "TokenizerSummary",
    "export_tokenizer",
    "find_pre_tokenizer",
    "read_vocabulary",
]
