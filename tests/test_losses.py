"""Tests for megatron_pref.losses: closed forms, autograd gradients, negative controls."""

import dataclasses
import math

import pytest
import torch

from megatron_pref.losses import (
    LOSSES,
    SPO_SHAPES,
    LossConfig,
    PairStats,
    compute_loss,
    requires_reference,
    spo_loss,
)

E = math.e
#: The pairwise losses of TRL 1.16's DPOTrainer added under TRL's names (issue 13).
NEW_TRL_LOSSES = {"sigmoid_norm", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop"}
T = torch.float64  # double precision so closed-form comparisons can be tight


def t(*xs, dtype=T, grad=False):
    return torch.tensor(list(xs), dtype=dtype, requires_grad=grad)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def softplus(x):
    return math.log1p(math.exp(x))


def ref_stats(h_values, beta=1.0, grad=False):
    """Pairs whose sequence-level log-ratio gap h is exactly h_values (ref = 0 for rejected)."""
    n = len(h_values)
    chosen = t(*[-5.0 + h for h in h_values], grad=grad)
    return PairStats(
        chosen_logps=chosen,
        rejected_logps=t(*([-5.0] * n)),
        chosen_lengths=t(*([4.0] * n)),
        rejected_lengths=t(*([4.0] * n)),
        ref_chosen_logps=t(*([-5.0] * n)),
        ref_rejected_logps=t(*([-5.0] * n)),
    )


def generic_stats(grad=False):
    """Two hand-made pairs with different lengths, usable by every loss."""
    return PairStats(
        chosen_logps=t(-6.0, -15.0, grad=grad),
        rejected_logps=t(-9.0, -12.0, grad=grad),
        chosen_lengths=t(3.0, 5.0),
        rejected_lengths=t(2.0, 4.0),
        ref_chosen_logps=t(-7.0, -14.0),
        ref_rejected_logps=t(-8.0, -13.0),
        rejected_token_logps=t(-4.0, -5.0, -1.0, -2.0, -3.0, -6.0, grad=grad),
    )


# --------------------------------------------------------------------------- #
# DPO
# --------------------------------------------------------------------------- #
def test_dpo_at_zero_margin_is_ln2():
    out = compute_loss("dpo", ref_stats([0.0, 0.0, 0.0]), LossConfig(beta=0.3))
    torch.testing.assert_close(out.pair_losses, torch.full((3,), math.log(2.0), dtype=T))
    assert out.loss_sum.item() == pytest.approx(3 * math.log(2.0))


def test_conservative_dpo_closed_form():
    beta, eps, h = 0.5, 0.2, 2.0
    out = compute_loss("dpo", ref_stats([h]), LossConfig(beta=beta, label_smoothing=eps))
    x = beta * h
    expected = -(1 - eps) * math.log(sigmoid(x)) - eps * math.log(sigmoid(-x))
    assert out.pair_losses.item() == pytest.approx(expected, rel=1e-12)
    # negative control: without smoothing the value differs
    plain = compute_loss("dpo", ref_stats([h]), LossConfig(beta=beta)).pair_losses.item()
    assert plain == pytest.approx(-math.log(sigmoid(x)), rel=1e-12)
    assert abs(plain - expected) > 1e-3


@pytest.mark.parametrize("h", [-3.0, 0.0, 1.5, 10.0])
def test_dpo_gradient_matches_closed_form(h):
    beta = 0.4
    stats = ref_stats([h], grad=True)
    stats.rejected_logps.requires_grad_(True)
    compute_loss("dpo", stats, LossConfig(beta=beta)).loss_sum.backward()
    g = -beta * sigmoid(-beta * h)
    assert stats.chosen_logps.grad.item() == pytest.approx(g, rel=1e-10)
    assert stats.rejected_logps.grad.item() == pytest.approx(-g, rel=1e-10)


# --------------------------------------------------------------------------- #
# IPO / hinge
# --------------------------------------------------------------------------- #
def test_ipo_closed_form_uses_per_token_average():
    s = generic_stats()
    beta = 0.25
    out = compute_loss("ipo", s, LossConfig(beta=beta))
    # pair 0: chosen ratio (-6+7)/3, rejected ratio (-9+8)/2
    hbar0 = (1.0 / 3.0) - (-1.0 / 2.0)
    # pair 1: chosen (-15+14)/5, rejected (-12+13)/4
    hbar1 = (-1.0 / 5.0) - (1.0 / 4.0)
    expected = [(hbar0 - 2.0) ** 2, (hbar1 - 2.0) ** 2]
    torch.testing.assert_close(out.pair_losses, t(*expected))
    # negative control: the sequence-level h would give a different value
    h0 = 1.0 - (-1.0)
    assert abs(out.pair_losses[0].item() - (h0 - 2.0) ** 2) > 1e-2


def test_hinge_closed_form_and_zero_gradient_past_margin():
    beta = 0.5
    stats = ref_stats([1.0, 4.0, -2.0], grad=True)
    out = compute_loss("hinge", stats, LossConfig(beta=beta))
    torch.testing.assert_close(out.pair_losses, t(0.5, 0.0, 2.0))
    out.loss_sum.backward()
    torch.testing.assert_close(stats.chosen_logps.grad, t(-beta, 0.0, -beta))


# --------------------------------------------------------------------------- #
# SPO
# --------------------------------------------------------------------------- #
def spo_shape_grad(z_value):
    z = torch.tensor(z_value, dtype=T, requires_grad=True)
    SPO_SHAPES["exp"](z, LossConfig()).backward()
    return z.grad.item()


def test_spo_shape_minimum_zero_at_one():
    cfg = LossConfig()
    assert SPO_SHAPES["exp"](torch.tensor(1.0, dtype=T), cfg).item() == pytest.approx(0.0, abs=1e-15)
    assert spo_shape_grad(1.0) == pytest.approx(0.0, abs=1e-15)
    # nonnegative everywhere on a grid, so 1 is the global minimum
    zs = torch.linspace(-5, 50, 1001, dtype=T)
    assert (SPO_SHAPES["exp"](zs, cfg) >= -1e-15).all()


def test_spo_gradient_values_and_decay():
    # f'(z) = (z - 1) e^{-z}
    for z in [-1.0, 0.0, 0.5, 2.0, 3.0, 5.0]:
        assert spo_shape_grad(z) == pytest.approx((z - 1) * math.exp(-z), rel=1e-12)
    assert spo_shape_grad(-1.0) == pytest.approx(-2 * E, rel=1e-12)
    # vanishing gradient beyond the target (past z = 2, where |f'| peaks)
    mags = [abs(spo_shape_grad(z)) for z in [2.0, 3.0, 5.0, 10.0, 20.0]]
    assert all(a > b for a, b in zip(mags, mags[1:]))
    assert mags[-1] < 1e-7
    # inverted pairs are pushed hard
    assert abs(spo_shape_grad(-1.0)) > E
    assert abs(spo_shape_grad(-1.0)) > 10 * abs(spo_shape_grad(2.0))


def test_spo_zero_loss_and_gradient_at_target():
    beta, margin = 0.5, 2.0
    stats = ref_stats([margin / beta], grad=True)  # beta*h = target  ->  z = 1
    out = compute_loss("spo", stats, LossConfig(beta=beta, spo_target_margin=margin))
    assert out.metrics["spo/z"].item() == pytest.approx(1.0)
    assert out.loss_sum.item() == pytest.approx(0.0, abs=1e-15)
    out.loss_sum.backward()
    assert stats.chosen_logps.grad.item() == pytest.approx(0.0, abs=1e-15)


def test_spo_policy_gradient_chain_rule():
    beta, margin, h = 0.5, 2.0, -2.0
    stats = ref_stats([h], grad=True)
    compute_loss("spo", stats, LossConfig(beta=beta, spo_target_margin=margin)).loss_sum.backward()
    z = beta * h / margin
    assert stats.chosen_logps.grad.item() == pytest.approx((z - 1) * math.exp(-z) * beta / margin)


def test_spo_target_from_scores_is_per_pair():
    beta = 1.0
    stats = ref_stats([2.0, 2.0])
    stats.score_chosen = t(5.0, 3.0)
    stats.score_rejected = t(1.0, 2.0)  # gaps 4 and 1
    out = compute_loss("spo", stats, LossConfig(beta=beta, spo_target_from_scores=True))
    torch.testing.assert_close(out.metrics["spo/z"], t(0.5, 2.0))
    f = lambda z: -z * math.exp(-z) + 1 / E
    torch.testing.assert_close(out.pair_losses, t(f(0.5), f(2.0)))
    # negative control: scores are ignored without the flag (constant target 1 -> z = 2)
    plain = compute_loss("spo", stats, LossConfig(beta=beta))
    torch.testing.assert_close(plain.metrics["spo/z"], t(2.0, 2.0))


def test_spo_scores_flag_without_scores_raises():
    with pytest.raises(ValueError, match="spo_target_from_scores"):
        compute_loss("spo", ref_stats([1.0]), LossConfig(spo_target_from_scores=True))


def test_spo_nonpositive_gap_skipped_and_small_gap_clamped():
    stats = ref_stats([1.0, 1.0, 1.0, 1.0], grad=True)
    stats.score_chosen = t(1.0, 1.0, 1.0, 1.0)
    stats.score_rejected = t(1.0, 2.0, 0.99, 0.0)  # gaps 0, -1, 0.01, 1
    cfg = LossConfig(beta=0.1, spo_target_from_scores=True, spo_min_target=0.05)
    out = compute_loss("spo", stats, cfg)
    torch.testing.assert_close(out.metrics["spo/skipped"], t(1.0, 1.0, 0.0, 0.0))
    torch.testing.assert_close(out.metrics["spo/target"], t(0.05, 0.05, 0.05, 1.0))
    f = lambda z: -z * math.exp(-z) + 1 / E
    torch.testing.assert_close(out.pair_losses, t(0.0, 0.0, f(0.1 / 0.05), f(0.1)))
    out.loss_sum.backward()
    g = stats.chosen_logps.grad
    assert g[0].item() == 0.0 and g[1].item() == 0.0
    assert g[2].item() != 0.0 and g[3].item() != 0.0


def test_spo_extreme_inversion_is_finite_and_continuous():
    cfg = LossConfig(spo_z_floor=-20.0)
    z = torch.tensor([-200.0, -20.0 - 1e-9, -20.0, -5.0], dtype=torch.float32, requires_grad=True)
    loss = SPO_SHAPES["exp"](z, cfg)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(z.grad).all()
    assert loss[1].item() == pytest.approx(loss[2].item(), rel=1e-6)  # continuous at floor
    assert z.grad[0].item() == pytest.approx(-21 * math.exp(20), rel=1e-5)  # tangent slope
    assert loss[3].item() == pytest.approx(5 * math.exp(5) + 1 / E, rel=1e-6)  # exact above floor


def test_spo_default_floor_bounds_the_push_on_inverted_pairs():
    """Exact exponential push down to z = -5 (|f'| = 6e^5), constant below: a pair at z = -50
    pushes like one at -5, not 51e^50 times harder than one at z = 0."""
    z = torch.tensor([-50.0, -5.0, -4.0, 0.0], dtype=T, requires_grad=True)
    SPO_SHAPES["exp"](z, LossConfig()).sum().backward()
    assert z.grad[0].item() == pytest.approx(-6 * math.exp(5), rel=1e-12)
    assert z.grad[1].item() == pytest.approx(-6 * math.exp(5), rel=1e-12)
    assert z.grad[2].item() == pytest.approx(-5 * math.exp(4), rel=1e-12)  # exact above the floor
    assert z.grad[3].item() == pytest.approx(-1.0, rel=1e-12)


def test_spo_shape_is_swappable():
    stats = ref_stats([3.0])
    out = spo_loss(stats, LossConfig(beta=1.0), shape=lambda z, c: (z - 1) ** 2)
    assert out.pair_losses.item() == pytest.approx(4.0)


# --------------------------------------------------------------------------- #
# SLIME
# --------------------------------------------------------------------------- #
def slime_stats(lbar_w, lbar_l, tokens=(-1.0,)):
    n = len(tokens)
    return PairStats(
        chosen_logps=t(lbar_w * 2.0),
        rejected_logps=t(lbar_l * n),
        chosen_lengths=t(2.0),
        rejected_lengths=t(float(n)),
        rejected_token_logps=t(*tokens),
    )


@pytest.mark.parametrize("d, expected", [(0.0, 1.5 * sigmoid(2.5)), (1.0, 0.25), (1.5, 0.0), (3.0, 0.0)])
def test_slime_margin_term(d, expected):
    cfg = LossConfig(slime_lambda_w=0.0, slime_lambda_l=0.0, slime_lambda_d=1.0)
    out = compute_loss("slime", slime_stats(-1.0, -1.0 - d), cfg)
    assert out.loss_sum.item() == pytest.approx(expected, abs=1e-12)
    assert out.metrics["slime/margin"].item() == pytest.approx(expected, abs=1e-12)


def test_slime_margin_reference_numbers():
    cfg = LossConfig(slime_lambda_w=0.0, slime_lambda_l=0.0)
    assert compute_loss("slime", slime_stats(-1.0, -1.0), cfg).loss_sum.item() == pytest.approx(1.386, abs=1e-3)
    assert compute_loss("slime", slime_stats(-1.0, -2.0), cfg).loss_sum.item() == pytest.approx(0.25, abs=1e-12)


def test_slime_anchor_term():
    cfg = LossConfig(slime_lambda_w=0.3, slime_lambda_l=0.0, slime_lambda_d=0.0)
    out = compute_loss("slime", slime_stats(-0.7, -5.0), cfg)
    assert out.loss_sum.item() == pytest.approx(0.3 * 0.7, rel=1e-12)
    assert out.metrics["slime/anchor"].item() == pytest.approx(0.21, rel=1e-12)


def test_slime_stabiliser_closed_form():
    # softplus(-logp - 1.25): tokens chosen so the arguments are -1, 0, 2
    tokens = (-0.25, -1.25, -3.25)
    cfg = LossConfig(slime_lambda_w=0.0, slime_lambda_l=0.2, slime_lambda_d=0.0, slime_power=2.5)
    out = compute_loss("slime", slime_stats(-1.0, -1.0, tokens), cfg)
    mean_stab = sum(softplus(a) ** 2.5 for a in (-1.0, 0.0, 2.0)) / 3
    # one pair, local default P/N = 1/3 -> loss_sum / 1 pair = ll * mean over tokens
    assert out.loss_sum.item() == pytest.approx(0.2 * mean_stab, rel=1e-12)
    assert out.metrics["slime/stabiliser"].item() == pytest.approx(0.2 * mean_stab, rel=1e-12)
    assert out.pair_losses.item() == pytest.approx(0.0, abs=1e-15)  # token term excluded


def _slime_global_batch():
    # 3 pairs, rejected lengths 1, 2, 5 -> 8 rejected tokens
    toks = [[-0.5], [-2.0, -3.0], [-1.0, -4.0, -0.1, -2.5, -6.0]]
    chosen = t(-3.0, -4.0, -10.0)
    chosen_len = t(3.0, 2.0, 4.0)
    rej = t(*[sum(x) for x in toks])
    rej_len = t(*[float(len(x)) for x in toks])
    return chosen, chosen_len, rej, rej_len, toks


def _slime_split(idx, ppt):
    chosen, chosen_len, rej, rej_len, toks = _slime_global_batch()
    return PairStats(
        chosen_logps=chosen[idx],
        rejected_logps=rej[idx],
        chosen_lengths=chosen_len[idx],
        rejected_lengths=rej_len[idx],
        rejected_token_logps=t(*[v for i in idx for v in toks[i]]),
        pairs_per_rejected_token=ppt,
    )


def test_slime_token_normalisation_is_split_invariant():
    cfg = LossConfig(slime_lambda_l=0.5)
    G, N = 3, 8
    whole = compute_loss("slime", _slime_split([0, 1, 2], None), cfg).loss_sum.item() / G
    split = sum(
        compute_loss("slime", _slime_split(idx, G / N), cfg).loss_sum.item() for idx in ([0], [1, 2])
    ) / G
    assert split == pytest.approx(whole, rel=1e-12)
    # also equals the closed form: mean pair loss + ll * mean over all global tokens
    chosen, chosen_len, rej, rej_len, toks = _slime_global_batch()
    all_toks = [v for x in toks for v in x]
    pair_only = compute_loss("slime", _slime_split([0, 1, 2], None), LossConfig(slime_lambda_l=0.0)).loss_sum.item()
    stab_mean = sum(softplus(-v - 1.25) ** 2.5 for v in all_toks) / len(all_toks)
    assert whole == pytest.approx(pair_only / G + 0.5 * stab_mean, rel=1e-12)
    # tensor-valued pairs_per_rejected_token works the same
    split_t = sum(
        compute_loss("slime", _slime_split(idx, torch.tensor(G / N)), cfg).loss_sum.item() for idx in ([0], [1, 2])
    ) / G
    assert split_t == pytest.approx(whole, rel=1e-6)


def test_slime_local_default_normalisation_differs_when_split_unevenly():
    # negative control: each split using its local P/N (1/1 and 2/7) is NOT the global mean
    cfg = LossConfig(slime_lambda_l=0.5)
    whole = compute_loss("slime", _slime_split([0, 1, 2], None), cfg).loss_sum.item() / 3
    split_local = sum(
        compute_loss("slime", _slime_split(idx, None), cfg).loss_sum.item() for idx in ([0], [1, 2])
    ) / 3
    assert abs(split_local - whole) > 1e-3


def test_slime_requires_token_logps_and_consistent_count():
    s = slime_stats(-1.0, -2.0, (-1.0, -2.0))
    s.rejected_token_logps = None
    with pytest.raises(ValueError, match="rejected_token_logps"):
        compute_loss("slime", s, LossConfig())
    s = slime_stats(-1.0, -2.0, (-1.0, -2.0))
    s.rejected_token_logps = t(-1.0, -2.0, -3.0)
    with pytest.raises(ValueError, match="rejected_token_logps"):
        compute_loss("slime", s, LossConfig())


def test_slime_paper_defaults():
    c = LossConfig()
    assert (c.slime_lambda_w, c.slime_lambda_l, c.slime_lambda_d) == (0.1, 0.1, 1.0)
    assert (c.slime_delta, c.slime_margin_hard, c.slime_margin_soft) == (1.25, 1.5, 1.0)
    assert (c.slime_kappa, c.slime_power) == (2.5, 2.5)


# --------------------------------------------------------------------------- #
# SimPO / ORPO / SFT
# --------------------------------------------------------------------------- #
def test_simpo_closed_form():
    s = generic_stats()
    beta, gamma = 2.0, 0.5
    out = compute_loss("simpo", s, LossConfig(beta=beta, simpo_gamma=gamma))
    d0 = -6.0 / 3 - (-9.0 / 2)
    d1 = -15.0 / 5 - (-12.0 / 4)
    expected = [-math.log(sigmoid(beta * d - gamma)) for d in (d0, d1)]
    torch.testing.assert_close(out.pair_losses, t(*expected))


def test_orpo_closed_form():
    s = generic_stats()
    lam = 0.3
    out = compute_loss("orpo", s, LossConfig(orpo_lambda=lam))
    expected = []
    for lw, ll in ((-2.0, -4.5), (-3.0, -3.0)):
        pw, pl = math.exp(lw), math.exp(ll)
        log_odds = math.log(pw / (1 - pw)) - math.log(pl / (1 - pl))
        expected.append(-lw + lam * -math.log(sigmoid(log_odds)))
    torch.testing.assert_close(out.pair_losses, t(*expected))
    # equal likelihoods -> odds-ratio term is lambda * ln 2
    assert out.pair_losses[1].item() == pytest.approx(3.0 + lam * math.log(2.0), rel=1e-12)


def test_orpo_stable_near_probability_one():
    for dtype in (torch.float32, T):
        s = PairStats(
            chosen_logps=t(-1e-9, -1e-3, dtype=dtype, grad=True),
            rejected_logps=t(-50.0, -1e-4, dtype=dtype),
            chosen_lengths=t(1.0, 1.0, dtype=dtype),
            rejected_lengths=t(1.0, 1.0, dtype=dtype),
        )
        out = compute_loss("orpo", s, LossConfig())
        out.loss_sum.backward()
        assert torch.isfinite(out.pair_losses).all() and torch.isfinite(s.chosen_logps.grad).all()
    # fp32 at p -> 1: log(1 - p) must be accurate, not only finite. At lbar = -1e-6 the naive
    # log1p(-exp(x)) is off by ~1e-2 (exp rounds to 1 - 1e-6 +- 6e-8); log1mexp is exact.
    x = torch.tensor([-1e-6, -0.3, -5.0], dtype=torch.float32)
    exact = torch.log(-torch.expm1(x.double()))
    from megatron_pref.losses import _log1mexp
    torch.testing.assert_close(_log1mexp(x).double(), exact, rtol=1e-6, atol=1e-6)
    assert (torch.log1p(-torch.exp(x)).double() - exact).abs().max() > 1e-3  # the control
    # small-but-representable case matches the naive formula in double precision
    lw, ll = -1e-3, -1e-4
    naive = -lw + 0.1 * -math.log(sigmoid(
        math.log(math.exp(lw) / -math.expm1(lw)) - math.log(math.exp(ll) / -math.expm1(ll))))
    assert out.pair_losses[1].item() == pytest.approx(naive, rel=1e-9)


def test_sft_is_per_token_nll_of_chosen():
    out = compute_loss("sft", generic_stats(), LossConfig())
    torch.testing.assert_close(out.pair_losses, t(2.0, 3.0))
    assert out.loss_sum.item() == pytest.approx(5.0)


def config_for(name, **kw):
    """LossConfig(**kw), with the epsilon exo_pair cannot do without."""
    if name == "exo_pair" and not kw.get("label_smoothing"):
        kw["label_smoothing"] = 1e-3
    return LossConfig(**kw)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_sft_weight_adds_exactly_the_nll_term(name):
    s = generic_stats()
    base = compute_loss(name, s, config_for(name))
    w = 0.7
    out = compute_loss(name, s, config_for(name, sft_weight=w))
    nll = t(2.0, 3.0)  # -(-6/3), -(-15/5)
    torch.testing.assert_close(out.pair_losses - base.pair_losses, w * nll)
    assert (out.loss_sum - base.loss_sum).item() == pytest.approx(w * 5.0, rel=1e-12)
    torch.testing.assert_close(out.metrics["sft/nll"], nll)


# --------------------------------------------------------------------------- #
# Dispatch, registry, metrics, normalisation
# --------------------------------------------------------------------------- #
def test_every_loss_gives_a_distinct_objective():
    s = generic_stats()
    # Break generic_stats' symmetry (apo_zero == apo_down there) and reverse the reference
    # margins' order (aot == dpo when sorting keeps the pairing).
    s.ref_chosen_logps, s.ref_rejected_logps = t(-7.3, -14.1), t(-8.0, -16.0)
    # robust == dpo at label_smoothing 0 (rDPO's correction vanishes): compare at 0.1.
    values = {name: compute_loss(name, s, config_for(name, label_smoothing=0.1 if name == "robust" else 0.0))
              .loss_sum.item() for name in LOSSES}
    assert set(values) == {"dpo", "ipo", "hinge", "spo", "slime", "simpo", "orpo", "sft"} | NEW_TRL_LOSSES
    vals = sorted(values.values())
    assert all(b - a > 1e-6 for a, b in zip(vals, vals[1:])), values


def test_unknown_loss_name_lists_valid_names():
    with pytest.raises(ValueError) as exc:
        compute_loss("sigmoid", generic_stats(), LossConfig())
    for name in LOSSES:
        assert name in str(exc.value)
    with pytest.raises(ValueError, match="dpo"):
        requires_reference("kto")


def test_requires_reference():
    assert {n for n in LOSSES if requires_reference(n)} == {"dpo", "ipo", "hinge", "spo"} | NEW_TRL_LOSSES
    assert requires_reference("sft,dpo") and not requires_reference("sft,simpo")


@pytest.mark.parametrize("name", ["dpo", "ipo", "hinge", "spo"] + sorted(NEW_TRL_LOSSES))
def test_reference_losses_need_reference(name):
    s = generic_stats()
    s.ref_rejected_logps = None
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        compute_loss(name, s, config_for(name))


@pytest.mark.parametrize("name", ["slime", "simpo", "orpo", "sft"])
def test_reference_free_losses_ignore_reference(name):
    s = generic_stats()
    with_ref = compute_loss(name, s, LossConfig()).loss_sum.item()
    s.ref_chosen_logps = s.ref_rejected_logps = None
    assert compute_loss(name, s, LossConfig()).loss_sum.item() == with_ref


@pytest.mark.parametrize("name", ["dpo", "hinge", "spo"])
def test_reference_metrics_are_beta_log_ratios(name):
    beta = 0.2
    s = generic_stats(grad=True)
    m = compute_loss(name, s, LossConfig(beta=beta)).metrics
    rc, rr = t(beta * 1.0, beta * -1.0), t(beta * -1.0, beta * 1.0)
    torch.testing.assert_close(m["rewards/chosen"], rc)
    torch.testing.assert_close(m["rewards/rejected"], rr)
    torch.testing.assert_close(m["rewards/margins"], rc - rr)
    torch.testing.assert_close(m["rewards/accuracies"], t(1.0, 0.0))
    torch.testing.assert_close(m["logps/chosen"], t(-6.0, -15.0))
    torch.testing.assert_close(m["logps/rejected"], t(-9.0, -12.0))
    assert all(not v.requires_grad and v.shape == (2,) for v in m.values())


def test_ipo_metrics_are_sequence_level_like_trl_1_16():
    """TRL 1.16 averages per token only inside the IPO loss; rewards/* and logps/* stay
    sequence level (issue 13's reproduction; TRL <= 0.27 and our old code gave 0.01, 0.002,
    accuracy 1 and logps -1)."""
    beta = 0.1
    s = PairStats(chosen_logps=t(-10.0), rejected_logps=t(-30.0), chosen_lengths=t(10.0),
                  rejected_lengths=t(100.0), ref_chosen_logps=t(-11.0), ref_rejected_logps=t(-32.0))
    out = compute_loss("ipo", s, LossConfig(beta=beta))
    m = out.metrics
    torch.testing.assert_close(m["rewards/chosen"], t(0.1))
    torch.testing.assert_close(m["rewards/rejected"], t(0.2))
    torch.testing.assert_close(m["rewards/accuracies"], t(0.0))
    torch.testing.assert_close(m["logps/chosen"], t(-10.0))
    torch.testing.assert_close(m["logps/rejected"], t(-30.0))
    # The loss itself still regresses the per-token gap: hbar = 1/10 - 2/100.
    assert m["ipo/hbar"].item() == pytest.approx(0.08)
    assert out.loss_sum.item() == pytest.approx((0.08 - 5.0) ** 2)


@pytest.mark.parametrize("name", ["slime", "simpo", "orpo", "sft"])
def test_reference_free_metrics_are_scaled_avg_logps(name):
    """As TRL's CPO (SimPO) and ORPO trainers: rewards = scale * lbar, logps = lbar; the
    scale is beta, except ORPO's, which is its lambda (TRL's ORPO beta)."""
    beta, lam = 2.0, 0.5
    m = compute_loss(name, generic_stats(grad=True), LossConfig(beta=beta, orpo_lambda=lam)).metrics
    scale = lam if name == "orpo" else beta
    torch.testing.assert_close(m["rewards/chosen"], scale * t(-2.0, -3.0))
    torch.testing.assert_close(m["rewards/rejected"], scale * t(-4.5, -3.0))
    torch.testing.assert_close(m["rewards/accuracies"], t(1.0, 0.0))  # tie is not accurate
    torch.testing.assert_close(m["logps/chosen"], t(-2.0, -3.0))
    torch.testing.assert_close(m["logps/rejected"], t(-4.5, -3.0))
    assert all(not v.requires_grad and v.shape == (2,) for v in m.values())


@pytest.mark.parametrize("name", ["dpo", "ipo", "hinge", "spo", "simpo", "orpo", "sft"])
def test_pair_losses_split_invariant(name):
    s = generic_stats()
    whole = compute_loss(name, s, LossConfig())
    parts = []
    for i in range(2):
        parts.append(compute_loss(name, PairStats(
            chosen_logps=s.chosen_logps[i:i + 1], rejected_logps=s.rejected_logps[i:i + 1],
            chosen_lengths=s.chosen_lengths[i:i + 1], rejected_lengths=s.rejected_lengths[i:i + 1],
            ref_chosen_logps=s.ref_chosen_logps[i:i + 1], ref_rejected_logps=s.ref_rejected_logps[i:i + 1],
        ), LossConfig()).loss_sum)
    assert sum(p.item() for p in parts) == pytest.approx(whole.loss_sum.item(), rel=1e-12)
    assert whole.loss_sum.item() == pytest.approx(whole.pair_losses.sum().item(), rel=1e-12)


def test_low_precision_inputs_computed_in_fp32():
    s = generic_stats()
    s16 = PairStats(**{k: (v.to(torch.bfloat16) if isinstance(v, torch.Tensor) else v) for k, v in vars(s).items()})
    out = compute_loss("dpo", s16, LossConfig())
    assert out.loss_sum.dtype == torch.float32 and out.pair_losses.dtype == torch.float32


# --------------------------------------------------------------------------- #
# Argument validation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "field, value",
    [
        ("beta", 0.0),
        ("beta", -1.0),
        ("beta", float("nan")),
        ("label_smoothing", 0.6),
        ("label_smoothing", -0.1),
        ("spo_target_margin", 0.0),
        ("spo_min_target", 0.0),
        ("spo_shape", "cubic"),
        ("spo_z_floor", 2.0),
        ("slime_lambda_l", -0.1),
        ("slime_delta", float("nan")),
        ("slime_kappa", float("inf")),
        ("slime_power", 0.0),
        ("simpo_gamma", float("nan")),
        ("orpo_lambda", -1.0),
        ("sft_weight", -0.5),
    ],
)
def test_bad_config_raises_naming_argument(field, value):
    cfg = LossConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        cfg.validate()
    with pytest.raises(ValueError, match=field):
        compute_loss("dpo", generic_stats(), cfg)


def test_default_config_is_valid():
    LossConfig().validate()


def test_label_smoothing_rejected_for_other_losses():
    with pytest.raises(ValueError, match="label_smoothing"):
        compute_loss("ipo", generic_stats(), LossConfig(label_smoothing=0.1))


@pytest.mark.parametrize("field", ["rejected_logps", "chosen_lengths", "ref_chosen_logps"])
def test_mismatched_shapes_name_the_field(field):
    s = generic_stats()
    setattr(s, field, t(-1.0, -2.0, -3.0))
    with pytest.raises(ValueError, match=field):
        compute_loss("dpo", s, LossConfig())


def test_non_positive_lengths_rejected():
    s = generic_stats()
    s.chosen_lengths = t(0.0, 5.0)
    with pytest.raises(ValueError, match="chosen_lengths"):
        compute_loss("sft", s, LossConfig())


def test_slime_masked_token_form_equals_flat_form():
    """The training step passes every token of a pack with a rejected-token mask."""
    cfg = LossConfig(slime_lambda_l=0.5)
    flat = _slime_split([0, 1, 2], None)
    tokens = flat.rejected_token_logps
    # Interleave junk (prompt/chosen/padding tokens, even -inf) that the mask must exclude.
    junk = torch.tensor([float("-inf"), -7.0, 3.0])
    padded = torch.cat([junk, tokens[:3], junk, tokens[3:]])
    mask = torch.cat([torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(tokens.numel() - 3)])
    masked = dataclasses.replace(flat, rejected_token_logps=padded, rejected_token_mask=mask)
    want = compute_loss("slime", flat, cfg).loss_sum
    got = compute_loss("slime", masked, cfg).loss_sum
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    # The -inf junk must not reach the gradient either (softplus' backward at -inf is 0 * inf).
    grad_tokens = padded.clone().requires_grad_(True)
    with_grad = dataclasses.replace(masked, rejected_token_logps=grad_tokens)
    compute_loss("slime", with_grad, cfg).loss_sum.backward()
    assert torch.isfinite(grad_tokens.grad).all() and (grad_tokens.grad[mask == 0] == 0).all()
    assert (grad_tokens.grad[mask > 0] != 0).all()
    # Negative control: without the mask the junk tokens change the loss.
    unmasked = dataclasses.replace(masked, rejected_token_mask=None, rejected_lengths=flat.rejected_lengths)
    assert not torch.isclose(compute_loss("slime", unmasked, cfg, check_values=False).loss_sum, want)


def test_spo_pair_without_scores_is_skipped():
    """Packed batches carry NaN for a pair with no score: no loss, no gradient, no NaN."""
    stats = ref_stats([0.5, 0.5], grad=True)
    stats = dataclasses.replace(stats, score_chosen=t(2.0, float("nan")), score_rejected=t(1.0, 0.0))
    out = compute_loss("spo", stats, LossConfig(beta=1.0, spo_target_from_scores=True))
    assert torch.isfinite(out.loss_sum)
    assert out.pair_losses[1].item() == 0.0 and out.pair_losses[0].item() > 0.0
    out.loss_sum.backward()
    assert torch.isfinite(stats.chosen_logps.grad).all() and stats.chosen_logps.grad[1].item() == 0.0


# --------------------------------------------------------------------------- #
# TRL 1.16's pairwise losses: closed forms (tests/test_losses_trl.py checks them against TRL)
# --------------------------------------------------------------------------- #
def one_pair(rho_c, rho_r, len_c=2.0, len_r=5.0, grad=False):
    """One pair with log-ratios rho_c, rho_r (reference -4 and -6)."""
    return PairStats(chosen_logps=t(-4.0 + rho_c, grad=grad), rejected_logps=t(-6.0 + rho_r, grad=grad),
                     chosen_lengths=t(len_c), rejected_lengths=t(len_r),
                     ref_chosen_logps=t(-4.0), ref_rejected_logps=t(-6.0))


def logsig(x):
    return -softplus(-x)


RC, RR, BETA = 0.7, -0.4, 0.5  # rho_c, rho_r, beta of the closed forms below
CLOSED_FORMS = {
    "sigmoid_norm": ({}, -logsig(BETA * (RC / 2 - RR / 5))),
    "nca_pair": ({}, -logsig(BETA * RC) - 0.5 * logsig(-BETA * RC) - 0.5 * logsig(-BETA * RR)),
    "robust": ({"label_smoothing": 0.2},
               (-(0.8) * logsig(BETA * (RC - RR)) + 0.2 * logsig(-BETA * (RC - RR))) / 0.6),
    "bco_pair": ({}, -logsig(BETA * RC) - logsig(-BETA * RR)),
    "sppo_hard": ({}, (RC - 1.0) ** 2 + (RR + 1.0) ** 2),
    "apo_zero": ({}, 1 - sigmoid(BETA * RC) + sigmoid(BETA * RR)),
    "apo_down": ({}, sigmoid(BETA * RC) + 1 - sigmoid(BETA * (RC - RR))),
    "exo_pair": ({"label_smoothing": 0.01},
                 sigmoid(BETA * (RC - RR)) * (logsig(BETA * (RC - RR)) - math.log(0.99))
                 + sigmoid(-BETA * (RC - RR)) * (logsig(-BETA * (RC - RR)) - math.log(0.01))),
    "discopop": ({"discopop_tau": 0.05},
                 (1 - sigmoid(BETA * (RC - RR) / 0.05)) * -logsig(BETA * (RC - RR))
                 + sigmoid(BETA * (RC - RR) / 0.05) * math.exp(-BETA * (RC - RR))),
    # One pair: sorting changes nothing, so both AOT variants are (label-smoothed) DPO.
    "aot": ({"label_smoothing": 0.1}, -0.9 * logsig(BETA * (RC - RR)) - 0.1 * logsig(-BETA * (RC - RR))),
    "aot_unpaired": ({}, -logsig(BETA * (RC - RR))),
}


@pytest.mark.parametrize("name", sorted(CLOSED_FORMS))
def test_trl_loss_closed_form(name):
    options, expected = CLOSED_FORMS[name]
    out = compute_loss(name, one_pair(RC, RR), LossConfig(beta=BETA, **options))
    assert out.loss_sum.item() == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(out.pair_losses, t(expected))
    # TRL 1.16's metrics: sequence-level beta * rho for every loss.
    torch.testing.assert_close(out.metrics["rewards/chosen"], t(BETA * RC))
    torch.testing.assert_close(out.metrics["rewards/rejected"], t(BETA * RR))


def test_closed_forms_cover_every_new_loss():
    assert set(CLOSED_FORMS) == NEW_TRL_LOSSES


def test_aot_sorts_over_the_micro_batch():
    """AOT couples pairs: delta_i = sorted(policy margins)_i - sorted(reference margins)_i."""
    s = PairStats(chosen_logps=t(-1.0, -2.0), rejected_logps=t(-3.0, -1.0), chosen_lengths=t(1.0, 1.0),
                  rejected_lengths=t(1.0, 1.0), ref_chosen_logps=t(-2.0, -1.0), ref_rejected_logps=t(-2.5, -4.0))
    # policy margins (2, -1) -> sorted (-1, 2); reference margins (0.5, 3) -> sorted (0.5, 3).
    out = compute_loss("aot", s, LossConfig(beta=1.0))
    torch.testing.assert_close(out.pair_losses, t(-logsig(-1.5), -logsig(-1.0)))
    # aot_unpaired: rho_c = (1, -1) -> (-1, 1); rho_r = (-0.5, 3) -> (-0.5, 3).
    out = compute_loss("aot_unpaired", s, LossConfig(beta=1.0))
    torch.testing.assert_close(out.pair_losses, t(-logsig(-0.5), -logsig(-2.0)))


def test_discopop_is_finite_for_badly_inverted_pairs():
    """exp(-x) overflows float32 at x < -88; the weight sigmoid(x/tau) underflows first, and
    TRL's product gives 0 * inf = NaN. Ours is exp(log sigmoid(x/tau) - x): finite."""
    s = PairStats(chosen_logps=t(-500.0, dtype=torch.float32, grad=True), rejected_logps=t(-1.0, dtype=torch.float32),
                  chosen_lengths=t(1.0, dtype=torch.float32), rejected_lengths=t(1.0, dtype=torch.float32),
                  ref_chosen_logps=t(-1.0, dtype=torch.float32), ref_rejected_logps=t(-1.0, dtype=torch.float32))
    out = compute_loss("discopop", s, LossConfig(beta=1.0))
    out.loss_sum.backward()
    assert math.isfinite(out.loss_sum.item()) and math.isfinite(s.chosen_logps.grad.item())
    # Control: the naive product is NaN here.
    x = torch.tensor(-499.0)
    assert math.isnan((torch.sigmoid(x / 0.05) * torch.exp(-x)).item())


@pytest.mark.parametrize("kind, score", [
    ("forward_kl", lambda r: 1 - math.exp(-r)),
    ("js_divergence", lambda r: math.log(2) + logsig(r)),
    ("alpha_divergence", lambda r: (math.exp(-0.5 * r) - 1) / -0.5),
])
def test_f_divergence_scores_closed_form(kind, score):
    """f-DPO: DPO on f'(u) with u = pi/pi_ref (alpha = 0.5 for alpha_divergence)."""
    out = compute_loss("dpo", one_pair(RC, RR), LossConfig(beta=BETA, f_divergence_type=kind))
    assert out.loss_sum.item() == pytest.approx(-logsig(BETA * (score(RC) - score(RR))), rel=1e-12)
    # alpha -> 1 is reverse KL, plain DPO.
    plain = compute_loss("dpo", one_pair(RC, RR), LossConfig(beta=BETA)).loss_sum.item()
    assert plain == pytest.approx(-logsig(BETA * (RC - RR)), rel=1e-12)
    assert compute_loss("dpo", one_pair(RC, RR), LossConfig(
        beta=BETA, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)).loss_sum.item() == plain


@pytest.mark.parametrize("spec, options, match", [
    ("bco_pair", {"f_divergence_type": "forward_kl"}, "--f-divergence-type forward_kl does not apply to --loss bco_pair"),
    ("exo_pair", {}, "exo_pair' needs --label-smoothing > 0"),
    ("robust", {"label_smoothing": 0.5}, "robust' needs --label-smoothing < 0.5"),
    ("ipo", {"label_smoothing": 0.1}, "label_smoothing"),
    ("dpo,sft", {"loss_weights": "1.0"}, "--loss-weights has 1 weight"),
    ("dpo,sft", {"loss_weights": "1,x"}, "comma-separated numbers"),
    ("dpo,dpo", {}, "names a loss twice"),
    ("sigmoid", {}, "TRL's 'sigmoid' is our 'dpo'"),
])
def test_bad_options_are_refused(spec, options, match):
    with pytest.raises(ValueError, match=match):
        compute_loss(spec, one_pair(RC, RR), LossConfig(**options))


def test_weighted_combination_is_the_weighted_sum():
    s = generic_stats()
    parts = {n: compute_loss(n, s, LossConfig()) for n in ("dpo", "sft", "simpo")}
    out = compute_loss("dpo,sft,simpo", s, LossConfig(loss_weights="1.0,0.2,0.5"))
    expected = parts["dpo"].loss_sum + 0.2 * parts["sft"].loss_sum + 0.5 * parts["simpo"].loss_sum
    assert out.loss_sum.item() == pytest.approx(expected.item(), rel=1e-12)
    for n in parts:
        assert out.metrics[f"loss/{n}"].sum().item() == pytest.approx(parts[n].loss_sum.item(), rel=1e-12)
    # The first term's metrics (DPO's sequence-level rewards), not SimPO's.
    torch.testing.assert_close(out.metrics["rewards/chosen"], parts["dpo"].metrics["rewards/chosen"])
    # --sft-weight is the shorthand of "<loss>,sft" with weights 1,w.
    shorthand = compute_loss("dpo", s, LossConfig(sft_weight=0.2)).loss_sum
    assert compute_loss("dpo,sft", s, LossConfig(loss_weights="1,0.2")).loss_sum.item() == pytest.approx(
        shorthand.item(), rel=1e-12)
    # Unset weights are 1.0 each.
    assert compute_loss("dpo,sft", s, LossConfig()).loss_sum.item() == pytest.approx(
        (parts["dpo"].loss_sum + parts["sft"].loss_sum).item(), rel=1e-12)


# --------------------------------------------------------------------------- #
# --nll-normalization
# --------------------------------------------------------------------------- #
def two_chosen(**kw):
    """Chosen responses [-1, -1] and 8 x [-0.25] (issue 13's example)."""
    return PairStats(chosen_logps=t(-2.0, -2.0), rejected_logps=t(-3.0, -3.0), chosen_lengths=t(2.0, 8.0),
                     rejected_lengths=t(1.0, 1.0), ref_chosen_logps=t(-2.0, -2.0),
                     ref_rejected_logps=t(-3.0, -3.0), **kw)


def test_nll_normalization_sequence_and_token():
    seq = compute_loss("sft", two_chosen(), LossConfig())
    assert seq.loss_sum.item() / 2 == pytest.approx(0.625)  # mean(1, 0.25)
    tok = compute_loss("sft", two_chosen(), LossConfig(nll_normalization="token"))
    assert tok.loss_sum.item() / 2 == pytest.approx(0.4)  # 4 / 10 tokens, TRL's sft
    # The same for --sft-weight and ORPO's NLL term.
    for name, cfg in (("dpo", {"sft_weight": 1.0}), ("orpo", {})):
        a = compute_loss(name, two_chosen(), LossConfig(**cfg)).loss_sum.item()
        b = compute_loss(name, two_chosen(), LossConfig(nll_normalization="token", **cfg)).loss_sum.item()
        assert (a - b) / 2 == pytest.approx(0.625 - 0.4)


def test_token_nll_is_split_invariant_with_the_global_ratio():
    """Micro-batches of one pair each, given the global pairs/chosen-tokens ratio, add up to the
    global token mean; the local fallback (P / N per micro-batch) does not (negative control)."""
    whole = compute_loss("sft", two_chosen(), LossConfig(nll_normalization="token")).loss_sum.item()
    parts = local = 0.0
    for i in range(2):
        s = two_chosen()
        part = PairStats(**{f.name: (getattr(s, f.name)[i:i + 1] if isinstance(getattr(s, f.name), torch.Tensor)
                                     else None) for f in dataclasses.fields(s)})
        local += compute_loss("sft", part, LossConfig(nll_normalization="token")).loss_sum.item()
        part.pairs_per_chosen_token = 2 / 10
        parts += compute_loss("sft", part, LossConfig(nll_normalization="token")).loss_sum.item()
    assert parts == pytest.approx(whole)
    assert local != pytest.approx(whole)


# --------------------------------------------------------------------------- #
# LD-DPO (--ld-alpha) and WPO (--use-weighting): closed forms through the step's pair_statistics
# --------------------------------------------------------------------------- #
def _pack_with_token_logps(token_logps_by_seq):
    """A pack of one pair (prompt [1], chosen, rejected) and logits whose label log-probs are
    the given values: logits put log p on the label and spread the rest uniformly."""
    from tests.packs import make_pack

    vocab = 4
    chosen, rejected = token_logps_by_seq
    pack = make_pack([([1], [1] * len(chosen), [1] * len(rejected))], pad_to_multiple=1)
    values = torch.zeros(pack.tokens.numel(), dtype=T)
    cu = pack.cu_seqlens.tolist()
    for s, logps in enumerate((chosen, rejected)):
        idx = [i for i in range(cu[s], cu[s + 1]) if pack.loss_mask[i] > 0]
        values[idx] = torch.tensor(logps, dtype=T)
    # logit of the label = log p, the other 3 share 1 - p: log((1 - p) / 3).
    p = values.exp().clamp(max=1 - 1e-12)
    logits = torch.log((1 - p) / (vocab - 1))[:, None].repeat(1, vocab)
    logits.scatter_(1, pack.labels[:, None], values[:, None])
    return pack, logits, vocab


def test_ld_alpha_damps_the_tokens_past_the_shared_length():
    from megatron_pref.losses import length_desensitised_logps
    from megatron_pref.step import pair_statistics

    assert length_desensitised_logps(t(-10.0), t(-4.0), 0.25).item() == pytest.approx(-4.0 - 0.25 * 6.0)
    pack, logits, vocab = _pack_with_token_logps(([-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5, -4.0, -8.0]))
    stats = pair_statistics(logits, pack, vocab, ld_alpha=0.5)
    # Shared length 3: chosen untouched; rejected = -1.5 + 0.5 * (-12).
    assert stats.chosen_logps.item() == pytest.approx(-6.0, abs=1e-5)
    assert stats.rejected_logps.item() == pytest.approx(-7.5, abs=1e-5)
    # Lengths stay the full response lengths (IPO's and sigmoid_norm's averages, as TRL).
    assert stats.rejected_lengths.item() == 5
    # Control: no ld_alpha is the plain sum.
    assert pair_statistics(logits, pack, vocab).rejected_logps.item() == pytest.approx(-13.5, abs=1e-5)


def test_wpo_weights_closed_form():
    """Uniform logits: log p = log sum p^2 = -log V, so every weight is exp(0) = 1; a peaked
    distribution gives p / sum p^2 per token."""
    from megatron_pref.losses import wpo_pair_weights
    from megatron_pref.step import pair_statistics, pair_stats_for_loss, MicroBatch

    pack, logits, vocab = _pack_with_token_logps(([math.log(0.25)] * 2, [math.log(0.25)] * 3))
    stats = pair_statistics(logits, pack, vocab, wpo=True)
    assert stats.chosen_wpo_logweights.item() == pytest.approx(0.0, abs=1e-6)
    pack, logits, vocab = _pack_with_token_logps(([math.log(0.7)], [math.log(0.1)]))
    stats = pair_statistics(logits, pack, vocab, wpo=True)
    sq_c, sq_r = 0.7 ** 2 + 3 * 0.1 ** 2, 0.1 ** 2 + 3 * 0.3 ** 2
    w = wpo_pair_weights(pair_stats_for_loss(stats, MicroBatch(pack)))
    assert w.item() == pytest.approx((0.7 / sq_c) * (0.1 / sq_r), rel=1e-5)
    # The weight multiplies every pair loss, and carries no gradient.
    s = generic_stats(grad=True)
    s.chosen_wpo_logweights, s.rejected_wpo_logweights = t(-0.1, -0.5), t(-0.2, -1.0)
    base = compute_loss("dpo", s, LossConfig())
    out = compute_loss("dpo", s, LossConfig(use_weighting=True))
    torch.testing.assert_close(out.pair_losses, base.pair_losses * torch.exp(t(-0.3, -1.5)))
    assert not out.metrics["wpo/weight"].requires_grad


def test_use_weighting_refused_where_pairs_have_no_own_loss():
    for name in ("aot", "aot_unpaired", "slime"):
        with pytest.raises(ValueError, match="--use-weighting does not apply"):
            compute_loss(name, generic_stats(), LossConfig(use_weighting=True))
    with pytest.raises(ValueError, match="ld_alpha"):
        LossConfig(ld_alpha=1.5).validate()


def test_bco_running_mean_closed_form():
    from megatron_pref.losses import bco_running_mean_update

    s = one_pair(RC, RR)
    s.bco_reward_shift = 0.3
    out = compute_loss("bco_pair", s, LossConfig(beta=BETA, bco_running_mean=True))
    assert out.loss_sum.item() == pytest.approx(-logsig(BETA * RC - 0.3) - logsig(-(BETA * RR - 0.3)), rel=1e-12)
    assert out.metrics["bco/reward"].item() == pytest.approx(BETA * (RC + RR) / 2)
    # Without the flag (TRL 1.16) the shift is not used.
    assert compute_loss("bco_pair", s, LossConfig(beta=BETA)).loss_sum.item() == pytest.approx(
        CLOSED_FORMS["bco_pair"][1], rel=1e-12)
    # The running mean of per-step mean rewards: steps 0.2 (over 4 pairs) and -0.6 -> -0.2.
    state = {}
    bco_running_mean_update(state, {"bco/reward": 0.8}, 4)
    bco_running_mean_update(state, {"bco/reward": -1.2}, 2)
    assert state == {"bco_steps": 2, "bco_mean": pytest.approx(-0.2)}
    with pytest.raises(ValueError, match="--bco-running-mean only applies to bco_pair"):
        compute_loss("dpo", s, LossConfig(bco_running_mean=True))


def test_slime_counts_zero_log_prob_rejected_tokens():
    """The formula counts a rejected token with log-prob exactly 0.0; the authors' released trainer
    drops it (its mask is logp != 0): chosen [-0.5], rejected [0.0, -2.0] at paper defaults give
    0.897797 here and 0.965109 there (the authors' stabiliser averages the -2.0 token alone)."""
    s = PairStats(chosen_logps=t(-0.5), rejected_logps=t(-2.0), chosen_lengths=t(1.0), rejected_lengths=t(2.0),
                  rejected_token_logps=t(0.0, -2.0))
    assert compute_loss("slime", s, LossConfig()).loss_sum.item() == pytest.approx(0.897797, abs=1e-6)
    dropped = PairStats(chosen_logps=t(-0.5), rejected_logps=t(-2.0), chosen_lengths=t(1.0),
                        rejected_lengths=t(2.0), rejected_token_logps=t(-2.0), pairs_per_rejected_token=1.0)
    assert compute_loss("slime", dropped, LossConfig(), check_values=False).loss_sum.item() == pytest.approx(
        0.965109, abs=1e-6)
