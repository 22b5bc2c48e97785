"""Preference datasets: preprocessed (memory-mapped IndexedDataset) and in-memory.

On-disk format written by ``tools/preprocess_pref_data.py`` for a prefix ``P``:

* ``P.bin`` / ``P.idx`` -- a megatron-core ``IndexedDataset``. Pair ``i`` is
  document ``i`` made of three sequences: prompt, chosen response, rejected
  response (token dtype ``uint16`` if the vocabulary has < 65500 entries, else
  ``int32``, Megatron's rule).
* ``P.pairs.npy`` -- the pair index, a structured array with one record per
  pair: ``prompt_seq``, ``chosen_seq``, ``rejected_seq`` (sequence ids in the
  IndexedDataset), ``score_chosen``, ``score_rejected`` (float32, NaN when
  absent), ``source_file`` (index into ``meta["inputs"]``), ``source_row``
  (1-based line / row number).
* ``P.meta.json`` -- format version, tokenizer (type, path, vocab size,
  BOS/EOS/pad ids), options, the processing summary and the checksums of the
  three files above (megatron_pref.checksums, compared on every load). It is
  renamed into place last and marks a complete dataset.

Both dataset classes expose ``__len__``, ``__getitem__(i) -> TokenizedPair``
(``pair_id == i``), ``lengths() -> int64 [N, 3]`` (prompt, chosen, rejected
token counts, without reading tokens) and ``has_scores``.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import replace
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..checksums import record, verify_dataset
from .errors import DataError
from .pairs import ProcessOptions, ProcessStats, TokenizedPair, process_row, validate_length_options
from .readers import check_input_files, decode_payload, iter_raw_chunks, parse_field_map

FORMAT_NAME = "megatron_pref.pairs"
FORMAT_VERSION = 1

PAIR_INDEX_DTYPE = np.dtype(
    [
        ("prompt_seq", "<i8"),
        ("chosen_seq", "<i8"),
        ("rejected_seq", "<i8"),
        ("score_chosen", "<f4"),
        ("score_rejected", "<f4"),
        ("source_file", "<i4"),
        ("source_row", "<i8"),
    ]
)


# The files whose checksums .meta.json records (key of output_paths -> suffix).
CHECKSUMMED = {"bin": ".bin", "idx": ".idx", "pairs": ".pairs.npy"}


def token_dtype(vocab_size: int):
    """Megatron's ``DType.optimal_dtype``: uint16 below 65500 tokens, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def output_paths(prefix: str) -> Dict[str, str]:
    return {
        "bin": prefix + ".bin",
        "idx": prefix + ".idx",
        "pairs": prefix + ".pairs.npy",
        "meta": prefix + ".meta.json",
    }


def _import_indexed_dataset():
    # megatron.core's package import is slow and noisy (TE/Apex warnings);
    # import it only when needed and quietly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset

    return indexed_dataset


class PreferenceDatasetWriter:
    """Streams tokenised pairs into temp files; :meth:`finalize` renames them
    into place (meta last), :meth:`abort` removes them. Nothing under the
    final names is touched before ``finalize``."""

    def __init__(self, prefix: str, vocab_size: int):
        self.prefix = prefix
        self.final = output_paths(prefix)
        tag = f".tmp{os.getpid()}"
        self.tmp = {k: v + tag for k, v in self.final.items()}
        self.tmp["pairs_raw"] = self.final["pairs"] + tag + ".raw"
        self.dtype = token_dtype(vocab_size)
        self._builder = None
        self._pairs_f = None
        self.num_pairs = 0
        self.has_scores = False

    def open(self) -> None:
        """Create the temp files (done lazily by the first :meth:`add_pairs`)."""
        if self._builder is not None:
            return
        idx = _import_indexed_dataset()
        self._builder = idx.IndexedDatasetBuilder(self.tmp["bin"], dtype=self.dtype)
        self._pairs_f = open(self.tmp["pairs_raw"], "wb")

    def add_pairs(self, tokens: np.ndarray, lengths: np.ndarray, records: np.ndarray) -> None:
        """Add pairs given as one flat token array, ``lengths [n, 3]`` and pair
        index records (``PAIR_INDEX_DTYPE``; the ``*_seq`` fields are filled here)."""
        n = len(lengths)
        if n == 0:
            return
        if self._builder is None:
            self.open()
        if tokens.size and int(tokens.max()) > np.iinfo(self.dtype).max:
            raise DataError(f"token id {int(tokens.max())} does not fit the {np.dtype(self.dtype).name} token file")
        tokens = tokens.astype(self.dtype, copy=False)
        offs = np.concatenate([[0], np.cumsum(lengths.sum(axis=1))])
        for j in range(n):
            self._builder.add_document(tokens[offs[j]:offs[j + 1]], [int(x) for x in lengths[j]])
        recs = records.copy()
        base = 3 * self.num_pairs + 3 * np.arange(n, dtype=np.int64)
        recs["prompt_seq"], recs["chosen_seq"], recs["rejected_seq"] = base, base + 1, base + 2
        if not self.has_scores:
            self.has_scores = bool(
                np.isfinite(recs["score_chosen"]).any() or np.isfinite(recs["score_rejected"]).any()
            )
        self._pairs_f.write(recs.tobytes())
        self.num_pairs += n

    def add(self, pair: TokenizedPair, source_file: int = 0, source_row: int = 0) -> None:
        rec = np.zeros(1, dtype=PAIR_INDEX_DTYPE)
        rec["score_chosen"] = np.nan if pair.score_chosen is None else pair.score_chosen
        rec["score_rejected"] = np.nan if pair.score_rejected is None else pair.score_rejected
        rec["source_file"], rec["source_row"] = source_file, source_row
        toks = np.concatenate([pair.prompt_ids, pair.chosen_ids, pair.rejected_ids])
        lens = np.array([[len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)]])
        self.add_pairs(toks, lens, rec)

    def finalize(self, meta: Dict[str, Any]) -> Dict[str, str]:
        if self._builder is None:
            self.open()
        self._builder.finalize(self.tmp["idx"])
        self._pairs_f.close()
        # .npy = header + the raw records (streamed, never held in memory)
        with open(self.tmp["pairs"], "wb") as out:
            np.lib.format.write_array_header_1_0(
                out,
                {
                    "descr": np.lib.format.dtype_to_descr(PAIR_INDEX_DTYPE),
                    "fortran_order": False,
                    "shape": (self.num_pairs,),
                },
            )
            with open(self.tmp["pairs_raw"], "rb") as raw:
                shutil.copyfileobj(raw, out, 16 << 20)
        os.remove(self.tmp["pairs_raw"])
        meta = dict(meta, checksums=record({sfx: self.tmp[k] for k, sfx in CHECKSUMMED.items()}))
        meta.update(
            format=FORMAT_NAME,
            version=FORMAT_VERSION,
            num_pairs=self.num_pairs,
            has_scores=self.has_scores,
            token_dtype=np.dtype(self.dtype).name,
        )
        with open(self.tmp["meta"], "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.write("\n")
        # an existing dataset under the prefix stops being valid first
        if os.path.exists(self.final["meta"]):
            os.remove(self.final["meta"])
        for k in ("bin", "idx", "pairs", "meta"):
            os.replace(self.tmp[k], self.final[k])
        return dict(self.final)

    def abort(self) -> None:
        try:
            if self._builder is not None and not self._builder.data_file.closed:
                self._builder.data_file.close()
            if self._pairs_f is not None and not self._pairs_f.closed:
                self._pairs_f.close()
        except Exception:
            pass
        for p in self.tmp.values():
            try:
                os.remove(p)
            except FileNotFoundError:
                pass


def _pair_index(i, n: int) -> int:
    """``i`` as a non-negative index below ``n`` (negative counts from the end)."""
    i = int(i)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"pair index {i} out of range [0, {n})")
    return i


def _open_indexed_dataset(prefix: str, mmap: bool):
    """megatron-core's IndexedDataset, or one DataError naming the files."""
    import sys

    idx = _import_indexed_dataset()
    problem = None
    unraisable_hook = sys.unraisablehook
    try:
        dataset = idx.IndexedDataset(prefix, mmap=mmap)
        index = dataset.index
        if len(index.sequence_lengths):  # a truncated .bin shows only when its tail is read
            needed = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
            if os.path.getsize(prefix + ".bin") < needed:
                raise ValueError(f"{prefix}.bin holds {os.path.getsize(prefix + '.bin')} bytes, the index "
                                 f"needs {needed}")
        return dataset
    except Exception as exc:  # a truncated .idx/.bin: numpy/mmap errors of every kind
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # The half-built object's __del__ fails when the traceback is freed: not the user's news.
        sys.unraisablehook = lambda _unraisable: None
    finally:
        if problem is not None:
            import gc

            gc.collect()
            sys.unraisablehook = unraisable_hook
    raise DataError(f"{prefix}.idx/.bin cannot be read ({problem}); re-run tools/preprocess_pref_data.py")


class PreferenceDataset:
    """Memory-mapped preference pairs written by ``tools/preprocess_pref_data.py``.

    ``PreferenceDataset(prefix)[i]`` reads pair ``i``'s tokens from the mmapped
    ``.bin`` (no tokenisation at train time)."""

    def __init__(self, prefix: str, mmap: bool = True, verify: bool = True):
        paths = output_paths(prefix)
        if not os.path.exists(paths["meta"]):
            raise DataError(
                f"no preprocessed preference dataset at prefix {prefix} (missing {paths['meta']}; "
                f"run tools/preprocess_pref_data.py)"
            )
        try:
            with open(paths["meta"]) as f:
                self.meta = json.load(f)
        except (OSError, ValueError) as exc:
            raise DataError(f"{paths['meta']}: {exc}") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT_NAME:
            raise DataError(f"{paths['meta']}: not a {FORMAT_NAME} dataset")
        if int(self.meta.get("version", 0)) > FORMAT_VERSION:
            raise DataError(f"{paths['meta']}: format version {self.meta['version']} is newer than supported")
        for k in ("bin", "idx", "pairs"):
            if not os.path.exists(paths[k]):
                raise DataError(f"incomplete preference dataset: missing {paths[k]}")
        self.prefix = prefix
        verify_dataset(self.meta, {sfx: paths[k] for k, sfx in CHECKSUMMED.items()}, paths["meta"], verify, DataError)
        self._ds = _open_indexed_dataset(prefix, mmap)
        try:
            self.pairs = np.load(paths["pairs"], mmap_mode="r")
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"{paths['pairs']}: cannot be read ({exc}); re-run tools/preprocess_pref_data.py") from None
        if self.pairs.dtype != PAIR_INDEX_DTYPE:
            raise DataError(f"{paths['pairs']}: unexpected dtype {self.pairs.dtype}")
        n = len(self.pairs)
        if n != int(self.meta["num_pairs"]) or len(self._ds) < 3 * n:
            raise DataError(f"inconsistent preference dataset at {prefix}: pair index and .idx disagree")
        ps = np.asarray(self.pairs["prompt_seq"])
        self._contiguous = bool(
            np.array_equal(np.asarray(self.pairs["chosen_seq"]), ps + 1)
            and np.array_equal(np.asarray(self.pairs["rejected_seq"]), ps + 2)
        )
        self.has_scores = bool(self.meta.get("has_scores", False))
        tok = self.meta.get("tokenizer", {})
        self.bos_id: Optional[int] = tok.get("bos_id")
        self.eos_id: Optional[int] = tok.get("eos_id")
        self.pad_id: int = int(tok.get("pad_id") or 0)
        self._lengths = None

    @property
    def tokenizer_info(self) -> Dict[str, Any]:
        return dict(self.meta.get("tokenizer", {}))

    def check_tokenizer(self, tokenizer) -> None:
        """Raise :class:`DataError` if ``tokenizer`` differs from the one used
        for preprocessing (vocabulary size / special ids)."""
        info = self.tokenizer_info
        for k in ("vocab_size", "bos_id", "eos_id"):
            if k in info and info[k] != getattr(tokenizer, k):
                raise DataError(
                    f"{self.prefix}: preprocessed with {k}={info[k]} but the tokenizer has "
                    f"{k}={getattr(tokenizer, k)}"
                )

    def __len__(self) -> int:
        return len(self.pairs)

    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            sl = np.asarray(self._ds.sequence_lengths, dtype=np.int64)
            self._lengths = np.stack(
                [sl[np.asarray(self.pairs[f])] for f in ("prompt_seq", "chosen_seq", "rejected_seq")],
                axis=1,
            )
        return self._lengths

    def __getitem__(self, i: int) -> TokenizedPair:
        i = _pair_index(i, len(self))
        rec = self.pairs[i]
        if self._contiguous:
            p, c, r = self._ds[int(rec["prompt_seq"]): int(rec["prompt_seq"]) + 3]
        else:
            p, c, r = (self._ds[int(rec[f])] for f in ("prompt_seq", "chosen_seq", "rejected_seq"))
        sc, sr = float(rec["score_chosen"]), float(rec["score_rejected"])
        return TokenizedPair(
            p, c, r,
            None if np.isnan(sc) else sc,
            None if np.isnan(sr) else sr,
            pair_id=i,
        )


class InMemoryPreferenceDataset:
    """Pairs held in memory (tokenised at load time). Used for the bundled
    demo task, small JSONL/Parquet files and tests."""

    def __init__(self, pairs: Sequence[TokenizedPair], has_scores: Optional[bool] = None,
                 stats: Optional[ProcessStats] = None, tokenizer=None):
        self.tokenizer = tokenizer
        self.bos_id: Optional[int] = getattr(tokenizer, "bos_id", None)
        self.eos_id: Optional[int] = getattr(tokenizer, "eos_id", None)
        self.pad_id: int = int(getattr(tokenizer, "pad_id", 0) or 0)
        self._pairs: List[TokenizedPair] = []
        for i, p in enumerate(pairs):
            self._pairs.append(TokenizedPair(
                np.asarray(p.prompt_ids), np.asarray(p.chosen_ids), np.asarray(p.rejected_ids),
                p.score_chosen, p.score_rejected, pair_id=i,
            ))
        if has_scores is None:
            has_scores = any(p.score_chosen is not None or p.score_rejected is not None for p in self._pairs)
        self.has_scores = bool(has_scores)
        self.stats = stats or ProcessStats(rows=len(self._pairs), pairs=len(self._pairs))
        self._lengths = np.array(
            [[len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)] for p in self._pairs],
            dtype=np.int64,
        ).reshape(-1, 3)

    @classmethod
    def from_files(
        cls,
        paths,
        tokenizer,
        field_map=None,
        strict: bool = False,
        seq_length: Optional[int] = None,
        max_prompt_length: Optional[int] = None,
        add_bos: bool = True,
        add_eos: bool = True,
    ) -> "InMemoryPreferenceDataset":
        """Read and tokenise JSONL/Parquet files (single process). Raises
        :class:`DataError`; skipped pairs are counted in ``.stats``."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = check_input_files([os.fspath(p) for p in paths])
        validate_length_options(seq_length, max_prompt_length)
        opts = ProcessOptions(parse_field_map(field_map), strict, seq_length, max_prompt_length, add_bos, add_eos)
        stats = ProcessStats()
        pairs = []
        for chunk in iter_raw_chunks(paths, 1024, opts.field_map):
            for rowno, payload in chunk.items:
                where = chunk.where(rowno)
                row = decode_payload(chunk.kind, payload, where, opts.field_map)
                pair = process_row(row, where, tokenizer, opts, stats)
                if pair is not None:
                    pairs.append(pair)
        return cls(pairs, stats=stats, tokenizer=tokenizer)

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, i: int) -> TokenizedPair:
        return self._pairs[i]

    def lengths(self) -> np.ndarray:
        return self._lengths


class ConcatPreferenceDataset:
    """Several preprocessed prefixes read as one dataset, in the order given (``--data-path
    A B``: every pair of A, then every pair of B)."""

    def __init__(self, parts: Sequence["PreferenceDataset"]):
        self.parts = list(parts)
        first = self.parts[0]
        for part in self.parts[1:]:
            for key in ("bos_id", "eos_id", "pad_id"):
                if getattr(part, key) != getattr(first, key):
                    raise DataError(f"{part.prefix} was preprocessed with {key}={getattr(part, key)} but "
                                    f"{first.prefix} with {key}={getattr(first, key)}: use one tokenizer")
        self.bos_id, self.eos_id, self.pad_id = first.bos_id, first.eos_id, first.pad_id
        self.has_scores = any(p.has_scores for p in self.parts)
        self._offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def lengths(self) -> np.ndarray:
        return np.concatenate([p.lengths() for p in self.parts]) if self.parts else np.zeros((0, 3), np.int64)

    def __getitem__(self, i: int) -> TokenizedPair:
        i = _pair_index(i, len(self))
        part = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return replace(self.parts[part][i - int(self._offsets[part])], pair_id=i)


def score_gaps(dataset) -> np.ndarray:
    """``score_chosen - score_rejected`` per pair (float64, NaN where a score is missing); read
    from the pair index of preprocessed data, without touching tokens."""
    if isinstance(dataset, ConcatPreferenceDataset):
        return np.concatenate([score_gaps(p) for p in dataset.parts]) if dataset.parts else np.zeros(0)
    if isinstance(dataset, PreferenceDataset):
        return (np.asarray(dataset.pairs["score_chosen"], dtype=np.float64)
                - np.asarray(dataset.pairs["score_rejected"], dtype=np.float64))
    missing = np.nan
    return np.array([missing if p.score_chosen is None or p.score_rejected is None
                     else p.score_chosen - p.score_rejected for p in (dataset[i] for i in range(len(dataset)))],
                    dtype=np.float64)


def is_raw_data_file(path) -> bool:
    """A JSONL/Parquet file (read and tokenised at load time), not a preprocessed prefix."""
    from .readers import JSONL_SUFFIXES, PARQUET_SUFFIXES

    return os.fspath(path).lower().endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES)


def open_preference_dataset(path: str, tokenizer=None, verify: bool = True, **kwargs):
    """JSONL/Parquet files (tokenised in memory with ``tokenizer``; ``kwargs`` go to
    :meth:`InMemoryPreferenceDataset.from_files`) or preprocessed prefixes (memory-mapped,
    several read one after the other; ``verify``: compare their files with the checksums
    recorded by the preprocessing)."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    raw = [is_raw_data_file(p) for p in paths]
    if all(raw):
        if tokenizer is None:
            raise DataError("a tokenizer is needed to read raw JSONL/Parquet preference data")
        return InMemoryPreferenceDataset.from_files(paths, tokenizer, **kwargs)
    if any(raw):
        raise DataError("give either raw .jsonl/.parquet files or preprocessed prefixes, not both: "
                        + ", ".join(os.fspath(p) for p, r in zip(paths, raw) if r) + " are raw, "
                        + ", ".join(os.fspath(p) for p, r in zip(paths, raw) if not r) + " are not")
    parts = [PreferenceDataset(os.fspath(p), verify=verify) for p in paths]
    if tokenizer is not None:
        for part in parts:
            part.check_tokenizer(tokenizer)
    return parts[0] if len(parts) == 1 else ConcatPreferenceDataset(parts)
