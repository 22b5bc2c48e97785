"""Row formats: turn one input row into a normalised :class:`PreferenceExample`.

Accepted rows (after ``--data-field-map`` renaming):

1. ``prompt``, ``chosen``, ``rejected`` strings (plain text).
2. ``chosen`` / ``rejected`` as lists of chat messages ``{"role", "content"}``,
   either
   a. with ``prompt`` as a message list: the prompt messages; if chosen and
      rejected repeat them at their start they are stripped;
   b. with ``prompt`` as a string and chosen/rejected holding the whole
      conversation (UltraFeedback-binarized): split at the longest common
      message prefix (the prompt string itself is not re-used);
   c. with ``prompt`` as a string and chosen/rejected holding only assistant
      messages: the prompt becomes one user message;
   d. without ``prompt``: split at the longest common message prefix.
   A string chosen/rejected next to a message-list prompt becomes one
   assistant message.
3. HH-RLHF text: ``chosen`` / ``rejected`` strings holding the whole
   conversation and no ``prompt``: split at the longest common prefix, moved
   back to just after the last ``"\\n\\nAssistant:"`` inside that prefix (so the
   prompt ends with the assistant marker and each response starts with the
   text after it, usually a space). Without that marker the cut is moved back
   to the last whitespace inside the common prefix (the response then starts
   with that whitespace); if there is none the cut is the whole common prefix.

The message-prefix split (2b, 2d) backs off until both responses start with an
``assistant`` message. Optional numeric ``score_chosen`` / ``score_rejected``
are kept. Roles must be ``system``, ``user`` or ``assistant``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

from .errors import DataError, SkipPair

ALLOWED_ROLES = ("system", "user", "assistant")
HH_ASSISTANT_MARKER = "\n\nAssistant:"

Message = Dict[str, str]
TextOrMessages = Union[str, List[Message]]
_MISSING = object()


@dataclass
class PreferenceExample:
    """One normalised preference pair before tokenisation.

    For plain-text rows ``prompt``/``chosen``/``rejected`` are strings; for
    chat rows they are message lists (``chosen``/``rejected`` hold only the
    response messages, starting with an ``assistant`` message).
    """

    prompt: TextOrMessages
    chosen: TextOrMessages
    rejected: TextOrMessages
    score_chosen: Optional[float] = None
    score_rejected: Optional[float] = None

    @property
    def is_chat(self) -> bool:
        return isinstance(self.chosen, list)


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _validate_messages(value: Any, field: str, where: str) -> List[Message]:
    if not isinstance(value, list):
        raise DataError(f"{where}: field {field!r} must be a list of chat messages, got {_type_name(value)}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(
                f"{where}: field {field!r} message {i} must be an object with 'role' and 'content', "
                f"got {_type_name(m)}"
            )
        if "role" not in m:
            raise DataError(f"{where}: field {field!r} message {i} has no 'role'")
        if "content" not in m:
            raise DataError(f"{where}: field {field!r} message {i} has no 'content'")
        role, content = m["role"], m["content"]
        if role not in ALLOWED_ROLES:
            raise DataError(
                f"{where}: unknown role {role!r} in field {field!r} message {i} "
                f"(allowed: {', '.join(ALLOWED_ROLES)})"
            )
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise DataError(
                f"{where}: field {field!r} message {i} 'content' must be a string, got {_type_name(content)}"
            )
        out.append({"role": role, "content": content})
    return out


def _text_or_messages(row: Dict[str, Any], field: str, where: str, required: bool) -> Any:
    if field not in row:
        if not required:
            return _MISSING
        present = ", ".join(sorted(map(str, row.keys()))) or "none"
        raise DataError(
            f"{where}: missing field {field!r} (fields present: {present}; "
            f"rename with --data-field-map old=new)"
        )
    v = row[field]
    if v is None:
        if not required:
            return _MISSING
        raise DataError(f"{where}: field {field!r} is null")
    if isinstance(v, (bytes, bytearray)):
        try:
            v = bytes(v).decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: invalid UTF-8 in field {field!r} (byte offset {e.start})") from None
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        return _validate_messages(v, field, where)
    raise DataError(
        f"{where}: field {field!r} must be a string or a list of chat messages, got {_type_name(v)}"
    )


def _score(row: Dict[str, Any], field: str, where: str) -> Optional[float]:
    v = row.get(field)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DataError(f"{where}: field {field!r} must be a number, got {_type_name(v)}")
    v = float(v)
    if math.isnan(v):
        return None
    if math.isinf(v):
        raise DataError(f"{where}: field {field!r} must be finite, got {v}")
    return v


def split_hh_text(chosen: str, rejected: str, marker: str = HH_ASSISTANT_MARKER) -> Tuple[str, str, str]:
    """Split two full conversations sharing a prompt into (prompt, chosen, rejected).

    See the module docstring for the rule.
    """
    n = len(os.path.commonprefix([chosen, rejected]))
    common = chosen[:n]
    idx = common.rfind(marker)
    if idx >= 0:
        cut = idx + len(marker)
    else:
        ws = max(common.rfind(c) for c in (" ", "\n", "\t"))
        cut = ws if ws > 0 else n
    return chosen[:cut], chosen[cut:], rejected[cut:]


def split_common_messages(
    chosen: List[Message], rejected: List[Message], where: str = "?"
) -> Tuple[List[Message], List[Message], List[Message]]:
    """Split two conversations at their longest common message prefix, backed
    off so that both responses start with an assistant message."""
    k = 0
    while k < len(chosen) and k < len(rejected) and chosen[k] == rejected[k]:
        k += 1

    def ok(k: int) -> bool:
        return (
            k < len(chosen)
            and k < len(rejected)
            and chosen[k]["role"] == "assistant"
            and rejected[k]["role"] == "assistant"
        )

    while k > 0 and not ok(k):
        k -= 1
    if not ok(k):
        raise DataError(
            f"{where}: cannot split 'chosen' and 'rejected' into a shared prompt and responses "
            f"starting with an assistant message"
        )
    return chosen[:k], chosen[k:], rejected[k:]


def _is_empty(x: TextOrMessages) -> bool:
    if isinstance(x, str):
        return not x.strip()
    return all(not m["content"].strip() for m in x)


def normalize_row(row: Dict[str, Any], where: str = "?") -> PreferenceExample:
    """Normalise one (already field-renamed) row.

    Raises :class:`DataError` for invalid rows and :class:`SkipPair` for rows
    with an empty or identical chosen/rejected.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {_type_name(row)}")
    chosen = _text_or_messages(row, "chosen", where, required=True)
    rejected = _text_or_messages(row, "rejected", where, required=True)
    prompt = _text_or_messages(row, "prompt", where, required=False)
    score_c = _score(row, "score_chosen", where)
    score_r = _score(row, "score_rejected", where)

    if chosen == rejected:
        raise SkipPair("identical", f"{where}: chosen and rejected are identical")

    chat = any(isinstance(x, list) for x in (prompt, chosen, rejected))
    if not chat:
        if prompt is _MISSING:
            prompt, chosen, rejected = split_hh_text(chosen, rejected)
    else:
        c = chosen if isinstance(chosen, list) else [{"role": "assistant", "content": chosen}]
        r = rejected if isinstance(rejected, list) else [{"role": "assistant", "content": rejected}]
        if isinstance(prompt, list):
            p = prompt
            if p and c[: len(p)] == p and r[: len(p)] == p:
                c, r = c[len(p):], r[len(p):]
            for name, resp in (("chosen", c), ("rejected", r)):
                if resp and resp[0]["role"] != "assistant":
                    raise DataError(
                        f"{where}: field {name!r}: the response must start with an assistant message, "
                        f"got {resp[0]['role']!r}"
                    )
        elif isinstance(prompt, str) and not any(m["role"] != "assistant" for m in c + r):
            p = [{"role": "user", "content": prompt}]
        else:
            p, c, r = split_common_messages(c, r, where)
        prompt, chosen, rejected = p, c, r

    if _is_empty(chosen):
        raise SkipPair("empty_chosen", f"{where}: empty chosen response")
    if _is_empty(rejected):
        raise SkipPair("empty_rejected", f"{where}: empty rejected response")
    if chosen == rejected:
        raise SkipPair("identical", f"{where}: chosen and rejected responses are identical")
    return PreferenceExample(prompt, chosen, rejected, score_c, score_r)
