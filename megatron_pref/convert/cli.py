"""Command lines of tools/convert_hf_to_megatron.py, tools/convert_megatron_to_hf.py and
tools/verify_conversion.py.

Exit status: 0 success, 1 verification above tolerance, 2 bad input or options (one line
``error: ...`` on stderr, no traceback, nothing written).
"""

from __future__ import annotations

import argparse
import math
import os
import warnings
from typing import Callable, Optional, Sequence

from megatron_pref.cli_errors import OneLineArgumentParser, launched_by_torchrun, refuse_torchrun, report_error
from megatron_pref.convert.errors import ConversionError
from megatron_pref.errors import UserError

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _quiet() -> None:
    """Keep the tools' output to their own lines (megatron-core/TE import warnings, progress bars)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, min(8, os.cpu_count() or 1))))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("megatron").setLevel(logging.ERROR)


def _run(body: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
         argv: Optional[Sequence[str]]) -> int:
    args = parser.parse_args(argv)
    _quiet()
    try:
        return body(args)
    except UserError as exc:  # ConversionError and the core's checkpoint/flag errors; bugs keep their traceback
        return report_error(exc)


def _bounded(convert: Callable, ok: Callable, requirement: str, kind: str) -> Callable[[str], float]:
    """An argparse ``type=``: ``convert(text)``, refused unless ``ok(value)``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        if not ok(value):  # comparisons with nan are False: refused too
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value

    return parse


_positive = _bounded(int, lambda v: v >= 1, ">= 1", "a whole number")
_tolerance = _bounded(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0", "a number")  # --atol
_fraction = _bounded(float, lambda v: 0.0 <= v <= 1.0, "a fraction between 0 and 1", "a number")


def _text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def hf_to_megatron_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="convert_hf_to_megatron.py",
        description="Convert a Hugging Face checkpoint (Llama, Mistral, Qwen2, GPT-2; safetensors) into a "
                    "megatron-core distributed checkpoint that pretrain_pref.py --load reads.")
    p.add_argument("--hf-dir", required=True, help="directory with config.json and *.safetensors")
    p.add_argument("--save", required=True, help="output checkpoint directory (must be empty unless --force)")
    p.add_argument("--target-tensor-parallel-size", type=_positive, default=1,
                   help="TP the checkpoint is meant for: validated and recorded (it loads at any TP)")
    p.add_argument("--target-pipeline-parallel-size", type=_positive, default=1,
                   help="PP the checkpoint is meant for: validated and recorded (it loads at any PP)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="stored dtype; auto keeps the source's (fp16 is widened to fp32)")
    p.add_argument("--make-vocab-size-divisible-by", type=_positive, default=128)
    p.add_argument("--allow-sliding-window-as-full", action="store_true",
                   help="convert a sliding-window model (Mistral, Qwen2) with full attention: exact only for "
                        "sequences no longer than the window")
    p.add_argument("--force", action="store_true", help="replace a non-empty --save directory")
    return p


def hf_to_megatron_main(argv: Optional[Sequence[str]] = None) -> int:
    refuse_torchrun("convert_hf_to_megatron.py", "the checkpoint loads at any TP/PP")

    def body(args):
        from megatron_pref.convert.hf_to_megatron import convert_hf_to_megatron

        convert_hf_to_megatron(args.hf_dir, args.save, target_tensor_parallel_size=args.target_tensor_parallel_size,
                               target_pipeline_parallel_size=args.target_pipeline_parallel_size, dtype=args.dtype,
                               force=args.force, allow_sliding_window_as_full=args.allow_sliding_window_as_full,
                               make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
        return EXIT_OK

    return _run(body, hf_to_megatron_parser(), argv)


def megatron_to_hf_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="convert_megatron_to_hf.py",
        description="Convert a megatron_pref checkpoint into a Hugging Face directory (config.json, "
                    "safetensors shards with an index, tokenizer).")
    p.add_argument("--load", required=True, help="megatron_pref checkpoint directory (with 'latest')")
    p.add_argument("--save", required=True, help="output directory (must be empty unless --force)")
    p.add_argument("--iteration", type=int, default=None, help="iteration to export (default: latest)")
    p.add_argument("--model-type", choices=("llama", "mistral", "qwen2", "gpt2"), default=None,
                   help="HF architecture (default: the one converted from, else inferred)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="dtype of the written tensors (auto: as stored)")
    p.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB")
    p.add_argument("--force", action="store_true", help="replace a non-empty --save directory")
    return p


def megatron_to_hf_main(argv: Optional[Sequence[str]] = None) -> int:
    refuse_torchrun("convert_megatron_to_hf.py", "it reads a checkpoint of any TP/PP")

    def body(args):
        from megatron_pref.convert.megatron_to_hf import convert_megatron_to_hf

        convert_megatron_to_hf(args.load, args.save, force=args.force, model_type=args.model_type,
                               dtype=args.dtype, max_shard_size=args.max_shard_size, iteration=args.iteration)
        return EXIT_OK

    return _run(body, megatron_to_hf_parser(), argv)


def verify_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="verify_conversion.py",
        description="Run the HF model and the converted megatron-core model in fp32 on a fixed text and "
                    "compare their logits. Exits 1 above tolerance.")
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--load", required=True, help="megatron_pref checkpoint directory")
    p.add_argument("--tensor-model-parallel-size", type=_positive, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=_positive, default=1)
    p.add_argument("--atol", type=_tolerance, default=1e-4, help="tolerance on max |dlogit| (default 1e-4)")
    p.add_argument("--min-argmax-agreement", type=_fraction, default=1.0,
                   help="required fraction (0..1) of positions with the same argmax (default 1.0)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--text", type=_text, default=None,
                        help="text to tokenize (default: a fixed paragraph); needs a tokenizer in the "
                             "checkpoint or --hf-dir")
    source.add_argument("--random-tokens", type=_positive, default=None,
                        help="use N fixed pseudo-random token ids instead of text (used when there is no "
                             "tokenizer); at most the model's max_position_embeddings and 4096")
    return p


def verify_main(argv: Optional[Sequence[str]] = None) -> int:
    """Without torchrun the TP x PP ranks are forked here; under torchrun they are its ranks
    (``torchrun --nproc-per-node TPxPP``), and one of them prints the report."""

    def body(args):
        world = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
        torchrun_world = int(os.environ.get("WORLD_SIZE", "1"))
        if launched_by_torchrun() and torchrun_world != world:  # before torch is imported
            raise ConversionError(
                f"torchrun started {torchrun_world} rank(s) and --tensor-model-parallel-size "
                f"{args.tensor_model_parallel_size} x --pipeline-model-parallel-size "
                f"{args.pipeline_model_parallel_size} needs {world}: use --nproc-per-node {world}, or start it "
                "with python (it starts the ranks itself)")
        from megatron_pref.convert.verify import verify_conversion

        def report(result):
            cut = (f" (the text's first {result.num_tokens} of {result.truncated_from} tokens: the model's limit)"
                   if result.truncated_from else "")
            print(f"verify: {result.num_tokens} tokens{cut}, TP={args.tensor_model_parallel_size} "
                  f"PP={args.pipeline_model_parallel_size}, fp32")
            print(result.summary())
            verdict = "PASS" if result.passed else "FAIL"
            print(f"{verdict} (tolerance: max |dlogit| <= {args.atol:g}, argmax agreement >= "
                  f"{100 * args.min_argmax_agreement:g}%)", flush=True)

        result = verify_conversion(args.hf_dir, args.load, args.tensor_model_parallel_size,
                                   args.pipeline_model_parallel_size, atol=args.atol,
                                   min_argmax_agreement=args.min_argmax_agreement, text=args.text,
                                   random_tokens=args.random_tokens, report=report)
        return EXIT_OK if result.passed else EXIT_VERIFY_FAILED

    return _run(body, verify_parser(), argv)
