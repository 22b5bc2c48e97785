"""Pairwise preference-optimisation losses (DPO family, SPO, SLIME, SimPO, ORPO, SFT).

Every loss consumes a :class:`PairStats` (per-pair sequence statistics of one
micro-batch, computed by the model side) and a :class:`LossConfig` (all
hyperparameters) and returns a :class:`LossOutput`.

Normalisation contract (the one rule every loss here obeys)
-----------------------------------------------------------
``LossOutput.loss_sum`` is this micro-batch's *additive* contribution. The
global-batch loss is::

    sum(loss_sum over all micro-batches and data-parallel ranks) / global_pair_count

so the objective does not depend on how pairs are split into micro-batches,
packs or ranks. For per-pair losses ``loss_sum = pair_losses.sum()``. SLIME also
has a token-level term averaged over *all rejected tokens of the global batch*;
it is made additive by scaling the local token sum with
``pairs_per_rejected_token = global_pairs / global_rejected_tokens`` (see
:func:`slime_loss`). Metrics follow the same rule: per-pair ``[P]`` tensors that
the caller sums and divides by the global pair count.

Notation: ``logp(y)`` is the sum of token log-probs over the response tokens
only, ``len(y)`` the response token count, ``lbar = logp / len``,
``rho = logp_policy - logp_ref`` and ``h = rho_chosen - rho_rejected``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PairStats",
    "LossConfig",
    "LossOutput",
    "LOSSES",
    "REFERENCE_LOSSES",
    "SPO_SHAPES",
    "compute_loss",
    "requires_reference",
    "loss_terms",
    "loss_weights",
    "length_desensitised_logps",
    "wpo_pair_weights",
    "bco_running_mean_update",
    "check_options",
    "dpo_loss",
    "ipo_loss",
    "hinge_loss",
    "spo_loss",
    "spo_target",
    "slime_loss",
    "simpo_loss",
    "orpo_loss",
    "sft_loss",
]


# --------------------------------------------------------------------------- #
# Data classes
# --------------------------------------------------------------------------- #
@dataclass
class PairStats:
    """Per-pair statistics of one micro-batch; all tensors 1-D over its P pairs, fp32.

    ``rejected_token_logps`` ([N], flat over every rejected response token of the
    micro-batch) and ``pairs_per_rejected_token`` are only used by SLIME.
    With ``rejected_token_mask`` ([T], 1.0 on rejected response tokens), the
    log-probs may instead be those of every token of a pack ([T]): only masked
    tokens count. The training step uses this form, which needs no boolean
    indexing (a host-device sync).
    ``pairs_per_rejected_token`` must be ``global_pairs / global_rejected_tokens``
    of the GLOBAL batch for split-invariant normalisation; when omitted the local
    ratio ``P / N`` is used (exact only when the whole global batch is one
    micro-batch).
    """

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    ref_chosen_logps: Optional[Tensor] = None
    ref_rejected_logps: Optional[Tensor] = None
    score_chosen: Optional[Tensor] = None
    score_rejected: Optional[Tensor] = None
    rejected_token_logps: Optional[Tensor] = None
    rejected_token_mask: Optional[Tensor] = None
    pairs_per_rejected_token: Optional[Union[float, Tensor]] = None
    # --nll-normalization token: global_pairs / global_chosen_tokens (local P / N when omitted).
    pairs_per_chosen_token: Optional[Union[float, Tensor]] = None
    # --bco-running-mean: delta, the running mean reward of the previous steps (train state).
    bco_reward_shift: Optional[Union[float, Tensor]] = None
    # --use-weighting (WPO): per response, mean over its tokens of log p(y_t) - log sum_v p(v)^2.
    chosen_wpo_logweights: Optional[Tensor] = None
    rejected_wpo_logweights: Optional[Tensor] = None


@dataclass
class LossConfig:
    """Every loss hyperparameter. Field names become CLI flags (``_`` -> ``-``)."""

    # Shared inverse temperature. DPO/IPO/hinge/SPO: KL strength. SimPO: reward
    # scale (the SimPO paper uses beta ~ 2-2.5, pass --beta explicitly). Also the
    # scale of the logged rewards of the reference-free losses (ORPO's: orpo_lambda,
    # as TRL's ORPO trainer, whose beta is that lambda).
    beta: float = 0.1
    # Assumed probability that a label is flipped: cDPO ('dpo'), 'robust', 'exo_pair'
    # (its epsilon, must be > 0), 'aot', 'aot_unpaired'. Refused with any other loss.
    label_smoothing: float = 0.0
    # Weights of the terms of a comma-separated --loss (TRL's loss_weights), e.g.
    # "--loss dpo,sft --loss-weights 1.0,0.2"; empty = 1.0 for every term.
    loss_weights: str = ""
    # f-divergence of the implicit reward (Wang et al. 2023, arXiv:2309.16240), TRL's
    # f_divergence_type: reverse_kl (plain DPO), forward_kl, js_divergence, alpha_divergence.
    f_divergence_type: str = "reverse_kl"
    # alpha of alpha_divergence (TRL's f_alpha_divergence_coef, default 0.5).
    f_alpha_divergence_coef: float = 0.5
    # DiscoPOP's temperature of the logistic/exponential mix (TRL's discopop_tau, paper 0.05).
    discopop_tau: float = 0.05
    # SPO: constant target for beta*h when no scores are used (z = beta*h / target).
    spo_target_margin: float = 1.0
    # SPO: per-pair target = score_chosen - score_rejected.
    spo_target_from_scores: bool = False
    # SPO: positive score gaps below this are raised to it (keeps z finite);
    # pairs with a gap <= 0 are skipped (zero loss, still counted as pairs).
    spo_min_target: float = 0.1
    # SPO: shape function name in SPO_SHAPES.
    spo_shape: str = "exp"
    # SPO: below this z the exp shape continues along its tangent line: the push on
    # an inverted pair grows as (1 - z) e^-z down to here (6e^5 ~ 890 at -5, 890x
    # the push at z = 0) and stays there, so one badly inverted pair cannot outweigh
    # a batch by orders of magnitude (at -20 it would be 21e^20 ~ 1e10).
    spo_z_floor: float = -5.0
    # SLIME (paper defaults; the released code uses lambda_l 0.0005, lambda_w 0.8, delta 0.5).
    slime_lambda_w: float = 0.1
    slime_lambda_l: float = 0.1
    slime_lambda_d: float = 1.0
    slime_delta: float = 1.25
    slime_margin_hard: float = 1.5
    slime_margin_soft: float = 1.0
    slime_kappa: float = 2.5
    slime_power: float = 2.5
    # SimPO target reward margin gamma (TRL default 0.5).
    simpo_gamma: float = 0.5
    # ORPO weight of the odds-ratio term (paper/TRL default 0.1).
    orpo_lambda: float = 0.1
    # RPO-style extra NLL of the chosen response, any loss (shorthand of "--loss <loss>,sft
    # --loss-weights 1,<w>").
    sft_weight: float = 0.0
    # NLL of the chosen responses (sft, --sft-weight, ORPO's NLL): "sequence" = each response's
    # token mean, then the pair mean; "token" = mean over every chosen response token of the
    # global batch (TRL's, at one rank and one micro-batch).
    nll_normalization: str = "sequence"
    # LD-DPO (Liu et al. 2024, arXiv:2409.06411), TRL's ld_alpha: every response's log-prob
    # (policy and reference) becomes shared + alpha * tail, where the shared part is the pair's
    # first min(len_w, len_l) response tokens. None = off (alpha = 1).
    ld_alpha: Optional[float] = None
    # WPO (Zhou et al. 2024, arXiv:2406.11827), TRL's use_weighting: every pair loss is weighted by
    # the policy's (detached) length-normalised probabilities of both responses.
    use_weighting: bool = False
    # bco_pair: subtract delta, the running mean of the batch-mean implicit reward over the
    # previous steps (BCO paper, Jung et al. 2024; TRL <= 0.2x). TRL 1.16's bco_pair has none.
    bco_running_mean: bool = False

    def validate(self) -> "LossConfig":
        """Raise ``ValueError`` naming the offending argument; returns self."""

        def bad(name: str, why: str) -> ValueError:
            flag = "--" + name.replace("_", "-")
            return ValueError(f"LossConfig.{name} ({flag}) {why}; got {getattr(self, name)!r}")

        # NaN / inf first, for every numeric field, so each later check is a plain comparison.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", float):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise bad(f.name, "must be a number")
                if not math.isfinite(value):
                    raise bad(f.name, "must be finite (not NaN/inf)")
        if not isinstance(self.spo_target_from_scores, bool):
            raise bad("spo_target_from_scores", "must be a bool")

        if self.beta <= 0:
            raise bad("beta", "must be > 0")
        if not 0.0 <= self.label_smoothing <= 0.5:
            raise bad("label_smoothing", "must be in [0, 0.5]")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise bad("f_divergence_type", f"must be one of {', '.join(F_DIVERGENCES)}")
        if self.nll_normalization not in NLL_NORMALIZATIONS:
            raise bad("nll_normalization", f"must be one of {', '.join(NLL_NORMALIZATIONS)}")
        if self.discopop_tau <= 0:
            raise bad("discopop_tau", "must be > 0")
        if self.ld_alpha is not None:
            if isinstance(self.ld_alpha, bool) or not isinstance(self.ld_alpha, (int, float)) \
                    or not 0.0 <= self.ld_alpha <= 1.0:
                raise bad("ld_alpha", "must be in [0, 1]")
        if not isinstance(self.use_weighting, bool):
            raise bad("use_weighting", "must be a bool")
        self.weights()  # parses loss_weights (ValueError naming --loss-weights)
        if self.spo_target_margin <= 0:
            raise bad("spo_target_margin", "must be > 0")
        if self.spo_min_target <= 0:
            raise bad("spo_min_target", "must be > 0")
        if self.spo_shape not in SPO_SHAPES:
            raise bad("spo_shape", f"must be one of {sorted(SPO_SHAPES)}")
        if self.spo_z_floor >= 1:
            raise bad("spo_z_floor", "must be < 1 (the SPO optimum is at z = 1)")
        for name in ("slime_lambda_w", "slime_lambda_l", "slime_lambda_d", "slime_kappa"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if self.slime_power <= 0:
            raise bad("slime_power", "must be > 0")
        if self.orpo_lambda < 0:
            raise bad("orpo_lambda", "must be >= 0")
        if self.sft_weight < 0:
            raise bad("sft_weight", "must be >= 0")
        return self

    def weights(self) -> Optional[list[float]]:
        """``loss_weights`` parsed (None when empty)."""
        if not isinstance(self.loss_weights, str):
            raise ValueError(f"LossConfig.loss_weights (--loss-weights) must be a string like '1.0,0.2'; "
                             f"got {self.loss_weights!r}")
        if not self.loss_weights.strip():
            return None
        try:
            values = [float(v) for v in self.loss_weights.split(",")]
        except ValueError:
            raise ValueError(f"LossConfig.loss_weights (--loss-weights) must be comma-separated numbers; "
                             f"got {self.loss_weights!r}") from None
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError(f"LossConfig.loss_weights (--loss-weights) must be finite and >= 0; "
                             f"got {self.loss_weights!r}")
        return values


@dataclass
class LossOutput:
    """Result of one loss on one micro-batch (see the module docstring for normalisation)."""

    loss_sum: Tensor  # scalar, additive over micro-batches and ranks; divide by global pairs
    pair_losses: Tensor  # [P], excludes SLIME's token-level term
    metrics: dict[str, Tensor] = field(default_factory=dict)  # [P] each, detached


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def _avg(logps: Tensor, lengths: Tensor) -> Tensor:
    """Per-token average log-prob ``lbar = logp / len``."""
    return logps / lengths


def _log_ratios(stats: PairStats) -> tuple[Tensor, Tensor]:
    """``rho_chosen, rho_rejected`` (sequence-level policy/reference log-ratios)."""
    return (
        stats.chosen_logps - stats.ref_chosen_logps,
        stats.rejected_logps - stats.ref_rejected_logps,
    )


def _metrics(reward_chosen: Tensor, reward_rejected: Tensor, logps_chosen: Tensor,
             logps_rejected: Tensor) -> dict[str, Tensor]:
    """TRL-named per-pair metrics; detached so logging never touches the graph."""
    rc, rr = reward_chosen.detach(), reward_rejected.detach()
    return {
        "rewards/chosen": rc,
        "rewards/rejected": rr,
        "rewards/accuracies": (rc > rr).to(rc.dtype),
        "rewards/margins": rc - rr,
        "logps/chosen": logps_chosen.detach(),
        "logps/rejected": logps_rejected.detach(),
    }


def _reference_metrics(stats: PairStats, config: LossConfig) -> dict[str, Tensor]:
    """Implicit DPO rewards ``beta * (logp - ref_logp)`` and ``logps`` (sequence level), as
    TRL 1.16's DPO trainer logs them for every one of its losses (IPO included)."""
    rho_c, rho_r = _log_ratios(stats)
    return _metrics(config.beta * rho_c, config.beta * rho_r, stats.chosen_logps, stats.rejected_logps)


NLL_NORMALIZATIONS = ("sequence", "token")


def length_desensitised_logps(total: Tensor, shared: Tensor, alpha: float) -> Tensor:
    """LD-DPO (Liu et al. 2024, arXiv:2409.06411, Eq. 9): ``logp_ld = shared + alpha * (total - shared)``.

    ``shared`` is the log-prob of a response's first ``min(len_w, len_l)`` tokens (the length both
    responses of the pair share), ``total - shared`` that of the excess ("verbose") tokens, which
    ``alpha`` < 1 damps so that the longer response's extra tokens no longer dominate ``h``.
    Applied to policy and reference log-probs alike, before any loss (the training step does it
    per sequence; the reference table is computed with the same alpha).
    """
    return shared + alpha * (total - shared)


def wpo_pair_weights(stats: PairStats) -> Tensor:
    """WPO (Zhou et al. 2024, arXiv:2406.11827, Eq. 2, TRL's ``use_weighting``), detached:

    ``w = exp(a_w) * exp(a_l)``, ``a = mean over the response's tokens of
    (log p(y_t) - log sum_v p(v)^2)``: the length-normalised probability of each response under
    the policy, aligned by the per-token ``sum_v p(v)^2`` (the probability of sampling a token
    twice), so that on-policy-like pairs weigh more. ``PairStats.chosen_wpo_logweights`` /
    ``rejected_wpo_logweights`` hold ``a`` (the training step computes them from the logits).
    """
    if stats.chosen_wpo_logweights is None or stats.rejected_wpo_logweights is None:
        raise ValueError("use_weighting (--use-weighting) needs PairStats.chosen_wpo_logweights and "
                         "rejected_wpo_logweights")
    return torch.exp(stats.chosen_wpo_logweights + stats.rejected_wpo_logweights).detach()


def _chosen_nll(stats: PairStats, config: LossConfig) -> Tensor:
    """Per-pair NLL of the chosen response under ``config.nll_normalization``.

    * ``sequence``: ``-logp_w / len_w`` (every pair weighs the same, whatever its length).
    * ``token``: ``-logp_w * G / N`` with ``G / N = pairs_per_chosen_token`` of the global batch,
      so ``sum over pairs / G`` is the mean NLL over every chosen token of the global batch
      (split invariant; per-token weight 1/N instead of 1/(G len_w)).
    """
    if config.nll_normalization == "sequence":
        return -_avg(stats.chosen_logps, stats.chosen_lengths)
    ppt = stats.pairs_per_chosen_token
    if ppt is None:
        # Local fallback: exact only if this micro-batch is the whole global batch.
        ppt = stats.chosen_logps.numel() / stats.chosen_lengths.sum().clamp(min=1.0)
    return -stats.chosen_logps * ppt


#: f-divergences of the implicit reward (f-DPO, Wang et al. 2023, arXiv:2309.16240): the
#: log-ratio ``rho = log(pi/pi_ref) = log u`` enters the losses as ``f'(u)``, shifted so that
#: reverse KL (``f'(u) = log u + 1``) gives ``rho`` itself. TRL 1.16's definitions:
#: forward_kl ``1 - 1/u``, js_divergence ``log(2u/(1+u)) = log 2 + log sigmoid(rho)``,
#: alpha_divergence ``(u^(alpha-1) - 1)/(alpha-1)`` (reverse KL in the limit alpha -> 1).
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
#: Losses built on the f-divergence scores (TRL 1.16 ignores the option elsewhere; we refuse it).
F_DIVERGENCE_LOSSES = frozenset({"dpo", "hinge", "ipo", "sigmoid_norm", "exo_pair", "robust", "discopop", "sft"})
# exp() argument cap of alpha_divergence: TRL's fp32/bf16 value (fp64 follows fp32).
_ALPHA_EXP_MAX = 80.0


def _f_scores(rho: Tensor, config: LossConfig) -> Tensor:
    """``f'(pi/pi_ref)`` of ``config.f_divergence_type`` from the log-ratio ``rho``."""
    kind = config.f_divergence_type
    if kind == "reverse_kl":
        return rho
    if kind == "forward_kl":
        return 1.0 - torch.exp(-rho)
    if kind == "js_divergence":
        return math.log(2.0) + F.logsigmoid(rho)
    alpha = config.f_alpha_divergence_coef
    if abs(alpha - 1.0) < 1e-6:
        return rho
    return torch.expm1(((alpha - 1.0) * rho).clamp(max=_ALPHA_EXP_MAX)) / (alpha - 1.0)


def _avg_score_margin(stats: PairStats, config: LossConfig) -> Tensor:
    """Per-token averaged margin ``f'(u_c)/len_c - f'(u_r)/len_r`` (IPO, sigmoid_norm)."""
    rho_c, rho_r = _log_ratios(stats)
    return (_avg(_f_scores(rho_c, config), stats.chosen_lengths)
            - _avg(_f_scores(rho_r, config), stats.rejected_lengths))


def _score_margin(stats: PairStats, config: LossConfig) -> Tensor:
    """``d = f'(u_chosen) - f'(u_rejected)``; ``d = h`` under reverse KL (plain DPO)."""
    rho_c, rho_r = _log_ratios(stats)
    return _f_scores(rho_c, config) - _f_scores(rho_r, config)


def _reference_free_metrics(stats: PairStats, scale: float) -> dict[str, Tensor]:
    """Rewards ``scale * lbar`` and ``logps = lbar`` (per-token averages), as TRL's CPO
    (SimPO) and ORPO trainers log them."""
    lbar_w, lbar_l = _avg(stats.chosen_logps, stats.chosen_lengths), _avg(stats.rejected_logps, stats.rejected_lengths)
    return _metrics(scale * lbar_w, scale * lbar_l, lbar_w, lbar_l)


def _output(pair_losses: Tensor, metrics: dict[str, Tensor]) -> LossOutput:
    return LossOutput(loss_sum=pair_losses.sum(), pair_losses=pair_losses, metrics=metrics)


# --------------------------------------------------------------------------- #
# Reference-based losses
# --------------------------------------------------------------------------- #
def dpo_loss(stats: PairStats, config: LossConfig) -> LossOutput:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290), with conservative DPO (cDPO).

    ``L = -(1 - eps) * log sigmoid(beta*d) - eps * log sigmoid(-beta*d)``,
    ``eps = label_smoothing`` (eps = 0 is plain DPO), ``d = h`` (or the f-divergence
    margin, :func:`_score_margin`). cDPO treats each label as flipped with probability
    eps, so the loss is the expected DPO loss under label noise and no longer pushes
    ``h`` to infinity when eps > 0. This is TRL <= 0.27's ``sigmoid``; TRL 1.16's
    ``sigmoid`` ignores label_smoothing (it keeps it for robust, exo_pair, aot).
    """
    logits = config.beta * _score_margin(stats, config)
    eps = config.label_smoothing
    # logsigmoid is the numerically stable form of log(sigmoid(x)).
    losses = -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    return _output(losses, _reference_metrics(stats, config))


def ipo_loss(stats: PairStats, config: LossConfig) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv:2310.12036).

    ``L = (hbar - 1/(2*beta))^2`` with per-token-averaged log-ratios, as Hugging
    Face TRL implements it:
    ``hbar = (logp_c/len_c - ref_c/len_c) - (logp_r/len_r - ref_r/len_r)``.
    The squared loss regresses the log-ratio gap onto a finite target instead of
    maximising it; averaging per token keeps that target length independent.
    The metrics are sequence level (``beta * rho``, ``logp``), as TRL 1.16 logs them
    (TRL <= 0.27 logged the per-token averages).
    """
    hbar = _avg_score_margin(stats, config)
    losses = (hbar - 1.0 / (2.0 * config.beta)) ** 2
    # TRL 1.16: the averaging is inside the loss only; rewards/logps stay sequence level.
    metrics = _reference_metrics(stats, config)
    metrics["ipo/hbar"] = hbar.detach()
    return _output(losses, metrics)


def hinge_loss(stats: PairStats, config: LossConfig) -> LossOutput:
    """SLiC-style hinge loss (Zhao et al. 2023, arXiv:2305.10425): ``L = relu(1 - beta*d)``,
    ``d = h`` under reverse KL."""
    losses = torch.relu(1.0 - config.beta * _score_margin(stats, config))
    return _output(losses, _reference_metrics(stats, config))


def sigmoid_norm_loss(stats: PairStats, config: LossConfig) -> LossOutput:
    """Length-normalised DPO (TRL's ``sigmoid_norm``; per-token rewards as in SimPO,
    Meng et al. 2024, arXiv:2405.14734, but against the reference):

    ``L = -log sigmoid(beta * (rho_c/len_c - rho_r/len_r))``.
    """
    losses = -F.logsigmoid(config.beta * _avg_score_margin(stats, config))
    return _output(losses, _reference_metrics(stats, config))


def exo_pair_loss(stats: PairStats, config: LossConfig) -> LossOutput:
    """EXO, pairwise (Ji et al. 2024, arXiv:2402.00856, Eq. 16).

    ``L = KL(q || p) = q_w (log q_w - log(1-eps)) + q_l (log q_l - log eps)`` with
    ``q_w = sigmoid(beta*d)``, ``q_l = sigmoid(-beta*d)``, ``eps = label_smoothing`` (> 0;
    the paper uses 1e-3): the policy's two-way softmax over {chosen, rejected} is pulled
    towards the smoothed label ``(1-eps, eps)`` by the reverse KL (mode seeking).
    """
    eps = config.label_smoothing
    logits = config.beta * _score_margin(stats, config)
    log_qw, log_ql = F.logsigmoid(logits), F.logsigmoid(-logits)
    losses = log_qw.exp() * (log_qw - math.log1p(-eps)) + log_ql.exp() * (log_ql - math.log(eps))
    return _output(losses, _reference_metrics(stats, config))


def nca_pair_loss(stats: PairStats, config: LossConfig) -> LossOutput:
    """NCA, pairwise (Chen et al. 2024, arXiv:2402.05369).

    ``L = -log sigmoid(beta*rho_c) - 0.5 log sigmoid(-beta*rho_c) - 0.5 log sigmoid(-beta*rho_r)``:
    absolute (not relative) rewards, so the chosen likelihood is kept from falling.
    """
    rho_c, rho_r = _log_ratios(stats)
    rc, rr = config.beta * rho_c, config.beta * rho_r
    losses = -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)
    return _output(losses, _reference_metrics(stats, config))


def robust_loss(stats: PairStats, config: LossConfig) -> LossOutput:
    """Robust DPO (rDPO, Chowdhury et al. 2024, arXiv:2403.00409, Eq. 8).

    ``L = ((1-eps) * -log sigmoid(beta*d) - eps * -log sigmoid(-beta*d)) / (1 - 2 eps)``,
    ``eps = label_smoothing`` < 0.5: an unbiased estimate of the clean-label DPO loss
    under label flips with probability eps (cDPO instead averages the two).
    """
    eps = config.label_smoothing
    logits = config.beta * _score_margin(stats, config)
    losses = (-(1.0 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1.0 - 2.0 * eps)
    return _output(losses, _reference_metrics(stats, config))


def bco_pair_loss(stats: PairStats, config: LossConfig) -> LossOutput:
    """BCO, pairwise (Jung et al. 2024, arXiv:2404.04656), as TRL 1.16's ``bco_pair``:

    ``L = -log sigmoid(beta*rho_c - delta) - log sigmoid(-(beta*rho_r - delta))``: a binary
    classifier with the implicit reward as logit (chosen = 1, rejected = 0). TRL 1.16 has
    ``delta = 0``. With ``bco_running_mean`` (the paper's reward shift, TRL <= 0.2x's
    ``RunningMoments``), ``delta = PairStats.bco_reward_shift``, the mean over the previous
    training steps of each step's global-batch mean reward ``(beta*rho_c + beta*rho_r)/2``
    (:func:`bco_running_mean_update`; kept in the checkpoint's train state).
    """
    rho_c, rho_r = _log_ratios(stats)
    delta = 0.0
    if config.bco_running_mean:
        delta = stats.bco_reward_shift if stats.bco_reward_shift is not None else 0.0
    losses = -F.logsigmoid(config.beta * rho_c - delta) - F.logsigmoid(-(config.beta * rho_r - delta))
    metrics = _reference_metrics(stats, config)
    if config.bco_running_mean:
        metrics["bco/delta"] = torch.full_like(losses, float(delta)).detach()
        # This pair's mean implicit reward, what the running mean averages (whatever the
        # first term of a combination logs as rewards/*).
        metrics["bco/reward"] = (0.5 * config.beta * (rho_c + rho_r)).detach()
    return _output(losses, metrics)


def bco_running_mean_update(loss_state: dict, metric_sums: dict, num_pairs: int) -> None:
    """After a training step: fold its global-batch mean reward into ``loss_state`` (in place).

    ``metric_sums`` are the step's sums over all pairs of the global batch (reduced over data-
    parallel ranks and pipeline stages), so every rank folds in the same value: ``bco/reward``
    sums ``beta * (rho_c + rho_r) / 2``. ``bco_mean`` is the running mean of
    the per-step means (each step weighs 1, as TRL's RunningMoments with one value per step),
    ``bco_steps`` their count. Unlike TRL <= 0.2x, the current step is folded in after it is
    used, not before: its rewards exist only after the pipelined forward of every micro-batch.
    """
    if num_pairs <= 0:
        return
    reward = metric_sums["bco/reward"] / num_pairs
    steps = int(loss_state.get("bco_steps", 0)) + 1
    mean = float(loss_state.get("bco_mean", 0.0))
    loss_state["bco_steps"] = steps
    loss_state["bco_mean"] = mean + (reward - mean) / steps


def sppo_hard_loss(stats: PairStats, config: LossConfig) -> LossOutput:
    """SPPO with hard labels (Wu et al. 2024, arXiv:2405.00675, Eq. 4.7 with P = 1 / 0):

    ``L = (rho_c - 1/(2 beta))^2 + (rho_r + 1/(2 beta))^2``: each log-ratio is regressed
    to +-1/(2 beta), the self-play target of a sure winner and a sure loser.
    """
    rho_c, rho_r = _log_ratios(stats)
    half = 0.5 / config.beta
    losses = (rho_c - half) ** 2 + (rho_r + half) ** 2
    return _output(losses, _reference_metrics(stats, config))


def _smoothed_logistic(delta: Tensor, config: LossConfig) -> Tensor:
    eps = config.label_smoothing
    logits = config.beta * delta
    return -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def aot_loss(stats: PairStats, config: LossConfig) -> LossOutput:
    """AOT, paired (Melnyk et al. 2024, arXiv:2406.05882): distributional alignment by
    optimal transport, i.e. first-order stochastic dominance of the policy's log-ratio
    distribution over the reference's.

    ``delta = sort(logp_c - logp_r) - sort(ref_c - ref_r)`` (each sorted over the pairs of
    the micro-batch), ``L_i = -(1-eps) log sigmoid(beta*delta_i) - eps log sigmoid(-beta*delta_i)``.
    The sort couples the pairs that are scored together: the loss is a function of the
    micro-batch (TRL: of the per-device batch), not a sum of independent pair losses.
    """
    policy = torch.sort(stats.chosen_logps - stats.rejected_logps).values
    reference = torch.sort(stats.ref_chosen_logps - stats.ref_rejected_logps).values
    losses = _smoothed_logistic(policy - reference, config)
    return _output(losses, _reference_metrics(stats, config))


def aot_unpaired_loss(stats: PairStats, config: LossConfig) -> LossOutput:
    """AOT, unpaired (Melnyk et al. 2024, arXiv:2406.05882): the chosen log-ratio
    distribution should dominate the rejected one.

    ``delta = sort(rho_c) - sort(rho_r)`` over the pairs of the micro-batch, then the
    label-smoothed logistic loss of :func:`aot_loss`.
    """
    rho_c, rho_r = _log_ratios(stats)
    losses = _smoothed_logistic(torch.sort(rho_c).values - torch.sort(rho_r).values, config)
    return _output(losses, _reference_metrics(stats, config))


def apo_zero_loss(stats: PairStats, config: LossConfig) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 7):

    ``L = 1 - sigmoid(beta*rho_c) + sigmoid(beta*rho_r)``: raise the chosen likelihood and
    lower the rejected one (chosen answers better than the model's own).
    """
    rho_c, rho_r = _log_ratios(stats)
    losses = 1.0 - torch.sigmoid(config.beta * rho_c) + torch.sigmoid(config.beta * rho_r)
    return _output(losses, _reference_metrics(stats, config))


def apo_down_loss(stats: PairStats, config: LossConfig) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 8):

    ``L = sigmoid(beta*rho_c) + 1 - sigmoid(beta*(rho_c - rho_r))``: lower both
    likelihoods, the rejected more (chosen answers worse than the model's own).
    """
    rho_c, rho_r = _log_ratios(stats)
    losses = torch.sigmoid(config.beta * rho_c) + 1.0 - torch.sigmoid(config.beta * (rho_c - rho_r))
    return _output(losses, _reference_metrics(stats, config))


def discopop_loss(stats: PairStats, config: LossConfig) -> LossOutput:
    """DiscoPOP, log-ratio modulated loss (Chris Lu et al. 2024, arXiv:2406.08414, Eq. 5):

    ``x = beta*d``, ``m = sigmoid(x / tau)``,
    ``L = (1 - m) * -log sigmoid(x) + m * exp(-x)``, ``tau = discopop_tau``: logistic for
    large margins, exponential (harder push) for inverted ones. ``m * exp(-x)`` is
    computed as ``exp(log sigmoid(x/tau) - x)``, finite where ``0 * exp(88+) = NaN``.
    """
    x = config.beta * _score_margin(stats, config)
    z = x / config.discopop_tau
    losses = -torch.sigmoid(-z) * F.logsigmoid(x) + torch.exp(F.logsigmoid(z) - x)
    return _output(losses, _reference_metrics(stats, config))


# ---- SPO ------------------------------------------------------------------- #
_INV_E = math.exp(-1.0)


def _spo_shape_exp(z: Tensor, config: LossConfig) -> Tensor:
    """SPO core function, shifted to minimum 0: ``L(z) = -z * exp(-z) + 1/e``.

    ``L'(z) = (z - 1) * exp(-z)``: zero at z = 1 (the target), negative for
    z < 1, positive but vanishing for z > 1, and ``(1 - z) * e^{-z}`` growing
    exponentially for inverted pairs (z < 0).

    Below ``z0 = config.spo_z_floor`` the function continues along its tangent
    at z0 (value and slope continuous), so fp32 never overflows; the exact
    branch is evaluated at ``max(z, z0)`` so ``torch.where`` cannot leak inf/NaN
    gradients from the unused branch.
    """
    z0 = config.spo_z_floor
    zc = z.clamp(min=z0)
    exact = -zc * torch.exp(-zc) + _INV_E
    f_z0 = -z0 * math.exp(-z0) + _INV_E
    df_z0 = (z0 - 1.0) * math.exp(-z0)
    tangent = f_z0 + df_z0 * (z - z0)
    return torch.where(z >= z0, exact, tangent)


#: SPO shape functions ``(z, config) -> per-pair loss``, each with its minimum 0 at z = 1.
#: Register an alternative here and select it with ``--spo-shape``.
SPO_SHAPES: dict[str, Callable[[Tensor, LossConfig], Tensor]] = {"exp": _spo_shape_exp}


def spo_target(stats: PairStats, config: LossConfig) -> tuple[Tensor, Tensor]:
    """Per-pair SPO target for ``beta*h`` and a mask of pairs that take part.

    * ``spo_target_from_scores``: target = ``score_chosen - score_rejected`` (the
      reward margin, see :func:`spo_loss`). Policy for bad gaps:

      - gap <= 0, or a missing score (NaN in packed batches): the pair carries no
        usable preference, so it is **skipped** (mask False, zero loss). It still
        counts in the global pair count, keeping the normalisation split-invariant.
      - 0 < gap < ``spo_min_target``: raised to ``spo_min_target`` so that
        ``z = beta*h / target`` cannot blow up for near-ties.
    * otherwise: the constant ``spo_target_margin`` for every pair.
    """
    ref = stats.chosen_logps
    if config.spo_target_from_scores:
        if stats.score_chosen is None or stats.score_rejected is None:
            raise ValueError(
                "spo_target_from_scores is set but PairStats.score_chosen/score_rejected are missing"
            )
        gap = (stats.score_chosen - stats.score_rejected).to(ref.dtype)
        # Scores are data, not parameters: never differentiate through the target.
        gap = torch.nan_to_num(gap.detach(), nan=0.0)
        valid = gap > 0
        return gap.clamp(min=config.spo_min_target), valid
    target = torch.full_like(ref, config.spo_target_margin).detach()
    return target, torch.ones_like(ref, dtype=torch.bool)


def spo_loss(
    stats: PairStats,
    config: LossConfig,
    *,
    shape: Optional[Callable[[Tensor, LossConfig], Tensor]] = None,
    target: Optional[Callable[[PairStats, LossConfig], tuple[Tensor, Tensor]]] = None,
) -> LossOutput:
    """SPO, "A Stable and Principled Loss Function for Direct Language Model Alignment"
    (arXiv:2508.07137) -- a RECONSTRUCTION.

    The paper body was not available: this implementation is rebuilt from its
    abstract and its core function ``f(z) = -z * exp(-z)``. What is certain is
    the idea: replace DPO's unbounded maximisation of ``h`` by a finite target
    dictated by the reward.

    Derivation. The KL-regularised RLHF objective
    ``max_pi E[r(x, y)] - beta * KL(pi || pi_ref)`` has the optimum
    ``pi*(y|x) = pi_ref(y|x) exp(r(x, y)/beta) / Z(x)``, i.e.
    ``r(x, y) = beta * log(pi*/pi_ref) + beta * log Z(x)``. ``Z(x)`` cancels in a
    pair, so at the optimum ``beta * h* = r(x, y_w) - r(x, y_l) = Delta r``: the
    optimal log-ratio gap is finite. DPO's ``-log sigmoid(beta*h)`` has gradient
    ``-beta * sigmoid(-beta*h) != 0`` for every finite h, so it keeps pushing h
    past ``h*`` (over-optimisation, likelihood collapse). SPO normalises
    ``z = beta * h / target`` with ``target = Delta r`` so the optimum sits at
    z = 1, and uses a shape with its minimum there:
    ``f'(z) = (z - 1) e^{-z}`` vanishes only at z = 1 (f''(1) = 1/e > 0, a
    minimum), the pull back for z > 1 decays to 0 (bounded, stable), and
    inverted pairs (z < 0) get an exponentially large push. We minimise
    ``L = f(z) + 1/e`` so the minimum is 0.

    ``L`` is the shape ``config.spo_shape`` from :data:`SPO_SHAPES` (or ``shape``)
    evaluated at ``z``; the target comes from :func:`spo_target` (or ``target``),
    so either can be swapped independently. Skipped pairs contribute 0.
    """
    shape_fn = shape if shape is not None else SPO_SHAPES[config.spo_shape]
    target_fn = target if target is not None else spo_target
    tgt, valid = target_fn(stats, config)
    rho_c, rho_r = _log_ratios(stats)
    z = config.beta * (rho_c - rho_r) / tgt
    per_pair = shape_fn(z, config)
    # where (not multiply) so a skipped pair can never inject inf*0 = NaN.
    losses = torch.where(valid, per_pair, torch.zeros_like(per_pair))
    metrics = _reference_metrics(stats, config)
    metrics["spo/z"] = z.detach()
    metrics["spo/target"] = tgt.detach()
    metrics["spo/skipped"] = (~valid).to(z.dtype)
    return _output(losses, metrics)


# --------------------------------------------------------------------------- #
# Reference-free losses
# --------------------------------------------------------------------------- #
def slime_loss(stats: PairStats, config: LossConfig) -> LossOutput:
    """SLIME (arXiv:2602.02383), reference free.

    ``L = -lw * lbar_w``                                                (anchor)
    ``  + ll * mean_{t in rejected tokens} softplus(-logp(t) - delta)^p``  (stabiliser)
    ``  + ld * max(0, mh - D) * sigmoid(-kappa * (D - ms))``            (margin)
    with ``D = lbar_w - lbar_l``.

    * anchor: keeps the chosen likelihood up (no likelihood displacement);
    * stabiliser: token-level, penalises rejected tokens whose NLL exceeds
      delta, so rejected responses are not driven to -inf log-prob;
    * margin: a hinge to ``mh`` softly gated around ``ms``; it is exactly 0 once
      ``D >= mh`` (e.g. 1.5 * sigmoid(2.5) = 1.386 at D = 0, 0.25 at D = 1).

    Defaults follow the paper (lw=0.1, ll=0.1, ld=1, delta=1.25, mh=1.5, ms=1,
    kappa=2.5, p=2.5). The released code (a TRL-based ``SlimeTrainer``) defaults to
    ll = 0.0005, lw = 0.8 and delta = 0.5 instead; pass
    ``--slime-lambda-l 0.0005 --slime-lambda-w 0.8 --slime-delta 0.5`` to reproduce it.

    Normalisation: the stabiliser is a mean over ALL rejected tokens of the
    GLOBAL batch. It is made additive with
    ``loss_sum += ll * pairs_per_rejected_token * sum_t stabiliser(t)``; dividing
    the sum over micro-batches by the global pair count G gives
    ``ll * (G / N_global) * sum_all / G = ll * mean over global tokens``.
    ``pair_losses`` exclude the token term. Metrics ``slime/anchor``,
    ``slime/margin`` and ``slime/stabiliser`` are the lambda-weighted terms
    (they add up to the loss); the stabiliser's micro-batch share is spread
    evenly over its P pairs.
    """
    lbar_w = _avg(stats.chosen_logps, stats.chosen_lengths)
    lbar_l = _avg(stats.rejected_logps, stats.rejected_lengths)
    d = lbar_w - lbar_l

    anchor = -config.slime_lambda_w * lbar_w
    margin = (
        config.slime_lambda_d
        * torch.relu(config.slime_margin_hard - d)
        * torch.sigmoid(-config.slime_kappa * (d - config.slime_margin_soft))
    )
    pair_losses = anchor + margin

    tok = stats.rejected_token_logps
    num_pairs = pair_losses.numel()
    mask = stats.rejected_token_mask
    if mask is not None:
        # Unmasked tokens (prompt, padding, padded-vocab labels) may hold any value, -inf
        # included: replace them before softplus, or its backward computes 0 * inf = NaN.
        tok = torch.where(mask > 0, tok, torch.zeros_like(tok))
    stab_tok = F.softplus(-tok - config.slime_delta).pow(config.slime_power)
    if mask is not None:
        stab_tok = torch.where(mask > 0, stab_tok * mask, torch.zeros_like(stab_tok))
        n_tok = mask.sum()
    else:
        n_tok = tok.numel()
    ppt = stats.pairs_per_rejected_token
    if ppt is None:
        # Local fallback: exact only if this micro-batch is the whole global batch.
        if isinstance(n_tok, Tensor):
            ppt = num_pairs / n_tok.clamp(min=1.0)
        else:
            ppt = num_pairs / n_tok if n_tok > 0 else 0.0
    token_term = config.slime_lambda_l * ppt * stab_tok.sum()

    loss_sum = pair_losses.sum() + token_term
    metrics = _reference_free_metrics(stats, config.beta)
    metrics["slime/anchor"] = anchor.detach()
    metrics["slime/margin"] = margin.detach()
    share = token_term.detach() / max(num_pairs, 1)
    metrics["slime/stabiliser"] = share.expand_as(pair_losses).clone()
    metrics["slime/D"] = d.detach()
    return LossOutput(loss_sum=loss_sum, pair_losses=pair_losses, metrics=metrics)


def simpo_loss(stats: PairStats, config: LossConfig) -> LossOutput:
    """SimPO (Meng et al. 2024, arXiv:2405.14734).

    ``L = -log sigmoid(beta * (lbar_w - lbar_l) - gamma)``, ``gamma = simpo_gamma``.
    The length-normalised likelihood is the implicit reward, so no reference
    model is needed; gamma is a target reward margin. ``beta`` is shared with
    the other losses (default 0.1), but the SimPO paper uses beta ~ 2-2.5, so pass
    ``--beta`` explicitly (TRL's default simpo_gamma = 0.5 is ours too).
    """
    lbar_w = _avg(stats.chosen_logps, stats.chosen_lengths)
    lbar_l = _avg(stats.rejected_logps, stats.rejected_lengths)
    losses = -F.logsigmoid(config.beta * (lbar_w - lbar_l) - config.simpo_gamma)
    return _output(losses, _reference_free_metrics(stats, config.beta))


# Keeps lbar strictly below 0 so log(1 - exp(lbar)) stays finite when p -> 1.
_ORPO_MAX_LBAR = -1e-6


def _log1mexp(x: Tensor) -> Tensor:
    """Stable ``log(1 - exp(x))`` for x < 0 (Maechler 2012): expm1 near 0, log1p far."""
    return torch.where(
        x > -math.log(2.0),
        torch.log(-torch.expm1(x)),
        torch.log1p(-torch.exp(x)),
    )


def orpo_loss(stats: PairStats, config: LossConfig) -> LossOutput:
    """ORPO (Hong et al. 2024, arXiv:2403.07691).

    ``L = -lbar_w + lambda * -log sigmoid(log_odds)``, ``lambda = orpo_lambda``,
    ``log_odds = log(p_w / (1 - p_w)) - log(p_l / (1 - p_l))`` with
    ``p = exp(lbar)`` (per-token geometric-mean likelihood). ``log(1 - p)`` is
    computed as a stable log1mexp; lbar is clamped to <= -1e-6 so a response
    with probability ~1 cannot give -inf.
    """
    lbar_w = _avg(stats.chosen_logps, stats.chosen_lengths)
    lbar_l = _avg(stats.rejected_logps, stats.rejected_lengths)
    cw = lbar_w.clamp(max=_ORPO_MAX_LBAR)
    cl = lbar_l.clamp(max=_ORPO_MAX_LBAR)
    log_odds = (cw - _log1mexp(cw)) - (cl - _log1mexp(cl))
    nll = _chosen_nll(stats, config)
    ratio_loss = -F.logsigmoid(log_odds)
    losses = nll + config.orpo_lambda * ratio_loss
    # TRL's ORPO trainer scales its rewards by its beta, which is this lambda.
    metrics = _reference_free_metrics(stats, config.orpo_lambda)
    metrics["orpo/log_odds"] = log_odds.detach()
    metrics["orpo/nll"] = nll.detach()
    return _output(losses, metrics)


def sft_loss(stats: PairStats, config: LossConfig) -> LossOutput:
    """Supervised fine-tuning on the chosen response: ``L = -lbar_w`` (per-response token mean),
    or with ``nll_normalization='token'`` the mean NLL over every chosen token of the global
    batch (TRL 1.16's ``sft`` term)."""
    losses = _chosen_nll(stats, config)
    return _output(losses, _reference_free_metrics(stats, config.beta))


# --------------------------------------------------------------------------- #
# Registry and dispatch
# --------------------------------------------------------------------------- #
LOSSES: dict[str, Callable[[PairStats, LossConfig], LossOutput]] = {
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "sigmoid_norm": sigmoid_norm_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "robust": robust_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "aot": aot_loss,
    "aot_unpaired": aot_unpaired_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "spo": spo_loss,
    "slime": slime_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
    "sft": sft_loss,
}

#: Losses that need ``ref_chosen_logps`` / ``ref_rejected_logps``.
REFERENCE_LOSSES = frozenset({"dpo", "ipo", "hinge", "spo", "sigmoid_norm", "exo_pair", "nca_pair", "robust",
                              "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down",
                              "discopop"})
#: Losses that read ``label_smoothing`` (TRL 1.16: robust, exo_pair, aot, aot_unpaired; ours also cDPO).
LABEL_SMOOTHING_LOSSES = frozenset({"dpo", "robust", "exo_pair", "aot", "aot_unpaired"})
#: TRL 1.16 ``loss_type`` names that differ from ours.
TRL_NAMES = {"sigmoid": "dpo"}


def loss_terms(spec: str) -> list[str]:
    """The loss names of ``spec``: one name, or a comma-separated combination ("dpo,sft").

    ValueError (naming --loss) for an unknown or repeated name.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--loss must name a loss; valid names: {', '.join(sorted(LOSSES))}")
    names = [n.strip() for n in spec.split(",")]
    for n in names:
        if n not in LOSSES:
            trl = f" (TRL's {n!r} is our {TRL_NAMES[n]!r})" if n in TRL_NAMES else ""
            raise ValueError(f"--loss {n!r} is unknown{trl}; choose one of: {', '.join(sorted(LOSSES))}")
    if len(set(names)) != len(names):
        raise ValueError(f"--loss {spec} names a loss twice")
    return names


def loss_weights(spec: str, config: LossConfig) -> list[float]:
    """One weight per term of ``spec`` (``config.loss_weights``; 1.0 each when unset)."""
    names = loss_terms(spec)
    weights = config.weights()
    if weights is None:
        return [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"--loss-weights has {len(weights)} weight(s) for the {len(names)} loss(es) of "
                         f"--loss {spec}")
    return weights


def _check_name(name: str) -> None:
    loss_terms(name)


def requires_reference(name: str) -> bool:
    """True if loss ``name`` (or any term of a combination) needs reference-model log-probs
    (ValueError if unknown)."""
    from megatron_pref import study_metrics

    # The loss study compares every loss relative to the same reference.
    return any(n in REFERENCE_LOSSES for n in loss_terms(name)) or study_metrics.enabled()


def check_options(spec: str, config: LossConfig) -> None:
    """Refuse options that no term of ``spec`` reads (they would be silently ignored)."""
    names = loss_terms(spec)
    config.validate()
    loss_weights(spec, config)
    if config.label_smoothing != 0.0 and not LABEL_SMOOTHING_LOSSES.intersection(names):
        raise ValueError(f"label_smoothing (--label-smoothing) only applies to "
                         f"{', '.join(sorted(LABEL_SMOOTHING_LOSSES))}, not --loss {spec}")
    if "exo_pair" in names and not config.label_smoothing > 0:
        raise ValueError("loss 'exo_pair' needs --label-smoothing > 0 (its epsilon; the paper uses 1e-3): "
                         "log(0) makes the loss infinite")
    if "robust" in names and not config.label_smoothing < 0.5:
        raise ValueError("loss 'robust' needs --label-smoothing < 0.5 (it divides by 1 - 2*eps)")
    if config.bco_running_mean and "bco_pair" not in names:
        raise ValueError(f"--bco-running-mean only applies to bco_pair, not --loss {spec}")
    if config.use_weighting:
        unweightable = [n for n in names if n in ("aot", "aot_unpaired", "slime")]
        if unweightable:
            raise ValueError(f"--use-weighting does not apply to --loss {','.join(unweightable)} (aot sorts the "
                             f"pairs, slime has a token-level term: no per-pair loss to weight)")
    if config.f_divergence_type != "reverse_kl":
        ignored = [n for n in names if n not in F_DIVERGENCE_LOSSES]
        if ignored:
            raise ValueError(f"--f-divergence-type {config.f_divergence_type} does not apply to --loss "
                             f"{','.join(ignored)} (only {', '.join(sorted(F_DIVERGENCE_LOSSES))})")


_PAIR_FIELDS = (
    "chosen_logps",
    "rejected_logps",
    "chosen_lengths",
    "rejected_lengths",
    "ref_chosen_logps",
    "ref_rejected_logps",
    "score_chosen",
    "score_rejected",
    "chosen_wpo_logweights",
    "rejected_wpo_logweights",
)


def _as_float(t: Tensor) -> Tensor:
    # Losses are computed in (at least) fp32 even if the model produced bf16/fp16.
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) or not t.is_floating_point() else t


def _prepare_stats(name: str, stats: PairStats, config: LossConfig, check_values: bool) -> PairStats:
    """Validate shapes/presence, upcast to fp32; returns a new PairStats."""
    updates: dict = {}
    num_pairs = None
    for fname in _PAIR_FIELDS:
        t = getattr(stats, fname)
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"PairStats.{fname} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"PairStats.{fname} must be 1-D over pairs, got shape {tuple(t.shape)}")
        if num_pairs is None:
            num_pairs = t.shape[0]
        elif t.shape[0] != num_pairs:
            raise ValueError(
                f"PairStats.{fname} has shape {tuple(t.shape)}, expected ({num_pairs},) "
                f"like PairStats.chosen_logps"
            )
        updates[fname] = _as_float(t)

    if requires_reference(name) and (stats.ref_chosen_logps is None or stats.ref_rejected_logps is None):
        raise ValueError(
            f"loss {name!r} needs reference log-probs: PairStats.ref_chosen_logps and "
            f"PairStats.ref_rejected_logps must be set"
        )
    if (stats.score_chosen is None) != (stats.score_rejected is None):
        raise ValueError("PairStats.score_chosen and PairStats.score_rejected must be given together")
    if name == "spo" and config.spo_target_from_scores and stats.score_chosen is None:
        raise ValueError(
            "spo_target_from_scores is set but PairStats.score_chosen/score_rejected are missing"
        )

    if name == "slime":
        tok = stats.rejected_token_logps
        if tok is None:
            raise ValueError("loss 'slime' needs PairStats.rejected_token_logps ([N] rejected-token log-probs)")
        if not isinstance(tok, Tensor) or tok.dim() != 1:
            raise ValueError("PairStats.rejected_token_logps must be a 1-D tensor over rejected tokens")
        updates["rejected_token_logps"] = _as_float(tok)
        token_mask = stats.rejected_token_mask
        if token_mask is not None:
            if not isinstance(token_mask, Tensor) or token_mask.shape != tok.shape:
                raise ValueError("PairStats.rejected_token_mask must have the shape of rejected_token_logps")
            updates["rejected_token_mask"] = _as_float(token_mask)
        ppt = stats.pairs_per_rejected_token
        if isinstance(ppt, Tensor):
            if ppt.numel() != 1:
                raise ValueError("PairStats.pairs_per_rejected_token must be a scalar")
            if check_values and not (math.isfinite(float(ppt)) and float(ppt) > 0):
                raise ValueError(f"PairStats.pairs_per_rejected_token must be finite and > 0, got {float(ppt)}")
            updates["pairs_per_rejected_token"] = _as_float(ppt.reshape(()))
        elif ppt is not None and not (math.isfinite(ppt) and ppt > 0):
            raise ValueError(f"PairStats.pairs_per_rejected_token must be finite and > 0, got {ppt}")
        if check_values and num_pairs:
            n_expected = float(stats.rejected_lengths.sum())
            n_given = tok.numel() if token_mask is None else float(token_mask.sum())
            if abs(n_expected - n_given) > 0.5:
                raise ValueError(
                    f"PairStats.rejected_token_logps has {n_given:g} tokens but "
                    f"PairStats.rejected_lengths sums to {n_expected:g}"
                )

    ppct = stats.pairs_per_chosen_token
    if isinstance(ppct, Tensor):
        updates["pairs_per_chosen_token"] = _as_float(ppct.reshape(()))
    elif ppct is not None and not (math.isfinite(ppct) and ppct > 0):
        raise ValueError(f"PairStats.pairs_per_chosen_token must be finite and > 0, got {ppct}")

    if check_values and num_pairs:
        for fname in ("chosen_lengths", "rejected_lengths"):
            if not bool((getattr(stats, fname) > 0).all()):
                raise ValueError(f"PairStats.{fname} must be > 0 for every pair")
    return dataclasses.replace(stats, **updates)


def compute_loss(name: str, stats: PairStats, config: LossConfig, *, check_values: bool = True) -> LossOutput:
    """Validate, dispatch to ``LOSSES[name]`` (or the weighted sum of a combination) and add
    the optional RPO-style NLL term.

    ``name`` is one loss or a comma-separated combination, as TRL's ``loss_type`` list:
    ``loss = sum_k w_k * L_k`` with ``w = config.loss_weights`` (1.0 each when empty). Each
    term's unweighted per-pair value is logged as ``loss/<name>`` (for a combination); the
    metrics are the first term's, plus the other terms' own keys (e.g. ``ipo/hbar``).

    Raises ``ValueError`` (naming the argument) for an unknown ``name``, invalid
    ``config``, mismatched ``PairStats`` shapes, a missing reference for a
    reference-based loss, missing ``rejected_token_logps`` for SLIME, missing
    scores with ``spo_target_from_scores``, or an option no term reads
    (:func:`check_options`).

    ``config.sft_weight * (-chosen_logps / chosen_lengths)`` is added to every
    pair loss (and to ``loss_sum``) when ``sft_weight > 0``, logged as ``sft/nll``
    (shorthand for ``--loss <name>,sft --loss-weights 1,<sft_weight>``).

    ``check_values=True`` also checks tensor *values* (lengths > 0, SLIME token
    count == sum of rejected lengths); this costs one host-device sync, so turn
    it off in a tuned training loop once the data path is trusted.
    """
    names = loss_terms(name)
    check_options(name, config)
    weights = loss_weights(name, config)
    prepared = {n: _prepare_stats(n, stats, config, check_values) for n in names}
    stats = prepared[names[0]]
    weight = wpo_pair_weights(stats) if config.use_weighting else None

    def run_term(n: str) -> LossOutput:
        term = LOSSES[n](prepared[n], config)
        if weight is None:
            return term
        pair_losses = term.pair_losses * weight
        return LossOutput(loss_sum=pair_losses.sum(), pair_losses=pair_losses,
                          metrics={**term.metrics, "wpo/weight": weight})

    if len(names) == 1:
        out = run_term(names[0])
    else:
        loss_sum, pair_losses, metrics, term_metrics = 0.0, 0.0, {}, {}
        for n, w in zip(names, weights):
            term = run_term(n)
            loss_sum = loss_sum + w * term.loss_sum
            pair_losses = pair_losses + w * term.pair_losses
            for key, value in term.metrics.items():
                metrics.setdefault(key, value)
            # The term's loss_sum spread over its pairs (SLIME's token term included).
            num = max(term.pair_losses.numel(), 1)
            term_metrics[f"loss/{n}"] = (term.loss_sum.detach() / num).expand_as(term.pair_losses).clone()
        out = LossOutput(loss_sum=loss_sum, pair_losses=pair_losses, metrics={**metrics, **term_metrics})
    if config.sft_weight > 0:
        nll = _chosen_nll(stats, config)
        extra = config.sft_weight * nll * (weight if weight is not None else 1.0)
        out = LossOutput(
            loss_sum=out.loss_sum + extra.sum(),
            pair_losses=out.pair_losses + extra,
            metrics={**out.metrics, "sft/nll": nll.detach()},
        )
    from megatron_pref import study_metrics

    if study_metrics.active():  # opt-in (tools/loss_study.py)
        out.metrics.update(study_metrics.pair_statistics(name, stats, config))
    return out
