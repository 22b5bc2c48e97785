"""What a resume (``--load`` of a training checkpoint) must keep, what it may change, and the
reference it must reuse. Checked from the checkpoint's train state (its small common part,
readable before any process group), before any model is built.

As Megatron-LM:
- may change: logging, evaluation, save and exit intervals, --train-iters (where training
  stops), parallel layout (within what the optimizer format allows), --clip-grad;
- the lr schedule only with --override-opt_param-scheduler (the flags win) or
  --use-checkpoint-opt_param-scheduler (the checkpoint wins); otherwise a changed schedule is
  an error naming the flag (megatron-core's OptimizerParamScheduler would assert);
- must match: the loss and its hyperparameters, --seq-length, --max-prompt-length,
  --global-batch-size, --seed, the training data and its reading flags, the tokenizer,
  precision, and (unless --no-load-optim) Adam's betas and eps, which the optimizer state
  brings back from the checkpoint whatever the flags say. The architecture is checked against
  the checkpoint's config (arguments.resolve_model_config).
--finetune starts a new run from the checkpoint's weights: none of this applies.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from typing import Optional

from megatron_pref.checkpointing import CheckpointError, pin_checkpoint, pinned_name

logger = logging.getLogger("megatron_pref")

# Run-record key -> the flag that sets it.
_RECORD_FLAGS = {
    "loss": "--loss", "seq_length": "--seq-length", "max_prompt_length": "--max-prompt-length",
    "global_batch_size": "--global-batch-size", "seed": "--seed", "shuffle": "--no-shuffle",
    "train_data": "--data-path",
    "data_field_map": "--data-field-map", "strict": "--strict", "tokenizer": "--tokenizer-model",
    "bf16": "--bf16", "fp8_format": "--fp8-format", "fp8_recipe": "--fp8-recipe",
    "adam_beta1": "--adam-beta1", "adam_beta2": "--adam-beta2", "adam_eps": "--adam-eps",
}
# Restored from the checkpoint's optimizer state, so they must match unless it is not loaded.
_OPTIMIZER_STATE_KEYS = ("adam_beta1", "adam_beta2", "adam_eps")
_FINGERPRINTS = ("train_data", "tokenizer")

# OptimizerParamScheduler.state_dict() key -> what it is.
_SCHEDULE_FIELDS = {"max_lr": "peak lr", "min_lr": "minimum lr", "lr_warmup_steps": "warmup steps",
                    "lr_decay_steps": "decay steps", "lr_decay_style": "decay style",
                    "start_wd": "weight decay", "end_wd": "weight decay"}


def run_record(run, data) -> dict:
    """The settings a resume must keep (stored in every checkpoint's train state)."""
    precision = run.precision
    return {
        "loss": run.loss, "loss_config": asdict(run.loss_config), "seq_length": run.data.seq_length,
        "max_prompt_length": run.data.max_prompt_length, "global_batch_size": run.optim.global_batch_size,
        "seed": run.seed, "shuffle": run.data.shuffle, "train_data": data.train_fingerprint,
        "data_field_map": run.data.data_field_map,
        "strict": run.data.strict, "tokenizer": data.tokenizer_fingerprint, "bf16": precision.bf16,
        "fp8_format": precision.fp8_format, "fp8_recipe": precision.fp8_recipe if precision.fp8_format else None,
        "adam_beta1": run.optim.adam_beta1, "adam_beta2": run.optim.adam_beta2, "adam_eps": run.optim.adam_eps,
    }


def _show(key: str, value) -> str:
    if key in _FINGERPRINTS and isinstance(value, str):
        return f"(content {value.rpartition(':')[2][:12]})"  # the digest, without its "xxh3_128:" label
    return str(value)


def check_run_record(run, data, saved_state: dict) -> None:
    """One CheckpointError line naming the first flag that differs from the checkpoint's."""
    record = saved_state.get("run")
    load = run.checkpoint.load
    if not isinstance(record, dict):
        logger.warning("--load %s: the checkpoint records no run settings (saved by an older megatron-pref); "
                       "the loss, data and batch settings of this resume are not checked against it", load)
        return
    now = run_record(run, data)
    pairs = [(_RECORD_FLAGS[k], k, now[k], record[k]) for k in _RECORD_FLAGS if k in record]
    saved_loss = record.get("loss_config") or {}
    pairs += [("--" + k.replace("_", "-"), k, v, saved_loss[k]) for k, v in now["loss_config"].items()
              if k in saved_loss]
    for flag, key, value, saved in pairs:
        if value == saved or (key in _OPTIMIZER_STATE_KEYS and run.checkpoint.no_load_optim):
            continue
        raise CheckpointError(f"--load {load}: {flag} {_show(key, value)} differs from the checkpoint's "
                              f"{_show(key, saved)}; a resume must keep it (--finetune starts a new run from "
                              "the checkpoint's weights)")


def check_schedule(run, saved_state: dict, train_iters: int) -> None:
    """The lr schedule the flags ask for must be the checkpoint's, unless one of Megatron-LM's
    two flags says which one wins."""
    from megatron_pref.engine import scheduler_settings

    ckpt = run.checkpoint
    if ckpt.override_opt_param_scheduler or ckpt.use_checkpoint_opt_param_scheduler:
        return
    saved = saved_state.get("scheduler") or {}
    now = scheduler_settings(run.optim, train_iters)
    optim = run.optim
    flags = {"max_lr": ("--lr", optim.lr), "min_lr": ("--min-lr", optim.min_lr),
             "lr_warmup_steps": ("--lr-warmup-iters", optim.lr_warmup_iters),
             "lr_decay_steps": ("--lr-decay-iters", optim.lr_decay_iters) if optim.lr_decay_iters
             else ("--train-iters", train_iters),
             "lr_decay_style": ("--lr-decay-style", optim.lr_decay_style),
             "start_wd": ("--weight-decay", optim.weight_decay), "end_wd": ("--weight-decay", optim.weight_decay)}
    for key, (flag, value) in flags.items():
        if key in saved and saved[key] != now[key]:
            raise CheckpointError(
                f"--load {ckpt.load}: {flag} {value} sets the lr schedule's {_SCHEDULE_FIELDS[key]} to {now[key]}, "
                f"the checkpoint's is {saved[key]}: pass --override-opt_param-scheduler to use this run's schedule, "
                "or --use-checkpoint-opt_param-scheduler to keep the checkpoint's")


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
