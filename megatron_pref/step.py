"""forward_step / loss_func glue between packed pairs and megatron-core's pipeline schedules.

Every pipeline stage runs ``GPTModel`` on the pack; only the last stage (``post_process``)
produces vocab-parallel logits, and only there ``loss_func`` turns them into per-token
log-probs -> per-sequence sums -> per-pair statistics -> the preference loss.

Normalisation. ``loss_func`` returns ``(loss_sum, num_pairs, metric_sums)``. With
``calculate_per_token_loss=True`` megatron-core back-propagates ``loss_sum`` unscaled and
``finalize_model_grads`` divides the gradients by the pair count summed over micro-batches and
all-reduced over data-parallel ranks: the gradient is that of the exact per-pair mean of the
global batch, whatever the split into micro-batches, packs and ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Optional

import torch

from megatron_pref.logprobs import DEFAULT_CHUNK_TOKENS, segment_sums, sequence_ids, token_logprobs
from megatron_pref.model import packed_forward_inputs


@dataclass
class MicroBatch:
    """One pack as the schedule consumes it (a ``PackedBatch`` plus what the step adds)."""

    pack: object  # megatron_pref.data.packing.PackedBatch
    ref_chosen_logps: Optional[torch.Tensor] = None  # [P]
    ref_rejected_logps: Optional[torch.Tensor] = None  # [P]
    # Global-batch normaliser for token-level terms (SLIME): global pairs / global rejected tokens.
    pairs_per_rejected_token: Optional[float] = None
    # Same for the token-normalised NLL (--nll-normalization token): global pairs / global chosen tokens.
    pairs_per_chosen_token: Optional[float] = None


@dataclass
class SequenceStats:
    """Per-pair reductions of one pack's token log-probs."""

    chosen_logps: torch.Tensor  # [P]
    rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    token_logps: torch.Tensor  # [T]
    rejected_token_mask: torch.Tensor  # [T] 1.0 on rejected response tokens
    # --use-weighting (WPO): per response, mean of log p(y_t) - log sum_v p(v)^2 over its tokens.
    chosen_wpo_logweights: Optional[torch.Tensor] = None
    rejected_wpo_logweights: Optional[torch.Tensor] = None


def _shared_length_mask(loss_mask, cu_seqlens, seq_ids, counts, pair_index, is_chosen, num_pairs):
    """``[T]`` 1.0 on each response's first ``min(len_w, len_l)`` response tokens (LD-DPO's
    shared part; TRL's ``1 <= cumsum(completion_mask) <= shared_len``)."""
    chosen_len = counts.new_zeros(num_pairs).index_add(0, pair_index, counts * is_chosen)
    rejected_len = counts.new_zeros(num_pairs).index_add(0, pair_index, counts * (1.0 - is_chosen))
    shared_len = torch.minimum(chosen_len, rejected_len)[pair_index]  # per sequence
    running = loss_mask.cumsum(0)
    before = torch.cat([running.new_zeros(1), running])[cu_seqlens[:-1].long()]  # response tokens before each seq
    # Padding tokens carry sequence id S: extend with values that select nothing.
    before = torch.cat([before, before.new_zeros(1)])
    shared_len = torch.cat([shared_len, shared_len.new_full((1,), -1.0)])
    position = running - before[seq_ids]  # 1-based index among the sequence's response tokens
    return loss_mask * (position <= shared_len[seq_ids]).to(loss_mask.dtype)


def pair_statistics(logits: torch.Tensor, pack, true_vocab_size: int,
                    chunk_tokens: int = DEFAULT_CHUNK_TOKENS, ld_alpha: Optional[float] = None,
                    wpo: bool = False) -> SequenceStats:
    """Token log-probs of one pack's labels, reduced per sequence and arranged per pair.

    One pass over the logits yields everything the losses need, including the rejected
    tokens' individual log-probs (SLIME's token-level term), so no loss costs a second pass.
    ``ld_alpha``: the per-sequence log-probs are LD-DPO's ``shared + alpha * tail``
    (:func:`megatron_pref.losses.length_desensitised_logps`). ``wpo``: also WPO's per-response
    log-weights (the same pass computes ``log sum_v p(v)^2``).
    """
    from megatron_pref.losses import length_desensitised_logps

    logits = logits.reshape(-1, logits.shape[-1])
    total = logits.shape[0]
    labels = pack.labels.to(logits.device)
    loss_mask = pack.loss_mask.to(logits.device, torch.float32)
    cu_seqlens = pack.cu_seqlens.to(logits.device)
    if wpo:
        token_logps, log_sum_sq = token_logprobs(logits, labels, true_vocab_size, chunk_tokens, with_log_sum_sq=True)
    else:
        token_logps = token_logprobs(logits, labels, true_vocab_size, chunk_tokens)
    seq_ids = sequence_ids(cu_seqlens, total)
    sums, counts = segment_sums(token_logps, loss_mask, cu_seqlens, seq_ids)

    num_pairs = pack.pair_ids.numel()
    pair_index = pack.seq_pair_index.to(logits.device)
    is_chosen = pack.seq_is_chosen.to(logits.device, torch.float32)

    def per_pair(values, weight):
        return values.new_zeros(num_pairs).index_add(0, pair_index, values * weight)

    if ld_alpha is not None:
        shared_mask = _shared_length_mask(loss_mask, cu_seqlens, seq_ids, counts, pair_index, is_chosen, num_pairs)
        shared, _ = segment_sums(token_logps, shared_mask, cu_seqlens, seq_ids)
        sums = length_desensitised_logps(sums, shared, ld_alpha)
    wpo_logweights = {}
    if wpo:
        aligned, _ = segment_sums((token_logps - log_sum_sq).detach(), loss_mask, cu_seqlens, seq_ids)
        mean_aligned = aligned / counts.clamp(min=1.0)
        wpo_logweights = dict(chosen_wpo_logweights=per_pair(mean_aligned, is_chosen),
                              rejected_wpo_logweights=per_pair(mean_aligned, 1.0 - is_chosen))

    # Padding tokens carry sequence id S: extend the flag with a 0 for them.
    is_rejected_token = torch.cat([1.0 - is_chosen, is_chosen.new_zeros(1)])[seq_ids] * loss_mask
    return SequenceStats(
        chosen_logps=per_pair(sums, is_chosen),
        rejected_logps=per_pair(sums, 1.0 - is_chosen),
        chosen_lengths=per_pair(counts, is_chosen),
        rejected_lengths=per_pair(counts, 1.0 - is_chosen),
        token_logps=token_logps,
        rejected_token_mask=is_rejected_token,
        **wpo_logweights,
    )


def pair_stats_for_loss(stats: SequenceStats, micro: MicroBatch, loss_state: Optional[dict] = None):
    """The losses module's ``PairStats`` for one micro-batch."""
    from megatron_pref.losses import PairStats

    pack = micro.pack
    device = stats.chosen_logps.device

    def optional(t):
        return None if t is None else t.to(device, torch.float32)

    return PairStats(
        chosen_logps=stats.chosen_logps,
        rejected_logps=stats.rejected_logps,
        chosen_lengths=stats.chosen_lengths,
        rejected_lengths=stats.rejected_lengths,
        ref_chosen_logps=optional(micro.ref_chosen_logps),
        ref_rejected_logps=optional(micro.ref_rejected_logps),
        score_chosen=optional(getattr(pack, "score_chosen", None)),
        score_rejected=optional(getattr(pack, "score_rejected", None)),
        rejected_token_logps=stats.token_logps,
        rejected_token_mask=stats.rejected_token_mask,
        pairs_per_rejected_token=micro.pairs_per_rejected_token,
        pairs_per_chosen_token=micro.pairs_per_chosen_token,
        chosen_wpo_logweights=stats.chosen_wpo_logweights,
        rejected_wpo_logweights=stats.rejected_wpo_logweights,
        bco_reward_shift=(loss_state or {}).get("bco_mean"),
    )


def preference_loss_func(output_tensor, micro: MicroBatch, loss_name: str, loss_config,
                         true_vocab_size: int, chunk_tokens: int, loss_state: Optional[dict] = None):
    """Last stage: logits -> (loss_sum, num_pairs, metric sums over this micro-batch's pairs)."""
    from megatron_pref.losses import compute_loss

    stats = pair_statistics(output_tensor, micro.pack, true_vocab_size, chunk_tokens,
                            ld_alpha=loss_config.ld_alpha, wpo=loss_config.use_weighting)
    # check_values=False: value checks sync with the device; the data pipeline guarantees them
    # (every response has a scored token: pairs without prompt tokens are skipped).
    out = compute_loss(loss_name, pair_stats_for_loss(stats, micro, loss_state), loss_config, check_values=False)
    num_pairs = torch.tensor(micro.pack.pair_ids.numel(), dtype=torch.int, device=out.loss_sum.device)
    metric_sums = {name: value.detach().float().sum() for name, value in out.metrics.items()}
    metric_sums["loss"] = out.loss_sum.detach().float()
    return out.loss_sum, num_pairs, metric_sums


def logps_loss_func(output_tensor, micro: MicroBatch, true_vocab_size: int, chunk_tokens: int,
                    ld_alpha: Optional[float] = None):
    """Forward-only passes (reference log-probs, evaluation): per-pair log-probs, no loss.
    With LD-DPO's ``ld_alpha`` they are desensitised like the policy's."""
    stats = pair_statistics(output_tensor, micro.pack, true_vocab_size, chunk_tokens, ld_alpha=ld_alpha)
    zero = stats.chosen_logps.sum() * 0.0
    num_pairs = torch.tensor(micro.pack.pair_ids.numel(), dtype=torch.int, device=zero.device)
    return zero, num_pairs, {
        "pair_ids": micro.pack.pair_ids,
        "chosen_logps": stats.chosen_logps.detach(),
        "rejected_logps": stats.rejected_logps.detach(),
        "chosen_lengths": stats.chosen_lengths.detach(),
        "rejected_lengths": stats.rejected_lengths.detach(),
    }


def _wraps_float16_module(model) -> bool:
    from megatron.core.transformer.module import Float16Module

    while True:
        if isinstance(model, Float16Module):
            return True
        if not hasattr(model, "module"):
            return False
        model = model.module


def model_forward(model, pack, use_thd: bool):
    """Run this stage's GPTModel on one pack (inputs on the model's device)."""
    device = next(model.parameters()).device
    inputs = packed_forward_inputs(pack.tokens.to(device), pack.position_ids.to(device), pack.cu_seqlens, use_thd)
    extra = {}
    if _wraps_float16_module(model):
        # Keep bf16 logits: Float16Module's default upcast would hold a full fp32 [T, V/TP]
        # copy until backward; token_logprobs upcasts one chunk at a time.
        extra["fp32_output"] = False
    return model(inputs.input_ids, inputs.position_ids, inputs.attention_mask,
                 packed_seq_params=inputs.packed_seq_params, **extra)


def make_forward_step(loss_func_factory: Callable[[MicroBatch], Callable], use_thd: bool):
    """A megatron-core ``forward_step_func(data_iterator, model)`` for packs of whole pairs."""

    def forward_step(data_iterator: Iterator[MicroBatch], model):
        micro = next(data_iterator)
        output = model_forward(model, micro.pack, use_thd)
        return output, loss_func_factory(micro)

    return forward_step


def preference_forward_step(loss_name: str, loss_config, true_vocab_size: int, use_thd: bool,
                            chunk_tokens: int = DEFAULT_CHUNK_TOKENS, loss_state: Optional[dict] = None):
    """``loss_state``: the run's loss state across steps (``TrainState.loss_state``), read at
    every micro-batch (bco_pair's running mean reward)."""
    return make_forward_step(
        lambda micro: partial(preference_loss_func, micro=micro, loss_name=loss_name,
                              loss_config=loss_config, true_vocab_size=true_vocab_size,
                              chunk_tokens=chunk_tokens, loss_state=loss_state),
        use_thd)


def logps_forward_step(true_vocab_size: int, use_thd: bool, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                       ld_alpha: Optional[float] = None):
    return make_forward_step(
        lambda micro: partial(logps_loss_func, micro=micro, true_vocab_size=true_vocab_size,
                              chunk_tokens=chunk_tokens, ld_alpha=ld_alpha),
        use_thd)
