"""Reference log-probs: precomputed and cached on disk, or computed online by a frozen model.

precompute (default): one forward-only pass of the reference weights over every pair of the
  data, in the policy's parallel layout and precision, before training. The per-pair sums
  are cached in ``<cache_dir>/reference_logps.npy`` next to ``reference_logps.json`` (the
  key). A cache whose key differs is rebuilt, with a log line naming the fields that differ.
online: a frozen copy (no gradients, optimizer state or DDP buffers) evaluated by a
  forward-only pass on each step's packs, right before the policy's step.
Reference-free losses (SLIME, SimPO, ORPO, SFT) build neither.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_pref.atomic import write_atomic, write_json_atomic
from megatron_pref.engine import forward_only_pass
from megatron_pref.step import MicroBatch

logger = logging.getLogger(__name__)

CACHE_FILE = "reference_logps.npy"
KEY_FILE = "reference_logps.json"
# Which tokens carry loss, as the data pipeline defines it; part of the cache key.
LOSS_MASK_POLICY = "response-tokens-only/v1"
# How the pass packs the pairs (values differ by rounding between packings); part of the key.
PACKING_POLICY = "train: first epoch's training packs, then the rest; valid: evaluation packs/v1"


def reference_logps_from_outputs(outputs: Sequence[dict]):
    """Concatenate the last stage's per-pack outputs of ``logps_loss_func``."""
    if not outputs:
        return None
    ids = torch.cat([o["pair_ids"].reshape(-1).cpu() for o in outputs])
    chosen = torch.cat([o["chosen_logps"].reshape(-1).double().cpu() for o in outputs])
    rejected = torch.cat([o["rejected_logps"].reshape(-1).double().cpu() for o in outputs])
    return ids, chosen, rejected


def _table_all_reduce(table: torch.Tensor) -> torch.Tensor:
    """Sum partial tables over data-parallel ranks and pipeline stages (zeros elsewhere)."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        return table
    device = "cuda" if torch.cuda.is_available() else "cpu"
    table = table.to(device)
    dist.all_reduce(table, group=ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(table, group=ps.get_pipeline_model_parallel_group())
    return table.cpu()


def compute_reference_table(model_chunks: list, steps: Iterable[list], num_pairs: int,
                            forward_step: Callable, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """``[num_pairs, 2]`` (chosen, rejected) reference log-prob sums and a ``[num_pairs]`` mask
    of the pairs computed, both identical on every rank.

    ``steps`` yields this rank's packs, each pair once across data-parallel ranks.
    """
    table = torch.zeros(num_pairs, 2, dtype=torch.float64)
    seen = torch.zeros(num_pairs, dtype=torch.float64)
    for packs in steps:
        if not packs:
            continue
        outputs = forward_only_pass(model_chunks, [MicroBatch(p) for p in packs], forward_step)
        got = reference_logps_from_outputs(outputs)
        if got is not None:
            ids, chosen, rejected = got
            table[ids, 0] = chosen
            table[ids, 1] = rejected
            seen[ids] = 1.0
        if progress is not None:
            progress.update(sum(p.num_pairs for p in packs))
    table = _table_all_reduce(torch.cat([table, seen[:, None]], dim=1))
    return table[:, :2].numpy(), table[:, 2].numpy() > 0


def cache_key(data_fingerprint: str, reference_fingerprint: str, tokenizer_fingerprint: str,
              seq_length: int, max_prompt_length: Optional[int], precision: str, model_config: dict) -> dict:
    """Everything the cached values depend on; compared field by field on load."""
    return {
        "data": data_fingerprint,
        "reference": reference_fingerprint,
        "tokenizer": tokenizer_fingerprint,
        "seq_length": seq_length,
        "max_prompt_length": max_prompt_length,
        "precision": precision,
        "loss_mask_policy": LOSS_MASK_POLICY,
        "packing": PACKING_POLICY,
        "model": hashlib.sha256(json.dumps(model_config, sort_keys=True).encode()).hexdigest(),
    }


def load_cached_table(cache_dir, key: dict, num_pairs: int) -> Optional[np.ndarray]:
    """The cached table if its key matches; None (and a log line saying why) otherwise."""
    cache_dir = Path(cache_dir)
    key_path, table_path = cache_dir / KEY_FILE, cache_dir / CACHE_FILE
    if not key_path.is_file() or not table_path.is_file():
        logger.info("reference log-probs: no cache in %s, computing them", cache_dir)
        return None
    try:
        stored = json.loads(key_path.read_text())
    except (OSError, ValueError):
        stored = None
    if not isinstance(stored, dict):
        logger.warning("reference log-probs: unreadable cache key %s, recomputing", key_path)
        return None
    differing = sorted(k for k in set(stored) | set(key) if stored.get(k) != key.get(k))
    if differing:
        logger.warning("reference log-probs: cache in %s is stale (%s changed), recomputing",
                       cache_dir, ", ".join(differing))
        return None
    try:
        table = np.load(table_path)
    except (OSError, ValueError, EOFError) as exc:  # e.g. truncated by a full disk
        logger.warning("reference log-probs: unreadable cache table %s (%s), recomputing", table_path, exc)
        return None
    if table.shape != (num_pairs, 2):
        logger.warning("reference log-probs: cache shape %s != (%d, 2), recomputing", table.shape, num_pairs)
        return None
    logger.info("reference log-probs: using the cache in %s", cache_dir)
    return table


def save_cached_table(cache_dir, key: dict, table: np.ndarray) -> None:
    """Atomic: drop the old key, write the table, then the key. A crash in between leaves a
    table without a key, which is never used."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / KEY_FILE).unlink(missing_ok=True)
    write_atomic(cache_dir / CACHE_FILE, lambda f: np.save(f, table))
    write_json_atomic(cache_dir / KEY_FILE, key)


class PrecomputedReference:
    """Looks up per-pair reference sums by the packs' global pair ids."""

    def __init__(self, table: np.ndarray):
        self.table = torch.from_numpy(np.asarray(table, dtype=np.float64))

    def attach(self, micro_batches: Sequence[MicroBatch]) -> None:
        for micro in micro_batches:
            ids = micro.pack.pair_ids.long()
            micro.ref_chosen_logps = self.table[ids, 0].float()
            micro.ref_rejected_logps = self.table[ids, 1].float()


class OnlineReference:
    """A frozen model evaluated on each step's packs (same schedule, forward only)."""

    def __init__(self, model_chunks: list, forward_step: Callable):
        self.model_chunks = model_chunks
        self.forward_step = forward_step

    def attach(self, micro_batches: Sequence[MicroBatch]) -> None:
        outputs = forward_only_pass(self.model_chunks, micro_batches, self.forward_step)
        # Only the last stage computes the loss, and only it gets outputs: pack i -> outputs[i].
        for micro, out in zip(micro_batches, outputs):
            micro.ref_chosen_logps = out["chosen_logps"].float()
            micro.ref_rejected_logps = out["rejected_logps"].float()


class NoReference:
    def attach(self, micro_batches: Sequence[MicroBatch]) -> None:
        pass
