"""Pre-flight: every check on flags, files, checkpoints, FP8, the parallel layout and the data,
before any process group or model, and the resolved run they leave: an immutable :class:`Plan`.

The architecture is resolved once, from the --load checkpoint or the flags, with the vocabulary
of the tokenizer (read first: it is cheap, the datasets are not). ``run`` is never changed: the
values resolved here (the transformer implementation, the model) live in the plan.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megatron_pref import reference
from megatron_pref.arguments import ConfigError, RunConfig, resolve_model_config
from megatron_pref.checkpointing import (CheckpointError, check_save_dir, read_model_config, read_provenance,
                                         read_train_state, validate_checkpoint_dir)
from megatron_pref.checksums import verify_checksums
from megatron_pref.data.bundle import DataBundle, build_data, open_tokenizer
from megatron_pref.model import (ModelConfig, PrecisionConfig, default_transformer_impl,
                                 local_norms_support_sequence_parallel)
from megatron_pref.resume import check_loss_state, check_optimizer_layout, check_run_record, check_schedule


@dataclass(frozen=True)
class Plan:
    """What the checks resolved; train() builds from it and from ``run``'s other settings."""
    run: RunConfig
    world_size: int
    model: ModelConfig
    precision: PrecisionConfig  # run.precision with transformer_impl resolved ("auto" -> TE or local)
    saved_state: Optional[dict]  # the train state being resumed (None: a new run, weights only, --finetune)
    data: DataBundle
    reference: Optional[dict]  # the pinned reference source (None: a reference-free loss)
    provenance: Optional[dict]  # the source model's config and tokenizer, carried from --load into every save

    @property
    def use_thd(self) -> bool:
        """Transformer Engine layers take packed (THD) sequences; local layers a block mask."""
        return self.precision.transformer_impl == "transformer_engine"


def preflight(run: RunConfig, world_size: int) -> Plan:
    """Every check that needs no process group, cheapest first; each failure is one error."""
    # Files and checkpoints.
    checkpoint_model = None
    if run.checkpoint.load:
        validate_checkpoint_dir(run.checkpoint.load)
        checkpoint_model = read_model_config(run.checkpoint.load)
    provenance = read_provenance(run.checkpoint.load)
    check_save_dir(run.checkpoint.save, provenance)
    if run.reference.ref_load:
        validate_checkpoint_dir(run.reference.ref_load, flag="--ref-load")
    saved_state = read_train_state(run.checkpoint.load) if run.checkpoint.load and not run.checkpoint.finetune else None
    if saved_state is not None and not run.checkpoint.no_load_optim:
        check_optimizer_layout(run, saved_state, world_size)
    if saved_state is not None:
        check_loss_state(run, saved_state)

    # Precision.
    precision = _resolve_precision(run.precision)

    # The architecture, once, with the tokenizer's vocabulary; then the layout it must fit.
    tokenizer = open_tokenizer(run)
    model = resolve_model_config(run, tokenizer.tokenizer.vocab_size, checkpoint_model)
    _check_layout(run, model, precision, world_size)
    if run.reference.ref_load:
        check_reference_architecture(run.reference.ref_load, model)
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

    # The data (its preprocessed files checked against their checksums as they are opened).
    data = build_data(run, tokenizer)
    check_scores(run, data)
    if saved_state is not None:
        check_run_record(run, data, saved_state)

    # The reference: chosen and pinned.
    source = reference.reference_source(run, saved_state)
    reference.check_reference_available(run, source, model, data)
    reference.check_save_keeps_reference(run, source, saved_state)
    return Plan(run, world_size, model, precision, saved_state, data, source, provenance)


def _resolve_precision(precision: PrecisionConfig) -> PrecisionConfig:
    """A copy with transformer_impl "auto" resolved; FP8 checked against this machine."""
    if precision.fp8_format and not torch.cuda.is_available():
        raise ConfigError("--fp8-format needs GPUs with Transformer Engine")
    if precision.transformer_impl == "auto":
        precision = dataclasses.replace(precision, transformer_impl=default_transformer_impl())
    if precision.fp8_format:
        check_fp8_support(precision)
    return precision


def _check_layout(run: RunConfig, model: ModelConfig, precision: PrecisionConfig, world_size: int) -> None:
    """The parallel layout, sequence length and batch size against the architecture."""
    try:
        run.parallel.validate_for(model, world_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if (run.parallel.sequence_parallel and precision.transformer_impl == "local"
            and not local_norms_support_sequence_parallel(model.normalization)):
        raise ConfigError("--sequence-parallel needs Transformer Engine layers, or apex and --normalization LayerNorm: "
                          f"the local spec's {model.normalization} here is torch's, which megatron-core refuses "
                          "to split over the sequence")
    if model.position_embedding_type == "learned_absolute" and run.data.seq_length > model.max_position_embeddings:
        raise ConfigError(f"--seq-length {run.data.seq_length} exceeds the model's {model.max_position_embeddings} "
                          "learned positions (--max-position-embeddings): lower --seq-length")
    data_parallel_size = world_size // (run.parallel.tensor_model_parallel_size *
                                        run.parallel.pipeline_model_parallel_size)
    if run.optim.global_batch_size % data_parallel_size:
        raise ConfigError(f"--global-batch-size {run.optim.global_batch_size} is not divisible by the "
                          f"data-parallel size {data_parallel_size}")


def check_reference_architecture(ref_load: str, policy) -> None:
    """The reference is built with the policy's architecture and loads its weights, so the two
    must agree: a mismatch is one line now, not a failed load after the data (or, for RoPE
    settings, silently different reference log-probs). Training-only fields may differ."""
    # Training-only fields, and the vocabulary padding (vocabulary tensors load across paddings).
    ignored = {"hidden_dropout", "attention_dropout", "init_method_std", "make_vocab_size_divisible_by"}
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
