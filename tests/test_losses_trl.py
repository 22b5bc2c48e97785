"""Our losses against TRL's own DPOTrainer code on identical inputs (value, gradient, metrics).

TRL 1.16.0 is in the ``test`` extra. Its DPOTrainer has no standalone loss function: the loss
lives in ``DPOTrainer._compute_loss(model, inputs, return_outputs)``, which we call on a trainer
built with ``object.__new__`` (no model, no download) whose ``model`` returns given per-token
log-probs. Both sides get the same leaf tensor of per-token log-probs, so the gradients are
compared token by token.

``python tests/test_losses_trl.py`` prints the per-loss max relative differences.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from megatron_pref.losses import LossConfig, PairStats, compute_loss

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install -e .[test] installs trl==1.16.0)")
from trl import DPOTrainer  # noqa: E402

TRL_VERSION = "1.16.0"

#: Our name -> TRL 1.16's loss_type.
TRL_LOSS_NAMES = {"dpo": "sigmoid", "hinge": "hinge", "ipo": "ipo", "sigmoid_norm": "sigmoid_norm",
                  "exo_pair": "exo_pair", "nca_pair": "nca_pair", "robust": "robust", "bco_pair": "bco_pair",
                  "sppo_hard": "sppo_hard", "aot": "aot", "aot_unpaired": "aot_unpaired",
                  "apo_zero": "apo_zero", "apo_down": "apo_down", "discopop": "discopop", "sft": "sft"}


def make_batch(num_pairs=6, max_len=12, seed=0, dtype=torch.float64, equal_lengths=False):
    """Per-token log-probs ``[2P, T-1]`` (chosen rows first, as TRL's batch) with masks."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (2 * num_pairs,), generator=g)
    if equal_lengths:
        lengths[:] = max_len // 2
    width = max_len  # T - 1 (one prompt token, then the completion)
    positions = torch.arange(width)[None, :]
    shift_mask = (positions < lengths[:, None]).to(torch.long)
    completion_mask = torch.cat([torch.zeros(2 * num_pairs, 1, dtype=torch.long), shift_mask], dim=1)
    policy = (-3.0 * torch.rand(2 * num_pairs, width, generator=g, dtype=dtype)) * shift_mask
    reference = (policy + 0.4 * torch.randn(2 * num_pairs, width, generator=g, dtype=dtype)).clamp(max=0.0)
    reference = reference * shift_mask
    log_sum_sq = -torch.rand(2 * num_pairs, width, generator=g, dtype=dtype) * shift_mask
    return SimpleNamespace(policy=policy.requires_grad_(True), reference=reference, shift_mask=shift_mask,
                           completion_mask=completion_mask, log_sum_sq=log_sum_sq, num_pairs=num_pairs)


def _fake_model(per_token, log_sum_sq):
    def model(**kwargs):
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros.detach(), mean_logits=zeros.detach(),
                               is_top1=torch.zeros(per_token.shape, dtype=torch.bool),
                               log_sum_sq_probs=log_sum_sq, aux_loss=None)
    return model


def trl_loss(batch, loss_types, weights=None, *, beta=0.1, label_smoothing=0.0, f_divergence_type="reverse_kl",
             f_alpha_divergence_coef=0.5, discopop_tau=0.05, ld_alpha=None, use_weighting=False):
    """TRL 1.16's DPO loss and metrics on ``batch`` (reference from per-token log-probs)."""
    trainer = object.__new__(DPOTrainer)
    trainer.model = SimpleNamespace(training=True, is_gradient_checkpointing=False)
    trainer.accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x.reshape(-1),
                                          gather=lambda x: x)
    trainer.args = SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None)
    trainer.aux_loss_enabled = False
    trainer.precompute_ref_logps = False
    trainer.ref_model = _fake_model(batch.reference, batch.log_sum_sq)
    trainer.beta = beta
    trainer.label_smoothing = label_smoothing
    trainer.loss_types = list(loss_types)
    trainer.loss_weights = list(weights) if weights is not None else [1.0] * len(loss_types)
    trainer.ld_alpha = ld_alpha
    trainer.f_divergence_type = f_divergence_type
    trainer.f_alpha_divergence_coef = f_alpha_divergence_coef
    trainer.use_weighting = use_weighting
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    rows = batch.completion_mask.shape[0]
    inputs = {"input_ids": torch.zeros_like(batch.completion_mask), "attention_mask": torch.ones_like(
        batch.completion_mask), "completion_mask": batch.completion_mask}
    per_token = batch.policy * batch.shift_mask  # TRL's model gives 0 at label -100
    loss = trainer._compute_loss(_fake_model(per_token, batch.log_sum_sq), inputs, return_outputs=False)
    assert rows == 2 * batch.num_pairs
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss, metrics


def our_stats(batch) -> PairStats:
    sums = (batch.policy * batch.shift_mask).sum(1)
    ref = (batch.reference * batch.shift_mask).sum(1)
    lengths = batch.shift_mask.sum(1).to(sums.dtype)
    p = batch.num_pairs
    return PairStats(chosen_logps=sums[:p], rejected_logps=sums[p:], chosen_lengths=lengths[:p],
                     rejected_lengths=lengths[p:], ref_chosen_logps=ref[:p], ref_rejected_logps=ref[p:])


def our_loss(batch, spec, **config):
    out = compute_loss(spec, our_stats(batch), LossConfig(**config))
    return out.loss_sum / batch.num_pairs, out


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(max |b|, tiny)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


def compare(spec, trl_types, weights=None, dtype=torch.float64, seed=0, equal_lengths=False, trl_overrides=None,
            **config):
    """(value rel diff, gradient rel diff, our metrics, TRL metrics) of one loss on one batch."""
    ours_batch = make_batch(seed=seed, dtype=dtype, equal_lengths=equal_lengths)
    theirs_batch = make_batch(seed=seed, dtype=dtype, equal_lengths=equal_lengths)
    ours, out = our_loss(ours_batch, spec, **({"loss_weights": ",".join(map(str, weights))} if weights else {}),
                         **config)
    ours.backward()
    trl_config = {**{k: v for k, v in config.items() if k not in ("sft_weight", "nll_normalization")},
                  **(trl_overrides or {})}
    theirs, theirs_metrics = trl_loss(theirs_batch, trl_types, weights, **trl_config)
    theirs.backward()
    our_metrics = {k: float(v.float().mean()) for k, v in out.metrics.items()}
    return (rel_diff(ours, theirs), rel_diff(ours_batch.policy.grad, theirs_batch.policy.grad), our_metrics,
            theirs_metrics)


# One configuration per loss: (our spec, TRL types, weights, config). label_smoothing 0.1 exercises
# robust/aot (exo_pair needs > 0), tau 0.5 keeps discopop's mixture away from a step function.
CASES = {
    "dpo": ("dpo", ["sigmoid"], None, {}),
    "hinge": ("hinge", ["hinge"], None, {"beta": 0.05}),
    "ipo": ("ipo", ["ipo"], None, {}),
    "sigmoid_norm": ("sigmoid_norm", ["sigmoid_norm"], None, {"beta": 2.0}),
    "exo_pair": ("exo_pair", ["exo_pair"], None, {"label_smoothing": 1e-3}),
    "nca_pair": ("nca_pair", ["nca_pair"], None, {}),
    "robust": ("robust", ["robust"], None, {"label_smoothing": 0.1}),
    "bco_pair": ("bco_pair", ["bco_pair"], None, {}),
    "sppo_hard": ("sppo_hard", ["sppo_hard"], None, {}),
    "aot": ("aot", ["aot"], None, {"label_smoothing": 0.1}),
    "aot_unpaired": ("aot_unpaired", ["aot_unpaired"], None, {"label_smoothing": 0.1}),
    "apo_zero": ("apo_zero", ["apo_zero"], None, {}),
    "apo_down": ("apo_down", ["apo_down"], None, {}),
    "discopop": ("discopop", ["discopop"], None, {"discopop_tau": 0.5}),
    "discopop_tau_default": ("discopop", ["discopop"], None, {}),
    # Combinations, as TRL's loss_type list + loss_weights (MPO-style, RPO = dpo,sft).
    "dpo,sft": ("dpo,sft", ["sigmoid", "sft"], [1.0, 0.2], {"equal_lengths": True}),
    "dpo,bco_pair,sft": ("dpo,bco_pair,sft", ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0],
                         {"equal_lengths": True}),
    "ipo,apo_zero": ("ipo,apo_zero", ["ipo", "apo_zero"], [0.5, 2.0], {}),
    # TRL's sft is the mean over every chosen token of the batch: our --nll-normalization token.
    "sft[token]": ("sft", ["sft"], None, {"nll_normalization": "token"}),
    "dpo,sft[token]": ("dpo,sft", ["sigmoid", "sft"], [1.0, 0.2], {"nll_normalization": "token"}),
}
for _kind in ("forward_kl", "js_divergence"):
    for _name in ("dpo", "hinge", "ipo", "sigmoid_norm", "exo_pair", "robust", "discopop"):
        _spec, _types, _w, _cfg = CASES[_name]
        CASES[f"{_name}[{_kind}]"] = (_spec, _types, _w, {**_cfg, "f_divergence_type": _kind})
for _alpha in (0.5, 0.9):
    # TRL's alpha_divergence has no float64 branch (its clamp table): compared in float32.
    CASES[f"dpo[alpha_divergence {_alpha}]"] = ("dpo", ["sigmoid"], None, {
        "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": _alpha, "dtype": torch.float32})

# float64 agreement; float32 cases are bounded by float32 rounding.
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_matches_trl(case):
    spec, types, weights, config = CASES[case]
    config = dict(config)
    dtype = config.pop("dtype", torch.float64)
    equal = config.pop("equal_lengths", False)
    value, grad, ours, theirs = compare(spec, types, weights, dtype=dtype, equal_lengths=equal, **config)
    # TRL's exo_pair holds epsilon in a float32 tensor (torch.tensor(label_smoothing)), so its
    # log(1 - eps) and log(eps) carry float32 rounding (~2e-8 relative) even in float64.
    tol = 1e-7 if spec == "exo_pair" else TOL[dtype]
    assert value < tol and grad < tol, (value, grad)
    # Metrics: TRL 1.16's sequence-level rewards and logps, for every loss. (Our reference-free
    # sft logs beta * lbar, as TRL's SFT-like trainers; TRL's DPOTrainer still logs beta * rho.)
    if spec == "sft":
        return
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), key


def test_trl_comparison_can_fail():
    """Negative control: a different beta (or TRL's label-smoothing-free sigmoid against our
    cDPO) is detected."""
    value, grad, _, _ = compare("dpo", ["sigmoid"], beta=0.1, trl_overrides={"beta": 0.2})
    assert value > 1e-4 and grad > 1e-2
    value, _, _, _ = compare("dpo", ["sigmoid"], label_smoothing=0.1)
    assert value > 1e-4  # TRL 1.16's sigmoid ignores label_smoothing; our dpo is cDPO
    value, grad, _, _ = compare("sft", ["sft"])  # per-response NLL (our default) is not TRL's
    assert value > 1e-3 and grad > 1e-2


def test_trl_version():
    assert trl.__version__ == TRL_VERSION


# --------------------------------------------------------------------------- #
# LD-DPO and WPO through the training step's pair_statistics (logits of a packed batch)
# --------------------------------------------------------------------------- #
VOCAB = 13


def _rows(values, pack):
    """Per-token values of a pack -> TRL's ``[2P, max_len]`` rows (chosen rows, then rejected),
    response tokens only, left aligned, zero padded; also the row mask."""
    num_pairs = pack.pair_ids.numel()
    rows = [[] for _ in range(2 * num_pairs)]
    cu = pack.cu_seqlens.tolist()
    for s in range(len(cu) - 1):
        row = int(pack.seq_pair_index[s]) + (0 if bool(pack.seq_is_chosen[s]) else num_pairs)
        rows[row] = [values[i] for i in range(cu[s], cu[s + 1]) if pack.loss_mask[i] > 0]
    width = max(len(r) for r in rows)
    out = torch.stack([torch.stack(r + [values.new_zeros(())] * (width - len(r))) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return out, mask


def _step_case(seed=0, num_pairs=5):
    from tests.packs import make_pack, random_pairs

    pack = make_pack(random_pairs(num_pairs, VOCAB, seed=seed))
    g = torch.Generator().manual_seed(seed + 100)
    total = pack.tokens.numel()
    logits = torch.randn(total, VOCAB, generator=g, dtype=torch.float64).requires_grad_(True)
    ref_logits = logits.detach() + 0.5 * torch.randn(total, VOCAB, generator=g, dtype=torch.float64)
    return pack, logits, ref_logits


def _trl_rows(logits, pack):
    logp = torch.log_softmax(logits, dim=-1).gather(1, pack.labels[:, None]).squeeze(1)
    p = torch.softmax(logits, dim=-1)
    log_sum_sq = torch.log((p * p).sum(-1)).detach()
    per_token, mask = _rows(logp, pack)
    sq_rows, _ = _rows(log_sum_sq, pack)
    return per_token, sq_rows, mask


def compare_step(spec, trl_types, seed=0, ld_alpha=None, use_weighting=False, **config):
    """(value rel diff, gradient rel diff w.r.t. the logits) of our step path against TRL."""
    from megatron_pref.step import MicroBatch, pair_statistics, pair_stats_for_loss

    pack, logits, ref_logits = _step_case(seed)
    num_pairs = pack.pair_ids.numel()
    cfg = LossConfig(ld_alpha=ld_alpha, use_weighting=use_weighting, **config)
    ref = pair_statistics(ref_logits, pack, VOCAB, ld_alpha=ld_alpha)
    stats = pair_statistics(logits, pack, VOCAB, ld_alpha=ld_alpha, wpo=use_weighting)
    micro = MicroBatch(pack, ref_chosen_logps=ref.chosen_logps, ref_rejected_logps=ref.rejected_logps)
    ours = compute_loss(spec, pair_stats_for_loss(stats, micro), cfg).loss_sum / num_pairs
    (ours_grad,) = torch.autograd.grad(ours, logits)

    per_token, sq_rows, mask = _trl_rows(logits, pack)
    ref_rows, _, _ = _trl_rows(ref_logits, pack)
    completion_mask = torch.cat([torch.zeros(mask.shape[0], 1, dtype=torch.long), mask], dim=1)
    batch = SimpleNamespace(policy=per_token, reference=ref_rows.detach(), shift_mask=mask,
                            completion_mask=completion_mask, log_sum_sq=sq_rows, num_pairs=num_pairs)
    theirs, _ = trl_loss(batch, trl_types, ld_alpha=ld_alpha, use_weighting=use_weighting, **config)
    (theirs_grad,) = torch.autograd.grad(theirs, logits)
    return rel_diff(ours, theirs), rel_diff(ours_grad, theirs_grad)


STEP_TOL = 3e-6
STEP_CASES = {
    "dpo[ld_alpha 0.5]": ("dpo", ["sigmoid"], {"ld_alpha": 0.5}),
    "dpo[ld_alpha 0]": ("dpo", ["sigmoid"], {"ld_alpha": 0.0}),
    "ipo[ld_alpha 0.3]": ("ipo", ["ipo"], {"ld_alpha": 0.3}),
    "dpo[use_weighting]": ("dpo", ["sigmoid"], {"use_weighting": True}),
    "bco_pair[use_weighting]": ("bco_pair", ["bco_pair"], {"use_weighting": True}),
    "dpo,apo_zero[use_weighting, ld_alpha 0.7]": ("dpo,apo_zero", ["sigmoid", "apo_zero"],
                                                 {"use_weighting": True, "ld_alpha": 0.7}),
    "dpo[step path]": ("dpo", ["sigmoid"], {}),
}


@pytest.mark.parametrize("case", sorted(STEP_CASES))
def test_step_options_match_trl(case):
    spec, types, config = STEP_CASES[case]
    value, grad = compare_step(spec, types, **config)
    # Our token log-probs are fp32 by design (logprobs.token_logprobs upcasts chunk by chunk);
    # TRL's side here is float64: agreement to fp32 rounding.
    assert value < STEP_TOL and grad < STEP_TOL, (value, grad)


def test_step_comparison_can_fail():
    """Negative controls: TRL with another LD alpha, or with WPO weights, differs from our
    plain LD-DPO at alpha 0.5 (so the comparisons above can fail)."""
    from megatron_pref.step import MicroBatch, pair_statistics, pair_stats_for_loss

    pack, logits, ref_logits = _step_case(0)
    ref = pair_statistics(ref_logits, pack, VOCAB, ld_alpha=0.5)
    stats = pair_statistics(logits, pack, VOCAB, ld_alpha=0.5)
    micro = MicroBatch(pack, ref_chosen_logps=ref.chosen_logps, ref_rejected_logps=ref.rejected_logps)
    ours = compute_loss("dpo", pair_stats_for_loss(stats, micro), LossConfig(ld_alpha=0.5)).loss_sum
    ours = ours / pack.pair_ids.numel()
    per_token, sq_rows, mask = _trl_rows(logits, pack)
    ref_rows, _, _ = _trl_rows(ref_logits, pack)
    completion_mask = torch.cat([torch.zeros(mask.shape[0], 1, dtype=torch.long), mask], dim=1)
    batch = SimpleNamespace(policy=per_token, reference=ref_rows.detach(), shift_mask=mask,
                            completion_mask=completion_mask, log_sum_sq=sq_rows, num_pairs=pack.pair_ids.numel())
    assert rel_diff(ours, trl_loss(batch, ["sigmoid"], ld_alpha=0.5)[0]) < STEP_TOL
    assert rel_diff(ours, trl_loss(batch, ["sigmoid"], ld_alpha=0.6)[0]) > 1e-4
    assert rel_diff(ours, trl_loss(batch, ["sigmoid"], ld_alpha=0.5, use_weighting=True)[0]) > 1e-2


if __name__ == "__main__":
    print(f"TRL {trl.__version__}: max relative difference, ours vs DPOTrainer._compute_loss")
    print(f"{'case':36s} {'value':>10s} {'gradient':>10s}")
    for case in sorted(CASES):
        spec, types, weights, config = CASES[case]
        config = dict(config)
        dtype = config.pop("dtype", torch.float64)
        equal = config.pop("equal_lengths", False)
        worst_v = worst_g = 0.0
        for seed in range(5):
            v, g, _, _ = compare(spec, types, weights, dtype=dtype, seed=seed, equal_lengths=equal, **config)
            worst_v, worst_g = max(worst_v, v), max(worst_g, g)
        print(f"{case:36s} {worst_v:10.1e} {worst_g:10.1e}  ({str(dtype).replace('torch.', '')})")
    print("through the training step's pair_statistics (fp32 token log-probs vs TRL in float64):")
    for case in sorted(STEP_CASES):
        spec, types, config = STEP_CASES[case]
        worst = [max(vals) for vals in zip(*(compare_step(spec, types, seed=seed, **config) for seed in range(5)))]
        print(f"{case:36s} {worst[0]:10.1e} {worst[1]:10.1e}")
