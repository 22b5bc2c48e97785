"""Preference data pipeline: readers, tokenizers, pair packing, indexed format, demo task.

Heavy modules (torch, megatron.core, transformers) are imported lazily so the
preprocessing tool starts fast; ``from megatron_pref.data import X`` works for
every name in ``__all__``.
"""

import importlib

_EXPORTS = {
    # errors
    "DataError": "errors", "SkipPair": "errors", "SKIP_REASONS": "errors",
    # readers / formats
    "iter_rows": "readers", "parse_field_map": "readers",
    "PreferenceExample": "formats", "normalize_row": "formats", "split_hh_text": "formats",
    "split_common_messages": "formats",
    # tokenizers
    "PreferenceTokenizer": "tokenizer", "SentencePieceTokenizer": "tokenizer",
    "HuggingFaceTokenizer": "tokenizer", "build_tokenizer": "tokenizer",
    # pairs
    "TokenizedPair": "pairs", "ProcessOptions": "pairs", "ProcessStats": "pairs",
    "process_row": "pairs", "apply_length_policy": "pairs", "plan_lengths": "pairs",
    # datasets
    "PreferenceDataset": "datasets", "InMemoryPreferenceDataset": "datasets",
    "PreferenceDatasetWriter": "datasets", "open_preference_dataset": "datasets",
    # packing
    "PackedBatch": "packing", "PackedPairLoader": "packing", "PairSource": "packing",
    "LoaderStats": "packing", "PaddedBatch": "packing", "build_packed_batch": "packing",
    "build_pack": "packing", "pad_pack": "packing",
    "first_fit_decreasing": "packing", "packed_to_padded": "packing", "scatter_to_padded": "packing",
    "per_sequence_sum": "packing", "split_chosen_rejected": "packing", "compute_pad_multiple": "packing",
    "iter_packs_once": "packing",
    # demo
    "demo_task": None,
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    mod = _EXPORTS[name]
    if mod is None:
        return importlib.import_module(f"{__name__}.{name}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
