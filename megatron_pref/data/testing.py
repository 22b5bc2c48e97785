"""Small helpers for tests: a tiny local Hugging Face tokenizer with a chat
template, and JSONL writing. Nothing here downloads anything."""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional

from megatron_pref.atomic import write_json_atomic, write_text_atomic

# A ChatML-like template: every turn is "<|role|>content<|end|>", the
# generation prompt is "<|assistant|>".
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
_CORPUS = [
    "hello world, how are you today?",
    "the quick brown fox jumps over the lazy dog",
    "Human: what is 12+35? Assistant: 12+35 is 47.",
    "I am fine, thank you. Sure! No. Yes, that is right.",
    "0123456789 +-*/=?!.,:;'\"()[]{}",
]


def make_tiny_hf_tokenizer(out_dir: str, chat_template: Optional[str] = TINY_CHAT_TEMPLATE,
                           vocab_size: int = 320) -> str:
    """Train a byte-level BPE tokenizer on a few sentences and save it as a
    Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json).
    Returns ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    os.makedirs(out_dir, exist_ok=True)
    # Each file written atomically (a temporary file, then a rename): never a half-written one.
    write_text_atomic(os.path.join(out_dir, "tokenizer.json"), tok.to_str(pretty=True))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "model_max_length": 4096,
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    write_json_atomic(os.path.join(out_dir, "tokenizer_config.json"), cfg)
    return out_dir


def write_jsonl(path: str, rows: Iterable) -> str:
    """Write rows (dicts are JSON-encoded, str/bytes written as-is) one per line."""
    with open(path, "wb") as f:
        for r in rows:
            if isinstance(r, bytes):
                f.write(r.rstrip(b"\n") + b"\n")
            elif isinstance(r, str):
                f.write(r.rstrip("\n").encode("utf-8") + b"\n")
            else:
                f.write(json.dumps(r).encode("utf-8") + b"\n")
    return path
