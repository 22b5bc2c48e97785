"""Parallel correctness on CPU/gloo: TP, PP, DP and micro-batching give the same loss and
gradients; packed equals padded. Tiny GPTModels, fp32."""

import math
from functools import partial

import pytest
import torch

from megatron_pref.arguments import OptimConfig
from megatron_pref.engine import build_model_chunks, build_optimizer, global_pair_counts, run_schedule
from megatron_pref.losses import LossConfig
from megatron_pref.model import ModelConfig, ParallelConfig, PrecisionConfig, layout_invariant_init, unwrap_model
from megatron_pref.step import MicroBatch, preference_forward_step, preference_loss_func
from tests.packs import random_pairs, split_into_packs

VOCAB = 300  # padded to 384 / 512 at TP 1 / 2: the padded columns must not matter
SEED = 7
MODEL = ModelConfig(vocab_size=VOCAB, num_layers=4, hidden_size=32, num_attention_heads=4,
                    num_query_groups=2, ffn_hidden_size=64, max_position_embeddings=128,
                    normalization="RMSNorm", swiglu=True, untie_embeddings_and_output_weights=True)
PAIRS = random_pairs(6, VOCAB, seed=3)
PACK_SIZES = (2, 1, 3)


def reference_logps(pair_ids):
    g = torch.Generator().manual_seed(11)
    table = -torch.rand(len(PAIRS), 2, generator=g) * 20
    return table[pair_ids, 0], table[pair_ids, 1]


def micro_batches(packs, with_reference):
    out = []
    for pack in packs:
        ref_c, ref_r = reference_logps(pack.pair_ids) if with_reference else (None, None)
        out.append(MicroBatch(pack, ref_c, ref_r))
    return out


def _gather_tp(tensor, dim):
    from megatron.core import parallel_state as ps

    world = ps.get_tensor_model_parallel_world_size()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)


def _one_step(parallel, model_cfg, loss_name, pack_sizes, dp_split=True, overlap_grad_reduce=False):
    """Loss, grad norm and selected full gradients after one backward on the global batch."""
    from megatron.core import parallel_state as ps

    chunks = build_model_chunks(model_cfg, parallel, PrecisionConfig(), overlap_grad_reduce=overlap_grad_reduce)
    for chunk in chunks:
        layout_invariant_init(chunk, model_cfg, SEED)
    optimizer = build_optimizer(chunks, OptimConfig(lr=0.0, clip_grad=1e9), PrecisionConfig())
    packs = split_into_packs(PAIRS, pack_sizes)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if dp_split:
        packs = packs[dp_rank::dp]
    micro = micro_batches(packs, with_reference=loss_name in ("dpo", "spo"))

    pairs, rejected_tokens = global_pair_counts(micro)
    for m in micro:
        m.pairs_per_rejected_token = pairs / rejected_tokens
    for chunk in chunks:
        chunk.zero_grad_buffer()
    forward_step = preference_forward_step(loss_name, LossConfig(beta=0.5), VOCAB, use_thd=False)
    outputs = run_schedule(chunks, micro, forward_step, forward_only=False, optimizer=optimizer)
    loss_sum = torch.tensor(sum(float(o["loss"]) for o in outputs), dtype=torch.float64)
    torch.distributed.all_reduce(loss_sum, group=ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(loss_sum, group=ps.get_pipeline_model_parallel_group())
    _, grad_norm, _ = optimizer.step()

    gpt = unwrap_model(chunks[0])
    result = {"loss": float(loss_sum) / pairs, "grad_norm": grad_norm}
    if ps.is_pipeline_first_stage():
        grad = _gather_tp(gpt.embedding.word_embeddings.weight.main_grad, 0)
        result["embedding_grad"] = grad[:VOCAB].clone()
    last = unwrap_model(chunks[-1])
    if ps.is_pipeline_last_stage():
        result["final_norm_grad"] = last.decoder.final_layernorm.weight.main_grad.clone()
        result["output_grad"] = _gather_tp(last.output_layer.weight.main_grad, 0)[:VOCAB].clone()
    return result


def _merged(results):
    merged = {}
    for r in results:
        for k, v in r.items():
            merged.setdefault(k, v)
    return merged


_BASELINES = {}


def baseline(distributed, loss_name):
    if loss_name not in _BASELINES:
        _BASELINES[loss_name] = _merged(distributed(_one_step, 1, ParallelConfig(), ParallelConfig(),
                                                    MODEL, loss_name, PACK_SIZES))
    return _BASELINES[loss_name]


def assert_same_step(got, want, atol=1e-5):
    assert math.isfinite(want["loss"])
    assert got["loss"] == pytest.approx(want["loss"], abs=atol)
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    for key in ("embedding_grad", "final_norm_grad", "output_grad"):
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=1e-4)


LAYOUTS = {
    "tp2": (2, ParallelConfig(tensor_model_parallel_size=2)),
    "pp2": (2, ParallelConfig(pipeline_model_parallel_size=2)),
    "dp2": (2, ParallelConfig()),
    "tp2pp2": (4, ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)),
    "pp2vpp2": (2, ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)),
    # Two micro-batches per DP rank: every one of the first stage's is in the warm-up phase.
    "pp2vpp2dp2": (4, ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)),
}


# DPO on every layout; SLIME (token-level normalisation across packs and ranks) on the basic ones.
@pytest.mark.parametrize("loss_name,layout", [("dpo", name) for name in LAYOUTS] +
                         [("slime", name) for name in ("tp2", "pp2", "dp2")])
def test_parallel_layouts_match_single_rank(distributed, layout, loss_name):
    world, parallel = LAYOUTS[layout]
    got = _merged(distributed(_one_step, world, parallel, parallel, MODEL, loss_name, PACK_SIZES))
    assert_same_step(got, baseline(distributed, loss_name))


# --overlap-grad-reduce: the reduction starts inside the schedule (per chunk, bucket by bucket)
# instead of in finalize_model_grads; the gradients must not change. Data parallel with several
# micro-batches per rank (no_sync until the last), with 1F1B, and with virtual stages.
@pytest.mark.parametrize("world,parallel", [
    (2, ParallelConfig()),
    (4, ParallelConfig(pipeline_model_parallel_size=2)),
    (4, ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)),
], ids=["dp2", "pp2dp2", "pp2vpp2dp2"])
def test_overlap_grad_reduce_matches_single_rank(distributed, world, parallel):
    got = _merged(distributed(_one_step, world, parallel, parallel, MODEL, "dpo", PACK_SIZES, True, True))
    assert_same_step(got, baseline(distributed, "dpo"))


@pytest.mark.parametrize("sizes", [(6,), (1, 1, 1, 1, 1, 1), (4, 2)])
def test_micro_batch_split_invariance(distributed, sizes):
    got = _merged(distributed(_one_step, 1, ParallelConfig(), ParallelConfig(), MODEL, "slime", sizes))
    want = baseline(distributed, "slime")
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    for key in ("embedding_grad", "final_norm_grad", "output_grad"):
        assert_relative_error_below(got[key], want[key], 1e-6)


def assert_relative_error_below(got, want, tolerance):
    """||got - want|| / ||want|| (fp32 sums in another order differ in the last bits)."""
    error = float((got.double() - want.double()).norm() / want.double().norm())
    assert error < tolerance, f"relative error {error:.3g} >= {tolerance}"


def _legacy_mean_loss_func(output_tensor, micro, **kwargs):
    """Negative control: megatron's 2-tuple path averages per micro-batch instead of per pair."""
    loss_sum, num_pairs, metrics = preference_loss_func(output_tensor, micro, **kwargs)
    return loss_sum / num_pairs, metrics


def _legacy_step(sizes):
    from megatron_pref.step import make_forward_step

    chunks = build_model_chunks(MODEL, ParallelConfig(), PrecisionConfig())
    layout_invariant_init(chunks[0], MODEL, SEED)
    for c in chunks:
        c.config.calculate_per_token_loss = False
    optimizer = build_optimizer(chunks, OptimConfig(lr=0.0, clip_grad=1e9), PrecisionConfig())
    micro = micro_batches(split_into_packs(PAIRS, sizes), with_reference=True)
    forward_step = make_forward_step(
        lambda m: partial(_legacy_mean_loss_func, micro=m, loss_name="dpo", loss_config=LossConfig(beta=0.5),
                          true_vocab_size=VOCAB, chunk_tokens=1024), use_thd=False)
    chunks[0].zero_grad_buffer()
    run_schedule(chunks, micro, forward_step, forward_only=False, optimizer=optimizer)
    return unwrap_model(chunks[0]).decoder.final_layernorm.weight.main_grad.clone()


def test_per_micro_batch_averaging_would_break_invariance(distributed):
    """Negative control: with unequal packs, averaging per micro-batch changes the gradient."""
    (uneven,) = distributed(_legacy_step, 1, ParallelConfig(), (1, 5))
    (whole,) = distributed(_legacy_step, 1, ParallelConfig(), (6,))
    assert (uneven - whole).abs().max() > 1e-4
    want = baseline(distributed, "dpo")["final_norm_grad"]
    assert_relative_error_below(whole, want, 1e-6)  # one micro-batch: both normalisations agree


# --------------------------------------------------------------------------- packed = padded


def _per_sequence_logps(model_cfg, boundaries=True):
    from megatron_pref.logprobs import segment_sums, token_logprobs
    from megatron_pref.model import build_gpt_model, packed_forward_inputs

    gpt = build_gpt_model(model_cfg, ParallelConfig(), PrecisionConfig())
    layout_invariant_init(gpt, model_cfg, SEED)
    pack = split_into_packs(PAIRS, (len(PAIRS),))[0]
    cu = pack.cu_seqlens if boundaries else torch.tensor([0, int(pack.cu_seqlens[-1])], dtype=torch.int32)
    inputs = packed_forward_inputs(pack.tokens, pack.position_ids, cu, use_thd=False)
    logits = gpt(inputs.input_ids, inputs.position_ids, inputs.attention_mask)[0]
    packed, _ = segment_sums(token_logprobs(logits, pack.labels, VOCAB), pack.loss_mask, pack.cu_seqlens)

    # Padded: one row per sequence, right-padded, causal mask; positions from 0.
    starts, ends = pack.cu_seqlens[:-1].tolist(), pack.cu_seqlens[1:].tolist()
    longest = max(e - s for s, e in zip(starts, ends))
    rows = len(starts)
    tokens = torch.zeros(rows, longest, dtype=torch.long)
    labels = torch.zeros(rows, longest, dtype=torch.long)
    mask = torch.zeros(rows, longest)
    for i, (s, e) in enumerate(zip(starts, ends)):
        tokens[i, :e - s] = pack.tokens[s:e]
        labels[i, :e - s] = pack.labels[s:e]
        mask[i, :e - s] = pack.loss_mask[s:e]
    causal = torch.triu(torch.ones(longest, longest, dtype=torch.bool), 1)[None, None]
    positions = torch.arange(longest).expand(rows, longest)
    padded_logits = gpt(tokens, positions, causal)
    padded = (token_logprobs(padded_logits, labels, VOCAB) * mask).sum(-1)
    return packed.detach(), padded.detach()


@pytest.mark.parametrize("position_embedding_type", ["rope", "learned_absolute"])
def test_packed_equals_padded(distributed, position_embedding_type):
    cfg = ModelConfig(**{**MODEL.to_dict(), "position_embedding_type": position_embedding_type})
    (packed, padded), = distributed(_per_sequence_logps, 1, ParallelConfig(), cfg)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)


def test_packed_without_boundaries_differs(distributed):
    """Negative control: one causal span over the whole pack leaks across sequences."""
    (leaky, padded), = distributed(_per_sequence_logps, 1, ParallelConfig(), MODEL, False)
    assert (leaky - padded)[1:].abs().max() > 1e-3


def _steps_with_torch_adam(fused: bool, steps: int = 3):
    """Parameters after a few Adam steps, with megatron-core's torch Adam fallback as it is or
    switched to the fused kernel (on CPU here; build_optimizer switches it on GPUs)."""
    from megatron_pref.engine import use_fused_torch_adam

    chunks = build_model_chunks(MODEL, ParallelConfig(), PrecisionConfig())
    layout_invariant_init(chunks[0], MODEL, SEED)
    optimizer = build_optimizer(chunks, OptimConfig(lr=1e-2, clip_grad=1e9), PrecisionConfig())
    switched = use_fused_torch_adam(optimizer, devices=("cpu",)) if fused else 0
    groups = [g for o in getattr(optimizer, "chained_optimizers", [optimizer]) for g in o.optimizer.param_groups]
    forward_step = preference_forward_step("dpo", LossConfig(beta=0.5), VOCAB, use_thd=False)
    for _ in range(steps):
        chunks[0].zero_grad_buffer()
        optimizer.zero_grad()
        micro = micro_batches(split_into_packs(PAIRS, PACK_SIZES), with_reference=True)
        pairs, rejected_tokens = global_pair_counts(micro)
        for m in micro:
            m.pairs_per_rejected_token = pairs / rejected_tokens
        run_schedule(chunks, micro, forward_step, forward_only=False, optimizer=optimizer)
        optimizer.step()
    # Once stepped, the optimizer keeps its layout: switching now would be refused.
    again = use_fused_torch_adam(optimizer, devices=("cpu",))
    params = {n: p.detach().clone() for n, p in unwrap_model(chunks[0]).named_parameters()}
    return switched, again, [bool(g.get("fused")) for g in groups], params


def test_fused_torch_adam_fallback_matches_the_foreach_step(distributed):
    (plain,) = distributed(_steps_with_torch_adam, 1, ParallelConfig(), False)
    (fused,) = distributed(_steps_with_torch_adam, 1, ParallelConfig(), True)
    assert plain[0] == 0 and not any(plain[2])
    assert fused[0] >= 1 and all(fused[2]) and fused[1] == 0
    moved = 0
    for name, value in fused[3].items():
        assert torch.allclose(value, plain[3][name], atol=1e-5, rtol=1e-5), name
        moved += 1
    assert moved > 0
    # Control: the optimizer did move the weights (a no-op step would also "match").
    initial = distributed(_steps_with_torch_adam, 1, ParallelConfig(), False, 0)[0][3]
    assert any(not torch.allclose(initial[n], plain[3][n]) for n in initial)


def _adam_step(parallel, use_distributed_optimizer: bool, overlap_grad_reduce: bool):
    """Loss, grad norm and full updated weights after one optimizer step on the global batch.
    Adam's epsilon is large, so the update is smooth in the gradient (near lr * g): reduction-
    order noise cannot flip the sign of a near-zero update."""
    from megatron.core import parallel_state as ps

    chunks = build_model_chunks(MODEL, parallel, PrecisionConfig(), use_distributed_optimizer=use_distributed_optimizer,
                                overlap_grad_reduce=overlap_grad_reduce)
    layout_invariant_init(chunks[0], MODEL, SEED)
    initial = {n: p.detach().clone() for n, p in unwrap_model(chunks[0]).named_parameters()}
    optim = OptimConfig(lr=1e-2, clip_grad=1e9, adam_eps=1.0, use_distributed_optimizer=use_distributed_optimizer)
    optimizer = build_optimizer(chunks, optim, PrecisionConfig())
    packs = split_into_packs(PAIRS, PACK_SIZES)[ps.get_data_parallel_rank()::ps.get_data_parallel_world_size()]
    micro = micro_batches(packs, with_reference=True)
    pairs, rejected_tokens = global_pair_counts(micro)
    for m in micro:
        m.pairs_per_rejected_token = pairs / rejected_tokens
    forward_step = preference_forward_step("dpo", LossConfig(beta=0.5), VOCAB, use_thd=False)
    outputs = run_schedule(chunks, micro, forward_step, forward_only=False, optimizer=optimizer)
    loss_sum = torch.tensor(sum(float(o["loss"]) for o in outputs), dtype=torch.float64)
    torch.distributed.all_reduce(loss_sum, group=ps.get_data_parallel_group())
    _, grad_norm, _ = optimizer.step()
    gpt = unwrap_model(chunks[0])
    weights = {n: p.detach().clone() for n, p in gpt.named_parameters()}
    moved = max(float((weights[n] - initial[n]).abs().max()) for n in weights)
    # As numpy arrays: pickled by value (many shared-memory tensors overrun the result queue).
    return {"loss": float(loss_sum) / pairs, "grad_norm": grad_norm, "moved": moved,
            "weights": {n: w.numpy() for n, w in weights.items()}}


@pytest.mark.parametrize("overlap_grad_reduce", [False, True], ids=["", "overlap"])
def test_distributed_optimizer_matches_single_rank(distributed, overlap_grad_reduce):
    """The distributed optimizer (Adam states sharded over DP=2, reduce-scatter of gradients,
    all-gather of parameters) updates every weight as a single rank with a plain optimizer."""
    (want,) = distributed(_adam_step, 1, ParallelConfig(), ParallelConfig(), False, False)
    got = distributed(_adam_step, 2, ParallelConfig(), ParallelConfig(), True, overlap_grad_reduce)
    for rank in got:
        assert rank["loss"] == pytest.approx(want["loss"], abs=1e-6)
        assert rank["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
        for name, value in want["weights"].items():
            torch.testing.assert_close(torch.from_numpy(rank["weights"][name]), torch.from_numpy(value),
                                       atol=1e-6, rtol=1e-5, msg=name)
    # Control: the step moved the weights by far more than the tolerance.
    assert want["moved"] > 1e-4
