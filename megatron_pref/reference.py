"""The reference: which weights it is (chosen and pinned), and its log-probs, precomputed and
cached on disk or computed online by a frozen model.

Choosing and pinning (:func:`reference_source`): a resume reuses the resumed run's pinned
  reference; a new run pins --ref-load, else --load, at the iteration its ``latest`` names now
  (and that save's unique id), else takes the seeded initial policy.

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
import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_pref.arguments import ConfigError, reference_cache_dir
from megatron_pref.atomic import write_atomic, write_json_atomic
from megatron_pref.checkpointing import (CheckpointError, load_weights_only, pin_checkpoint, pinned_checkpoint_problem,
                                         pinned_name)
from megatron_pref.engine import build_model_chunks, forward_only_pass
from megatron_pref.logging import is_logging_rank, progress_bar
from megatron_pref.model import layout_invariant_init
from megatron_pref.step import MicroBatch, logps_forward_step

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


# --------------------------------------------------------------------------- choosing and pinning

def reference_source(run, saved_state: Optional[dict]) -> Optional[dict]:
    """Where the reference weights come from: the resumed run's pinned reference, else --ref-load
    or --load pinned now (their current iteration and its id), else the seeded initial policy.
    ``saved_state``: the train state being resumed (None for a new run or --finetune)."""
    from megatron_pref.losses import requires_reference

    if not requires_reference(run.loss):
        return None
    ref_load = run.reference.ref_load
    if saved_state is not None:
        resumed = saved_state.get("reference_source")
        load = run.checkpoint.load
        if resumed is None:
            raise CheckpointError(f"--load {load}: the checkpoint was trained without a reference model, and "
                                  f"--loss {run.loss} needs one (--finetune starts a new run from its weights)")
        if resumed.get("kind") == "checkpoint" and "iteration" not in resumed:
            resumed = _pin_legacy(resumed, run)
        if ref_load and (resumed.get("kind") != "checkpoint" or os.path.abspath(ref_load) != resumed["path"]):
            was = pinned_name(resumed) if resumed.get("kind") == "checkpoint" else \
                f"the initial policy of --seed {resumed.get('seed')}"
            raise CheckpointError(f"--ref-load {ref_load} differs from the reference of the run being resumed, "
                                  f"{was}: drop --ref-load (--finetune starts a new run)")
        return resumed
    if ref_load:
        return pin_checkpoint(ref_load, "--ref-load")
    if run.checkpoint.load:
        return pin_checkpoint(run.checkpoint.load)
    return {"kind": "init", "seed": run.seed}


def _pin_legacy(resumed: dict, run) -> dict:
    """A reference saved as a bare directory (older megatron-pref) followed that directory's
    ``latest``. Where this run saves or loads, that is the policy now: refuse. Elsewhere it is
    what the run used, unless that directory changed: pin its current iteration."""
    path = resumed["path"]
    ours = {os.path.abspath(p) for p in (run.checkpoint.load, run.checkpoint.save) if p}
    if path in ours:
        raise CheckpointError(f"--load {run.checkpoint.load}: the checkpoint names its reference only as the "
                              f"directory {path} (saved by an older megatron-pref), whose latest iteration is now "
                              "this run's policy; the original reference cannot be recovered from it")
    pinned = pin_checkpoint(path, "the reference")
    logger.warning("the checkpoint names its reference only as the directory %s (older megatron-pref): pinning "
                   "its current iteration, %s", path, pinned_name(pinned))
    return pinned


def check_save_keeps_reference(run, reference: Optional[dict], saved_state: Optional[dict]) -> None:
    """A run must not save over its own pinned reference (e.g. --finetune from iter_0000002 of
    the directory it saves into): later resumes would find it gone."""
    if not (run.checkpoint.save and reference and reference["kind"] == "checkpoint"):
        return
    start = (saved_state or {}).get("iteration", 0)
    try:
        pinned = int(reference["iteration"].removeprefix("iter_"))
    except ValueError:  # not a name this package writes: it never saves over it
        return
    if os.path.abspath(run.checkpoint.save) == reference["path"] and pinned > start:
        raise ConfigError(f"--save {run.checkpoint.save} would overwrite {reference['iteration']}, this run's "
                          "reference; save into another directory")


# --------------------------------------------------------------------------- building

def _load_reference_weights(model_chunks, source: dict, model_cfg, verify: bool = True) -> None:
    if source["kind"] == "checkpoint":
        load_weights_only(source["path"], model_chunks, pinned=source, verify=verify)
    else:
        for chunk in model_chunks:
            layout_invariant_init(chunk, model_cfg, source["seed"])


def _reference_fingerprint(source: dict, model_cfg) -> str:
    if source["kind"] == "checkpoint":
        return "checkpoint:" + source["id"]  # the pinned save's unique id
    # layout_invariant_init draws on the parameters' device: CPU and CUDA draws differ.
    return f"init:seed={source['seed']}:device={'cuda' if torch.cuda.is_available() else 'cpu'}"


def _reference_cache(run, source: dict, model_cfg, data, splits) -> tuple:
    """The cache directory and each split's cache key."""
    cache_root = Path(reference_cache_dir(run.reference.ref_cache_dir, run.checkpoint.save))
    fingerprints = {"train": data.train_fingerprint, "valid": data.valid_fingerprint}
    precision = ("bf16" if run.precision.bf16 else "fp32") + (
        f"+fp8-{run.precision.fp8_format}-{run.precision.fp8_recipe}" if run.precision.fp8_format else "")
    keys = {split: cache_key(fingerprints[split], _reference_fingerprint(source, model_cfg), data.tokenizer_fingerprint,
                             run.data.seq_length, run.data.max_prompt_length, precision, model_cfg.to_dict())
            for split in splits}
    if run.loss_config.ld_alpha is not None:  # the cached values are LD-DPO's desensitised sums
        for key in keys.values():
            key["ld_alpha"] = run.loss_config.ld_alpha
    return cache_root, keys


def check_reference_available(run, source: Optional[dict], model_cfg, data) -> None:
    """A pinned reference checkpoint that is gone (or overwritten) may be served by precomputed
    log-probs whose key names it; otherwise one line now, before any model is built."""
    if source is None or source["kind"] != "checkpoint":
        return
    problem = pinned_checkpoint_problem(source)
    if problem is None:
        return
    if run.reference.ref_logprobs == "online":
        raise CheckpointError(f"{problem}; --ref-logprobs online needs its weights")
    cache_root, keys = _reference_cache(run, source, model_cfg, data, ["train"] + (["valid"] if data.valid is not None else []))
    for split, key in keys.items():
        try:
            stored = json.loads((cache_root / split / KEY_FILE).read_text())
        except (OSError, ValueError):
            stored = None
        if stored != key:
            raise CheckpointError(f"{problem}, and no precomputed reference log-probs for the {split} split in "
                                  f"{cache_root} match it (restore it, or give the --ref-cache-dir that has them)")
    logger.info("%s; its precomputed log-probs in %s serve", problem, cache_root)


def _reference_model(plan, source: dict, model_cfg) -> list:
    chunks = build_model_chunks(model_cfg, plan.run.parallel, plan.precision, wrap_ddp=False,
                                perform_initialization=False)
    _load_reference_weights(chunks, source, model_cfg, verify=plan.run.verify_checksums)
    return chunks


def _cache_hits_on_every_rank(hits: list) -> list:
    """A split counts as cached only if every rank found it (e.g. a cache directory that is
    not on a shared filesystem): ranks that disagree would enter different collectives."""
    if not dist.is_initialized():
        return hits
    flags = torch.tensor([1.0 if h else 0.0 for h in hits],
                         device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return [bool(f) for f in flags.tolist()]


def build_reference(plan, loaders: dict, pairs_per_step: int) -> dict:
    """NoReference, a PrecomputedReference per split (cached), or an OnlineReference.
    ``plan``: the run's preflight.Plan (its run, reference source, model, precision and data)."""
    run, source, model_cfg, data = plan.run, plan.reference, plan.model, plan.data
    if source is None:
        return {split: NoReference() for split in loaders}
    forward_step = logps_forward_step(model_cfg.vocab_size, plan.use_thd, run.logprob_chunk_tokens,
                                      ld_alpha=run.loss_config.ld_alpha)
    if run.reference.ref_logprobs == "online":
        online = OnlineReference(_reference_model(plan, source, model_cfg), forward_step)
        return {split: online for split in loaders}
    cache_root, keys = _reference_cache(run, source, model_cfg, data, list(loaders))
    tables = {}
    for split, loader in loaders.items():
        tables[split] = load_cached_table(cache_root / split, keys[split], len(loader.dataset))
    hits = _cache_hits_on_every_rank([tables[split] is not None for split in loaders])
    missing_splits = [split for split, hit in zip(loaders, hits) if not hit]
    # The reference weights are loaded only when some split must be computed.
    ref_chunks = _reference_model(plan, source, model_cfg) if missing_splits else None
    for split in missing_splits:
        loader = loaders[split]
        bar = progress_bar(loader.num_usable_pairs, f"reference log-probs ({split})",
                           disable=run.log.no_progress_bar)
        # The training split in the training's own packs (step 0 bit-identical); evaluation's for valid.
        steps = loader.iter_reference_pass(pairs_per_step) if split == "train" else loader.iter_once(pairs_per_step)
        table, seen = compute_reference_table(ref_chunks, steps,
                                              len(loader.dataset), forward_step, bar)
        bar.close()
        missing = np.setdiff1d(loader.source.usable, np.nonzero(seen)[0])
        if len(missing):
            raise RuntimeError(f"reference pass missed {len(missing)} pairs of the {split} split")
        if is_logging_rank():
            save_cached_table(cache_root / split, keys[split], table)
        if dist.is_initialized():
            dist.barrier()
        tables[split] = table
    return {split: PrecomputedReference(tables[split]) for split in loaders}
