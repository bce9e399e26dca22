"""Evaluation text and its chunks, laid out as llama.cpp's perplexity tool lays them out.

The text (the user's files, or the built-in held-out text in `resources/eval/text/`, which shares nothing with
the calibration text) is tokenized by the reference model, each source on its own, and cut into chunks of `ctx`
tokens; a model that starts texts with BOS gets BOS as the first token of every chunk. The chunks of the
sources are interleaved (first chunk of each source, then the second of each, …) so that `--chunks N` takes a
mix of every source rather than the first one alone; sources shorter than a chunk are pooled into one stream.
In each chunk the logits at positions `ctx // 2` … `ctx - 2` are scored against the token that follows them:
the first half only gives context, as in llama.cpp's perplexity tool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

import numpy as np

from converters.calibration.calibrate import read_plain_text
from converters.core.errors import UserError
from converters.core.paths import resources_dir

DEFAULT_CTX = 512
MIN_CTX = 16
BUILTIN_ORDER = ("prose", "dialogue", "code", "math", "multilingual")
"""Built-in sources in this order (others after, by name): the sample paragraph comes from the first."""


class EvalError(UserError):
    """An evaluation that cannot run as asked: the message says what is wrong and what to do."""


@dataclass(frozen=True)
class EvalText:
    name: str
    text: str


@dataclass(frozen=True)
class TokenChunks:
    """The token ids of every chunk (chunks × ctx) and which positions are scored."""

    ids: np.ndarray
    text_tokens: int
    """Tokens in the whole text (the chunks use the first chunks × ctx of them)."""

    @property
    def count(self) -> int:
        return int(self.ids.shape[0])

    @property
    def ctx(self) -> int:
        return int(self.ids.shape[1])

    @property
    def first_scored(self) -> int:
        """Position of the first logit row that is scored; it predicts the token after it."""
        return self.ctx // 2

    @property
    def scored_per_chunk(self) -> int:
        return self.ctx - 1 - self.first_scored

    @property
    def scored_tokens(self) -> int:
        return self.count * self.scored_per_chunk

    def next_tokens(self, chunk: int) -> np.ndarray:
        """The tokens the scored rows of `chunk` predict."""
        return self.ids[chunk, self.first_scored + 1 :]


def builtin_eval_texts() -> list[EvalText]:
    folder = resources_dir() / "eval" / "text"

    def rank(path: Path) -> tuple[int, str]:
        return (BUILTIN_ORDER.index(path.stem) if path.stem in BUILTIN_ORDER else len(BUILTIN_ORDER), path.stem)

    texts = [EvalText(f"qdesk-builtin:{path.stem}", path.read_text(encoding="utf-8"))
             for path in sorted(folder.glob("*.txt"), key=rank)]
    if not texts:
        raise EvalError(f"the built-in evaluation text is missing from {folder}; reinstall qdesk or pass --text FILE.")
    return texts


def read_eval_texts(paths: Sequence[str | Path]) -> list[EvalText]:
    return [EvalText(str(path), read_plain_text(path, "evaluation")) for path in paths]


def check_ctx(ctx: int) -> None:
    if ctx < MIN_CTX:
        raise EvalError(f"--ctx must be at least {MIN_CTX} tokens (got {ctx}).")


def chunk_tokens(sources: Sequence[Sequence[int]], ctx: int, max_chunks: int | None, bos: int | None
                 ) -> TokenChunks:
    """Whole chunks of `ctx` tokens from each source's tokens, interleaved; `bos` (if used) opens every chunk."""
    check_ctx(ctx)
    if max_chunks is not None and max_chunks < 1:
        raise EvalError(f"--chunks must be at least 1 (got {max_chunks}).")
    total = sum(len(tokens) for tokens in sources)
    pooled = [token for tokens in sources if len(tokens) < ctx for token in tokens]
    streams = [tokens for tokens in sources if len(tokens) >= ctx] + ([pooled] if len(pooled) >= ctx else [])
    per_stream = [[stream[start : start + ctx] for start in range(0, len(stream) - ctx + 1, ctx)]
                  for stream in streams]
    interleaved = [chunk for group in zip_longest(*per_stream) for chunk in group if chunk is not None]
    if not interleaved:
        raise EvalError(f"the evaluation text is {total} tokens long, less than one chunk of {ctx}; give a "
                        "longer text or a smaller --ctx.")
    chosen = interleaved if max_chunks is None else interleaved[:max_chunks]
    ids = np.asarray(chosen, dtype=np.int32)
    if bos is not None:
        ids[:, 0] = bos
    return TokenChunks(ids, text_tokens=total)
