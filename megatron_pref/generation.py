"""Greedy decoding through the pipeline schedule (any TP/PP), for exact-match evaluation.

Each step packs every unfinished prompt+answer as one sequence of a pack, runs a forward-only
pass, and takes the argmax at each sequence's last token on the last stage (gathered over
TP, padded vocab excluded). The chosen tokens are summed over the pipeline group so every
stage extends the same sequences.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.distributed as dist

from megatron_pref.data.packing import build_pack
from megatron_pref.engine import forward_only_pass
from megatron_pref.step import MicroBatch, make_forward_step


def _next_token_loss_func(output_tensor, micro, true_vocab_size: int):
    from megatron.core import parallel_state as ps

    logits = output_tensor.reshape(-1, output_tensor.shape[-1])
    last = micro.pack.cu_seqlens[1:].long().to(logits.device) - 1
    local = logits[last].float()
    world = ps.get_tensor_model_parallel_world_size()
    if world > 1:
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
        local = torch.cat(parts, dim=-1)
    next_tokens = local[:, :true_vocab_size].argmax(dim=-1)
    zero = output_tensor.sum() * 0.0
    return zero, torch.tensor(0, dtype=torch.int), {"next_tokens": next_tokens}


@torch.no_grad()
def greedy_generate(model_chunks: list, prompts: Sequence[list], true_vocab_size: int, eos_id,
                    max_new_tokens: int, use_thd: bool, sequences_per_pack: int = 64, pad_multiple: int = 1) -> list:
    """Greedy continuations (without the prompt, EOS dropped) of every prompt. Packs are padded
    to ``pad_multiple`` tokens, as the training packs are (``compute_pad_multiple``)."""
    from megatron.core import parallel_state as ps

    forward_step = make_forward_step(
        lambda m: partial(_next_token_loss_func, micro=m, true_vocab_size=true_vocab_size), use_thd)
    answers = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        active = [i for i, d in enumerate(done) if not d]
        if not active:
            break
        groups = [active[k:k + sequences_per_pack] for k in range(0, len(active), sequences_per_pack)]
        micro = [MicroBatch(build_pack([list(prompts[i]) + answers[i] for i in g], pad_multiple=pad_multiple))
                 for g in groups]
        outputs = forward_only_pass(model_chunks, micro, forward_step)
        chosen = torch.zeros(len(active), dtype=torch.long)
        if outputs:
            chosen = torch.cat([o["next_tokens"].cpu() for o in outputs])
        if dist.is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            chosen = chosen.to(device)
            dist.all_reduce(chosen, group=ps.get_pipeline_model_parallel_group())
            chosen = chosen.cpu()
        for i, token in zip(active, chosen.tolist()):
            if eos_id is not None and token == eos_id:
                done[i] = True
            else:
                answers[i].append(token)
    return answers
