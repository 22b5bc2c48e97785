#!/usr/bin/env python
"""Regenerate the bundled demo task (megatron_pref/assets/demo/): the
train/valid/test JSONL splits of the addition preference task and the
SentencePiece tokenizer trained on them. Deterministic for a given seed.

``--bench N --bench-out FILE [--bench-format add|chat]`` instead writes N
synthetic pairs to FILE (required: nothing is written to the working directory
unasked) for measuring preprocessing throughput: ``add`` rows are
addition pairs (for the demo tokenizer), ``chat`` rows are UltraFeedback-style
message lists with ~60-word prompts and ~150-word responses (use a byte-level
tokenizer such as ``--bench-hf-tokenizer DIR``, which writes the tiny test
tokenizer with a chat template to DIR).
"""
import argparse
import json
import os
import random
import sys

try:
    from megatron_pref.cli_errors import refuse_torchrun
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_pref.cli_errors import refuse_torchrun
if __name__ == "__main__":
    refuse_torchrun("make_demo_data.py", "the data are written once")
from megatron_pref.data import demo_task  # noqa: E402

_WORDS = ("the a of to and in is it that for on with as was be this by are at from or an not have "
          "model data answer question train token pack pair reward policy loss value number sum "
          "because however therefore example result simple small large quickly carefully").split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + "."


def _bench_rows(n: int, fmt: str, seed: int):
    rng = random.Random(seed)
    for i in range(n):
        if fmt == "add":
            yield demo_task.make_pair(rng.randrange(100), rng.randrange(100), rng)
        else:
            q = _sentence(rng, rng.randint(30, 90))
            c, r = _sentence(rng, rng.randint(80, 220)), _sentence(rng, rng.randint(80, 220))
            user = {"role": "user", "content": q}
            yield {"prompt": q, "chosen": [user, {"role": "assistant", "content": c}],
                   "rejected": [user, {"role": "assistant", "content": r}],
                   "score_chosen": float(rng.randint(5, 10)), "score_rejected": float(rng.randint(1, 5))}


def write_bench(path: str, n: int, fmt: str, seed: int) -> None:
    """Write ``n`` synthetic pairs to ``path`` atomically (a temporary file, then a rename)."""
    from megatron_pref.atomic import write_atomic

    def write(f):
        for row in _bench_rows(n, fmt, seed):
            f.write((json.dumps(row) + "\n").encode())

    write_atomic(path, write)


def main(argv=None) -> int:
    from megatron_pref.cli_errors import OneLineArgumentParser, check_output_dir, check_output_file, exit_with_error

    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=demo_task.DEMO_DIR)
    p.add_argument("--seed", type=int, default=demo_task.DEFAULT_SEED)
    p.add_argument("--bench", type=int, default=0, metavar="N", help="write N synthetic pairs instead")
    p.add_argument("--bench-out", default=None, metavar="FILE", help="where --bench writes its pairs (required)")
    p.add_argument("--bench-format", choices=("add", "chat"), default="add")
    p.add_argument("--bench-hf-tokenizer", default=None, metavar="DIR",
                   help="also write a tiny byte-level HF tokenizer with a chat template to DIR")
    args = p.parse_args(argv)
    # Every check before anything is written: one line "error: ...", exit 2.
    if args.bench < 0:
        p.error(f"--bench must be >= 1 (or 0: the demo assets), got {args.bench}")
    if args.bench:
        if args.bench_out is None:  # never a file in the working directory that nobody asked for
            p.error("--bench needs --bench-out FILE (where to write the pairs)")
        problem = check_output_file(args.bench_out, "--bench-out")
        if not problem and args.bench_hf_tokenizer is not None:
            problem = check_output_dir(args.bench_hf_tokenizer, "--bench-hf-tokenizer")
        if problem:
            exit_with_error(problem)
        os.makedirs(os.path.dirname(os.path.abspath(args.bench_out)), exist_ok=True)
        write_bench(args.bench_out, args.bench, args.bench_format, args.seed)
        print(f"{args.bench_out}: {args.bench} pairs ({os.path.getsize(args.bench_out)} bytes)")
        if args.bench_hf_tokenizer:
            from megatron_pref.data.testing import make_tiny_hf_tokenizer

            make_tiny_hf_tokenizer(args.bench_hf_tokenizer)
            print(f"tokenizer: {args.bench_hf_tokenizer}")
        return 0
    for flag, value in (("--bench-out", args.bench_out), ("--bench-hf-tokenizer", args.bench_hf_tokenizer)):
        if value is not None:
            p.error(f"{flag} needs --bench N")
    problem = check_output_dir(args.out_dir, "--out-dir")
    if problem:
        exit_with_error(problem)
    paths = demo_task.build_assets(args.out_dir, args.seed)
    for k, v in paths.items():
        print(f"{k}: {v} ({os.path.getsize(v)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
