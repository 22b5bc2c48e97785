"""Model chunks, optimizer, scheduler and one step through megatron-core's schedules.

Each function applies one concern (torchtitan style); ``training.py`` strings them together.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_pref.data.packing import build_packed_batch, pad_pack
from megatron_pref.model import ModelConfig, ParallelConfig, PrecisionConfig, build_gpt_model


def ddp_bucket_size(overlap_grad_reduce: bool, data_parallel_size: int) -> Optional[int]:
    """Parameters per gradient bucket: megatron-core's choice, made explicit because the
    distributed optimizer's DP-reshardable checkpoints store one tensor per bucket. One bucket
    without overlap; with it, max(40M, 1M x DP)."""
    return max(40_000_000, 1_000_000 * data_parallel_size) if overlap_grad_reduce else None


def build_model_chunks(model_cfg: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig,
                       wrap_ddp: bool = True, use_distributed_optimizer: bool = False,
                       perform_initialization: bool = True, overlap_grad_reduce: bool = False,
                       overlap_param_gather: bool = False) -> list:
    """This rank's model chunks (one, or one per virtual pipeline stage), DDP-wrapped.

    ``wrap_ddp=False`` builds a frozen model (the online reference): no DDP buffers, no
    optimizer state, and run only under ``torch.no_grad``, so it keeps no gradients.
    ``overlap_grad_reduce`` (``--overlap-grad-reduce``) launches each gradient bucket's
    data-parallel reduction as soon as the last micro-batch's backward has filled it,
    overlapping it with the rest of the backward. ``overlap_param_gather``
    (``--overlap-param-gather``, distributed optimizer only) leaves the optimizer step's
    parameter all-gather to forward pre-hooks, bucket by bucket, during the next forward; with
    virtual pipeline stages the interleaved schedule starts each chunk's gather, aligned across
    stages (Megatron-LM's default). Read the weights outside a training forward only after
    ``synchronize_params``.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    vpp = parallel.virtual_pipeline_model_parallel_size
    stages = range(vpp) if vpp else [None]
    chunks = []
    for vp_stage in stages:
        model = build_gpt_model(model_cfg, parallel, precision, vp_stage=vp_stage,
                                perform_initialization=perform_initialization)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        if precision.bf16:
            model = Float16Module(model.config, model)
        if wrap_ddp:
            ddp_config = DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
                use_distributed_optimizer=use_distributed_optimizer, overlap_param_gather=overlap_param_gather,
                align_param_gather=overlap_param_gather and vpp is not None,
                bucket_size=ddp_bucket_size(overlap_grad_reduce, ps.get_data_parallel_world_size(with_context_parallel=True)))
            model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model,
                                            disable_bucketing=(vp_stage is not None and vp_stage > 0))
        else:
            # Frozen by running only under torch.no_grad (forward_only_pass), not by
            # requires_grad_(False): torch.matmul picks its GEMM by the weight's requires_grad,
            # and at TP>1 a frozen weight took a folded 2-D GEMM while the policy took the
            # batched one, so reference and policy differed by rounding and step-0 ties broke.
            model.eval()
        chunks.append(model)
    return chunks


def synchronize_params(model_chunks: list) -> None:
    """Finish every parameter all-gather that ``--overlap-param-gather`` left to the next
    training forward.

    The distributed optimizer's step updates only this rank's shard of each bucket; the other
    shards arrive by the all-gathers that the next forward's pre-hooks wait for. Evaluation,
    generation, checkpoints and digests read the weights outside that forward, so they call
    this first (Megatron-LM does the same before evaluation and saving). A no-op without the
    flag.
    """
    for chunk in model_chunks:
        if getattr(chunk, "use_forward_hook", False):
            chunk.start_param_sync(force_sync=True)


def build_optimizer(model_chunks: list, optim, precision: PrecisionConfig):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, bf16=precision.bf16, params_dtype=precision.params_dtype,
        use_distributed_optimizer=optim.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(config, model_chunks)
    if optim.use_distributed_optimizer:
        # Its zero_grad sets .grad on views of the main parameters (megatron-core's own comment:
        # "throws grad-access warning"); harmless, and printed by every rank.
        warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf Tensor",
                                category=UserWarning)
    if torch.cuda.is_available():
        use_fused_torch_adam(optimizer)
    return optimizer


def use_fused_torch_adam(optimizer, devices: tuple = ("cuda",)) -> int:
    """Switch megatron-core's torch Adam fallback to torch's fused kernel; returns how many
    optimizers were switched.

    megatron-core takes TE's fused Adam, else apex's, else ``torch.optim.Adam(W)`` with its
    default multi-tensor (foreach) step. apex is optional here, so without TE and apex a GPU
    run gets torch's fused Adam (one kernel over all tensors) instead. Before the first step
    only: fused keeps its step counters on the device, the foreach path on the host.
    """
    switched = 0
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(wrapper, "optimizer", None)
        if type(inner) not in (torch.optim.Adam, torch.optim.AdamW):  # TE / apex FusedAdam: already fused
            continue
        params = [p for group in inner.param_groups for p in group["params"]]
        if not params or any(p.device.type not in devices for p in params) or inner.state:
            continue
        for group in inner.param_groups:
            group["fused"], group["foreach"] = True, False
        switched += 1
    return switched


def scheduler_settings(optim, train_iters: int) -> dict:
    """The schedule the flags ask for, under the names of OptimizerParamScheduler.state_dict()
    (so a checkpoint's schedule can be compared with it before any model is built)."""
    decay_iters = optim.lr_decay_iters or train_iters
    warmup = min(optim.lr_warmup_iters, decay_iters)
    return dict(max_lr=optim.lr, min_lr=optim.min_lr, lr_warmup_steps=warmup,
                lr_decay_steps=max(decay_iters, warmup + 1), lr_decay_style=optim.lr_decay_style,
                start_wd=optim.weight_decay, end_wd=optim.weight_decay)


def build_scheduler(optimizer, optim, train_iters: int, override: bool = False):
    """megatron-core's scheduler. On load, ``override`` (--override-opt_param-scheduler) keeps
    these settings; otherwise the checkpoint's are taken, which megatron_pref.resume has checked
    equal them unless --use-checkpoint-opt_param-scheduler asked for the checkpoint's."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    settings = scheduler_settings(optim, train_iters)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if settings["lr_warmup_steps"] else optim.lr, **settings,
        wd_incr_steps=max(train_iters, 1), wd_incr_style="constant",
        override_opt_param_scheduler=override, use_checkpoint_opt_param_scheduler=not override)


def _configure_schedule(model_chunks: list, optimizer=None) -> None:
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    config = get_model_config(model_chunks[0])
    config.finalize_model_grads_func = finalize_model_grads if optimizer is not None else None
    config.grad_scale_func = optimizer.scale_loss if optimizer is not None else None
    config.param_sync_func = None
    if optimizer is None:
        return
    if any(getattr(getattr(c, "ddp_config", None), "overlap_grad_reduce", False) for c in model_chunks):
        # As Megatron-LM: every chunk defers its reduction until its last micro-batch, and the
        # schedule starts each chunk's reduction when that chunk's last backward is done.
        no_sync = [c.no_sync for c in model_chunks]
        grad_sync = [c.start_grad_sync for c in model_chunks]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    elif len(model_chunks) == 1:
        config.no_sync_func = model_chunks[0].no_sync
    if any(getattr(getattr(c, "ddp_config", None), "align_param_gather", False) for c in model_chunks):
        # The interleaved schedule starts each chunk's parameter all-gather before its first
        # micro-batch, at the same time on every pipeline stage.
        config.param_sync_func = [c.start_param_sync for c in model_chunks]


def pad_micro_batches_for_interleaving(micro_batches: list, pipeline_size: int, virtual_size) -> list:
    """The interleaved schedule wants a micro-batch count that is a multiple of PP, and
    communicates fixed-shape activations: pad the count with empty packs and every pack to
    the longest one."""
    if not virtual_size:
        return micro_batches
    missing = (-len(micro_batches)) % pipeline_size
    longest = max(int(m.pack.tokens.numel()) for m in micro_batches)
    micro_batches = [dataclasses.replace(m, pack=pad_pack(m.pack, longest)) for m in micro_batches]
    template = micro_batches[0]
    empty = build_packed_batch([], pad_to=longest, with_scores=template.pack.score_chosen is not None)
    fillers = [dataclasses.replace(template, pack=empty,
                                   ref_chosen_logps=None if template.ref_chosen_logps is None else template.ref_chosen_logps[:0],
                                   ref_rejected_logps=None if template.ref_rejected_logps is None else template.ref_rejected_logps[:0])
               for _ in range(missing)]
    return list(micro_batches) + fillers


def run_schedule(model_chunks: list, micro_batches: Sequence, forward_step: Callable,
                 forward_only: bool, optimizer=None) -> list[dict]:
    """Run the pipeline schedule (1F1B, interleaved with virtual stages) over the micro-batches.

    Returns the last stage's per-micro-batch outputs of the loss function (empty elsewhere).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    micro_batches = pad_micro_batches_for_interleaving(
        list(micro_batches), ps.get_pipeline_model_parallel_world_size(),
        ps.get_virtual_pipeline_model_parallel_world_size())
    _configure_schedule(model_chunks, None if forward_only else optimizer)
    # Each chunk reads the same sequence of micro-batches.
    iterators = [iter(micro_batches) for _ in model_chunks]
    longest = max(int(m.pack.tokens.numel()) for m in micro_batches)
    config = get_model_config(model_chunks[0])
    # Interleaving pads every pack to one length, so the shape is known: no per-transfer shape
    # exchange (one round trip less per p2p on GPUs; on gloo the untagged exchange of shapes
    # could deadlock when every micro-batch of a stage is in the warm-up phase).
    variable_seq_lengths = config.variable_seq_lengths
    config.variable_seq_lengths = variable_seq_lengths and not ps.get_virtual_pipeline_model_parallel_world_size()
    try:
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
            num_microbatches=len(micro_batches),
            seq_length=longest,
            micro_batch_size=1,
            forward_only=forward_only,
        )
    finally:
        config.variable_seq_lengths = variable_seq_lengths


def metric_sums_over_data_parallel(outputs: list[dict], names: Sequence[str]) -> dict:
    """Sum per-micro-batch metric sums, then over DP ranks and pipeline stages.

    Only the last stage holds values; the others contribute zeros, so after the all-reduce over
    the pipeline group every rank (including the logging rank 0) holds the global sums.
    """
    from megatron.core import parallel_state as ps

    device = "cuda" if torch.cuda.is_available() else "cpu"
    totals = torch.zeros(len(names), dtype=torch.float64, device=device)
    for out in outputs:
        for i, name in enumerate(names):
            if name in out:
                totals[i] += out[name].to(device, torch.float64)
    if dist.is_initialized():
        dist.all_reduce(totals, group=ps.get_data_parallel_group())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(totals, group=ps.get_pipeline_model_parallel_group())
    return dict(zip(names, totals.tolist()))


@dataclass
class StepResult:
    metric_sums: dict  # global sums over pairs
    num_pairs: int  # global
    grad_norm: Optional[float]
    skipped: bool


class NonFiniteLoss(RuntimeError):
    pass


def _global_counts(micro_batches: Sequence) -> tuple[int, int, int]:
    """(pairs, rejected response tokens, chosen response tokens) of the global batch, summed
    over DP ranks in one collective."""
    from megatron.core import parallel_state as ps

    local = torch.tensor([
        sum(int(m.pack.pair_ids.numel()) for m in micro_batches),
        sum(int(m.pack.num_rejected_response_tokens) for m in micro_batches),
        sum(int(m.pack.num_chosen_response_tokens) for m in micro_batches),
    ], dtype=torch.float64)
    if dist.is_initialized():
        local = local.to("cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(local, group=ps.get_data_parallel_group())
    return int(local[0]), int(local[1]), int(local[2])


def global_pair_counts(micro_batches: Sequence) -> tuple[int, int]:
    """(pairs, rejected response tokens) of the global batch, summed over DP ranks."""
    pairs, rejected, _ = _global_counts(micro_batches)
    return pairs, rejected


def attach_token_normalisers(micro_batches: Sequence) -> int:
    """Give every micro-batch the global-batch ratios that make token-level terms additive
    (SLIME's rejected-token mean, the token-normalised NLL); returns the global pair count."""
    pairs, rejected, chosen = _global_counts(micro_batches)
    for m in micro_batches:
        m.pairs_per_rejected_token = pairs / max(rejected, 1)
        m.pairs_per_chosen_token = pairs / max(chosen, 1)
    return pairs


def nonfinite_gradients(optimizer) -> bool:
    """True on every rank when any rank's optimizer holds a non-finite gradient.

    megatron-core's found-inf check (``MixedPrecisionOptimizer._unscale_main_grads_and_check_for_nan``:
    the fused non-finite check, here with an unscale by 1) for every optimizer, grad scaler or
    not, all-reduced over all ranks. Every gradient counts, including the copies of replicated
    weights on TP ranks > 0 that the gradient norm leaves out as duplicates.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    found, one = torch.zeros(1, dtype=torch.float, device=device), torch.ones(1, dtype=torch.float, device=device)
    grads_by_dtype: dict = {}
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(sub, "is_stub_optimizer", False):
            continue
        decoupled = sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
        for param in sub.get_parameters():
            grad = getattr(param, "decoupled_grad", None) if decoupled else param.grad
            if grad is not None:
                grads_by_dtype.setdefault(grad.dtype, []).append(grad)
    for grads in grads_by_dtype.values():  # the fused kernel wants one dtype per call
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)
    if dist.is_initialized():
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
    return bool(found.item() > 0)


def step_if_finite(optimizer) -> tuple[bool, float]:
    """megatron-core's ``optimizer.step()``, applied on no rank when any gradient is non-finite.

    Returns (update applied, global gradient norm before clipping). megatron-core checks for
    inf/NaN only with a grad scaler (fp16, or a constant loss scale); in fp32 and bf16 its
    ``step()`` applies NaN gradients. So the step is taken apart as ``MegatronOptimizer.step()``
    and ``ChainedOptimizer.step()`` take it apart (prepare the gradients, one global norm, clip
    with that norm, step), and the check decides before anything is applied. A norm that
    overflows (finite gradients, sum of squares past fp32) skips too.
    """
    from megatron.core.optimizer import optimizer as mcore_optimizer  # its clip (cpu.py may patch it)

    found_inf = optimizer.prepare_grads()  # the grad scaler's own check, where there is one
    found_inf = nonfinite_gradients(optimizer) or found_inf
    grad_norm = float(optimizer.get_grad_norm())
    if found_inf or not math.isfinite(grad_norm):
        return False, grad_norm
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = [] if getattr(sub, "is_stub_optimizer", False) else sub.get_parameters()
        if params and sub.config.clip_grad > 0.0:
            mcore_optimizer.clip_grad_by_total_norm_fp32(
                params, max_norm=sub.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return optimizer.step_with_ready_grads(), grad_norm


def train_step(model_chunks: list, optimizer, micro_batches: Sequence, forward_step: Callable,
               metric_names: Sequence[str], iteration: int, skip_nonfinite: bool = False) -> StepResult:
    """Forward + backward of one global batch through the schedule, then the optimizer step.

    A non-finite loss or gradient anywhere leaves every rank's weights and optimizer state as
    they were: the batch is skipped (``skip_nonfinite``) or the run stops naming the step.
    """
    pairs = attach_token_normalisers(micro_batches)
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    outputs = run_schedule(model_chunks, micro_batches, forward_step, forward_only=False, optimizer=optimizer)
    sums = metric_sums_over_data_parallel(outputs, metric_names)
    loss = sums["loss"] / max(pairs, 1)
    if not math.isfinite(loss):
        terms = {k: v / max(pairs, 1) for k, v in sums.items()}
        if not skip_nonfinite:
            raise NonFiniteLoss(f"non-finite loss {loss} at step {iteration}; loss terms: "
                                + ", ".join(f"{k}={v:.4g}" for k, v in terms.items()))
        optimizer.zero_grad()
        return StepResult(sums, pairs, None, skipped=True)
    update_successful, grad_norm = step_if_finite(optimizer)
    if not update_successful and not skip_nonfinite:
        raise NonFiniteLoss(f"non-finite gradients at step {iteration} (gradient norm {grad_norm:.4g}, loss "
                            f"{loss:.4g}); no update was applied (--skip-nonfinite-batches skips such batches)")
    return StepResult(sums, pairs, grad_norm, skipped=not update_successful)


def forward_only_pass(model_chunks: list, micro_batches: Sequence, forward_step: Callable) -> list[dict]:
    with torch.no_grad():
        return run_schedule(model_chunks, micro_batches, forward_step, forward_only=True)
