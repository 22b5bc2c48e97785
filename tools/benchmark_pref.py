#!/usr/bin/env python3
"""Throughput benchmark: this project's DPO training step against a TRL-style Hugging Face step.

One command makes one run: every configuration below is stepped on the *same* ragged pairs, on
the same device, in the same process, one after the other (each one's model and optimizer are
freed before the next is built). It prints a table and writes a JSON file.

Configurations
  packed      megatron-core GPTModel (TE layer spec on a GPU, local spec on CPU), every pair of
              the step packed into one THD micro-batch (no padding except a tail to a multiple
              of 16), megatron_pref's forward step (chunked vocab-parallel log-probs), the DPO
              loss, DDP + megatron-core's optimizer (fp32 master weights, Adam), bf16 on a GPU.
  packed-fp8  the same with FP8 (``--fp8-format hybrid --fp8-recipe <--fp8-recipe>``). GPU + TE only.
  padded      the same code path, but every sequence is padded to the longest of the step
              (the compute a padded batch spends, in this project's own step).
  hf          ``transformers.LlamaForCausalLM`` of identical shape stepped the way TRL's
              DPOTrainer.concatenated_forward does: chosen and rejected rows padded into one
              batch, SDPA attention, per-token log-probs by a gather minus a log-sum-exp on fp32
              logits, DPO loss, grad-norm clip 1.0, ``torch.optim.AdamW`` (fused on CUDA) on the
              bf16 parameters (no fp32 master copy: the fastest and leanest HF setting, so the
              comparison is conservative for this project).

Reference log-probs are precomputed constants for every configuration (``--ref-logprobs
precompute``), so the timed step is the policy's forward + backward + optimizer step.

Reported per configuration
  real tokens/s   prompt + response tokens of both sequences of every pair, padding excluded,
                  over the mean step time (host-synchronised, after ``--warmup`` steps).
  TFLOP/s, MFU    model FLOPs per step = 6 * N * tokens + 6 * layers * hidden * sum(len^2),
                  N = parameters - input embedding (the output projection counted once, tied or
                  not); tokens and lengths are the real ones. MFU is against ``--peak-tflops``
                  (default 989 = H100 SXM bf16 dense; the FP8 row is still against the bf16 peak).
  peak memory     ``torch.cuda.max_memory_allocated`` over the timed steps (the peak is reset
                  after the warm-up steps): weights, grads, optimizer states, activations. CUDA only.
  micro_pairs     pairs per micro-batch. All pairs of a step go into one micro-batch unless
                  ``--micro-pairs`` says otherwise or that runs out of memory: then the step is
                  retried with half as many pairs per micro-batch (gradient accumulation), and
                  ``out_of_memory_at_micro_pairs`` lists the sizes that did not fit.
  logits dtype    the dtype of the logits that reach the log-prob stage (bf16 expected: fp32
                  logits there mean a full [T, V] fp32 tensor is held for the backward).

The log-prob stage alone is also measured (CUDA only): the extra peak memory of
``megatron_pref.logprobs.token_logprobs`` forward + backward on bf16 logits of the step's size,
against the size of the full fp32 logits and against a plain ``log_softmax`` gather (control).

Examples
  python tools/benchmark_pref.py --preset tiny --device cpu --steps 2          # CPU smoke run
  python tools/benchmark_pref.py --preset 1b --out runs/bench-1b.json
  python tools/benchmark_pref.py --preset 8b-slice --fp8-recipe tensorwise --profile runs/prof
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

H100_SXM_BF16_DENSE_TFLOPS = 989.0
CONFIG_NAMES = ("packed", "packed-fp8", "padded", "hf")
FP8_TOKEN_MULTIPLE = 16  # TE's FP8 GEMMs need the token dimension divisible by 8/16
FLOP_FORMULA = ("6 * (params - input_embedding [output projection counted once]) * real_tokens "
                "+ 6 * layers * hidden * sum(real_len^2)")

# Shapes. Lengths: prompt and response lengths are log-normal (median, sigma), clipped; the
# probe in shared/device/README.md used 8 pairs / 16 sequences / 8416 real tokens per step.
PRESETS = {
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                 ffn_hidden_size=192, vocab_size=512, tied=False, rotary_base=10000,
                 pairs=4, prompt_median=24, response_median=16, max_prompt=48, max_len=96),
    # Llama-3.2-1B: tied embeddings, 128k vocab.
    "1b": dict(num_layers=16, hidden_size=2048, num_attention_heads=32, num_query_groups=8,
               ffn_hidden_size=8192, vocab_size=128256, tied=True, rotary_base=500000,
               pairs=8, prompt_median=192, response_median=256, max_prompt=1024, max_len=2048),
    # Llama-3.2-3B: tied embeddings.
    "3b": dict(num_layers=28, hidden_size=3072, num_attention_heads=24, num_query_groups=8,
               ffn_hidden_size=8192, vocab_size=128256, tied=True, rotary_base=500000,
               pairs=8, prompt_median=192, response_median=256, max_prompt=1024, max_len=2048),
    # Llama-3-8B hidden/heads/FFN/vocab with 8 of its 32 layers: fits one H100 with Adam.
    "8b-slice": dict(num_layers=8, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                     ffn_hidden_size=14336, vocab_size=128256, tied=False, rotary_base=500000,
                     pairs=8, prompt_median=192, response_median=256, max_prompt=1024, max_len=2048),
}
PROMPT_SIGMA = 0.8
RESPONSE_SIGMA = 0.7


# --------------------------------------------------------------------------------------------
# Pairs and packs (numpy / torch only: no GPU needed)
# --------------------------------------------------------------------------------------------
def sample_pairs(rng: np.random.Generator, num_pairs: int, vocab_size: int, prompt_median: float,
                 response_median: float, max_prompt: int, max_len: int):
    """Ragged ``TokenizedPair``s: log-normal prompt and response lengths, clipped; random ids."""
    from megatron_pref.data.pairs import TokenizedPair

    pairs = []
    for i in range(num_pairs):
        p = int(np.clip(round(rng.lognormal(math.log(prompt_median), PROMPT_SIGMA)), 4, max_prompt))
        responses = []
        for _ in range(2):
            r = int(np.clip(round(rng.lognormal(math.log(response_median), RESPONSE_SIGMA)), 2, max_len - p))
            responses.append(rng.integers(1, vocab_size, size=r, dtype=np.int64))
        pairs.append(TokenizedPair(rng.integers(1, vocab_size, size=p, dtype=np.int64), *responses, pair_id=i))
    return pairs


def sequences(pairs) -> list:
    return [s for p in pairs for s in (p.chosen_sequence, p.rejected_sequence)]


def real_tokens(pairs) -> int:
    return sum(len(s) for s in sequences(pairs))


def sum_len_sq(pairs) -> int:
    return sum(len(s) ** 2 for s in sequences(pairs))


def round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def make_pack(pairs, layout: str = "packed", multiple: int = FP8_TOKEN_MULTIPLE, device="cpu"):
    """One micro-batch of every pair, as a ``megatron_pref.data.packing.PackedBatch``.

    ``packed``: the project's packer (``build_packed_batch``): sequences back to back, the tail
    padded to a multiple of ``multiple``.
    ``padded``: the same layout with every sequence in a slot as long as the longest sequence of
    the batch (``cu_seqlens`` are the slot boundaries; slot padding has loss_mask 0): the tokens
    a padded batch computes on, through the project's own step.
    """
    from megatron_pref.data.packing import PackedBatch, build_packed_batch

    if layout not in ("packed", "padded"):
        raise ValueError(f"layout must be 'packed' or 'padded', got {layout!r}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    ids = list(range(len(pairs)))
    packed = build_packed_batch(pairs, pad_multiple=multiple, pair_ids=ids, with_scores=False)
    if layout == "packed":
        return packed.to(device)
    import torch

    seqs = sequences(pairs)
    slot = max(len(s) for s in seqs)
    total = round_up(slot * len(seqs), multiple)
    tokens = np.zeros(total, np.int64)
    labels = np.zeros(total, np.int64)
    loss_mask = np.zeros(total, np.float32)
    positions = np.zeros(total, np.int64)
    src = packed.cu_seqlens.numpy()
    for k, seq in enumerate(seqs):
        a, n = k * slot, len(seq)
        tokens[a:a + n] = seq
        labels[a:a + n] = packed.labels.numpy()[src[k]:src[k] + n]
        loss_mask[a:a + n] = packed.loss_mask.numpy()[src[k]:src[k] + n]
        positions[a:a + slot] = np.arange(slot)
    tail = total - slot * len(seqs)
    positions[total - tail:] = np.arange(tail)
    cu = (np.arange(len(seqs) + 1) * slot).astype(np.int32)
    return PackedBatch(
        tokens=torch.from_numpy(tokens), labels=torch.from_numpy(labels), loss_mask=torch.from_numpy(loss_mask),
        position_ids=torch.from_numpy(positions), cu_seqlens=torch.from_numpy(cu),
        seq_pair_index=packed.seq_pair_index, seq_is_chosen=packed.seq_is_chosen, pair_ids=packed.pair_ids,
    ).to(device)


def reference_logps(pairs, vocab_size: int, device="cpu"):
    """Stand-in precomputed reference log-probs: a uniform model's, -len * ln(V)."""
    import torch

    c = torch.tensor([-len(p.chosen_ids) * math.log(vocab_size) for p in pairs], dtype=torch.float32)
    r = torch.tensor([-len(p.rejected_ids) * math.log(vocab_size) for p in pairs], dtype=torch.float32)
    return c.to(device), r.to(device)


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------
def flop_params(shape: dict, padded_vocab: int) -> int:
    """N of the FLOP formula: every weight a token passes through, input embedding excluded."""
    h, heads, groups = shape["hidden_size"], shape["num_attention_heads"], shape["num_query_groups"]
    head_dim = h // heads
    per_layer = (h * (heads + 2 * groups) * head_dim  # fused QKV
                 + heads * head_dim * h  # output projection
                 + 3 * h * shape["ffn_hidden_size"]  # SwiGLU: gate, up, down
                 + 2 * h)  # two RMSNorms
    return shape["num_layers"] * per_layer + h + padded_vocab * h  # + final norm + LM head


def step_flops(shape: dict, padded_vocab: int, real_tokens: int, sum_len_sq: int) -> float:
    return (6.0 * flop_params(shape, padded_vocab) * real_tokens
            + 6.0 * shape["num_layers"] * shape["hidden_size"] * sum_len_sq)


# --------------------------------------------------------------------------------------------
# Runners: each returns a Runner whose step(i) runs training step i (host-synchronised)
# --------------------------------------------------------------------------------------------
@dataclass
class Runner:
    step: Callable[[int], float]  # returns the loss
    close: Callable[[], None]
    info: dict = field(default_factory=dict)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _tuned_transformer_config(overrides: dict):
    """Context manager: megatron_pref.model.transformer_config with extra attributes set."""
    from megatron_pref import model as mp_model

    @contextlib.contextmanager
    def ctx():
        original = mp_model.transformer_config

        def tuned(*args, **kwargs):
            config = original(*args, **kwargs)
            for name, value in overrides.items():
                setattr(config, name, value)
            return config

        mp_model.transformer_config = tuned
        try:
            yield
        finally:
            mp_model.transformer_config = original

    return ctx()


def gpu_fusions() -> dict:
    """The fusions ``--fusions on`` adds. Gradient-accumulation fusion only with apex's kernel:
    megatron-core's own output layer (ColumnParallelLinear) refuses the option without it."""
    import importlib.util

    fusions = dict(bias_activation_fusion=True, apply_rope_fusion=True, masked_softmax_fusion=True,
                   use_cpu_initialization=False)
    fusions["gradient_accumulation_fusion"] = importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None
    return fusions


def split_pairs(pairs: list, micro_pairs: Optional[int]) -> list:
    """The step's pairs in consecutive micro-batches of ``micro_pairs`` (None: one micro-batch)."""
    if not micro_pairs or micro_pairs >= len(pairs):
        return [pairs]
    return [pairs[i:i + micro_pairs] for i in range(0, len(pairs), micro_pairs)]


def megatron_runner(args, shape: dict, precision, layout: str, batches: list, device: str,
                    micro_pairs: Optional[int] = None) -> Runner:
    from megatron_pref import engine, step
    from megatron_pref.model import unwrap_model
    from megatron_pref.arguments import OptimConfig
    from megatron_pref.losses import LossConfig
    from megatron_pref.model import ParallelConfig
    from megatron_pref.parallel import seed_everything

    model_cfg = megatron_model_config(shape)
    parallel = ParallelConfig()
    # Same seed before every build: packed and padded start from identical weights, so their
    # step-0 losses must agree (a free check that padding slots change nothing but the cost).
    seed_everything(args.seed)
    tuned = args.fusions == "on" and device == "cuda"
    with (_tuned_transformer_config(gpu_fusions()) if tuned else contextlib.nullcontext()):
        chunks = engine.build_model_chunks(model_cfg, parallel, precision)
    optim = OptimConfig(lr=1e-6, min_lr=0.0, clip_grad=1.0, weight_decay=0.0)
    optimizer = engine.build_optimizer(chunks, optim, precision)
    use_thd = precision.transformer_impl == "transformer_engine"
    base_step = step.preference_forward_step("dpo", LossConfig(beta=0.1), model_cfg.vocab_size, use_thd,
                                             chunk_tokens=args.logprob_chunk_tokens)
    seen = {}

    def forward_step(data_iterator, model):
        output, loss_func = base_step(data_iterator, model)
        if "logits_dtype" not in seen and output is not None:
            seen["logits_dtype"] = str(output.dtype).replace("torch.", "")
            seen["logits_shape"] = list(output.shape)
        return output, loss_func

    from megatron_pref.data.packing import compute_pad_multiple

    multiple = compute_pad_multiple(fp8=bool(precision.fp8_format))  # 16 under FP8, else 1
    steps = []  # per step: its micro-batches (one, unless a smaller micro_pairs was needed)
    for pairs in batches:
        micros = []
        for group in split_pairs(pairs, micro_pairs):
            ref_chosen, ref_rejected = reference_logps(group, model_cfg.vocab_size, device)
            micros.append(step.MicroBatch(pack=make_pack(group, layout, multiple, device),
                                          ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected))
        steps.append(micros)
    gpt = unwrap_model(chunks[0])
    params = sum(p.numel() for p in gpt.parameters())

    def run(i: int) -> float:
        result = engine.train_step(chunks, optimizer, steps[i], forward_step, ["loss"], iteration=i)
        _sync(device)
        return result.metric_sums["loss"] / result.num_pairs

    def close():
        nonlocal chunks, optimizer
        config = gpt.config
        config.finalize_model_grads_func = config.grad_scale_func = config.no_sync_func = None
        del chunks, optimizer

    info = dict(model_params=int(params), padded_vocab=int(gpt.vocab_size),
                transformer_impl=precision.transformer_impl, fusions="on" if tuned else "project",
                pad_multiple=multiple, observed=seen,
                tokens_per_step_computed=[sum(m.pack.pack_length for m in micros) for micros in steps])
    return Runner(run, close, info)


def megatron_model_config(shape: dict):
    from megatron_pref.model import ModelConfig

    return ModelConfig(
        vocab_size=shape["vocab_size"], num_layers=shape["num_layers"], hidden_size=shape["hidden_size"],
        num_attention_heads=shape["num_attention_heads"], num_query_groups=shape["num_query_groups"],
        ffn_hidden_size=shape["ffn_hidden_size"], max_position_embeddings=max(shape["max_len"], 256),
        normalization="RMSNorm", norm_epsilon=1e-5, swiglu=True, position_embedding_type="rope",
        rotary_base=shape["rotary_base"], untie_embeddings_and_output_weights=not shape["tied"],
        make_vocab_size_divisible_by=128)


def hf_model(shape: dict, dtype, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        intermediate_size=shape["ffn_hidden_size"], num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_attention_heads"], num_key_value_heads=shape["num_query_groups"],
        max_position_embeddings=max(shape["max_len"], 256), rms_norm_eps=1e-5,
        rope_theta=float(shape["rotary_base"]), tie_word_embeddings=shape["tied"],
        attn_implementation="sdpa", use_cache=False)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(dtype)
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"HF model uses {model.config._attn_implementation!r} attention, expected sdpa")
    return model


def hf_batch(pairs, device):
    """TRL's concatenated batch: chosen rows then rejected rows, right-padded to the longest."""
    import torch

    rows = [p.chosen_sequence for p in pairs] + [p.rejected_sequence for p in pairs]
    prompt_lens = [len(p.prompt_ids) for p in pairs] * 2
    longest = max(len(r) for r in rows)
    ids = np.zeros((len(rows), longest), np.int64)
    attention = np.zeros((len(rows), longest), np.int64)
    loss_mask = np.zeros((len(rows), longest - 1), np.float32)
    for i, (row, plen) in enumerate(zip(rows, prompt_lens)):
        ids[i, :len(row)] = row
        attention[i, :len(row)] = 1
        loss_mask[i, plen - 1:len(row) - 1] = 1.0
    to = lambda x: torch.as_tensor(x).to(device)  # noqa: E731
    return to(ids), to(attention), to(loss_mask)


def selective_log_softmax_fp32(logits, labels):
    """TRL's selective_log_softmax for fp32 logits: gather minus a row-by-row log-sum-exp."""
    import torch

    logits = logits.float()
    selected = torch.gather(logits, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
    lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    return selected - lse


def hf_runner(args, shape: dict, dtype, batches: list, device: str, micro_pairs: Optional[int] = None) -> Runner:
    import torch
    import torch.nn.functional as F

    model = hf_model(shape, dtype, device)
    model.train()
    opt_kwargs = dict(lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    if device == "cuda":
        opt_kwargs["fused"] = True
    optimizer = torch.optim.AdamW(model.parameters(), **opt_kwargs)
    # Per step, its micro-batches (TRL's gradient accumulation when all pairs do not fit at once).
    data = [[(hf_batch(g, device), reference_logps(g, shape["vocab_size"], device)) for g in split_pairs(b, micro_pairs)]
            for b in batches]
    beta = 0.1
    params = sum(p.numel() for p in model.parameters())

    def run(i: int) -> float:
        total_pairs = sum(ids.shape[0] // 2 for (ids, _, _), _ in data[i])
        value = 0.0
        for (ids, attention, loss_mask), (ref_chosen, ref_rejected) in data[i]:
            num_pairs = ids.shape[0] // 2
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
            per_token = selective_log_softmax_fp32(logits[:, :-1, :], ids[:, 1:])
            seq_logps = (per_token * loss_mask).sum(-1)
            h = (seq_logps[:num_pairs] - ref_chosen) - (seq_logps[num_pairs:] - ref_rejected)
            loss = -F.logsigmoid(beta * h).sum() / total_pairs  # the mean over the step's pairs
            loss.backward()
            value += float(loss.detach())
            del logits, per_token
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return value

    def close():
        nonlocal model, optimizer
        del model, optimizer

    info = dict(model_params=int(params), attention="sdpa", optimizer="torch.optim.AdamW on bf16/model-dtype params",
                tokens_per_step_computed=[sum(int(ids.numel()) for (ids, _, _), _ in step) for step in data])
    return Runner(run, close, info)


# --------------------------------------------------------------------------------------------
# The log-prob stage alone
# --------------------------------------------------------------------------------------------
def measure_logprob_stage(tokens: int, vocab: int, true_vocab: int, chunk_tokens: int, device: str) -> dict:
    """Extra peak memory of the chunked log-prob forward+backward vs a plain fp32 log_softmax."""
    import torch

    from megatron_pref.logprobs import token_logprobs

    if device != "cuda":
        return {"status": "skipped", "reason": "peak memory is measured with CUDA only"}
    gib = 1024 ** 3
    out = {"tokens": tokens, "vocab": vocab, "chunk_tokens": chunk_tokens,
           "logits_bf16_gib": tokens * vocab * 2 / gib, "full_fp32_logits_gib": tokens * vocab * 4 / gib}
    g = torch.Generator(device="cuda").manual_seed(0)
    labels = torch.randint(0, true_vocab, (tokens,), device="cuda", generator=g)

    def extra(fn) -> dict:
        logits = (torch.randn(tokens, vocab, device="cuda", generator=g) * 2).to(torch.bfloat16).requires_grad_(True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        logps = fn(logits, labels)
        torch.cuda.synchronize()
        fwd_peak = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        logps.sum().backward()
        torch.cuda.synchronize()
        bwd_peak = torch.cuda.max_memory_allocated() - base
        grad_bytes = logits.grad.numel() * logits.grad.element_size()
        del logits, logps
        torch.cuda.empty_cache()
        # The backward must allocate the gradient of the logits (bf16, [T, V]); the rest is extra.
        return {"forward_extra_gib": fwd_peak / gib, "backward_extra_gib": (bwd_peak - grad_bytes) / gib}

    out["chunked"] = extra(lambda x, y: token_logprobs(x, y, true_vocab, chunk_tokens=chunk_tokens))
    out["plain_fp32_log_softmax"] = extra(
        lambda x, y: torch.log_softmax(x.float(), -1).gather(1, y[:, None]).squeeze(1))
    full = out["full_fp32_logits_gib"]
    out["chunked_holds_full_fp32_logits"] = bool(max(out["chunked"].values()) >= full)
    out["control_holds_full_fp32_logits"] = bool(max(out["plain_fp32_log_softmax"].values()) >= full)
    out["status"] = "ok"
    return out


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
def init_single_rank(device: str, seed: int) -> None:
    """torch.distributed (gloo on CPU, nccl on GPU; torchrun's env if set) + megatron-core groups."""
    from megatron_pref.parallel import free_port

    if "TORCHELASTIC_RUN_ID" not in os.environ:  # not under torchrun: a rendezvous of our own
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")
    import torch

    from megatron_pref import parallel
    from megatron_pref.model import ParallelConfig

    if device == "cuda" and not torch.cuda.is_available():
        from megatron_pref.cli_errors import exit_with_error

        exit_with_error("--device cuda but no CUDA device is visible")
    if int(os.environ["WORLD_SIZE"]) != 1:
        from megatron_pref.cli_errors import exit_with_error

        exit_with_error("the benchmark runs on one rank (WORLD_SIZE=1)")
    parallel.initialize(ParallelConfig(), seed)


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "megatron-core", "transformers", "transformer_engine", "transformer-engine"):
        try:
            out[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine()


def default_peak_tflops(device: str, name: str) -> Optional[float]:
    if device == "cuda" and "H100" in name:
        return H100_SXM_BF16_DENSE_TFLOPS
    return None


def time_runner(runner: Runner, warmup: int, steps: int, device: str) -> dict:
    import torch

    losses = []
    for i in range(warmup):
        losses.append(runner.step(i))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup, warmup + steps):
        start = time.perf_counter()
        losses.append(runner.step(i))
        times.append(time.perf_counter() - start)
    out = {"step_times_s": times, "losses": losses}
    if device == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 1024 ** 3
    return out


def profile_runner(runner: Runner, first_step: int, steps: int, device: str, path_prefix: str,
                   trace: bool = False) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        for i in range(first_step, first_step + steps):
            runner.step(i)
    averages = prof.key_averages()
    sort_by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    os.makedirs(os.path.dirname(path_prefix) or ".", exist_ok=True)
    from megatron_pref.atomic import write_text_atomic

    write_text_atomic(path_prefix + ".txt", averages.table(sort_by=sort_by, row_limit=40))
    out = {"table": path_prefix + ".txt", "steps": steps,
           **time_by_category(averages, device, steps)}
    if trace:
        prof.export_chrome_trace(path_prefix + ".trace.json")
        out["trace"] = path_prefix + ".trace.json"
    return out


# Where time goes: operator / kernel names (lower case) -> category, the first match wins.
PROFILE_CATEGORIES = (
    ("communication", ("nccl", "all_reduce", "allreduce", "all_gather", "reduce_scatter", "gloo")),
    ("optimizer", ("adam", "multi_tensor", "l2norm")),
    ("fp8 quantize/amax", ("quantize", "amax", "cast_transpose", "fp8", "float8")),
    ("attention", ("flash", "fmha", "sdpa", "scaled_dot_product", "attention", "attn", "bmm")),
    ("gemm", ("gemm", "cutlass", "cublas", "nvjet", "xmma", "aten::mm", "aten::addmm", "matmul", "aten::linear")),
    ("norm", ("rmsnorm", "rms_norm", "layernorm", "layer_norm")),
    ("softmax / log-prob", ("softmax", "logsumexp", "cross_entropy", "nll")),
    ("copy / fill", ("memcpy", "memset", "copy", "fill", "zero", "aten::cat", "index")),
)


def profile_category(name: str) -> str:
    lowered = name.lower()
    for category, patterns in PROFILE_CATEGORIES:
        if any(p in lowered for p in patterns):
            return category
    return "other (elementwise, ...)"


def time_by_category(averages, device: str, steps: int) -> dict:
    """Self time per category and the top entries: GPU kernels on CUDA (each kernel once, not
    also under the operator that launched it), self CPU time of operators on CPU."""
    kernels = [e for e in averages if str(e.device_type).endswith("CUDA")] if device == "cuda" else []
    if kernels:
        entries, basis = [(e.key, e.self_device_time_total) for e in kernels], "GPU kernel time"
    elif device == "cuda":  # no kernel rows: fall back to the device time operators report
        entries, basis = [(e.key, e.self_device_time_total) for e in averages], "operator self device time"
    else:
        entries, basis = [(e.key, e.self_cpu_time_total) for e in averages], "operator self CPU time"
    total_us = sum(t for _, t in entries) or 1.0
    by_category: dict = {}
    for key, t in entries:
        by_category[profile_category(key)] = by_category.get(profile_category(key), 0.0) + t
    breakdown = {c: {"ms_per_step": t / 1e3 / steps, "fraction": t / total_us}
                 for c, t in sorted(by_category.items(), key=lambda kv: -kv[1])}
    top = sorted(entries, key=lambda kv: -kv[1])[:15]
    return {"basis": basis, "ms_per_step": total_us / 1e3 / steps, "by_category": breakdown,
            "top": [{"name": k[:160], "category": profile_category(k), "ms_per_step": t / 1e3 / steps}
                    for k, t in top]}


def run_config(name: str, args, shape: dict, batches, device: str, peak_tflops: Optional[float]) -> dict:
    import torch

    from megatron_pref.model import PrecisionConfig, te_available

    row: dict = {"name": name}
    gpu = device == "cuda"
    impl = "transformer_engine" if (gpu and te_available()) else "local"
    if name == "packed-fp8" and impl != "transformer_engine":
        return dict(row, status="skipped", reason="FP8 needs CUDA and Transformer Engine")
    if args.fusions == "on" and gpu and impl != "transformer_engine":
        return dict(row, status="skipped", reason="--fusions on needs Transformer Engine")
    total_steps = args.warmup + args.steps + (args.profile_steps if args.profile else 0)
    batches = batches[:total_steps]
    runner = None

    def build(micro_pairs: Optional[int]) -> Runner:
        if name == "hf":
            dtype = torch.bfloat16 if gpu else torch.float32
            row.update(dtype=str(dtype).replace("torch.", ""), layout="padded batch [2P, Lmax] per micro-batch")
            return hf_runner(args, shape, dtype, batches, device, micro_pairs=micro_pairs)
        fp8 = name == "packed-fp8"
        precision = PrecisionConfig(bf16=gpu, fp8_format="hybrid" if fp8 else None,
                                    fp8_recipe=args.fp8_recipe, transformer_impl=impl)
        row.update(dtype=("fp8-" + args.fp8_recipe) if fp8 else ("bfloat16" if gpu else "float32"),
                   layout="padded slots per micro-batch" if name == "padded" else "packed THD" if impl ==
                   "transformer_engine" else "packed, block-diagonal mask")
        return megatron_runner(args, shape, precision, "padded" if name == "padded" else "packed",
                               batches, device, micro_pairs=micro_pairs)

    try:
        # Out of memory with every pair of the step in one micro-batch: retry with half as many
        # pairs per micro-batch (gradient accumulation, as a TRL user would), down to one pair.
        micro_pairs = args.micro_pairs
        while True:
            out_of_memory = False
            try:
                runner = build(micro_pairs)
                timing = time_runner(runner, args.warmup, args.steps, device)
                break
            except torch.cuda.OutOfMemoryError:
                current = micro_pairs or shape["pairs"]
                if current <= 1:
                    raise
                out_of_memory = True
            # Freed outside the except block: its traceback keeps the failed build's frames
            # (model, optimizer, activations) alive until the block ends.
            if out_of_memory:
                if runner is not None:
                    runner.close()
                runner = None
                gc.collect()
                if gpu:
                    torch.cuda.empty_cache()
                row.setdefault("out_of_memory_at_micro_pairs", []).append(current)
                micro_pairs = current // 2
        row["micro_pairs"] = micro_pairs or shape["pairs"]
        row.update(runner.info)
        row.update(timing)
        if args.profile:
            row["profile"] = profile_runner(runner, args.warmup + args.steps, args.profile_steps, device,
                                            os.path.join(args.profile, f"{args.preset}-{name}"), args.profile_trace)
        padded_vocab = runner.info.get("padded_vocab") or int(math.ceil(shape["vocab_size"] / 128) * 128)
        timed = batches[args.warmup:args.warmup + args.steps]
        real = [real_tokens(b) for b in timed]
        sq = [sum_len_sq(b) for b in timed]
        computed = runner.info["tokens_per_step_computed"][args.warmup:args.warmup + args.steps]
        total_time = sum(row["step_times_s"])
        flops = sum(step_flops(shape, padded_vocab, t, q) for t, q in zip(real, sq))
        row.update(
            status="ok",
            real_tokens_per_step=float(np.mean(real)),
            computed_tokens_per_step=float(np.mean(computed)),
            padding_fraction=1.0 - sum(real) / sum(computed),
            step_time_s_mean=total_time / len(timed),
            step_time_s_median=float(np.median(row["step_times_s"])),
            tokens_per_s=sum(real) / total_time,
            tflops=flops / total_time / 1e12,
        )
        row["mfu"] = row["tflops"] / peak_tflops if peak_tflops else None
        if not all(math.isfinite(v) for v in row["losses"]):
            row.update(status="failed", reason=f"non-finite loss: {row['losses']}")
        observed = row.pop("observed", None)
        if observed:
            row["logits_dtype_at_logprob_stage"] = observed.get("logits_dtype")
            row["logits_shape_at_logprob_stage"] = observed.get("logits_shape")
    except Exception as exc:  # one configuration failing (e.g. out of memory) must not hide the others
        row.update(status="failed", reason=f"{type(exc).__name__}: {exc}",
                   traceback=traceback.format_exc(limit=20))
    finally:
        if runner is not None:
            runner.close()
        del runner
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
    return row


def summarise(result: dict) -> dict:
    rows = {r["name"]: r for r in result["configs"] if r.get("status") == "ok"}
    ratios = {}

    def ratio(a, b):
        if a in rows and b in rows:
            return rows[a]["tokens_per_s"] / rows[b]["tokens_per_s"]
        return None

    ratios["packed_over_hf"] = ratio("packed", "hf")
    ratios["packed_over_padded"] = ratio("packed", "padded")
    ratios["fp8_over_bf16"] = ratio("packed-fp8", "packed")
    checks = {}
    if "packed" in rows and "padded" in rows:
        # Identical weights (same seed) and pairs: the first step's losses must agree.
        checks["packed_padded_step0_loss_abs_diff"] = abs(rows["packed"]["losses"][0] - rows["padded"]["losses"][0])
    preset = result["meta"]["preset"]
    targets = {"packed_over_hf >= 2.5": None, "fp8_over_bf16 >= 1.3 (8b-slice)": None,
               "mfu >= 0.45 (1b) / 0.50 (8b-slice)": None, "log-prob stage never holds full fp32 logits": None}
    lp = result.get("logprob_stage", {})
    if lp.get("status") == "ok" and "packed" in rows:
        # Both: the chunked reduction itself, and the dtype of the logits the model hands it
        # (fp32 logits there are a full [T, V] fp32 tensor saved for the backward).
        targets["log-prob stage never holds full fp32 logits"] = (
            not lp["chunked_holds_full_fp32_logits"]
            and rows["packed"].get("logits_dtype_at_logprob_stage") == "bfloat16")
    on_h100 = result["meta"]["peak_tflops"] == H100_SXM_BF16_DENSE_TFLOPS
    if on_h100:
        if ratios["packed_over_hf"] is not None:
            targets["packed_over_hf >= 2.5"] = ratios["packed_over_hf"] >= 2.5
        if preset == "8b-slice" and ratios["fp8_over_bf16"] is not None:
            targets["fp8_over_bf16 >= 1.3 (8b-slice)"] = ratios["fp8_over_bf16"] >= 1.3
        goal = {"1b": 0.45, "8b-slice": 0.50}.get(preset)
        if goal and "packed" in rows and rows["packed"]["mfu"] is not None:
            targets["mfu >= 0.45 (1b) / 0.50 (8b-slice)"] = rows["packed"]["mfu"] >= goal
    return {"ratios": ratios, "targets": targets, "checks": checks}


def format_table(result: dict) -> str:
    head = f"{'config':<11} {'dtype':<15} {'status':<8} {'tok/s real':>11} {'TFLOP/s':>8} {'MFU':>6} " \
           f"{'step s':>8} {'pad %':>6} {'peak GiB':>9} {'logits@lp':>10}"
    lines = [head, "-" * len(head)]
    for r in result["configs"]:
        if r.get("status") != "ok":
            lines.append(f"{r['name']:<11} {r.get('dtype', ''):<15} {r.get('status', ''):<8} {r.get('reason', '')}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        peak = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
        lines.append(f"{r['name']:<11} {r['dtype']:<15} {'ok':<8} {r['tokens_per_s']:>11,.0f} "
                     f"{r['tflops']:>8.2f} {mfu:>6} {r['step_time_s_mean']:>8.4f} "
                     f"{100 * r['padding_fraction']:>5.1f} {peak:>9} {r.get('logits_dtype_at_logprob_stage', '-'):>10}")
    s = result["summary"]["ratios"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    lines.append(f"packed/hf {fmt(s['packed_over_hf'])}  packed/padded {fmt(s['packed_over_padded'])}  "
                 f"fp8/bf16 {fmt(s['fp8_over_bf16'])}")
    lp = result.get("logprob_stage", {})
    if lp.get("status") == "ok":
        lines.append(f"log-prob stage, T={lp['tokens']} V={lp['vocab']}: full fp32 logits "
                     f"{lp['full_fp32_logits_gib']:.2f} GiB; chunked extra fwd {lp['chunked']['forward_extra_gib']:.2f} "
                     f"/ bwd {lp['chunked']['backward_extra_gib']:.2f} GiB; plain log_softmax extra fwd "
                     f"{lp['plain_fp32_log_softmax']['forward_extra_gib']:.2f} / bwd "
                     f"{lp['plain_fp32_log_softmax']['backward_extra_gib']:.2f} GiB")
    for r in result["configs"]:
        categories = r.get("profile", {}).get("by_category")
        if categories:
            shares = ", ".join(f"{c} {100 * v['fraction']:.0f}%" for c, v in categories.items() if v["fraction"] >= 0.01)
            lines.append(f"profile {r['name']} ({r['profile']['basis']}, {r['profile']['ms_per_step']:.1f} ms/step): {shares}")
    lines.append("FLOPs/step = " + FLOP_FORMULA)
    return "\n".join(lines)


def write_result(path: str, result: dict, complete: bool) -> None:
    """The JSON file, written atomically; ``complete`` is false while configurations remain."""
    from megatron_pref.atomic import write_text_atomic

    result["complete"] = complete
    write_text_atomic(path, json.dumps(result, indent=2, default=str) + "\n")


def build_parser() -> argparse.ArgumentParser:
    from megatron_pref.cli_errors import OneLineArgumentParser

    p = OneLineArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    p.add_argument("--configs", default=",".join(CONFIG_NAMES),
                   help=f"comma-separated subset of {','.join(CONFIG_NAMES)}")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration")
    p.add_argument("--pairs", type=int, default=None, help="pairs per step (default: the preset's)")
    p.add_argument("--micro-pairs", type=int, default=None,
                   help="pairs per micro-batch (default: all pairs of a step in one; halved on out-of-memory)")
    p.add_argument("--num-layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--fp8-recipe", choices=("delayed", "tensorwise", "blockwise", "mxfp8"), default="tensorwise")
    p.add_argument("--fusions", choices=("project", "on"), default="project",
                   help="project: megatron_pref.model's TransformerConfig as it is (TE's fused RoPE on); on: "
                        "also the bias-SwiGLU and masked-softmax fusions, and gradient-accumulation fusion "
                        "when apex's kernel is installed (GPU + TE)")
    p.add_argument("--logprob-chunk-tokens", type=int, default=1024)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="bf16 dense peak for MFU (default: 989 on an H100, none elsewhere)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also profile --profile-steps extra steps per configuration into DIR")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--profile-trace", action="store_true",
                   help="with --profile, also write Chrome traces (large: tens of MB per configuration)")
    p.add_argument("--skip-logprob-stage", action="store_true", help="skip the log-prob memory measurement")
    p.add_argument("--out", default=None,
                   help="JSON path (default: runs/benchmark_pref-<preset>-<device>.json); rewritten "
                        "after every configuration, with \"complete\": false until the run ends")
    return p


def main(argv=None) -> int:
    from megatron_pref.cli_errors import check_output_dir, check_output_file, exit_with_error

    if int(os.environ.get("WORLD_SIZE", "1")) != 1:  # torchrun --nproc-per-node 1 is fine
        exit_with_error("the benchmark runs on one rank: start it with python, or torchrun --nproc-per-node 1")

    args = build_parser().parse_args(argv)
    # Every flag and output path is checked here, before any model is built: one line, exit 2.
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(CONFIG_NAMES))
    if unknown:
        exit_with_error(f"unknown --configs {unknown}; choose from {list(CONFIG_NAMES)}")
    if not configs:
        exit_with_error(f"--configs {args.configs!r} selects no configuration; choose from {list(CONFIG_NAMES)}")
    repeated = sorted({c for c in configs if configs.count(c) > 1})
    if repeated:
        exit_with_error(f"--configs lists {', '.join(repeated)} more than once")
    if args.steps < 1 or args.warmup < 0:
        exit_with_error("--steps must be >= 1 and --warmup >= 0")
    for flag, value in (("--pairs", args.pairs), ("--num-layers", args.num_layers),
                        ("--profile-steps", args.profile_steps), ("--logprob-chunk-tokens", args.logprob_chunk_tokens),
                        ("--micro-pairs", args.micro_pairs)):
        if value is not None and value < 1:
            exit_with_error(f"{flag} must be >= 1, got {value}")
    if args.peak_tflops is not None and not (math.isfinite(args.peak_tflops) and args.peak_tflops > 0):
        exit_with_error(f"--peak-tflops must be a positive number, got {args.peak_tflops}")
    if args.out is not None:
        problem = check_output_file(args.out, "--out")
        if problem:
            exit_with_error(problem)
    if args.profile is not None:
        problem = check_output_dir(args.profile, "--profile")
        if problem:
            exit_with_error(problem)
    if args.device == "cpu":
        # The CPU layer (megatron_pref.cpu) refuses to run beside a visible GPU: hide it first.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        exit_with_error("--device cuda but no CUDA device is visible")
    out = args.out or os.path.join("runs", f"benchmark_pref-{args.preset}-{device}.json")
    problem = check_output_file(out, "--out")
    if problem:
        exit_with_error(problem)
    out_dir = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(out_dir, exist_ok=True)
        if args.profile is not None:
            os.makedirs(args.profile, exist_ok=True)
    except OSError as exc:
        exit_with_error(f"cannot create {exc.filename}: {exc.strerror}")
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    init_single_rank(device, args.seed)

    shape = dict(PRESETS[args.preset])
    if args.pairs:
        shape["pairs"] = args.pairs
    if args.num_layers:
        shape["num_layers"] = args.num_layers
    rng = np.random.default_rng(args.seed)
    total_steps = args.warmup + args.steps + (args.profile_steps if args.profile else 0)
    batches = [sample_pairs(rng, shape["pairs"], shape["vocab_size"], shape["prompt_median"],
                            shape["response_median"], shape["max_prompt"], shape["max_len"])
               for _ in range(total_steps)]
    name = _device_name(device)
    peak = args.peak_tflops if args.peak_tflops is not None else default_peak_tflops(device, name)
    result = {"meta": {
        "preset": args.preset, "shape": shape, "device": device, "device_name": name,
        "versions": _versions(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seed": args.seed,
        "steps": args.steps, "warmup": args.warmup, "pairs_per_step": shape["pairs"],
        "length_distribution": {"prompt": f"lognormal(median {shape['prompt_median']}, sigma {PROMPT_SIGMA}) "
                                          f"clipped to [4, {shape['max_prompt']}]",
                                "response": f"lognormal(median {shape['response_median']}, sigma {RESPONSE_SIGMA}) "
                                            f"clipped to [2, {shape['max_len']} - prompt]"},
        "flop_formula": FLOP_FORMULA, "flop_params": flop_params(shape, round_up(shape["vocab_size"], 128)),
        "peak_tflops": peak, "fp8_recipe": args.fp8_recipe, "fusions": args.fusions,
        "reference_logprobs": "precomputed constants (not part of the timed step)",
        "loss": "dpo, beta 0.1", "threads": torch.get_num_threads(),
    }, "configs": []}
    for config in configs:
        row = run_config(config, args, shape, batches, device, peak)
        result["configs"].append(row)
        # Rewritten after every configuration: a run cut short (time limit, crash) keeps what it measured.
        write_result(out, result, complete=False)
        print(f"[benchmark_pref] {config}: {row.get('status')} "
              + (f"{row['tokens_per_s']:,.0f} tok/s" if row.get("status") == "ok" else row.get("reason", "")),
              flush=True)
    if args.skip_logprob_stage:
        result["logprob_stage"] = {"status": "skipped", "reason": "--skip-logprob-stage"}
    else:
        first = make_pack(batches[args.warmup], "packed")
        try:
            result["logprob_stage"] = measure_logprob_stage(first.pack_length, round_up(shape["vocab_size"], 128),
                                                            shape["vocab_size"], args.logprob_chunk_tokens, device)
        except Exception as exc:
            result["logprob_stage"] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    result["summary"] = summarise(result)
    write_result(out, result, complete=True)
    print(format_table(result))
    print(f"[benchmark_pref] wrote {out}")
    from megatron_pref import parallel

    parallel.destroy()
    failed = [r["name"] for r in result["configs"] if r.get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
