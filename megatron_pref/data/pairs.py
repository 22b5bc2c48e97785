"""Tokenised pairs, the length policy and the row -> pair processing step.

Length policy (``seq_length`` = pack length, ``max_prompt_length`` optional):

* a pair needs ``2 * len(prompt) + len(chosen) + len(rejected)`` tokens of a
  pack (the prompt is repeated in front of both responses);
* with ``max_prompt_length`` set, every prompt longer than it is truncated
  from the left to ``max_prompt_length`` tokens (a leading BOS is kept);
  if the pair still does not fit, both responses are truncated from the right
  to a common cap ``m``, the largest with ``min(len_c, m) + min(len_r, m) <=
  seq_length - 2 * len(prompt)`` (the shorter response is cut only when it
  must be). A truncated response loses its EOS.
* pairs that still do not fit (or need ``m < 1``) are skipped as
  ``too_long``; pairs whose truncated responses became identical are skipped
  as ``identical_after_truncation``;
* without ``max_prompt_length`` pairs that do not fit are skipped as
  ``too_long`` (nothing is truncated).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .errors import SKIP_REASONS, STRICT_REASONS, DataError, SkipPair
from .formats import normalize_row


@dataclass
class TokenizedPair:
    """One tokenised preference pair. ``prompt_ids`` includes BOS, each
    response includes its EOS (unless truncated)."""

    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray
    score_chosen: Optional[float] = None
    score_rejected: Optional[float] = None
    pair_id: int = -1

    @property
    def num_tokens(self) -> int:
        """Tokens the pair occupies in a pack (prompt counted twice)."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)

    @property
    def chosen_sequence(self) -> np.ndarray:
        return np.concatenate([self.prompt_ids, self.chosen_ids])

    @property
    def rejected_sequence(self) -> np.ndarray:
        return np.concatenate([self.prompt_ids, self.rejected_ids])


def validate_length_options(seq_length: Optional[int], max_prompt_length: Optional[int]) -> None:
    if seq_length is not None and seq_length < 4:
        raise DataError(f"--seq-length must be at least 4, got {seq_length}")
    if max_prompt_length is not None:
        if max_prompt_length < 1:
            raise DataError(f"--max-prompt-length must be at least 1, got {max_prompt_length}")
        if seq_length is None:
            raise DataError("--max-prompt-length needs --seq-length")
        if 2 * max_prompt_length + 2 > seq_length:
            raise DataError(
                f"--max-prompt-length {max_prompt_length} leaves no room for responses in "
                f"--seq-length {seq_length} (need 2*max_prompt_length + 2 <= seq_length)"
            )


def plan_lengths(
    lengths: np.ndarray, seq_length: int, max_prompt_length: Optional[int] = None
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised length policy.

    ``lengths``: int array ``[N, 3]`` (prompt, chosen, rejected). Returns
    ``(new_lengths [N, 3], fits [N] bool, truncated [N] bool)``; rows with
    ``fits == False`` are ``too_long``. New lengths are prefix/suffix lengths to
    keep (the prompt keeps its last tokens, plus a leading BOS).
    """
    L = np.asarray(lengths, dtype=np.int64).reshape(-1, 3)
    lp, lc, lr = L[:, 0].copy(), L[:, 1].copy(), L[:, 2].copy()
    total = 2 * lp + lc + lr
    if max_prompt_length is None:
        fits = total <= seq_length
        return L.copy(), fits, np.zeros(len(L), dtype=bool)
    lp2 = np.minimum(lp, max_prompt_length)
    budget = seq_length - 2 * lp2
    a = np.minimum(lc, lr)
    cap = np.maximum(budget - a, budget // 2)
    need_cut = (lc + lr) > budget
    lc2 = np.where(need_cut, np.minimum(lc, cap), lc)
    lr2 = np.where(need_cut, np.minimum(lr, cap), lr)
    fits = (2 * lp2 + lc2 + lr2 <= seq_length) & (lc2 >= 1) & (lr2 >= 1)
    truncated = (lp2 != lp) | (lc2 != lc) | (lr2 != lr)
    return np.stack([lp2, lc2, lr2], axis=1), fits, truncated & fits


def apply_length_policy(
    pair: TokenizedPair,
    seq_length: Optional[int],
    max_prompt_length: Optional[int] = None,
    bos_id: Optional[int] = None,
) -> Tuple[TokenizedPair, bool]:
    """Apply the length policy to one pair.

    Returns ``(pair, truncated)``; raises :class:`SkipPair` (``too_long`` or
    ``identical_after_truncation``)."""
    if seq_length is None:
        return pair, False
    validate_length_options(seq_length, max_prompt_length)
    lens = np.array([[len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)]])
    new, fits, trunc = plan_lengths(lens, seq_length, max_prompt_length)
    if not fits[0]:
        raise SkipPair("too_long", f"pair needs {pair.num_tokens} tokens > seq_length {seq_length}")
    if not trunc[0]:
        return pair, False
    return truncate_pair(pair, new[0], bos_id), True


def truncate_pair(pair: TokenizedPair, new_lengths, bos_id: Optional[int]) -> TokenizedPair:
    """Cut a pair to ``new_lengths`` = (prompt, chosen, rejected): prompt from
    the left (keeping a leading BOS), responses from the right. Raises
    :class:`SkipPair` if the responses become identical."""
    lp, lc, lr = (int(x) for x in new_lengths)
    p = pair.prompt_ids
    if lp < len(p):
        if bos_id is not None and len(p) and p[0] == bos_id and lp >= 1:
            p = np.concatenate([p[:1], p[len(p) - (lp - 1):]]) if lp > 1 else p[:1]
        else:
            p = p[len(p) - lp:]
    c, r = pair.chosen_ids[:lc], pair.rejected_ids[:lr]
    if len(c) == len(r) and np.array_equal(c, r):
        raise SkipPair("identical_after_truncation", "responses identical after truncation")
    return TokenizedPair(p, c, r, pair.score_chosen, pair.score_rejected, pair.pair_id)


@dataclass
class ProcessOptions:
    """Options of the row -> tokenised pair step (shared by the preprocessing
    tool and the in-memory dataset)."""

    field_map: Dict[str, str] = field(default_factory=dict)
    strict: bool = False
    seq_length: Optional[int] = None
    max_prompt_length: Optional[int] = None
    add_bos: bool = True
    add_eos: bool = True


@dataclass
class ProcessStats:
    """Counters of one processing run."""

    rows: int = 0
    pairs: int = 0
    truncated: int = 0
    skipped: Dict[str, int] = field(default_factory=lambda: {r: 0 for r in SKIP_REASONS})
    prompt_tokens: int = 0
    chosen_tokens: int = 0
    rejected_tokens: int = 0

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def add(self, other: "ProcessStats") -> None:
        self.rows += other.rows
        self.pairs += other.pairs
        self.truncated += other.truncated
        for k, v in other.skipped.items():
            self.skipped[k] = self.skipped.get(k, 0) + v
        self.prompt_tokens += other.prompt_tokens
        self.chosen_tokens += other.chosen_tokens
        self.rejected_tokens += other.rejected_tokens

    def as_dict(self) -> Dict[str, Any]:
        return {
            "rows": self.rows,
            "pairs": self.pairs,
            "truncated": self.truncated,
            "skipped": dict(self.skipped),
            "skipped_total": self.num_skipped,
            "prompt_tokens": self.prompt_tokens,
            "chosen_tokens": self.chosen_tokens,
            "rejected_tokens": self.rejected_tokens,
        }

    def summary(self) -> str:
        sk = ", ".join(f"{k}={v}" for k, v in self.skipped.items() if v) or "none"
        return (
            f"{self.rows} rows -> {self.pairs} pairs ({self.truncated} truncated); "
            f"skipped {self.num_skipped} ({sk})"
        )


def process_row(
    row: Dict[str, Any], where: str, tokenizer, options: ProcessOptions, stats: ProcessStats
) -> Optional[TokenizedPair]:
    """Normalise, tokenise and length-check one field-renamed row.

    Returns the pair, or ``None`` if it was skipped (counted in ``stats``).
    Raises :class:`DataError` (one line naming ``where``) for invalid rows and,
    with ``options.strict``, for empty/identical pairs."""
    stats.rows += 1
    try:
        ex = normalize_row(row, where)
        try:
            p, c, r = tokenizer.tokenize_example(ex, options.add_bos, options.add_eos, where)
        except DataError as e:
            msg = str(e)
            raise DataError(msg if msg.startswith(where) else f"{where}: {msg}") from None
        pair = TokenizedPair(p, c, r, ex.score_chosen, ex.score_rejected)
        if len(c) == len(r) and np.array_equal(c, r):
            raise SkipPair("identical", f"{where}: chosen and rejected tokenise identically")
        if len(c) == 0:
            raise SkipPair("empty_chosen", f"{where}: empty chosen response")
        if len(r) == 0:
            raise SkipPair("empty_rejected", f"{where}: empty rejected response")
        if len(p) == 0:
            # Nothing precedes the first response token, so it cannot be scored: a one-token
            # response would have no log-prob at all (0/0 in per-token averages).
            raise SkipPair("empty_prompt", f"{where}: no prompt tokens and no BOS: the first response "
                                           "token has nothing to predict it")
        pair, truncated = apply_length_policy(
            pair, options.seq_length, options.max_prompt_length, tokenizer.bos_id
        )
    except SkipPair as s:
        if options.strict and s.reason in STRICT_REASONS:
            msg = str(s)
            raise DataError(
                (msg if msg.startswith(where) else f"{where}: {msg}") + " (--strict)"
            ) from None
        stats.skipped[s.reason] = stats.skipped.get(s.reason, 0) + 1
        return None
    stats.pairs += 1
    stats.truncated += int(truncated)
    stats.prompt_tokens += len(pair.prompt_ids)
    stats.chosen_tokens += len(pair.chosen_ids)
    stats.rejected_tokens += len(pair.rejected_ids)
    return pair
