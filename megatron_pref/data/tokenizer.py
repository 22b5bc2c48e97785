"""Tokenizers for preference data and the pair tokenisation policy.

Two kinds, named like Megatron's ``--tokenizer-type``:

* ``SentencePieceTokenizer`` -- ``--tokenizer-model FILE.model``;
* ``HuggingFaceTokenizer`` -- ``--tokenizer-model DIR``, a local directory
  with ``tokenizer.json`` and ``tokenizer_config.json`` (loaded with
  ``transformers.AutoTokenizer``, offline). Its chat template renders message
  rows.

Tokenisation policy (the same for chosen and rejected):

* sequence = prompt tokens + response tokens;
* the prompt starts with BOS when the tokenizer has one (prepended unless the
  rendered chat template already starts with it);
* each response ends with EOS (appended unless it already ends with it);
* plain-text prompt and responses are tokenised separately (no special
  tokens added by the tokenizer itself) and concatenated;
* chat rows: ``prompt = render(prompt_messages, add_generation_prompt=True)``
  and ``response = render(prompt_messages + response_messages)[len(prompt):]``;
  the template must render the prompt as a prefix of the conversation.
  Tokenizers without a chat template (all SentencePiece models) use an
  HH-RLHF style rendering: ``"\\n\\n{Role}: {content}"`` per message with
  roles System/Human/Assistant and generation prompt ``"\\n\\nAssistant:"``.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .errors import DataError
from .formats import PreferenceExample

SENTENCEPIECE = "SentencePieceTokenizer"
HUGGINGFACE = "HuggingFaceTokenizer"
_ALIASES = {
    "sentencepiecetokenizer": SENTENCEPIECE,
    "sentencepiece": SENTENCEPIECE,
    "gptsentencepiecetokenizer": SENTENCEPIECE,
    "huggingfacetokenizer": HUGGINGFACE,
    "huggingface": HUGGINGFACE,
    "hf": HUGGINGFACE,
}
TOKENIZER_TYPES = (SENTENCEPIECE, HUGGINGFACE)

DEFAULT_ROLE_LABELS = {"system": "System", "user": "Human", "assistant": "Assistant"}


def default_render_chat(messages: Sequence[dict], add_generation_prompt: bool) -> str:
    """HH-RLHF style rendering used when the tokenizer has no chat template."""
    s = "".join(f"\n\n{DEFAULT_ROLE_LABELS[m['role']]}: {m['content']}" for m in messages)
    if add_generation_prompt:
        s += "\n\nAssistant:"
    return s


def canonical_tokenizer_type(name: str) -> str:
    key = str(name).replace("-", "").replace("_", "").lower()
    if key not in _ALIASES:
        raise DataError(
            f"unknown tokenizer type {name!r} (expected {' or '.join(TOKENIZER_TYPES)})"
        )
    return _ALIASES[key]


def check_tokenizer_path(tokenizer_type: str, tokenizer_model: Optional[str]) -> Tuple[str, str]:
    """Validate the tokenizer type and path without loading anything heavy.

    Returns ``(canonical_type, absolute_path)``; raises :class:`DataError`."""
    ttype = canonical_tokenizer_type(tokenizer_type)
    if not tokenizer_model:
        raise DataError(f"--tokenizer-model is required for {ttype}")
    path = os.path.abspath(os.fspath(tokenizer_model))
    if not os.path.exists(path):
        raise DataError(f"tokenizer model not found: {tokenizer_model}")
    if ttype == SENTENCEPIECE:
        if os.path.isdir(path):
            raise DataError(f"SentencePieceTokenizer expects a .model file, got a directory: {tokenizer_model}")
    else:
        if not os.path.isdir(path):
            raise DataError(
                f"HuggingFaceTokenizer expects a directory with tokenizer.json and "
                f"tokenizer_config.json, got a file: {tokenizer_model}"
            )
        if not os.path.exists(os.path.join(path, "tokenizer.json")) and not os.path.exists(
            os.path.join(path, "tokenizer_config.json")
        ):
            raise DataError(
                f"no tokenizer.json or tokenizer_config.json in tokenizer directory {tokenizer_model}"
            )
    return ttype, path


class PreferenceTokenizer:
    """Common interface. Attributes: ``vocab_size``, ``bos_id`` / ``eos_id``
    (``None`` when the tokenizer has none), ``pad_id`` (always an int: the
    pad token, else EOS, else 0), ``tokenizer_type``, ``model_path``."""

    tokenizer_type: str = ""
    model_path: str = ""
    vocab_size: int
    bos_id: Optional[int]
    eos_id: Optional[int]
    pad_id: int

    # -- to implement ------------------------------------------------------------
    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def has_chat_template(self) -> bool:
        return False

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        return default_render_chat(messages, add_generation_prompt)

    # -- shared ------------------------------------------------------------------
    @property
    def spec(self) -> Tuple[str, str]:
        """``(tokenizer_type, model_path)``: enough to rebuild it in a worker."""
        return self.tokenizer_type, self.model_path

    def __getstate__(self):
        return {"spec": self.spec}

    def __setstate__(self, state):
        t = build_tokenizer(*state["spec"])
        self.__dict__.update(t.__dict__)
        self.__class__ = t.__class__

    def tokenize_example(
        self, ex: PreferenceExample, add_bos: bool = True, add_eos: bool = True, where: str = "?"
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokenise one example into ``(prompt_ids, chosen_ids, rejected_ids)``
        (int32 arrays) following the module's policy."""
        if ex.is_chat:
            p_text = self.render_chat(ex.prompt, add_generation_prompt=True)
            responses = []
            for name, msgs in (("chosen", ex.chosen), ("rejected", ex.rejected)):
                full = self.render_chat(list(ex.prompt) + list(msgs), add_generation_prompt=False)
                if not full.startswith(p_text):
                    raise DataError(
                        f"{where}: the chat template does not render the prompt (with generation prompt) "
                        f"as a prefix of the {name} conversation; cannot separate the response"
                    )
                responses.append(full[len(p_text):])
            c_text, r_text = responses
        else:
            p_text, c_text, r_text = ex.prompt, ex.chosen, ex.rejected
        p = self.encode(p_text) if p_text else []
        c = self.encode(c_text) if c_text else []
        r = self.encode(r_text) if r_text else []
        if add_bos and self.bos_id is not None and (not p or p[0] != self.bos_id):
            p = [self.bos_id] + p
        if add_eos and self.eos_id is not None:
            if not c or c[-1] != self.eos_id:
                c = c + [self.eos_id]
            if not r or r[-1] != self.eos_id:
                r = r + [self.eos_id]
        return (
            np.asarray(p, dtype=np.int32),
            np.asarray(c, dtype=np.int32),
            np.asarray(r, dtype=np.int32),
        )


class SentencePieceTokenizer(PreferenceTokenizer):
    tokenizer_type = SENTENCEPIECE

    def __init__(self, model_path: str):
        import sentencepiece as spm

        self.model_path = os.path.abspath(model_path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        except Exception as e:
            raise DataError(f"cannot load SentencePiece model {model_path}: {e}") from None
        self.vocab_size = int(self._sp.get_piece_size())
        bos, eos, pad = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()
        self.bos_id = int(bos) if bos >= 0 else None
        self.eos_id = int(eos) if eos >= 0 else None
        self.pad_id = int(pad) if pad >= 0 else (self.eos_id if self.eos_id is not None else 0)

    def encode(self, text: str) -> List[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


class HuggingFaceTokenizer(PreferenceTokenizer):
    tokenizer_type = HUGGINGFACE

    def __init__(self, model_path: str):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import warnings

        self.model_path = os.path.abspath(model_path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from transformers import AutoTokenizer

                self._tok = AutoTokenizer.from_pretrained(
                    self.model_path, local_files_only=True, trust_remote_code=False
                )
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"cannot load Hugging Face tokenizer from {model_path}: {msg}") from None
        self._backend = getattr(self._tok, "backend_tokenizer", None)
        self.vocab_size = int(len(self._tok))
        self.bos_id = self._tok.bos_token_id
        self.eos_id = self._tok.eos_token_id
        pad = self._tok.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.eos_id if self.eos_id is not None else 0))

    @property
    def hf_tokenizer(self):
        return self._tok

    def encode(self, text: str) -> List[int]:
        if self._backend is not None:
            return self._backend.encode(text, add_special_tokens=False).ids
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        if not self.has_chat_template:
            return default_render_chat(messages, add_generation_prompt)
        try:
            return self._tok.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:
            raise DataError(f"chat template failed: {type(e).__name__}: {e}") from None


def build_tokenizer(tokenizer_type: str, tokenizer_model: str) -> PreferenceTokenizer:
    """Build a tokenizer from Megatron-style ``--tokenizer-type`` /
    ``--tokenizer-model`` values; raises :class:`DataError` on bad paths."""
    ttype, path = check_tokenizer_path(tokenizer_type, tokenizer_model)
    if ttype == SENTENCEPIECE:
        return SentencePieceTokenizer(path)
    return HuggingFaceTokenizer(path)
