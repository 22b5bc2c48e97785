"""Opt-in per-pair statistics for ``tools/loss_study.py`` (off by default).

When enabled, every call of :func:`megatron_pref.losses.compute_loss` adds ``study/*``
metrics to its per-pair metrics, so they travel the path every metric travels: summed over a
micro-batch's pairs in ``step.preference_loss_func``, over micro-batches and data-parallel ranks
in ``engine.metric_sums_over_data_parallel``, divided by the global pair count, written by the
metrics logger (training steps and ``eval/`` evaluations alike). Every loss then also gets the
reference log-probs (``losses.requires_reference``), so reference-free losses can be compared
relative to the same reference.

Every metric is a per-pair value whose mean over pairs is what is wanted. Token shares are
logged as two pair-averaged counts (their ratio is exact whatever the split). The per-pair
gradient weight is ``g = (dL/dlogp_w - dL/dlogp_l) / 2``, by autograd through the loss itself:
for losses of ``h`` alone (DPO, IPO, SPO) it is exactly ``dL/dh``; for SLIME and SimPO it is the
antisymmetric part of the gradient through the sequence log-probs (SLIME's token term, which
acts on token log-probs, is not in it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

_enabled = False
_suspended = False

#: log10 |dL/dh| histogram edges; bin k counts pairs with EDGES[k-1] <= log10|g| < EDGES[k].
GRAD_LOG10_EDGES = (-6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0)
#: A rejected token "collapsed" below this probability.
COLLAPSE_PROB = 1e-4
# exp() of a per-token log-ratio above this is clamped (k3 would overflow fp32).
_K3_MAX_LOG_RATIO = 30.0


def enable(on: bool = True) -> None:
    global _enabled
    _enabled = on


def enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def _no_statistics():
    global _suspended
    previous, _suspended = _suspended, True
    try:
        yield
    finally:
        _suspended = previous


def active() -> bool:
    return _enabled and not _suspended


def grad_bin_names() -> list:
    return [f"study/grad_h_bin{k}" for k in range(len(GRAD_LOG10_EDGES) + 1)]


def pair_statistics(name: str, stats, config) -> dict:
    """``study/*`` per-pair metrics of one micro-batch (``stats``: the validated fp32 PairStats)."""
    from megatron_pref.losses import compute_loss

    w, l = stats.chosen_logps.detach(), stats.rejected_logps.detach()
    len_w, len_l = stats.chosen_lengths.detach(), stats.rejected_lengths.detach()
    out = {
        # Sequence log-probs (the losses' own logps/* are per token for some reference-free losses).
        "study/logps_chosen": w, "study/logps_rejected": l,
        "study/logps_chosen_per_token": w / len_w,
        "study/logps_rejected_per_token": l / len_l,
    }
    if stats.ref_chosen_logps is not None and stats.ref_rejected_logps is not None:
        rho_w = w - stats.ref_chosen_logps.detach()
        rho_l = l - stats.ref_rejected_logps.detach()
        h = rho_w - rho_l
        per_token = (-rho_w / len_w).clamp(max=_K3_MAX_LOG_RATIO)  # log(ref/policy) per chosen token
        out.update({
            "study/logratio_chosen": rho_w, "study/logratio_rejected": rho_l,
            "study/logratio_chosen_per_token": rho_w / len_w, "study/logratio_rejected_per_token": rho_l / len_l,
            "study/h": h, "study/h_positive": (h > 0).to(h.dtype),
            # k3 = r - 1 - log r >= 0, r = ref/policy per token: Schulman's KL(policy || ref) estimator.
            "study/kl_k3_chosen": torch.exp(per_token) - 1.0 - per_token,
        })

    # The per-pair gradient weight, by autograd through the loss on detached leaves (also in
    # forward-only evaluation, where nothing else builds a graph).
    with torch.enable_grad(), _no_statistics():
        leaf_w = w.clone().requires_grad_()
        leaf_l = l.clone().requires_grad_()
        token_logps = stats.rejected_token_logps
        leaf_stats = dataclasses.replace(stats, chosen_logps=leaf_w, rejected_logps=leaf_l,
                                         rejected_token_logps=None if token_logps is None else token_logps.detach())
        loss = compute_loss(name, leaf_stats, config, check_values=False)
        grads = torch.autograd.grad(loss.loss_sum, [leaf_w, leaf_l], allow_unused=True)
    grad_w, grad_l = (torch.zeros_like(w) if g is None else g.detach() for g in grads)
    signed = (grad_w - grad_l) / 2  # < 0: the loss pushes h up
    g = signed.abs()
    out["study/grad_h_signed"] = signed
    out["study/abs_grad_h"] = g
    log_g = torch.log10(g.clamp(min=1e-30))
    edges = [-math.inf, *GRAD_LOG10_EDGES, math.inf]
    for k, name_k in enumerate(grad_bin_names()):
        out[name_k] = ((log_g >= edges[k]) & (log_g < edges[k + 1])).to(g.dtype)

    # Rejected-token collapse: two pair-averaged counts over this micro-batch's rejected tokens.
    if stats.rejected_token_logps is not None:
        token_logps = stats.rejected_token_logps.detach()
        mask = stats.rejected_token_mask
        mask = torch.ones_like(token_logps) if mask is None else mask.detach()
        below = (mask * (token_logps < math.log(COLLAPSE_PROB)).to(mask.dtype)).sum()
        pairs = max(w.numel(), 1)
        out["study/rejected_tokens"] = (mask.sum() / pairs).expand_as(w).clone()
        out["study/rejected_tokens_collapsed"] = (below / pairs).expand_as(w).clone()
    return out
