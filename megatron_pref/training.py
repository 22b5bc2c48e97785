"""The training loop, readable top to bottom: data -> model -> reference -> steps -> eval -> save."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_pref import parallel
from megatron_pref.arguments import ConfigError, RunConfig, reference_cache_dir, resolve_model_config
from megatron_pref.checkpointing import (CheckpointError, TrainState, check_optimizer_resume, load_checkpoint,
                                         load_weights_only, pinned_checkpoint_problem, read_model_config,
                                         read_train_state, save_checkpoint, validate_checkpoint_dir)
from megatron_pref.checksums import verify_checksums
from megatron_pref.data.fingerprint import agreed_fingerprint, data_fingerprint, tree_fingerprint
from megatron_pref.engine import (build_model_chunks, build_optimizer, build_scheduler, ddp_bucket_size, forward_only_pass,
                                  attach_token_normalisers, metric_sums_over_data_parallel, synchronize_params, train_step)
from megatron_pref.logging import MetricsLogger, is_logging_rank, progress_bar, setup_console_logging
from megatron_pref.losses import bco_running_mean_update
from megatron_pref.model import (default_transformer_impl, layout_invariant_init, local_norms_support_sequence_parallel,
                                 unwrap_model)
from megatron_pref.reference import (KEY_FILE, NoReference, OnlineReference, PrecomputedReference, cache_key,
                                     compute_reference_table, load_cached_table, save_cached_table)
from megatron_pref.resume import check_run_record, check_schedule, reference_source, run_record
from megatron_pref.step import MicroBatch, logps_forward_step, preference_forward_step

logger = logging.getLogger("megatron_pref")

# Evaluation packs this many pairs per forward-only schedule call.
EVAL_PAIRS_PER_STEP = 256


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


def build_data(run: RunConfig) -> DataBundle:
    """Tokenizer and datasets (memory-mapped or tokenised in memory). Errors are DataError."""
    from megatron_pref.data import demo_task
    from megatron_pref.data.tokenizer import build_tokenizer

    data = run.data
    if data.uses_demo:
        tokenizer = demo_task.demo_tokenizer()
        train_files, valid_files = [demo_task.demo_data_path("train")], [demo_task.demo_data_path("valid")]
        tokenizer_path = demo_task.demo_tokenizer_path()
    else:
        tokenizer = build_tokenizer(data.tokenizer_type, data.tokenizer_model)
        train_files, valid_files = data.data_path, data.valid_data_path
        tokenizer_path = data.tokenizer_model
    from megatron_pref.data.datasets import is_raw_data_file
    from megatron_pref.data.errors import DataError

    raw_kwargs = {} if data.uses_demo else dict(strict=data.strict, field_map=data.data_field_map)
    used = [{"strict": "--strict", "field_map": "--data-field-map"}[k] for k, v in raw_kwargs.items() if v]
    splits = [files for files in (train_files, valid_files) if files]
    if used and not any(all(is_raw_data_file(p) for p in files) for files in splits):
        # Preprocessing applied them (or not): silently ignoring them here would mislead.
        raise DataError(f"{' and '.join(used)}: for raw .jsonl/.parquet files only, and the data given is "
                        f"preprocessed (give {'it' if len(used) == 1 else 'them'} to tools/preprocess_pref_data.py "
                        "instead)")
    train = _open_split(train_files, tokenizer, raw_kwargs, "--data-path", used, run.verify_checksums)
    valid = (_open_split(valid_files, tokenizer, raw_kwargs, "--valid-data-path", used, run.verify_checksums)
             if valid_files else None)
    tokenizer_dir = tokenizer_path if os.path.isdir(tokenizer_path) else None
    return DataBundle(tokenizer, train, valid, train_files, valid_files, tokenizer_path, tokenizer_dir)


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


def check_scores(run: RunConfig, data: DataBundle) -> None:
    """--spo-target-from-scores needs score fields: data without any is one error now (not after
    the reference pass); pairs without a usable score gap are counted in one warning line."""
    from megatron_pref.data.datasets import score_gaps
    from megatron_pref.data.errors import DataError

    if run.loss != "spo" or not run.loss_config.spo_target_from_scores:
        return
    for flag, paths, dataset in (("--data-path", run.data.data_path, data.train),
                                 ("--valid-data-path", run.data.valid_data_path, data.valid)):
        if dataset is None or paths is None:  # the bundled demo has scores
            continue
        gaps = score_gaps(dataset)
        missing, not_positive = int(np.isnan(gaps).sum()), int((gaps <= 0).sum())
        if missing == len(gaps):
            raise DataError(f"--spo-target-from-scores: {flag} {' '.join(paths)} has no score_chosen/score_rejected "
                            "fields (map them with --data-field-map, or drop the flag for a constant target)")
        if (missing or not_positive) and os.environ.get("RANK", "0") == "0":  # before logging is set up
            print(f"warning: --spo-target-from-scores: {missing + not_positive} of {len(gaps)} pairs of {flag} carry "
                  f"no training signal ({missing} without both scores, {not_positive} with score_chosen <= "
                  "score_rejected): they are skipped, and still count in the per-pair mean", file=sys.stderr, flush=True)


def metric_names(loss_name: str, loss_config) -> list:
    """The metric keys a loss reports (identical on every rank, so they can be all-reduced)."""
    from megatron_pref.losses import PairStats, compute_loss

    one = torch.ones(1)
    stats = PairStats(chosen_logps=-one, rejected_logps=-2 * one, chosen_lengths=one, rejected_lengths=one,
                      ref_chosen_logps=-one, ref_rejected_logps=-one, score_chosen=one, score_rejected=0 * one,
                      rejected_token_logps=-2 * one, chosen_wpo_logweights=-one, rejected_wpo_logweights=-one)
    names = set(compute_loss(loss_name, stats, loss_config).metrics) | {"loss"}
    return sorted(names)


def _check_optimizer_resume_early(run: RunConfig, saved_state: dict, world_size: int) -> None:
    """load_checkpoint's optimizer check, before any process group or model (a wrong layout
    for a distributed-optimizer checkpoint should not cost a model build)."""
    tp, pp = run.parallel.tensor_model_parallel_size, run.parallel.pipeline_model_parallel_size
    layout = {"tp": tp, "pp": pp, "vpp": run.parallel.virtual_pipeline_model_parallel_size or 1}
    bucket_size = ddp_bucket_size(run.optim.overlap_grad_reduce, max(world_size // (tp * pp), 1))
    problem = check_optimizer_resume(saved_state, run.optim.use_distributed_optimizer, layout, bucket_size)
    if problem:
        raise CheckpointError(f"--load {run.checkpoint.load}: {problem}")


def _check_loss_state_resume(run: RunConfig, saved_state: dict) -> None:
    """A loss that keeps state across steps must find it in the checkpoint (with or without
    --no-load-optim): restarting bco_pair's running mean at 0 mid-run would silently change the loss."""
    if run.loss_config.bco_running_mean and saved_state.get("iteration", 0) > 0 \
            and "bco_steps" not in (saved_state.get("loss_state") or {}):
        raise CheckpointError(f"--load {run.checkpoint.load}: saved without --bco-running-mean, so it has no "
                              f"running mean reward to resume")


def _check_reference_architecture(ref_load: str, policy, check_vocab: bool = False) -> None:
    """The reference is built with the policy's architecture and loads its weights, so the two
    must agree: a mismatch is one line now, not a failed load after the data (or, for RoPE
    settings, silently different reference log-probs). Training-only fields may differ; the
    vocabulary is checked once the tokenizer has given it (``check_vocab``)."""
    # Training-only fields, and the vocabulary padding (vocabulary tensors load across paddings).
    ignored = {"hidden_dropout", "attention_dropout", "init_method_std", "make_vocab_size_divisible_by"} | (
        set() if check_vocab else {"vocab_size"})
    if policy.position_embedding_type == "rope":
        ignored.add("max_position_embeddings")  # no weights, no effect on RoPE
    reference = read_model_config(ref_load, flag="--ref-load").to_dict()
    differing = [f"{name} {reference[name]} != {value}" for name, value in policy.to_dict().items()
                 if name not in ignored and reference.get(name) != value]
    if differing:
        raise CheckpointError(f"--ref-load {ref_load} has another architecture than the policy: "
                              + ", ".join(differing[:5]))


def check_fp8_support(precision) -> None:
    """FP8 needs Transformer Engine layers, and MXFP8 a Blackwell GPU (TE would assert later)."""
    if precision.transformer_impl != "transformer_engine":
        raise ConfigError("--fp8-format needs Transformer Engine layers, and Transformer Engine is not "
                          "importable here (pip install -e '.[gpu]', or use the Docker image)")
    verdict = _te_recipe_support(precision.fp8_recipe)
    if verdict is not None and not verdict[0]:
        raise ConfigError(f"--fp8-recipe {precision.fp8_recipe} cannot run on {torch.cuda.get_device_name()}: "
                          f"{verdict[1]}")
    capability = torch.cuda.get_device_capability()
    if precision.fp8_recipe == "mxfp8" and capability < (10, 0):  # when TE's own check is not there
        raise ConfigError(f"--fp8-recipe mxfp8 needs compute capability 10.0 or newer (Blackwell); "
                          f"{torch.cuda.get_device_name()} has {capability[0]}.{capability[1]}: "
                          "use delayed, tensorwise or blockwise")


def _te_recipe_support(recipe: str):
    """Transformer Engine's own (supported, reason) for the recipe on this GPU (compute
    capability, CUDA and cuBLASLt versions), or None where this TE has no such check."""
    try:
        from transformer_engine.pytorch import quantization as checks  # TE >= 2.10
    except ImportError:
        try:
            from transformer_engine.pytorch import fp8 as checks
        except ImportError:
            return None
    name = {"mxfp8": "check_mxfp8_support", "blockwise": "check_fp8_block_scaling_support"}.get(recipe,
                                                                                              "check_fp8_support")
    check = getattr(checks, name, None)
    return check() if check is not None else None


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


def _reference_cache(run: RunConfig, source: dict, model_cfg, data: DataBundle, splits) -> tuple:
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


def _check_reference_available(run: RunConfig, source: Optional[dict], model_cfg, data: DataBundle) -> None:
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


def _reference_model(run: RunConfig, source: dict, model_cfg) -> list:
    chunks = build_model_chunks(model_cfg, run.parallel, run.precision, wrap_ddp=False,
                                perform_initialization=False)
    _load_reference_weights(chunks, source, model_cfg, verify=run.verify_checksums)
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


def build_reference(run: RunConfig, source: Optional[dict], model_cfg, data: DataBundle, loaders: dict,
                    use_thd: bool):
    """NoReference, a PrecomputedReference per split (cached), or an OnlineReference."""
    if source is None:
        return {split: NoReference() for split in loaders}
    forward_step = logps_forward_step(model_cfg.vocab_size, use_thd, run.logprob_chunk_tokens,
                                      ld_alpha=run.loss_config.ld_alpha)
    if run.reference.ref_logprobs == "online":
        online = OnlineReference(_reference_model(run, source, model_cfg), forward_step)
        return {split: online for split in loaders}

    cache_root, keys = _reference_cache(run, source, model_cfg, data, list(loaders))
    tables = {}
    for split, loader in loaders.items():
        tables[split] = load_cached_table(cache_root / split, keys[split], len(loader.dataset))
    hits = _cache_hits_on_every_rank([tables[split] is not None for split in loaders])
    missing_splits = [split for split, hit in zip(loaders, hits) if not hit]
    # The reference weights are loaded only when some split must be computed.
    ref_chunks = _reference_model(run, source, model_cfg) if missing_splits else None
    for split in missing_splits:
        loader = loaders[split]
        bar = progress_bar(loader.num_usable_pairs, f"reference log-probs ({split})",
                           disable=run.log.no_progress_bar)
        # The training split in the training's own packs (step 0 bit-identical); evaluation's for valid.
        steps = loader.iter_reference_pass(EVAL_PAIRS_PER_STEP) if split == "train" else loader.iter_once(EVAL_PAIRS_PER_STEP)
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
    from megatron.core import parallel_state as ps

    from megatron_pref.data.packing import compute_pad_multiple

    # --- Cheap validation of files, before any process group or model --------------------
    checkpoint_model = None
    if run.checkpoint.load:
        validate_checkpoint_dir(run.checkpoint.load)
        checkpoint_model = read_model_config(run.checkpoint.load)
    if run.reference.ref_load:
        validate_checkpoint_dir(run.reference.ref_load, flag="--ref-load")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # The train state being resumed (None: a new run, a weights-only checkpoint, --finetune).
    saved_state = read_train_state(run.checkpoint.load) if run.checkpoint.load and not run.checkpoint.finetune else None
    if saved_state is not None and not run.checkpoint.no_load_optim:
        _check_optimizer_resume_early(run, saved_state, world_size)
    if saved_state is not None:
        _check_loss_state_resume(run, saved_state)
    if run.precision.fp8_format and not torch.cuda.is_available():
        raise ConfigError("--fp8-format needs GPUs with Transformer Engine")
    if run.precision.transformer_impl == "auto":
        run.precision.transformer_impl = default_transformer_impl()
    if run.precision.fp8_format:
        check_fp8_support(run.precision)
    try:
        architecture = resolve_model_config(run, None, checkpoint_model)
        run.parallel.validate_for(architecture, world_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if (run.parallel.sequence_parallel and run.precision.transformer_impl == "local"
            and not local_norms_support_sequence_parallel(architecture.normalization)):
        raise ConfigError("--sequence-parallel needs Transformer Engine layers, or apex and --normalization LayerNorm: "
                          f"the local spec's {architecture.normalization} here is torch's, which megatron-core refuses "
                          "to split over the sequence")
    if architecture.position_embedding_type == "learned_absolute" and run.data.seq_length > architecture.max_position_embeddings:
        raise ConfigError(f"--seq-length {run.data.seq_length} exceeds the model's {architecture.max_position_embeddings} "
                          "learned positions (--max-position-embeddings): lower --seq-length")
    if run.reference.ref_load:
        _check_reference_architecture(run.reference.ref_load, architecture)
    data_parallel_size = world_size // (run.parallel.tensor_model_parallel_size *
                                         run.parallel.pipeline_model_parallel_size)
    if run.optim.global_batch_size % data_parallel_size:
        raise ConfigError(f"--global-batch-size {run.optim.global_batch_size} is not divisible by the "
                          f"data-parallel size {data_parallel_size}")
    # Resume compatibility after the architecture and layout: a checkpoint that cannot be built
    # at all is the first thing to say.
    if saved_state is not None and run.optim.train_iters:
        check_schedule(run, saved_state, run.optim.train_iters)
    # Every byte of the checkpoints, after the cheap checks and before any process group.
    if run.checkpoint.load:
        verify_checksums(validate_checkpoint_dir(run.checkpoint.load), "--load", run.verify_checksums, CheckpointError)
    if run.reference.ref_load:
        verify_checksums(validate_checkpoint_dir(run.reference.ref_load, "--ref-load"), "--ref-load",
                         run.verify_checksums, CheckpointError)
    data = build_data(run)
    check_scores(run, data)
    model_cfg = resolve_model_config(run, data.tokenizer.vocab_size, checkpoint_model)
    if run.reference.ref_load:
        _check_reference_architecture(run.reference.ref_load, model_cfg, check_vocab=True)
    if saved_state is not None:
        check_run_record(run, data, saved_state)
    reference = reference_source(run, saved_state)
    _check_reference_available(run, reference, model_cfg, data)
    _check_save_keeps_reference(run, reference, saved_state)
    use_thd = run.precision.transformer_impl == "transformer_engine"

    # --- Process groups --------------------------------------------------------------------
    # From here a SIGTERM (with --exit-signal-handler) stops training after the current step.
    exit_conditions = ExitConditions(run.checkpoint)
    cpu_mode = parallel.initialize(run.parallel, run.seed)
    setup_console_logging()
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    logger.info("megatron-pref: loss=%s, %s, world=%d (TP=%d PP=%d DP=%d), %s, model %s",
                run.loss, "CPU/gloo" if cpu_mode else "GPU", world_size, run.parallel.tensor_model_parallel_size,
                run.parallel.pipeline_model_parallel_size, dp_size, run.precision.transformer_impl,
                json.dumps({k: v for k, v in model_cfg.to_dict().items() if v is not None}))

    # --- Data --------------------------------------------------------------------------------
    pad_multiple = compute_pad_multiple(fp8=bool(run.precision.fp8_format),
                                        tensor_parallel=run.parallel.tensor_model_parallel_size,
                                        sequence_parallel=run.parallel.sequence_parallel,
                                        fp8_recipe=run.precision.fp8_recipe)
    loader_kwargs = dict(seq_length=run.data.seq_length, dp_rank=dp_rank, dp_size=dp_size, seed=run.seed,
                         pad_multiple=pad_multiple, max_prompt_length=run.data.max_prompt_length)
    train_loader = _pair_loader("--data-path", data.train, global_batch_pairs=run.optim.global_batch_size,
                                shuffle=run.data.shuffle, **loader_kwargs)
    # Evaluation takes every usable pair once: fewer pairs than data-parallel ranks is fine.
    valid_loader = (_pair_loader("--valid-data-path", data.valid, global_batch_pairs=dp_size, evaluation_only=True,
                                 **loader_kwargs) if data.valid is not None else None)
    train_iters = _train_iters(run, train_loader)
    if saved_state is not None and not run.optim.train_iters:  # --train-epochs: known only now
        check_schedule(run, saved_state, train_iters)

    # --- Model, optimizer, scheduler, state ------------------------------------------------
    # Random weights only when nothing is loaded: layout_invariant_init or the checkpoint
    # overwrites every tensor, so megatron-core's own initialisation would be wasted work.
    model_chunks = build_model_chunks(model_cfg, run.parallel, run.precision,
                                      use_distributed_optimizer=run.optim.use_distributed_optimizer,
                                      overlap_grad_reduce=run.optim.overlap_grad_reduce,
                                      overlap_param_gather=run.optim.overlap_param_gather,
                                      perform_initialization=False)
    if not run.checkpoint.load:
        for chunk in model_chunks:
            layout_invariant_init(chunk, model_cfg, run.seed)
    optimizer = build_optimizer(model_chunks, run.optim, run.precision)
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
    train_loader.consumed_pairs = state.consumed_pairs

    # --- Reference log-probs ------------------------------------------------------------------
    state.reference_source = reference
    loaders = {"train": train_loader}
    if valid_loader is not None:
        loaders["valid"] = valid_loader
    references = build_reference(run, reference, model_cfg, data, loaders, use_thd)

    # --- Logging ----------------------------------------------------------------------------
    log_dir = run.log.tensorboard_dir or run.checkpoint.save
    metrics_file = run.log.metrics_file or (os.path.join(log_dir, "metrics.jsonl") if log_dir else None)
    run_summary = {"loss": run.loss, "loss_config": asdict(run.loss_config), "model": model_cfg.to_dict(),
                   "parallel": asdict(run.parallel), "optim": asdict(run.optim)}
    metrics_logger = MetricsLogger(train_iters, run.log.tensorboard_dir, run.log.wandb_project,
                                   run.log.wandb_exp_name, run.log.wandb_save_dir, metrics_file, run_summary)
    names = metric_names(run.loss, run.loss_config)
    if run.loss_config.bco_running_mean:
        state.loss_state.setdefault("bco_steps", 0)
        state.loss_state.setdefault("bco_mean", 0.0)
    forward_step = preference_forward_step(run.loss, run.loss_config, model_cfg.vocab_size, use_thd,
                                           run.logprob_chunk_tokens, loss_state=state.loss_state)

    def run_evaluation(tag: str) -> dict:
        if valid_loader is None:
            return {}
        synchronize_params(model_chunks)
        results = evaluate(model_chunks, valid_loader, references["valid"], forward_step, names,
                           run.log.eval_iters, progress=not run.log.no_progress_bar)
        if run.data.uses_demo:
            results["eval/exact_match"] = demo_exact_match(model_chunks, data.tokenizer, use_thd,
                                                           pad_multiple=pad_multiple)
        logger.info("%s evaluation: %s", tag, "  ".join(
            f"{k.removeprefix('eval/')} {v:.4f}" for k, v in results.items()
            if k in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/exact_match")))
        return results

    before = run_evaluation("initial") if state.iteration == 0 else {}
    if before:
        metrics_logger.log(state.iteration, before, console=False)

    # --- The loop -----------------------------------------------------------------------------
    last_metrics: dict = {}
    window = {"time": 0.0, "real_tokens": 0, "pack_tokens": 0, "skipped": 0}
    saved_at = None  # the step of the last save
    stop = None  # why the loop stops before train_iters: --exit-interval, a signal, a duration
    try:
        while state.iteration < train_iters and stop is None:
            start = time.time()
            packs = train_loader.next_global_batch()
            micro = [MicroBatch(p) for p in packs]
            references["train"].attach(micro)
            result = train_step(model_chunks, optimizer, micro, forward_step, names, state.iteration + 1,
                                run.skip_nonfinite_batches)
            if not result.skipped:  # as Megatron-LM: the schedule advances with successful updates only
                scheduler.step(increment=1)
            elif is_logging_rank():
                logger.warning("step %d: non-finite loss or gradients: batch skipped, no update "
                               "(--skip-nonfinite-batches)", state.iteration + 1)
            if run.loss_config.bco_running_mean and not result.skipped:
                bco_running_mean_update(state.loss_state, result.metric_sums, result.num_pairs)
            state.iteration += 1
            state.consumed_pairs = train_loader.consumed_pairs
            state.epoch = train_loader.epoch
            window["time"] += time.time() - start
            window["real_tokens"] += _global_sum(sum(p.num_real_tokens for p in packs))
            window["pack_tokens"] += _global_sum(sum(p.pack_length for p in packs))
            window["skipped"] += int(result.skipped)

            if state.iteration % run.log.log_interval == 0 or state.iteration == train_iters:
                last_metrics = {name: value / max(result.num_pairs, 1) for name, value in result.metric_sums.items()}
                last_metrics.update({
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": result.grad_norm,
                    "tokens_per_sec": window["real_tokens"] / max(window["time"], 1e-9),
                    "packing_efficiency": window["real_tokens"] / max(window["pack_tokens"], 1),
                    "consumed_pairs": state.consumed_pairs,
                    "skipped": float(window["skipped"]),  # batches skipped since the last log line
                })
                metrics_logger.log(state.iteration, last_metrics)
                window = {"time": 0.0, "real_tokens": 0, "pack_tokens": 0, "skipped": 0}
            if run.log.eval_interval and state.iteration % run.log.eval_interval == 0 and state.iteration < train_iters:
                metrics_logger.log(state.iteration, run_evaluation(f"step {state.iteration}"), console=False)
            if run.checkpoint.save and run.checkpoint.save_interval and state.iteration % run.checkpoint.save_interval == 0:
                _save(run, model_chunks, optimizer, scheduler, state, model_cfg, data)
                saved_at = state.iteration
            # Also at the last step, as Megatron-LM: an exit skips the final evaluation.
            stop = exit_conditions.check(state.iteration)
    finally:
        exit_conditions.close()

    # --- Finish: one path for the end of training and every early exit ------------------------
    if stop is not None:
        logger.info("exiting after step %d (%s)", state.iteration, stop)
    after = run_evaluation("final") if stop is None else {}
    if after:
        metrics_logger.log(state.iteration, after, console=False)
    if run.checkpoint.save and saved_at != state.iteration:  # as Megatron-LM: every exit saves
        _save(run, model_chunks, optimizer, scheduler, state, model_cfg, data)
    if before and after:
        logger.info("held-out preference accuracy: %.3f -> %.3f%s", before["eval/rewards/accuracies"],
                    after["eval/rewards/accuracies"],
                    f"; exact match: {before['eval/exact_match']:.3f} -> {after['eval/exact_match']:.3f}"
                    if "eval/exact_match" in after else "")
    metrics_logger.close()
    synchronize_params(model_chunks)
    return {"train": last_metrics, "eval_before": before, "eval_after": after, "iteration": state.iteration,
            "weights_sha256": weights_digest(model_chunks), "stopped_by": stop}


class ExitConditions:
    """When to leave the loop early, as Megatron-LM: --exit-interval (the same step on every
    rank), SIGTERM with --exit-signal-handler, --exit-duration-in-mins. A signal or a clock
    reaches ranks at different steps, so those two are agreed on by an all-reduce after every
    step (Megatron-LM's DistributedSignalHandler): all ranks stop after the same step."""

    def __init__(self, config):
        self.config = config
        self.start = time.time()
        self.signalled = False
        self.previous_handler = None
        if config.exit_signal_handler:
            self.previous_handler = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def check(self, iteration: int) -> Optional[str]:
        if self.config.exit_interval and iteration % self.config.exit_interval == 0:
            return "--exit-interval"
        if not (self.config.exit_signal_handler or self.config.exit_duration_in_mins):
            return None
        minutes = (time.time() - self.start) / 60
        flags = torch.tensor([float(self.signalled),
                              float(bool(self.config.exit_duration_in_mins) and minutes >= (self.config.exit_duration_in_mins or 0))],
                             device="cuda" if torch.cuda.is_available() else "cpu")
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0] > 0:
            return "SIGTERM, --exit-signal-handler"
        if flags[1] > 0:
            return "--exit-duration-in-mins"
        return None

    def close(self) -> None:
        if self.config.exit_signal_handler:
            signal.signal(signal.SIGTERM, self.previous_handler if self.previous_handler is not None else signal.SIG_DFL)


def _check_save_keeps_reference(run: RunConfig, reference: Optional[dict], saved_state: Optional[dict]) -> None:
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


def _save(run, model_chunks, optimizer, scheduler, state, model_cfg, data) -> None:
    synchronize_params(model_chunks)
    path = save_checkpoint(run.checkpoint.save, model_chunks, optimizer, scheduler, state, model_cfg,
                           tokenizer_dir=data.tokenizer_dir, run_metadata={"loss": run.loss},
                           optim_fully_reshardable=run.checkpoint.optim_fully_reshardable,
                           run_record=run_record(run, data))
    logger.info("saved checkpoint %s", path)
