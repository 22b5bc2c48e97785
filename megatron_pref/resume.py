"""What a resume (``--load`` of a training checkpoint) must keep and what it may change; the
reference it must reuse is megatron_pref.reference.reference_source. Checked from the
checkpoint's train state (its small common part, readable before any process group), before
any model is built.

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
from dataclasses import asdict

from megatron_pref.checkpointing import CheckpointError, check_optimizer_resume

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


def check_optimizer_layout(run, saved_state: dict, world_size: int) -> None:
    """load_checkpoint's optimizer check, before any process group or model (a wrong layout
    for a distributed-optimizer checkpoint should not cost a model build)."""
    from megatron_pref.engine import ddp_bucket_size

    tp, pp = run.parallel.tensor_model_parallel_size, run.parallel.pipeline_model_parallel_size
    layout = {"tp": tp, "pp": pp, "vpp": run.parallel.virtual_pipeline_model_parallel_size or 1}
    bucket_size = ddp_bucket_size(run.optim.overlap_grad_reduce, max(world_size // (tp * pp), 1))
    problem = check_optimizer_resume(saved_state, run.optim.use_distributed_optimizer, layout, bucket_size)
    if problem:
        raise CheckpointError(f"--load {run.checkpoint.load}: {problem}")


def check_loss_state(run, saved_state: dict) -> None:
    """A loss that keeps state across steps must find it in the checkpoint (with or without
    --no-load-optim): restarting bco_pair's running mean at 0 mid-run would silently change the loss."""
    if run.loss_config.bco_running_mean and saved_state.get("iteration", 0) > 0 \
            and "bco_steps" not in (saved_state.get("loss_state") or {}):
        raise CheckpointError(f"--load {run.checkpoint.load}: saved without --bco-running-mean, so it has no "
                              f"running mean reward to resume")
