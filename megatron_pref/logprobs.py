"""Per-token log-probs from vocab-parallel logits, and per-sequence reductions of packed batches.

``token_logprobs`` is a vocab-parallel log-softmax gather (the same reduction as megatron-core's
``vocab_parallel_cross_entropy``) with two differences that matter for preference training:

* **Padded vocab masked.** Megatron pads the vocab to a multiple of
  ``make_vocab_size_divisible_by * TP``; the padded columns hold live (trained) logits. If they
  enter the softmax, log-probs change with TP. We give them -inf.
* **Chunked along tokens, recomputed in backward.** Forward keeps only the per-token
  log-sum-exp (``[T]`` fp32); backward recomputes the softmax chunk by chunk from the logits the
  model already holds, in place on one chunk copy. The extra peak memory is one chunk of
  ``[chunk, V/TP]`` fp32 (plus the logits' gradient autograd returns), never the
  full ``[T, V/TP]`` fp32 that autograd through a plain ``log_softmax`` (or through
  megatron-core's cross-entropy, which saves the softmax) would keep alive.

``segment_sums`` reduces packed token values to per-sequence sums and counts from ``cu_seqlens``
with no host synchronisation (no ``.item()``/``.tolist()``/boolean indexing).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

DEFAULT_CHUNK_TOKENS = 1024


def _tensor_parallel_info(group):
    if group is None:
        try:
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                group = parallel_state.get_tensor_model_parallel_group()
        except Exception:
            group = None
    if group is None or not dist.is_initialized():
        return None, 0, 1
    return group, dist.get_rank(group), dist.get_world_size(group)


def _masked_chunk(logits_chunk: torch.Tensor, vocab_start: int, true_vocab_size: int) -> torch.Tensor:
    """fp32 copy of one chunk with padded-vocab columns at -inf."""
    # copy=True: .float() on fp32 logits would alias them, and the masking would write into the model's output.
    x = logits_chunk.to(torch.float32, copy=True)
    local_valid = true_vocab_size - vocab_start
    if local_valid < x.shape[-1]:
        x[:, max(local_valid, 0):] = float("-inf")
    return x


class _VocabParallelTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, true_vocab_size, chunk_tokens, group, rank, world, with_log_sum_sq=False):
        tokens, local_vocab = logits.shape
        vocab_start = rank * local_vocab
        log_normaliser = torch.empty(tokens, dtype=torch.float32, device=logits.device)
        # WPO: log sum_v p(v)^2 per token (empty when not asked for; never differentiated).
        log_sum_sq = torch.empty(tokens if with_log_sum_sq else 0, dtype=torch.float32, device=logits.device)
        target_logit = torch.empty(tokens, dtype=torch.float32, device=logits.device)
        local_labels = labels - vocab_start
        label_is_local = (local_labels >= 0) & (local_labels < local_vocab)
        safe_local_labels = torch.where(label_is_local, local_labels, torch.zeros_like(local_labels))
        for start in range(0, tokens, chunk_tokens):
            end = min(start + chunk_tokens, tokens)
            x = _masked_chunk(logits[start:end], vocab_start, true_vocab_size)
            chunk_max = x.max(dim=-1).values
            if world > 1:
                dist.all_reduce(chunk_max, op=dist.ReduceOp.MAX, group=group)
            picked = x.gather(1, safe_local_labels[start:end, None]).squeeze(1)
            picked = torch.where(label_is_local[start:end], picked, torch.zeros_like(picked))
            # In place: the chunk copy is the only [chunk, V/TP] fp32 buffer.
            sum_exp = x.sub_(chunk_max[:, None]).exp_().sum(dim=-1)
            sums = [sum_exp, picked]
            if with_log_sum_sq:
                sums.append(x.square_().sum(dim=-1))  # sum exp(2 (z - max)); x is spent after this
            if world > 1:
                # One collective for all sums: [sum_exp, picked target logit(, sum of squares)].
                both = torch.stack(sums)
                dist.all_reduce(both, group=group)
                sums = list(both)
            sum_exp, picked = sums[0], sums[1]
            log_normaliser[start:end] = chunk_max + torch.log(sum_exp)
            if with_log_sum_sq:
                # log sum_v p_v^2 = log sum exp(2(z - max)) - 2 log sum exp(z - max)
                log_sum_sq[start:end] = torch.log(sums[2]) - 2.0 * torch.log(sum_exp)
            target_logit[start:end] = picked
            del x
        ctx.save_for_backward(logits, safe_local_labels, label_is_local, log_normaliser)
        ctx.vocab_start = vocab_start
        ctx.true_vocab_size = true_vocab_size
        ctx.chunk_tokens = chunk_tokens
        ctx.mark_non_differentiable(log_sum_sq)
        return target_logit - log_normaliser, log_sum_sq

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_log_sum_sq=None):
        logits, safe_local_labels, label_is_local, log_normaliser = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        grad_logprobs = grad_logprobs.float()
        for start in range(0, logits.shape[0], ctx.chunk_tokens):
            end = min(start + ctx.chunk_tokens, logits.shape[0])
            x = _masked_chunk(logits[start:end], ctx.vocab_start, ctx.true_vocab_size)
            # d logp(target) / d logit_v = 1[v == target] - softmax_v, in place on the chunk copy.
            grad = x.sub_(log_normaliser[start:end, None]).exp_().mul_(-grad_logprobs[start:end, None])
            onehot_grad = torch.where(label_is_local[start:end], grad_logprobs[start:end],
                                      torch.zeros_like(grad_logprobs[start:end]))
            grad.scatter_add_(1, safe_local_labels[start:end, None], onehot_grad[:, None])
            grad_logits[start:end] = grad  # copy_ casts to the logits' dtype
            del x, grad
        return grad_logits, None, None, None, None, None, None, None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, true_vocab_size: int,
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS, group=None, with_log_sum_sq: bool = False):
    """log p(labels[t] | ...) for every token, from this TP rank's vocab shard of the logits.

    Args:
        logits: ``[..., V/TP]`` (any float dtype; leading dims are flattened to tokens).
        labels: ``[...]`` global token ids, same leading shape.
        true_vocab_size: the tokenizer's vocab size; columns at or above it are excluded.
        chunk_tokens: tokens per chunk (bounds the extra fp32 memory).
        group: the tensor-parallel group (default: megatron-core's, if initialised).
        with_log_sum_sq: also return ``log sum_v p(v)^2`` per token (WPO's alignment term; no
            gradient), computed in the same pass.
    Returns: fp32 log-probs with the shape of ``labels`` (and the log sum of squares, same shape).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    group, rank, world = _tensor_parallel_info(group)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1).long()
    out, log_sum_sq = _VocabParallelTokenLogprobs.apply(flat_logits, flat_labels, true_vocab_size, chunk_tokens,
                                                        group, rank, world, with_log_sum_sq)
    if with_log_sum_sq:
        return out.view(labels.shape), log_sum_sq.view(labels.shape)
    return out.view(labels.shape)


def sequence_ids(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """Sequence index of every token of a pack; padding after the last sequence gets S."""
    positions = torch.arange(total_tokens, device=cu_seqlens.device)
    return torch.bucketize(positions, cu_seqlens[1:].to(positions.dtype), right=True)


def segment_sums(values: torch.Tensor, loss_mask: torch.Tensor, cu_seqlens: torch.Tensor,
                 seq_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of ``values * loss_mask`` and per-sequence counts of ``loss_mask``.

    ``values``/``loss_mask`` are ``[T]`` over one pack; ``cu_seqlens`` ``[S+1]`` covers the real
    sequences (tokens past ``cu_seqlens[-1]`` are padding and are dropped). Shapes only come from
    tensor sizes, so nothing waits on the device.
    """
    if values.shape != loss_mask.shape or values.dim() != 1:
        raise ValueError(f"values {tuple(values.shape)} and loss_mask {tuple(loss_mask.shape)} "
                         "must be the same 1-D shape")
    num_sequences = cu_seqlens.numel() - 1
    if seq_ids is None:
        seq_ids = sequence_ids(cu_seqlens, values.numel())
    mask = loss_mask.to(values.dtype)
    # where(), not a product: a masked-out value may be -inf (e.g. a padding label).
    masked_values = torch.where(mask > 0, values * mask, torch.zeros_like(values))
    sums = values.new_zeros(num_sequences + 1).index_add(0, seq_ids, masked_values)
    counts = mask.new_zeros(num_sequences + 1).index_add(0, seq_ids, mask)
    return sums[:num_sequences], counts[:num_sequences]
