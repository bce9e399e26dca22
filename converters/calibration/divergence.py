"""Per-token divergence of a candidate's next-token distribution from a reference's, from raw logits.

The reference's distribution is kept in a compact, exact-enough form so that it can be cached on disk and
streamed back for every candidate: for each scored token, the square root of each vocabulary entry's
probability relative to the most likely entry, as 16-bit fixed point (`w = round(65535 * sqrt(p / p_max))`).
The distribution the candidate is compared with is then p~ = w² / Σw², a normalized distribution whose
divergence from the exact one, KL(p~ ‖ p) ≈ 2 Σ (rounding error of √p)², stays near 1e-6 nats per token whatever
the vocabulary, while the many entries of negligible probability become small integers that compress well.

For a candidate's logits x (centred on their maximum: x' = x - max x, s = Σ exp x'):

    KL(p~ ‖ q) = Σ p~ log p~  -  (Σ w² x') / Σ w²  +  log s

so the reference side contributes two stored numbers per token (Σ p~ log p~ and Σ w²) and the candidate side
one pass of exp and one weighted sum over its logits. Perplexity, the probability of the correct token and the
reference's top token come from the exact float logits of each side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROOT_SCALE = 65535
"""Fixed-point scale of √(p / p_max): 16 bits."""
ROWS_PER_BLOCK = 16
"""Rows processed together: big enough for numpy's loops, small enough to stay in cache."""


@dataclass(frozen=True)
class ReferenceRows:
    """The reference's side of a run of scored tokens (one row per token)."""

    roots: np.ndarray
    """uint16 [rows, n_vocab]: round(65535 √(p / p_max))."""
    neg_entropy: np.ndarray
    """float64 [rows]: Σ p~ log p~ of the fixed-point distribution."""
    root_norm: np.ndarray
    """float64 [rows]: Σ w², the fixed-point distribution's normalizer."""
    top: np.ndarray
    """int32 [rows]: the reference's most likely token."""
    logp_correct: np.ndarray
    """float64 [rows]: exact log-probability of the token that actually follows."""

    def __len__(self) -> int:
        return int(self.top.size)

    def window(self, rows: slice) -> ReferenceRows:
        """The rows `rows` only (views, no copies)."""
        return ReferenceRows(self.roots[rows], self.neg_entropy[rows], self.root_norm[rows], self.top[rows],
                             self.logp_correct[rows])


@dataclass(frozen=True)
class CandidateRows:
    """A candidate's scores for a run of scored tokens against the reference."""

    kld: np.ndarray
    """float64 [rows]: KL(P_ref ‖ P_cand) in nats."""
    logp_correct: np.ndarray
    """float64 [rows]: the candidate's log-probability of the token that actually follows."""
    top_matches: np.ndarray
    """bool [rows]: the candidate's most likely token is the reference's."""


def _centred(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits − row max, row argmax, log Σ exp(logits − row max)) of float32 rows."""
    top = logits.argmax(axis=1)
    centred = logits - logits[np.arange(logits.shape[0]), top][:, None]
    log_sum = np.log(np.exp(centred).sum(axis=1, dtype=np.float64))
    return centred, top, log_sum


def _logp_of(centred: np.ndarray, log_sum: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    return centred[np.arange(centred.shape[0]), tokens].astype(np.float64) - log_sum


def encode_reference(logits: np.ndarray, next_tokens: np.ndarray) -> ReferenceRows:
    """Reference rows from float32 logits [rows, n_vocab] and the token following each row."""
    _check_rows(logits, next_tokens)
    parts: list[ReferenceRows] = []
    for start in range(0, logits.shape[0], ROWS_PER_BLOCK):
        block = logits[start : start + ROWS_PER_BLOCK]
        centred, top, log_sum = _centred(block)
        roots = np.rint(np.exp(centred * np.float32(0.5)) * np.float32(ROOT_SCALE)).astype(np.uint16)
        squares = roots.astype(np.float64) ** 2
        norm = squares.sum(axis=1)
        probabilities = squares / norm[:, None]
        with np.errstate(divide="ignore"):
            logs = np.where(squares > 0, np.log(np.where(squares > 0, probabilities, 1.0)), 0.0)
        parts.append(ReferenceRows(
            roots=roots,
            neg_entropy=(probabilities * logs).sum(axis=1),
            root_norm=norm,
            top=top.astype(np.int32),
            logp_correct=_logp_of(centred, log_sum, next_tokens[start : start + ROWS_PER_BLOCK]),
        ))
    return join_reference(parts)


def compare_candidate(logits: np.ndarray, reference: ReferenceRows, next_tokens: np.ndarray) -> CandidateRows:
    """Score a candidate's float32 logits [rows, n_vocab] against the matching reference rows."""
    _check_rows(logits, next_tokens)
    if reference.roots.shape != logits.shape:
        raise ValueError(f"reference rows {reference.roots.shape} do not match candidate logits {logits.shape}")
    kld, logp, matches = [], [], []
    for start in range(0, logits.shape[0], ROWS_PER_BLOCK):
        rows = slice(start, start + ROWS_PER_BLOCK)
        centred, top, log_sum = _centred(logits[rows])
        weights = reference.roots[rows].astype(np.float32)
        weights *= weights
        cross = np.einsum("ij,ij->i", weights, centred, dtype=np.float64) / reference.root_norm[rows]
        kld.append(np.maximum(reference.neg_entropy[rows] - cross + log_sum, 0.0))
        logp.append(_logp_of(centred, log_sum, next_tokens[rows]))
        matches.append(top == reference.top[rows])
    return CandidateRows(np.concatenate(kld), np.concatenate(logp), np.concatenate(matches))


def log_probabilities_of(logits: np.ndarray, next_tokens: np.ndarray) -> np.ndarray:
    """Exact log-probability of each row's next token (for perplexity alone, without a reference)."""
    _check_rows(logits, next_tokens)
    parts = []
    for start in range(0, logits.shape[0], ROWS_PER_BLOCK):
        centred, _, log_sum = _centred(logits[start : start + ROWS_PER_BLOCK])
        parts.append(_logp_of(centred, log_sum, next_tokens[start : start + ROWS_PER_BLOCK]))
    return np.concatenate(parts)


def join_reference(parts: list[ReferenceRows]) -> ReferenceRows:
    return ReferenceRows(
        roots=np.concatenate([part.roots for part in parts]),
        neg_entropy=np.concatenate([part.neg_entropy for part in parts]),
        root_norm=np.concatenate([part.root_norm for part in parts]),
        top=np.concatenate([part.top for part in parts]),
        logp_correct=np.concatenate([part.logp_correct for part in parts]),
    )


def _check_rows(logits: np.ndarray, next_tokens: np.ndarray) -> None:
    if logits.ndim != 2 or logits.dtype != np.float32:
        raise ValueError(f"logits must be float32 rows × vocabulary (got {logits.dtype} {logits.shape})")
    if next_tokens.shape != (logits.shape[0],):
        raise ValueError(f"{next_tokens.size} next tokens for {logits.shape[0]} rows of logits")
