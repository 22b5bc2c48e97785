"""Preprocess preference data into a megatron-core IndexedDataset + pair index.

Entry point of ``tools/preprocess_pref_data.py``; see ``docs/data.md``.

* Inputs are streamed (JSONL lines / Parquet record batches) in chunks; JSON
  parsing, normalisation and tokenisation run in ``--workers`` processes
  (``multiprocessing.Pool.imap``, ordered, with a bounded number of chunks in
  flight so memory stays flat for inputs larger than RAM).
* Output goes to temp files that are renamed into place only when every row
  has been processed; on any error they are removed.
* Every error in the input or the flags (a :class:`DataError`, a ``UserError``) is printed as
  one line ``error: ...`` on stderr, exit status 2; anything else is a bug and keeps its
  traceback.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import threading
import time
from typing import List, Optional

import numpy as np

from .datasets import PAIR_INDEX_DTYPE, PreferenceDatasetWriter, output_paths
from ..errors import UserError
from .errors import DataError
from .pairs import ProcessOptions, ProcessStats, process_row, validate_length_options
from .readers import PARQUET_SUFFIXES, RawChunk, check_input_files, decode_payload, iter_raw_chunks, parse_field_map
from .tokenizer import HUGGINGFACE, TOKENIZER_TYPES, build_tokenizer, check_tokenizer_path

# --------------------------------------------------------------------------- workers
_W_TOKENIZER = None
_W_OPTIONS: Optional[ProcessOptions] = None


def _init_worker(spec, options: ProcessOptions) -> None:
    global _W_TOKENIZER, _W_OPTIONS
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _W_TOKENIZER = build_tokenizer(*spec)
    _W_OPTIONS = options


def _process_chunk(chunk: RawChunk):
    """Returns ``(rows, tokens, lengths, records, stats, error)``."""
    stats = ProcessStats()
    toks: List[np.ndarray] = []
    lens: List[List[int]] = []
    recs = []
    where = chunk.path
    try:
        for rowno, payload in chunk.items:
            where = chunk.where(rowno)
            row = decode_payload(chunk.kind, payload, where, _W_OPTIONS.field_map)
            pair = process_row(row, where, _W_TOKENIZER, _W_OPTIONS, stats)
            if pair is None:
                continue
            toks.extend((pair.prompt_ids, pair.chosen_ids, pair.rejected_ids))
            lens.append([len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)])
            recs.append((
                0, 0, 0,
                np.nan if pair.score_chosen is None else pair.score_chosen,
                np.nan if pair.score_rejected is None else pair.score_rejected,
                chunk.file_index, rowno,
            ))
    except DataError as e:
        return len(chunk.items), None, None, None, stats, str(e)
    except Exception as e:  # a bug: its traceback, plus the row it failed on
        raise RuntimeError(f"{where}: internal error: {type(e).__name__}: {e}") from e
    tokens = np.concatenate(toks).astype(np.int32) if toks else np.zeros(0, np.int32)
    lengths = np.asarray(lens, dtype=np.int64).reshape(-1, 3)
    records = np.array(recs, dtype=PAIR_INDEX_DTYPE)
    return len(chunk.items), tokens, lengths, records, stats, None


def _bounded(gen, sem: threading.Semaphore, stop: threading.Event):
    """Yield from ``gen``, at most N items ahead of the consumer (who releases
    ``sem`` once per result); gives up when ``stop`` is set."""
    for item in gen:
        while not sem.acquire(timeout=0.1):
            if stop.is_set():
                return
        if stop.is_set():
            return
        yield item


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from megatron_pref.cli_errors import OneLineArgumentParser

    p = OneLineArgumentParser(
        error_type=DataError,
        prog="preprocess_pref_data.py",
        description="Tokenise preference pairs (JSONL/Parquet) into a megatron-core IndexedDataset "
        "(.bin/.idx) plus a pair index (.pairs.npy) and metadata (.meta.json).",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="JSONL (.jsonl/.json/.ndjson, optionally .gz) or Parquet files, read in order")
    p.add_argument("--output-prefix", required=True,
                   help="write PREFIX.bin, PREFIX.idx, PREFIX.pairs.npy, PREFIX.meta.json")
    p.add_argument("--tokenizer-type", required=True, help=" or ".join(TOKENIZER_TYPES))
    p.add_argument("--tokenizer-model", required=True,
                   help="SentencePiece .model file, or a Hugging Face tokenizer directory")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes (default: all CPUs; 1 = in-process)")
    p.add_argument("--chunk-size", type=int, default=256, help="rows per work item (default 256)")
    p.add_argument("--seq-length", type=int, default=None,
                   help="pack length: pairs that cannot fit are skipped (or truncated, see --max-prompt-length)")
    p.add_argument("--max-prompt-length", type=int, default=None,
                   help="truncate prompts from the left to this many tokens and responses from the right "
                   "so that a pair fits --seq-length")
    p.add_argument("--strict", action="store_true",
                   help="empty or identical chosen/rejected, and pairs without prompt tokens, are errors instead of skipped pairs")
    p.add_argument("--data-field-map", default=None, metavar="OLD=NEW[,OLD=NEW...]",
                   help="rename input fields, e.g. question=prompt,response_j=chosen,response_k=rejected")
    p.add_argument("--no-bos", action="store_true", help="do not start prompts with BOS")
    p.add_argument("--no-eos", action="store_true", help="do not end responses with EOS")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress bar on stderr (auto: only on a terminal)")
    return p


def _check_optional_packages(inputs: List[str], tokenizer_flag: str, tokenizer_type: str) -> None:
    """pyarrow for Parquet input, transformers for a Hugging Face tokenizer: one line if missing."""
    from megatron_pref.cli_errors import missing_dependency

    parquet = [p for p in inputs if p.lower().endswith(PARQUET_SUFFIXES)]
    needed = [(f"--input {parquet[0]}", "pyarrow")] if parquet else []
    if tokenizer_type == HUGGINGFACE:
        needed.append((f"--tokenizer-type {tokenizer_flag}", "transformers"))
    for flag, package in needed:
        problem = missing_dependency(flag, package)
        if problem:
            raise DataError(problem)


def run(args: argparse.Namespace) -> dict:
    t0 = time.time()
    # -- every check that needs no data happens before any work --------------------
    spec = check_tokenizer_path(args.tokenizer_type, args.tokenizer_model)
    inputs = check_input_files(args.input)
    _check_optional_packages(inputs, args.tokenizer_type, spec[0])
    field_map = parse_field_map(args.data_field_map)
    validate_length_options(args.seq_length, args.max_prompt_length)
    if args.workers < 1:
        raise DataError(f"--workers must be >= 1, got {args.workers}")
    if args.chunk_size < 1:
        raise DataError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    prefix = args.output_prefix
    if not prefix or prefix.endswith(os.sep) or os.path.isdir(prefix):
        raise DataError(f"--output-prefix must be a file name prefix, got {prefix!r}")
    from megatron_pref.cli_errors import writable_dir_problem

    out_dir = os.path.dirname(os.path.abspath(prefix))
    problem = writable_dir_problem(out_dir, "--output-prefix", target=prefix)
    if problem:
        raise DataError(problem)
    os.makedirs(out_dir, exist_ok=True)
    in_abs = {os.path.abspath(p) for p in inputs}
    for k, path in output_paths(prefix).items():
        if os.path.abspath(path) in in_abs:
            raise DataError(f"output {path} would overwrite an input file")

    tokenizer = build_tokenizer(*spec)
    options = ProcessOptions(
        field_map=field_map, strict=args.strict, seq_length=args.seq_length,
        max_prompt_length=args.max_prompt_length, add_bos=not args.no_bos, add_eos=not args.no_eos,
    )

    workers = args.workers
    writer = PreferenceDatasetWriter(prefix, tokenizer.vocab_size)
    stats = ProcessStats()
    stop = threading.Event()
    sem = threading.Semaphore(max(4, 8 * workers))
    chunks = _bounded(iter_raw_chunks(inputs, args.chunk_size, field_map), sem, stop)
    pool = None
    from tqdm import tqdm

    disable = {"auto": None, "on": False, "off": True}[args.progress]
    bar = tqdm(unit="pairs", unit_scale=True, disable=disable, desc="preprocess", file=sys.stderr,
               dynamic_ncols=True, smoothing=0.1)
    ok = False
    try:
        if workers > 1:
            try:
                ctx = mp.get_context("fork")
            except ValueError:
                ctx = mp.get_context()
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(spec, options))
            results = pool.imap(_process_chunk, chunks)
            writer.open()  # import megatron-core while the workers already tokenise
        else:
            _init_worker(spec, options)
            results = map(_process_chunk, chunks)
        for rows, tokens, lengths, records, st, err in results:
            sem.release()
            if err is not None:
                raise DataError(err)
            stats.add(st)
            writer.add_pairs(tokens, lengths, records)
            bar.update(rows)
            bar.set_postfix_str(f"written={stats.pairs} skipped={stats.num_skipped}", refresh=False)
        bar.close()
        if stats.pairs == 0:
            raise DataError(f"no usable pairs in the input ({stats.summary()})")
        elapsed = time.time() - t0
        meta = {
            "tokenizer": {
                "type": tokenizer.tokenizer_type, "model": tokenizer.model_path,
                "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
                "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
            },
            "options": {
                "seq_length": args.seq_length, "max_prompt_length": args.max_prompt_length,
                "strict": args.strict, "field_map": field_map,
                "add_bos": options.add_bos, "add_eos": options.add_eos,
            },
            "inputs": [os.path.abspath(p) for p in inputs],
            "stats": stats.as_dict(),
            "elapsed_s": round(elapsed, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        paths = writer.finalize(meta)
        ok = True
    finally:
        stop.set()
        bar.close()
        if pool is not None:
            if ok:
                pool.close()
            else:
                pool.terminate()
            pool.join()
        if not ok:
            writer.abort()
    elapsed = time.time() - t0
    return {"paths": paths, "stats": stats, "elapsed": elapsed, "workers": workers,
            "dtype": np.dtype(writer.dtype).name}


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        res = run(args)
    except UserError as e:  # DataError and the other bad inputs; anything else keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no output written", file=sys.stderr)
        return 130
    st: ProcessStats = res["stats"]
    rate = st.rows / max(res["elapsed"], 1e-9)
    print(f"wrote {st.pairs} pairs to {args.output_prefix}.{{bin,idx,pairs.npy,meta.json}}")
    print(st.summary())
    print(f"tokens: prompt {st.prompt_tokens}, chosen {st.chosen_tokens}, rejected {st.rejected_tokens} "
          f"(stored as {res['dtype']})")
    print(f"time {res['elapsed']:.2f} s, {rate:.0f} pairs/s with {res['workers']} worker(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
