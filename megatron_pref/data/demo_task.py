"""Bundled demo task: verifiable two-number addition preferences.

Each pair is ``{"prompt": "12+35=", "chosen": "47", "rejected": "48", ...}``:
chosen is the correct sum, rejected a plausible mistake of one of these
kinds (picked uniformly among those that apply and give a different,
non-negative number):

* ``off_by_one``  -- sum +- 1;
* ``carry``       -- sum +- 10 (a dropped or spurious carry);
* ``digit_swap``  -- the digits of the sum reversed (e.g. 47 -> 74).

Operands are 0..99, so prompts are 4-6 characters and answers 1-3 digits:
a tiny GPT (2-4 layers, hidden 64-128) can learn it in CPU minutes. The
splits are disjoint by prompt: ``test`` (200) and ``valid`` (200) prompts
never occur in ``train`` (4000). They are generated deterministically by
:func:`generate_splits` and shipped, with a SentencePiece tokenizer trained
on them (digits split into single tokens, no normalisation, BOS=1, EOS=2,
PAD=3, UNK=0), under ``megatron_pref/assets/demo/``; ``tools/make_demo_data.py``
regenerates them.

Metrics: the implicit reward of the correct answer vs the wrong one on the
held-out split, and exact-match accuracy of greedy answers
(:func:`is_correct`).
"""

from __future__ import annotations

import io
import json
import os
import random
import re
from typing import Dict, List, Optional, Sequence, Tuple

from ..atomic import write_atomic, write_text_atomic
from .errors import DataError

DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo")
TOKENIZER_FILE = "tokenizer.model"
SPLIT_SIZES: Dict[str, int] = {"train": 4000, "valid": 200, "test": 200}
SPLIT_ORDER = ("test", "valid", "train")  # held-out splits are drawn first
DEFAULT_SEED = 1234
MAX_OPERAND = 99
REJECTED_KINDS = ("off_by_one", "carry", "digit_swap")

_PROMPT_RE = re.compile(r"^\s*(\d{1,6})\s*\+\s*(\d{1,6})\s*=\s*$")


# --------------------------------------------------------------------------- verification
def parse_prompt(prompt: str) -> Optional[Tuple[int, int]]:
    m = _PROMPT_RE.match(prompt)
    return (int(m.group(1)), int(m.group(2))) if m else None


def correct_answer(prompt: str) -> Optional[str]:
    """The correct answer string for a demo prompt (None if not a demo prompt)."""
    ab = parse_prompt(prompt)
    return None if ab is None else str(ab[0] + ab[1])


def is_correct(prompt: str, answer: str) -> bool:
    """Exact match of a (greedy) answer: surrounding whitespace is ignored,
    anything else must equal the decimal sum with no leading zeros."""
    want = correct_answer(prompt)
    return want is not None and isinstance(answer, str) and answer.strip() == want


def exact_match_accuracy(prompts: Sequence[str], answers: Sequence[str]) -> float:
    if len(prompts) != len(answers):
        raise ValueError("prompts and answers differ in length")
    if not prompts:
        return 0.0
    return sum(is_correct(p, a) for p, a in zip(prompts, answers)) / len(prompts)


# --------------------------------------------------------------------------- generation
def wrong_answer(a: int, b: int, rng: random.Random) -> Tuple[str, str]:
    """A plausible wrong answer for ``a+b`` and its kind."""
    s = a + b
    cands: Dict[int, str] = {}
    for kind, vals in (
        ("off_by_one", (s + 1, s - 1)),
        ("carry", (s + 10, s - 10)),
        ("digit_swap", (int(str(s)[::-1]),) if len(str(s)) > 1 else ()),
    ):
        for v in vals:
            if v >= 0 and v != s and v not in cands:
                cands[v] = kind
    kinds = sorted({k for k in cands.values()}, key=REJECTED_KINDS.index)
    kind = rng.choice(kinds)
    value = rng.choice(sorted(v for v, k in cands.items() if k == kind))
    return str(value), kind


def make_pair(a: int, b: int, rng: random.Random) -> dict:
    wrong, kind = wrong_answer(a, b, rng)
    return {
        "prompt": f"{a}+{b}=",
        "chosen": str(a + b),
        "rejected": wrong,
        "score_chosen": 1.0,
        "score_rejected": 0.0,
        "kind": kind,
    }


def generate_splits(seed: int = DEFAULT_SEED, sizes: Optional[Dict[str, int]] = None,
                    max_operand: int = MAX_OPERAND) -> Dict[str, List[dict]]:
    """Deterministic splits, disjoint by prompt."""
    sizes = dict(SPLIT_SIZES if sizes is None else sizes)
    rng = random.Random(seed)
    combos = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    rng.shuffle(combos)
    need = sum(sizes.values())
    if need > len(combos):
        raise ValueError(f"{need} pairs requested but only {len(combos)} distinct prompts exist")
    out: Dict[str, List[dict]] = {}
    pos = 0
    for split in sorted(sizes, key=lambda s: SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 99):
        n = sizes[split]
        out[split] = [make_pair(a, b, rng) for a, b in combos[pos:pos + n]]
        pos += n
    return out


def train_tokenizer(rows: Sequence[dict], vocab_size: int = 64) -> bytes:
    """Train the demo SentencePiece model on the rows; returns the model bytes."""
    import sentencepiece as spm

    lines = []
    for r in rows:
        lines.append(r["prompt"] + r["chosen"])
        lines.append(r["prompt"] + r["rejected"])
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def build_assets(out_dir: str = DEMO_DIR, seed: int = DEFAULT_SEED) -> Dict[str, str]:
    """Write ``{train,valid,test}.jsonl`` and ``tokenizer.model`` to ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    splits = generate_splits(seed)
    paths = {}
    for split, rows in splits.items():
        path = os.path.join(out_dir, f"{split}.jsonl")
        write_text_atomic(path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))
        paths[split] = path
    model = train_tokenizer(splits["train"] + splits["valid"])
    path = os.path.join(out_dir, TOKENIZER_FILE)
    write_atomic(path, lambda f: f.write(model))
    paths["tokenizer"] = path
    return paths


# --------------------------------------------------------------------------- loading
def demo_data_path(split: str = "train") -> str:
    if split not in SPLIT_SIZES:
        raise DataError(f"unknown demo split {split!r} (expected one of {', '.join(SPLIT_SIZES)})")
    path = os.path.join(DEMO_DIR, f"{split}.jsonl")
    if not os.path.exists(path):
        raise DataError(f"demo data missing: {path} (run tools/make_demo_data.py)")
    return path


def demo_tokenizer_path() -> str:
    path = os.path.join(DEMO_DIR, TOKENIZER_FILE)
    if not os.path.exists(path):
        raise DataError(f"demo tokenizer missing: {path} (run tools/make_demo_data.py)")
    return path


def demo_tokenizer():
    """The bundled SentencePiece tokenizer."""
    from .tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer(demo_tokenizer_path())


def load_demo_rows(split: str = "train") -> List[dict]:
    with open(demo_data_path(split)) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_demo_dataset(split: str = "train", tokenizer=None, seq_length: Optional[int] = None,
                      max_prompt_length: Optional[int] = None):
    """The demo split as an :class:`InMemoryPreferenceDataset` (tokenised with
    the bundled tokenizer unless another is given)."""
    from .datasets import InMemoryPreferenceDataset

    tok = tokenizer if tokenizer is not None else demo_tokenizer()
    return InMemoryPreferenceDataset.from_files(
        [demo_data_path(split)], tok, seq_length=seq_length, max_prompt_length=max_prompt_length
    )
