"""The run's data: its tokenizer and its training and validation splits, opened once, with the
content identities (every byte hashed) that cache keys, resumes and run records compare."""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Optional

from megatron_pref.data.fingerprint import agreed_fingerprint, data_fingerprint, tree_fingerprint

logger = logging.getLogger("megatron_pref")


@dataclass(frozen=True)
class Tokenizer:
    """The tokenizer and where it was read from (its files enter the fingerprints)."""
    tokenizer: object
    path: str


@dataclass
class DataBundle:
    tokenizer: object
    train: object
    valid: Optional[object]
    train_files: list
    valid_files: Optional[list]
    tokenizer_path: str
    tokenizer_dir: Optional[str]

    # Content identities (every byte hashed), computed on first use: by a precomputed reference's
    # cache key, a resume's check and every save's run record (megatron_pref.resume). With process
    # groups they are a collective (once per node): every rank must ask, in the same order.
    @functools.cached_property
    def train_fingerprint(self) -> str:
        return agreed_fingerprint(lambda: data_fingerprint(self.train_files))

    @functools.cached_property
    def valid_fingerprint(self) -> Optional[str]:
        return agreed_fingerprint(lambda: data_fingerprint(self.valid_files)) if self.valid_files else None

    @functools.cached_property
    def tokenizer_fingerprint(self) -> str:
        return agreed_fingerprint(lambda: tree_fingerprint(self.tokenizer_path))


def open_tokenizer(run) -> Tokenizer:
    """The tokenizer alone (cheap: its vocabulary size completes the architecture before any
    data is read). Errors are DataError."""
    from megatron_pref.data import demo_task
    from megatron_pref.data.tokenizer import build_tokenizer

    if run.data.uses_demo:
        return Tokenizer(demo_task.demo_tokenizer(), demo_task.demo_tokenizer_path())
    return Tokenizer(build_tokenizer(run.data.tokenizer_type, run.data.tokenizer_model), run.data.tokenizer_model)


def build_data(run, tokenizer: Optional[Tokenizer] = None) -> DataBundle:
    """Tokenizer and datasets (memory-mapped or tokenised in memory). Errors are DataError."""
    from megatron_pref.data import demo_task
    from megatron_pref.data.datasets import is_raw_data_file
    from megatron_pref.data.errors import DataError

    data = run.data
    tokenizer = tokenizer or open_tokenizer(run)
    if data.uses_demo:
        train_files, valid_files = [demo_task.demo_data_path("train")], [demo_task.demo_data_path("valid")]
    else:
        train_files, valid_files = data.data_path, data.valid_data_path

    raw_kwargs = {} if data.uses_demo else dict(strict=data.strict, field_map=data.data_field_map)
    used = [{"strict": "--strict", "field_map": "--data-field-map"}[k] for k, v in raw_kwargs.items() if v]
    splits = [files for files in (train_files, valid_files) if files]
    if used and not any(all(is_raw_data_file(p) for p in files) for files in splits):
        # Preprocessing applied them (or not): silently ignoring them here would mislead.
        raise DataError(f"{' and '.join(used)}: for raw .jsonl/.parquet files only, and the data given is "
                        f"preprocessed (give {'it' if len(used) == 1 else 'them'} to tools/preprocess_pref_data.py "
                        "instead)")
    verify = run.verify_checksums
    train = _open_split(train_files, tokenizer.tokenizer, raw_kwargs, "--data-path", used, verify)
    valid = (_open_split(valid_files, tokenizer.tokenizer, raw_kwargs, "--valid-data-path", used, verify)
             if valid_files else None)
    tokenizer_dir = tokenizer.path if os.path.isdir(tokenizer.path) else None
    return DataBundle(tokenizer.tokenizer, train, valid, train_files, valid_files, tokenizer.path, tokenizer_dir)


def _open_split(paths: list, tokenizer, raw_kwargs: dict, flag: str, used_flags: list, verify: bool = True):
    """One split: raw files (tokenised now, with --strict / --data-field-map) or preprocessed
    prefixes (read one after the other). Errors are DataError naming ``flag``."""
    from megatron_pref.data.datasets import is_raw_data_file, open_preference_dataset
    from megatron_pref.data.errors import DataError

    if not all(is_raw_data_file(p) for p in paths):
        if used_flags:
            logger.info("%s names preprocessed data: %s apply to the raw split only", flag, " and ".join(used_flags))
        return open_preference_dataset(paths, tokenizer, verify=verify)
    dataset = open_preference_dataset(paths, tokenizer, **raw_kwargs)
    stats = getattr(dataset, "stats", None)
    if stats is not None and stats.num_skipped:
        logger.info("%s: tokenised %s", flag, stats.summary())
    if len(dataset) == 0:
        raise DataError(f"{flag}: no usable pairs ({stats.summary() if stats is not None else 'empty'})")
    return dataset
