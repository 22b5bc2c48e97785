"""GPU checks of the H100 path: Transformer Engine layers, THD packing, FP8 (issue 5).

Every test here carries ``@pytest.mark.gpu`` (module-level ``pytestmark``): conftest.py skips
them without CUDA, and the ``gpu_env`` fixture skips them without Transformer Engine. Nothing
at module level imports TE, apex or megatron-core, so the module imports cleanly on CPU.

Measured values (step-0 biases, log-prob differences) are printed and, when
``MEGATRON_PREF_GPU_RECORD`` names a file, appended to it as JSON lines:

    MEGATRON_PREF_GPU_RECORD=$OUT/gpu_record.jsonl python -m pytest -m gpu -q tests/test_gpu.py

Tolerances marked PROVISIONAL were set before any GPU run (from the CPU calibration in
docs/gpu.md); tighten them from the recorded values.

Packs, pairs and the single-rank setup come from tools/benchmark_pref.py, so the benchmark and
these tests exercise the same code.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from megatron_pref.model import unwrap_model
from tests.test_packaging import load_benchmark

pytestmark = pytest.mark.gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 1234
VOCAB = 1000  # padded to 1024: the padded-vocab masking is exercised too
FP8_MULTIPLE = 16
LN2 = math.log(2.0)

# Per-token tolerance on per-sequence log-prob sums, TE+THD vs local+padded, both bf16.
# CPU calibration (local spec, init std 0.05): bf16 vs fp32 1.6e-3 nats/token; attention
# leaking across sequences changes them by 0.19 nats/token. PROVISIONAL.
LOGP_TOL_PER_TOKEN = 0.015
# |DPO loss at step 0 - ln 2| with the reference computed by the same model/recipe. PROVISIONAL.
STEP0_TOL = {"bf16": 1e-3, "tensorwise": 1e-2, "delayed": 1e-2}


def record(test: str, **values) -> None:
    line = json.dumps({"test": test, **values}, default=float)
    print("[gpu-record]", line)
    path = os.environ.get("MEGATRON_PREF_GPU_RECORD")
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a") as f:
            f.write(line + "\n")


def tiny_model_config():
    from megatron_pref.model import ModelConfig

    # Dimensions are multiples of 16 (FP8 GEMMs); init std 0.05 makes log-probs depend on context
    # enough for the leak control below to be far outside the tolerance.
    return ModelConfig(vocab_size=VOCAB, num_layers=2, hidden_size=128, num_attention_heads=4,
                       num_query_groups=2, ffn_hidden_size=384, max_position_embeddings=512,
                       normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
                       untie_embeddings_and_output_weights=True, init_method_std=0.05)


def precision(impl: str, fp8_recipe=None, bf16: bool = True):
    from megatron_pref.model import PrecisionConfig

    return PrecisionConfig(bf16=bf16, fp8_format="hybrid" if fp8_recipe else None,
                           fp8_recipe=fp8_recipe or "delayed", transformer_impl=impl)


def sample(bench, seed: int, num_pairs: int = 6):
    rng = np.random.default_rng(seed)
    return bench.sample_pairs(rng, num_pairs, VOCAB, prompt_median=24, response_median=32,
                              max_prompt=64, max_len=160)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build(model_cfg, prec, wrap_ddp=True, seed=SEED):
    from megatron_pref import engine
    from megatron_pref.model import ParallelConfig
    from megatron_pref.parallel import seed_everything

    seed_everything(seed)
    return engine.build_model_chunks(model_cfg, ParallelConfig(), prec, wrap_ddp=wrap_ddp)


def local_to_te_state_dict(local_state: dict) -> dict:
    """Local-spec GPTModel names -> TE-spec names.

    The TE spec fuses each pre-norm into the following linear: ``input_layernorm.weight`` ->
    ``self_attention.linear_qkv.layer_norm_weight`` and ``pre_mlp_layernorm.weight`` ->
    ``mlp.linear_fc1.layer_norm_weight``. Everything else keeps its name and layout.
    """
    out = {}
    for key, value in local_state.items():
        if key.endswith("_extra_state") or value is None:
            continue
        key = key.replace(".input_layernorm.weight", ".self_attention.linear_qkv.layer_norm_weight")
        key = key.replace(".pre_mlp_layernorm.weight", ".mlp.linear_fc1.layer_norm_weight")
        out[key] = value
    return out


def padded_sequence_logps(model, pairs, bench, true_vocab: int):
    """Per-pair log-prob sums from a [2P, Lmax] right-padded batch with a causal mask."""
    from megatron_pref.logprobs import token_logprobs

    ids, _, loss_mask = bench.hf_batch(pairs, device())
    rows, length = ids.shape
    positions = torch.arange(length, device=ids.device).expand(rows, length)
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=ids.device), 1)[None, None]
    logits = model(ids, positions, causal)  # [B, L, V/TP]
    logps = token_logprobs(logits[:, :-1].contiguous(), ids[:, 1:].contiguous(), true_vocab)
    sums = (logps * loss_mask).sum(-1)
    p = len(pairs)
    return sums[:p], sums[p:], loss_mask.sum(-1)[:p], loss_mask.sum(-1)[p:]


def packed_pair_logps(model, pack, true_vocab: int, use_thd: bool, cu_seqlens=None):
    """Per-pair log-prob sums of one pack through megatron_pref.step (optionally other segments)."""
    from megatron_pref import step
    from megatron_pref.model import packed_forward_inputs

    if cu_seqlens is None:
        logits = step.model_forward(model, pack, use_thd)
    else:  # the same tokens, attention segmented differently; the reduction keeps pack's segments
        inputs = packed_forward_inputs(pack.tokens, pack.position_ids, cu_seqlens, use_thd)
        logits = model(inputs.input_ids, inputs.position_ids, inputs.attention_mask,
                       packed_seq_params=inputs.packed_seq_params)
    stats = step.pair_statistics(logits, pack, true_vocab)
    return stats.chosen_logps, stats.rejected_logps, stats.chosen_lengths, stats.rejected_lengths


def per_token_gap(a, b, lengths) -> float:
    return float(((a.double() - b.double()).abs() / lengths.double().clamp(min=1)).max())


def packed_vs_padded(bench, packed_impl: str, padded_impl: str, use_thd: bool, bf16: bool = True) -> dict:
    """Build two models with the same weights, compare per-sequence log-probs packed vs padded.

    Also returns the gap of a negative control: the same pack with one attention segment over
    every sequence (attention leaks across sequences), which must be far from the padded result.
    """
    model_cfg = tiny_model_config()
    padded_model = build(model_cfg, precision(padded_impl, bf16=bf16), wrap_ddp=False)[0]
    packed_model = build(model_cfg, precision(packed_impl, bf16=bf16), wrap_ddp=False)[0]
    state = unwrap_model(padded_model).state_dict()
    if packed_impl != padded_impl:
        state = local_to_te_state_dict(state)
        missing, unexpected = unwrap_model(packed_model).load_state_dict(state, strict=False)
        assert not unexpected, f"weights with no place in the TE model: {unexpected}"
        assert all(k.endswith("_extra_state") for k in missing), f"TE weights not copied: {missing}"
    else:
        unwrap_model(packed_model).load_state_dict(state)
    pairs = sample(bench, seed=7)
    pack = bench.make_pack(pairs, "packed", FP8_MULTIPLE, device())
    with torch.no_grad():
        pc, pr, lc, lr = padded_sequence_logps(padded_model, pairs, bench, VOCAB)
        qc, qr, mc, mr = packed_pair_logps(packed_model, pack, VOCAB, use_thd)
        real = int(pack.cu_seqlens[-1])
        one_segment = torch.tensor([0, real], dtype=torch.int32, device=pack.tokens.device)
        xc, xr, _, _ = packed_pair_logps(packed_model, pack, VOCAB, use_thd, cu_seqlens=one_segment)
    assert torch.equal(lc.cpu(), mc.cpu()) and torch.equal(lr.cpu(), mr.cpu()), "response token counts differ"
    lengths = torch.cat([lc, lr])
    padded, packed, leaked = torch.cat([pc, pr]), torch.cat([qc, qr]), torch.cat([xc, xr])
    return {"gap_per_token": per_token_gap(packed, padded, lengths),
            "leak_gap_per_token": per_token_gap(leaked, padded, lengths),
            "max_abs_sum_gap": float((packed - padded).abs().max()),
            "mean_logp_per_token": float((padded / lengths).mean())}


def reference_pass(chunks, micro, use_thd: bool, calibrate: bool = False):
    """Forward-only per-pair log-probs (the precompute path) on ``chunks``."""
    from megatron_pref import engine, step

    forward_step = step.logps_forward_step(VOCAB, use_thd=use_thd)
    if calibrate:  # one discarded pass: delayed scaling gets an amax history first
        engine.forward_only_pass(chunks, [micro], forward_step)
    outputs = engine.forward_only_pass(chunks, [micro], forward_step)
    chosen = torch.cat([o["chosen_logps"] for o in outputs]).float()
    rejected = torch.cat([o["rejected_logps"] for o in outputs]).float()
    return chosen, rejected


def frozen_copy(chunks, model_cfg, prec):
    """An online reference: a frozen model with the policy's current weights."""
    ref = build(model_cfg, prec, wrap_ddp=False)
    unwrap_model(ref[0]).load_state_dict(unwrap_model(chunks[0]).state_dict())
    return ref


def train_steps(bench, prec, loss: str, steps: int = 4, use_thd: bool = True) -> dict:
    """A few optimizer steps of ``loss`` with an online frozen reference; returns losses/norms."""
    from megatron_pref import engine, step
    from megatron_pref.arguments import OptimConfig
    from megatron_pref.losses import LossConfig, requires_reference

    model_cfg = tiny_model_config()
    chunks = build(model_cfg, prec)
    optimizer = engine.build_optimizer(chunks, OptimConfig(lr=1e-4, clip_grad=1.0), prec)
    forward_step = step.preference_forward_step(loss, LossConfig(), VOCAB, use_thd)
    ref = frozen_copy(chunks, model_cfg, prec) if requires_reference(loss) else None
    watched = next(p for n, p in unwrap_model(chunks[0]).named_parameters() if "linear_fc1.weight" in n)
    before = watched.detach().float().clone()
    losses, norms, totals = [], [], []
    for i in range(steps):
        pack = bench.make_pack(sample(bench, seed=100 + i), "packed", FP8_MULTIPLE, device())
        totals.append(pack.pack_length)
        micro = step.MicroBatch(pack=pack)
        if ref is not None:
            micro.ref_chosen_logps, micro.ref_rejected_logps = reference_pass(ref, micro, use_thd)
        result = engine.train_step(chunks, optimizer, [micro], forward_step, ["loss"], iteration=i)
        assert not result.skipped, f"step {i} skipped"
        losses.append(result.metric_sums["loss"] / result.num_pairs)
        norms.append(result.grad_norm)
    moved = float((watched.detach().float() - before).abs().max())
    return {"losses": losses, "grad_norms": norms, "max_weight_change": moved, "pack_tokens": totals}


def step0_identity(bench, prec, ref_mode: str, calibrate: bool, use_thd: bool = True) -> dict:
    """DPO at step 0 with the reference = the initial policy, same recipe: loss should be ln 2."""
    from megatron_pref import engine, step
    from megatron_pref.arguments import OptimConfig
    from megatron_pref.losses import LossConfig

    model_cfg = tiny_model_config()
    chunks = build(model_cfg, prec)
    optimizer = engine.build_optimizer(chunks, OptimConfig(lr=1e-4), prec)
    pack = bench.make_pack(sample(bench, seed=11), "packed", FP8_MULTIPLE, device())
    micro = step.MicroBatch(pack=pack)
    ref_chunks = chunks if ref_mode == "precompute" else frozen_copy(chunks, model_cfg, prec)
    micro.ref_chosen_logps, micro.ref_rejected_logps = reference_pass(ref_chunks, micro, use_thd, calibrate)
    if calibrate and ref_chunks is not chunks:
        # The frozen copy has its own FP8 scaling state: the policy needs its discarded pass too,
        # or its first forward runs with the initial scales while the reference's did not.
        reference_pass(chunks, micro, use_thd)
    forward_step = step.preference_forward_step("dpo", LossConfig(beta=0.1), VOCAB, use_thd)
    names = ["loss", "rewards/margins"]
    result = engine.train_step(chunks, optimizer, [micro], forward_step, names, iteration=0)
    loss = result.metric_sums["loss"] / result.num_pairs
    return {"loss": loss, "bias": abs(loss - LN2),
            "mean_h": result.metric_sums["rewards/margins"] / result.num_pairs / 0.1}


# ----------------------------------------------------------------------------------------------
# Fixtures and tests
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_env():
    """Single-rank NCCL + megatron-core parallel state, once for the module; yields the benchmark module."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("transformer_engine.pytorch", reason="needs Transformer Engine")
    bench = load_benchmark()
    bench.init_single_rank("cuda", SEED)
    yield bench
    from megatron_pref import parallel

    parallel.destroy()


def test_te_thd_packed_logps_match_local_padded(gpu_env):
    r = packed_vs_padded(gpu_env, packed_impl="transformer_engine", padded_impl="local", use_thd=True)
    record("te_thd_vs_local_padded", tolerance_per_token=LOGP_TOL_PER_TOKEN, **r)
    assert r["gap_per_token"] <= LOGP_TOL_PER_TOKEN, r
    # Negative control: the comparison does see attention leaking across the packed sequences.
    assert r["leak_gap_per_token"] > 4 * LOGP_TOL_PER_TOKEN, r


def test_logprob_stage_receives_bf16_logits(gpu_env):
    """With --bf16 the logits reaching the log-prob stage must stay bf16.

    Float16Module upcasts its output to fp32 unless called with fp32_output=False; fp32 logits
    at the log-prob stage are a full [T, V] fp32 tensor, saved for the backward.
    """
    from megatron_pref import step
    from megatron_pref.losses import LossConfig

    chunks = build(tiny_model_config(), precision("transformer_engine"))
    pack = gpu_env.make_pack(sample(gpu_env, seed=3), "packed", FP8_MULTIPLE, "cuda")
    forward_step = step.preference_forward_step("sft", LossConfig(), VOCAB, use_thd=True)
    with torch.no_grad():
        output, _ = forward_step(iter([step.MicroBatch(pack=pack)]), chunks[0])
    record("logits_dtype_at_logprob_stage", dtype=str(output.dtype))
    assert output.dtype == torch.bfloat16, f"log-prob stage got {output.dtype} logits"


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
@pytest.mark.parametrize("loss", ["dpo", "spo", "slime"])
def test_fp8_training_steps(gpu_env, recipe, loss):
    r = train_steps(gpu_env, precision("transformer_engine", fp8_recipe=recipe), loss)
    record("fp8_training", recipe=recipe, loss=loss, **r)
    assert all(math.isfinite(v) for v in r["losses"]), r
    assert all(n is not None and math.isfinite(n) for n in r["grad_norms"]), r
    assert r["max_weight_change"] > 0, "the optimizer did not move the weights"
    assert all(t % FP8_MULTIPLE == 0 for t in r["pack_tokens"]), r


@pytest.mark.parametrize("calibrate", [False, True], ids=["first-pass", "calibrated"])
@pytest.mark.parametrize("ref_mode", ["precompute", "online"])
@pytest.mark.parametrize("recipe", ["bf16", "delayed", "tensorwise"])
def test_reference_step0_identity(gpu_env, recipe, ref_mode, calibrate):
    """The reference pass uses the policy's recipe; at step 0 the DPO loss is ln 2 up to a bias.

    With delayed scaling the very first FP8 forward of a model runs with the initial scales
    (no amax history yet): a reference computed by that pass (``first-pass`` + ``precompute``)
    is quantised differently from the policy's next forward. That bias is recorded, not asserted;
    the ``calibrated`` variant (one discarded forward first) must meet the tolerance.
    """
    fp8 = None if recipe == "bf16" else recipe
    r = step0_identity(gpu_env, precision("transformer_engine", fp8_recipe=fp8), ref_mode, calibrate)
    expected_bias = recipe == "delayed" and ref_mode == "precompute" and not calibrate
    record("step0_identity", recipe=recipe, ref_mode=ref_mode, calibrate=calibrate,
           tolerance=STEP0_TOL[recipe], asserted=not expected_bias, **r)
    assert math.isfinite(r["loss"])
    if not expected_bias:
        assert r["bias"] <= STEP0_TOL[recipe], r


def test_fp8_pack_lengths_multiple_of_16(gpu_env):
    """Packs for FP8 are padded to a multiple of 16 tokens; an odd-length pack is refused by TE."""
    from megatron_pref import step

    from megatron_pref.data.packing import compute_pad_multiple

    assert compute_pad_multiple(fp8=True) % FP8_MULTIPLE == 0
    chunks = build(tiny_model_config(), precision("transformer_engine", fp8_recipe="tensorwise"), wrap_ddp=False)
    pairs = sample(gpu_env, seed=5)
    pack = gpu_env.make_pack(pairs, "packed", compute_pad_multiple(fp8=True), "cuda")
    assert pack.pack_length % FP8_MULTIPLE == 0
    with torch.no_grad():
        logits = step.model_forward(chunks[0], pack, use_thd=True)
    assert torch.isfinite(logits.float()).all()

    odd = gpu_env.make_pack(pairs, "packed", 1, "cuda")
    if odd.pack_length % 2 == 0:  # make the unpadded pack odd: drop the last pair's last token
        pairs[-1].rejected_ids = pairs[-1].rejected_ids[:-1]
        odd = gpu_env.make_pack(pairs, "packed", 1, "cuda")
    assert odd.pack_length % 2 == 1
    try:
        with torch.no_grad():
            step.model_forward(chunks[0], odd, use_thd=True)
    except Exception as exc:  # TE's FP8 GEMMs assert divisible token counts
        record("fp8_odd_pack_refused", tokens=odd.pack_length, error=f"{type(exc).__name__}: {exc}"[:300])
        return
    record("fp8_odd_pack_accepted", tokens=odd.pack_length)
    pytest.fail(f"an FP8 forward accepted a pack of {odd.pack_length} tokens: this TE version pads "
                "internally; record it and relax the multiple-of-16 requirement if confirmed")


def test_benchmark_tiny_on_gpu(gpu_env, tmp_path):
    """The benchmark's configurations all run on the GPU (tiny shape; figures are not asserted)."""
    from megatron_pref import parallel

    out = tmp_path / "bench.json"
    # The benchmark initialises its own process group: hand it a clean one.
    parallel.destroy()
    try:
        code = gpu_env.main(["--preset", "tiny", "--device", "cuda", "--steps", "2", "--warmup", "1",
                             "--out", str(out)])
    finally:
        if not torch.distributed.is_initialized():
            gpu_env.init_single_rank("cuda", SEED)
    result = json.loads(out.read_text())
    record("benchmark_tiny_gpu", configs={r["name"]: r.get("status") for r in result["configs"]})
    assert code == 0, [r for r in result["configs"] if r.get("status") != "ok"]
    assert {r["name"] for r in result["configs"] if r["status"] == "ok"} == {"packed", "packed-fp8", "padded", "hf"}


def _parallel_attributes(gpt) -> dict:
    names = ("tensor_model_parallel", "partition_dim", "partition_stride", "sequence_parallel", "shared", "allreduce")
    return {name: {a: getattr(p, a, None) for a in names} for name, p in gpt.named_parameters()}


def test_te_spec_uninitialised_build_marks_parameters_as_an_initialised_one(gpu_env, monkeypatch):
    """train() builds with perform_initialization=False (issue 11). Every parameter of the TE-spec
    model carries the tensor-parallel attributes of an initialised build: TE's layers mark
    their weights themselves, megatron-core's embedding and output layer only when initialised
    (or by model.mark_tensor_parallel_weights). An unmarked weight is counted in the gradient
    norm on TP rank 0 only. One rank here (the harness has one GPU): the attributes are set at
    any TP size; the CPU tests check the norm itself at TP 2."""
    from megatron_pref import model
    from megatron_pref.model import ParallelConfig, build_gpt_model

    cfg, prec = tiny_model_config(), precision("transformer_engine")
    uninitialised = _parallel_attributes(build_gpt_model(cfg, ParallelConfig(), prec, perform_initialization=False))
    initialised = _parallel_attributes(build_gpt_model(cfg, ParallelConfig(), prec, perform_initialization=True))
    marked = sorted(name for name, attrs in uninitialised.items() if attrs["tensor_model_parallel"])
    record("te_spec_parallel_attributes", marked=marked)
    assert uninitialised == initialised
    for name in ("embedding.word_embeddings.weight", "output_layer.weight", "decoder.layers.0.self_attention.linear_qkv.weight",
                 "decoder.layers.0.self_attention.linear_proj.weight", "decoder.layers.0.mlp.linear_fc1.weight",
                 "decoder.layers.0.mlp.linear_fc2.weight"):
        assert name in marked, name
    # Negative control: without the marking, megatron-core leaves its own layers unmarked.
    monkeypatch.setattr(model, "mark_tensor_parallel_weights", lambda gpt: None)
    unmarked = _parallel_attributes(build_gpt_model(cfg, ParallelConfig(), prec, perform_initialization=False))
    assert not unmarked["embedding.word_embeddings.weight"]["tensor_model_parallel"]
