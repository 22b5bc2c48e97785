"""The training loop, readable top to bottom: pre-flight -> build -> steps -> finish.

What is checked before any work is in preflight.py, the reference in reference.py, the data in
data/bundle.py, when to stop early in stopping.py; this module strings them together.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict
from typing import Optional

import torch
import torch.distributed as dist

from megatron_pref import parallel
from megatron_pref.arguments import ConfigError, RunConfig
from megatron_pref.checkpointing import TrainState, load_checkpoint, save_checkpoint
from megatron_pref.engine import (attach_token_normalisers, build_model_chunks, build_optimizer, build_scheduler,
                                  forward_only_pass, metric_sums_over_data_parallel, synchronize_params, train_step)
from megatron_pref.logging import MetricsLogger, is_logging_rank, progress_bar, setup_console_logging
from megatron_pref.losses import bco_running_mean_update
from megatron_pref.model import layout_invariant_init, unwrap_model
from megatron_pref.preflight import Plan, preflight
from megatron_pref.reference import build_reference
from megatron_pref.resume import check_schedule, run_record
from megatron_pref.step import MicroBatch, preference_forward_step
from megatron_pref.stopping import ExitConditions, record_step

logger = logging.getLogger("megatron_pref")

# Evaluation (and the reference pass) packs this many pairs per forward-only schedule call.
EVAL_PAIRS_PER_STEP = 256


def metric_names(loss_name: str, loss_config) -> list:
    """The metric keys a loss reports (identical on every rank, so they can be all-reduced)."""
    from megatron_pref.losses import PairStats, compute_loss

    one = torch.ones(1)
    stats = PairStats(chosen_logps=-one, rejected_logps=-2 * one, chosen_lengths=one, rejected_lengths=one,
                      ref_chosen_logps=-one, ref_rejected_logps=-one, score_chosen=one, score_rejected=0 * one,
                      rejected_token_logps=-2 * one, chosen_wpo_logweights=-one, rejected_wpo_logweights=-one)
    names = set(compute_loss(loss_name, stats, loss_config).metrics) | {"loss"}
    return sorted(names)


def evaluate(model_chunks, loader, reference, forward_step, names, max_steps: Optional[int],
             progress: bool) -> dict:
    """Held-out loss and metrics, every usable pair once (or ``max_steps`` steps)."""
    sums = dict.fromkeys(names, 0.0)
    pairs = 0
    bar = progress_bar(loader.num_usable_pairs, "evaluation", disable=not progress)
    for step, packs in enumerate(loader.iter_once(EVAL_PAIRS_PER_STEP)):
        if max_steps is not None and step >= max_steps:
            break
        micro = [MicroBatch(p) for p in packs]
        reference.attach(micro)
        step_pairs = attach_token_normalisers(micro)
        # The last step may leave a data-parallel rank without pairs; it still joins the reductions.
        outputs = forward_only_pass(model_chunks, micro, forward_step) if micro else []
        for name, value in metric_sums_over_data_parallel(outputs, names).items():
            sums[name] += value
        pairs += step_pairs
        bar.update(sum(p.num_pairs for p in packs))
    bar.close()
    return {f"eval/{name}": value / max(pairs, 1) for name, value in sums.items()}


def demo_exact_match(model_chunks, tokenizer, use_thd: bool, split: str = "test", pad_multiple: int = 1) -> float:
    """Greedy answers to the demo's held-out prompts, scored exactly."""
    from megatron_pref.data import demo_task
    from megatron_pref.generation import greedy_generate

    rows = demo_task.load_demo_rows(split)
    prompts = [([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(r["prompt"])
               for r in rows]
    answers = greedy_generate(model_chunks, prompts, tokenizer.vocab_size, tokenizer.eos_id,
                              max_new_tokens=5, use_thd=use_thd, pad_multiple=pad_multiple)
    texts = [tokenizer.decode(a) for a in answers]
    return demo_task.exact_match_accuracy([r["prompt"] for r in rows], texts)


def _pair_loader(flag: str, dataset, **kwargs):
    """PackedPairLoader whose DataError names the flag of its data."""
    from megatron_pref.data.errors import DataError
    from megatron_pref.data.packing import PackedPairLoader

    try:
        return PackedPairLoader(dataset, **kwargs)
    except DataError as exc:
        hint = "" if kwargs.get("evaluation_only") else " (lower --global-batch-size, or give more pairs)"
        raise DataError(f"{flag}: {exc}{hint}") from None


def _train_iters(run: RunConfig, loader) -> int:
    if run.optim.train_iters:
        return run.optim.train_iters
    if run.optim.train_epochs:
        return max(1, math.ceil(run.optim.train_epochs * loader.pairs_per_epoch / run.optim.global_batch_size))
    raise ConfigError("give --train-iters or --train-epochs")


def train(run: RunConfig) -> dict:
    """Run preference training; returns the final metrics (on every rank)."""
    plan = preflight(run, int(os.environ.get("WORLD_SIZE", "1")))  # every check, before any work
    model_cfg, data = plan.model, plan.data

    # --- Build: process groups, data, model and optimizer, reference, logging -----------------
    # From here a SIGTERM (with --exit-signal-handler) stops training after the current step.
    exit_conditions = ExitConditions(run.checkpoint)
    try:
        _start_process_groups(plan)
        loaders, pad_multiple = _loaders(plan)
        train_loader, valid_loader = loaders["train"], loaders.get("valid")
        train_iters = _train_iters(run, train_loader)
        if plan.saved_state is not None and not run.optim.train_iters:  # --train-epochs: known only now
            check_schedule(run, plan.saved_state, train_iters)
        model_chunks, optimizer, scheduler, state = _model_and_state(plan, train_iters)
        train_loader.consumed_pairs = state.consumed_pairs
        state.reference_source = plan.reference
        state.provenance = plan.provenance
        references = build_reference(plan, loaders, EVAL_PAIRS_PER_STEP)
        metrics_logger = _metrics_logger(plan, train_iters)
        names = metric_names(run.loss, run.loss_config)
        forward_step = preference_forward_step(run.loss, run.loss_config, model_cfg.vocab_size, plan.use_thd,
                                               run.logprob_chunk_tokens, loss_state=state.loss_state)

        def run_evaluation(tag: str) -> dict:
            if valid_loader is None:
                return {}
            synchronize_params(model_chunks)
            results = evaluate(model_chunks, valid_loader, references["valid"], forward_step, names,
                               run.log.eval_iters, progress=not run.log.no_progress_bar)
            if run.data.uses_demo:
                results["eval/exact_match"] = demo_exact_match(model_chunks, data.tokenizer, plan.use_thd,
                                                               pad_multiple=pad_multiple)
            logger.info("%s evaluation: %s", tag, "  ".join(
                f"{k.removeprefix('eval/')} {v:.4f}" for k, v in results.items()
                if k in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/exact_match")))
            metrics_logger.log(state.iteration, results, console=False)
            return results

        before = run_evaluation("initial") if state.iteration == 0 else {}

        # --- The loop ---------------------------------------------------------------------
        last_metrics: dict = {}
        window = _Window()
        saved_at = None  # the step of the last save
        stop = None  # why the loop stops before train_iters: --exit-interval, a signal, a duration
        while state.iteration < train_iters and stop is None:
            start = time.time()
            packs = train_loader.next_global_batch()
            micro = [MicroBatch(p) for p in packs]
            references["train"].attach(micro)
            result = train_step(model_chunks, optimizer, micro, forward_step, names, state.iteration + 1,
                                run.skip_nonfinite_batches)
            if not result.skipped:  # as Megatron-LM: the schedule advances with successful updates only
                scheduler.step(increment=1)
                if run.loss_config.bco_running_mean:
                    bco_running_mean_update(state.loss_state, result.metric_sums, result.num_pairs)
            elif is_logging_rank():
                logger.warning("step %d: non-finite loss or gradients: batch skipped, no update "
                               "(--skip-nonfinite-batches)", state.iteration + 1)
            state.iteration += 1
            state.consumed_pairs, state.epoch = train_loader.consumed_pairs, train_loader.epoch
            window.add(time.time() - start, packs, result.skipped)
            if state.iteration % run.log.log_interval == 0 or state.iteration == train_iters:
                last_metrics = window.metrics(result, optimizer, state.consumed_pairs)
                metrics_logger.log(state.iteration, last_metrics)
                window = _Window()
            if run.log.eval_interval and state.iteration % run.log.eval_interval == 0 and state.iteration < train_iters:
                run_evaluation(f"step {state.iteration}")
            if run.checkpoint.save and run.checkpoint.save_interval and state.iteration % run.checkpoint.save_interval == 0:
                _save(plan, model_chunks, optimizer, scheduler, state)
                saved_at = state.iteration
            # Also at the last step, as Megatron-LM: an exit skips the final evaluation.
            stop = exit_conditions.check(state.iteration)
    finally:
        exit_conditions.close()

    # --- Finish: one path for the end of training and every early exit ----------------------
    if stop is not None:
        logger.info("exiting after step %d (%s)", state.iteration, stop)
    after = run_evaluation("final") if stop is None else {}
    if run.checkpoint.save and saved_at != state.iteration:  # as Megatron-LM: every exit saves
        _save(plan, model_chunks, optimizer, scheduler, state)
    _log_accuracy_change(before, after)
    metrics_logger.close()
    synchronize_params(model_chunks)
    return {"train": last_metrics, "eval_before": before, "eval_after": after, "iteration": state.iteration,
            "weights_sha256": weights_digest(model_chunks), "stopped_by": stop}


def _log_accuracy_change(before: dict, after: dict) -> None:
    if before and after:
        logger.info("held-out preference accuracy: %.3f -> %.3f%s", before["eval/rewards/accuracies"],
                    after["eval/rewards/accuracies"],
                    f"; exact match: {before['eval/exact_match']:.3f} -> {after['eval/exact_match']:.3f}"
                    if "eval/exact_match" in after else "")


def _start_process_groups(plan: Plan) -> None:
    from megatron.core import parallel_state as ps

    run = plan.run
    cpu_mode = parallel.initialize(run.parallel, run.seed, run.distributed_timeout_minutes)
    setup_console_logging()
    logger.info("megatron-pref: loss=%s, %s (collectives time out after %d min, --distributed-timeout-minutes), "
                "world=%d (TP=%d PP=%d DP=%d), %s, model %s", run.loss, "CPU/gloo" if cpu_mode else "GPU/NCCL",
                run.distributed_timeout_minutes, plan.world_size, run.parallel.tensor_model_parallel_size,
                run.parallel.pipeline_model_parallel_size, ps.get_data_parallel_world_size(),
                plan.precision.transformer_impl,
                json.dumps({k: v for k, v in plan.model.to_dict().items() if v is not None}))


def _loaders(plan: Plan) -> tuple:
    """The packed-pair loaders of this data-parallel rank ("train", and "valid" if given) and
    the pack length multiple they pad to."""
    from megatron.core import parallel_state as ps

    from megatron_pref.data.packing import compute_pad_multiple

    run, data = plan.run, plan.data
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    pad_multiple = compute_pad_multiple(fp8=bool(run.precision.fp8_format),
                                        tensor_parallel=run.parallel.tensor_model_parallel_size,
                                        sequence_parallel=run.parallel.sequence_parallel,
                                        fp8_recipe=run.precision.fp8_recipe)
    loader_kwargs = dict(seq_length=run.data.seq_length, dp_rank=dp_rank, dp_size=dp_size, seed=run.seed,
                         pad_multiple=pad_multiple, max_prompt_length=run.data.max_prompt_length)
    loaders = {"train": _pair_loader("--data-path", data.train, global_batch_pairs=run.optim.global_batch_size,
                                     shuffle=run.data.shuffle, **loader_kwargs)}
    # Evaluation takes every usable pair once: fewer pairs than data-parallel ranks is fine.
    if data.valid is not None:
        loaders["valid"] = _pair_loader("--valid-data-path", data.valid, global_batch_pairs=dp_size,
                                        evaluation_only=True, **loader_kwargs)
    return loaders, pad_multiple


def _model_and_state(plan: Plan, train_iters: int) -> tuple:
    """The policy's model chunks, optimizer, lr schedule and train state: fresh, or loaded from
    --load (resumed, or its weights only with --finetune)."""
    run, model_cfg = plan.run, plan.model
    # Random weights only when nothing is loaded: layout_invariant_init or the checkpoint
    # overwrites every tensor, so megatron-core's own initialisation would be wasted work.
    model_chunks = build_model_chunks(model_cfg, run.parallel, plan.precision,
                                      use_distributed_optimizer=run.optim.use_distributed_optimizer,
                                      overlap_grad_reduce=run.optim.overlap_grad_reduce,
                                      overlap_param_gather=run.optim.overlap_param_gather,
                                      perform_initialization=False)
    if not run.checkpoint.load:
        for chunk in model_chunks:
            layout_invariant_init(chunk, model_cfg, run.seed)
    optimizer = build_optimizer(model_chunks, run.optim, plan.precision)
    scheduler = build_scheduler(optimizer, run.optim, train_iters, override=run.checkpoint.override_opt_param_scheduler)
    state = TrainState()
    if run.checkpoint.finetune:  # as Megatron-LM: the weights only; step 0, fresh optimizer and schedule
        load_checkpoint(run.checkpoint.load, model_chunks, optimizer, None, load_optimizer=False, load_rng=False,
                        verify=run.verify_checksums)
        logger.info("--finetune: starting at step 0 from the weights of %s", run.checkpoint.load)
    elif run.checkpoint.load:
        loaded = load_checkpoint(run.checkpoint.load, model_chunks, optimizer, scheduler,
                                 load_optimizer=not run.checkpoint.no_load_optim,
                                 load_rng=not run.checkpoint.no_load_rng, verify=run.verify_checksums)
        if loaded is not None:
            state = loaded
            logger.info("resuming from %s at step %d (%d pairs consumed)", run.checkpoint.load,
                        state.iteration, state.consumed_pairs)
            if state.iteration >= train_iters:
                logger.warning("the checkpoint is at step %d and --train-iters is %d: nothing to train, "
                               "evaluating only", state.iteration, train_iters)
    if run.loss_config.bco_running_mean:
        state.loss_state.setdefault("bco_steps", 0)
        state.loss_state.setdefault("bco_mean", 0.0)
    record_step(state.iteration)  # a stop from here names the step
    return model_chunks, optimizer, scheduler, state


def _metrics_logger(plan: Plan, train_iters: int) -> MetricsLogger:
    run = plan.run
    log_dir = run.log.tensorboard_dir or run.checkpoint.save
    metrics_file = run.log.metrics_file or (os.path.join(log_dir, "metrics.jsonl") if log_dir else None)
    run_summary = {"loss": run.loss, "loss_config": asdict(run.loss_config), "model": plan.model.to_dict(),
                   "parallel": asdict(run.parallel), "optim": asdict(run.optim)}
    return MetricsLogger(train_iters, run.log.tensorboard_dir, run.log.wandb_project,
                         run.log.wandb_exp_name, run.log.wandb_save_dir, metrics_file, run_summary)


class _Window:
    """Throughput and skipped batches since the last log line."""

    def __init__(self):
        self.time, self.real_tokens, self.pack_tokens, self.skipped = 0.0, 0, 0, 0

    def add(self, seconds: float, packs: list, skipped: bool) -> None:
        self.time += seconds
        self.real_tokens += _global_sum(sum(p.num_real_tokens for p in packs))
        self.pack_tokens += _global_sum(sum(p.pack_length for p in packs))
        self.skipped += int(skipped)

    def metrics(self, result, optimizer, consumed_pairs: int) -> dict:
        metrics = {name: value / max(result.num_pairs, 1) for name, value in result.metric_sums.items()}
        metrics.update({
            "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": result.grad_norm,
            "tokens_per_sec": self.real_tokens / max(self.time, 1e-9),
            "packing_efficiency": self.real_tokens / max(self.pack_tokens, 1),
            "consumed_pairs": consumed_pairs,
            "skipped": float(self.skipped),  # batches skipped since the last log line
        })
        return metrics


def weights_digest(model_chunks) -> str:
    """sha256 of this rank's parameters, in name order: equal digests = bit-identical weights."""
    digest = hashlib.sha256()
    for chunk in model_chunks:
        for name, param in sorted(unwrap_model(chunk).named_parameters()):
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _global_sum(value: int) -> int:
    """Sum of a per-DP-rank count over the data-parallel group."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return int(t.item())


def _save(plan: Plan, model_chunks, optimizer, scheduler, state) -> None:
    run, data = plan.run, plan.data
    synchronize_params(model_chunks)
    path = save_checkpoint(run.checkpoint.save, model_chunks, optimizer, scheduler, state, plan.model,
                           tokenizer_dir=data.tokenizer_dir, run_metadata={"loss": run.loss},
                           optim_fully_reshardable=run.checkpoint.optim_fully_reshardable,
                           run_record=run_record(run, data))
    logger.info("saved checkpoint %s", path)
