"""Logit-level verification of a conversion: the HF model and the megatron-core model (at a
chosen TP/PP, CPU gloo ranks) run in fp32 on the same fixed tokens."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from megatron_pref.checksums import verify_checksums
from megatron_pref.checkpoint_format import TOKENIZER_DIR, read_checkpoint_metadata, read_model_config
from megatron_pref.convert.checkpoint_io import (check_dist_checkpoint, check_tokenizer_files, load_model_checkpoint,
                                                 resolve_iteration_dir)
from megatron_pref.convert.errors import ConversionError

DEFAULT_TEXT = (
    "The quick brown fox jumps over the lazy dog. Preference optimisation compares a chosen and a "
    "rejected answer to the same prompt, and the policy learns to prefer the chosen one. "
    "In 1969, 2 astronauts walked on the Moon; 3 + 4 = 7, and pi is about 3.14159."
)
DEFAULT_RANDOM_TOKENS = 64


@dataclass
class VerifyResult:
    num_tokens: int
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    max_abs_logprob_diff: float
    argmax_agreement: float
    atol: float
    min_argmax_agreement: float
    truncated_from: Optional[int] = None  # the text's token count when it was cut to the model's limit

    @property
    def passed(self) -> bool:
        return self.max_abs_logit_diff <= self.atol and self.argmax_agreement >= self.min_argmax_agreement

    def summary(self) -> str:
        agree = round(self.argmax_agreement * self.num_tokens)
        return (f"max |dlogit| {self.max_abs_logit_diff:.3e}  mean |dlogit| {self.mean_abs_logit_diff:.3e}  "
                f"max |dlogp| {self.max_abs_logprob_diff:.3e}  argmax agreement "
                f"{100 * self.argmax_agreement:.2f}% ({agree}/{self.num_tokens})")


def compare_logits(megatron: torch.Tensor, hf: torch.Tensor, atol: float = 1e-4,
                   min_argmax_agreement: float = 1.0) -> VerifyResult:
    """Both [T, V] over the true vocabulary."""
    if megatron.shape != hf.shape:
        raise ValueError(f"logit shapes differ: megatron {tuple(megatron.shape)}, HF {tuple(hf.shape)}")
    m, h = megatron.double(), hf.double()
    diff = (m - h).abs()
    dlogp = (torch.log_softmax(m, -1) - torch.log_softmax(h, -1)).abs()
    agree = (m.argmax(-1) == h.argmax(-1)).double().mean()
    return VerifyResult(num_tokens=m.shape[0], max_abs_logit_diff=float(diff.max()),
                        mean_abs_logit_diff=float(diff.mean()), max_abs_logprob_diff=float(dlogp.max()),
                        argmax_agreement=float(agree), atol=atol, min_argmax_agreement=min_argmax_agreement)


# Fields of ModelConfig that decide the tensors' shapes and the architecture: the HF model and
# the checkpoint must agree on them before a comparison means anything (None = the default).
STRUCTURE_FIELDS = ("vocab_size", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                    "kv_channels", "ffn_hidden_size", "normalization", "swiglu", "position_embedding_type",
                    "untie_embeddings_and_output_weights", "add_qkv_bias", "add_bias_linear")


def _structure(cfg) -> dict:
    heads = cfg.num_attention_heads
    out = {k: getattr(cfg, k) for k in STRUCTURE_FIELDS}
    out["num_query_groups"] = cfg.num_query_groups or heads
    out["kv_channels"] = cfg.kv_channels or cfg.hidden_size // heads
    out["ffn_hidden_size"] = cfg.ffn_hidden_size or 4 * cfg.hidden_size
    return out


def check_same_architecture(hf_cfg, hf_desc: str, ckpt_cfg, ckpt_desc: str) -> None:
    """Raise ConversionError listing the structural differences of two ModelConfigs, if any."""
    a, b = _structure(hf_cfg), _structure(ckpt_cfg)
    if a["position_embedding_type"] == b["position_embedding_type"] == "learned_absolute":  # tables of that many rows
        a["max_position_embeddings"] = hf_cfg.max_position_embeddings
        b["max_position_embeddings"] = ckpt_cfg.max_position_embeddings
    diffs = [f"{k} {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k]]
    if diffs:
        raise ConversionError(f"the HF model ({hf_desc}) and the checkpoint ({ckpt_desc}) are different "
                              f"architectures: " + ", ".join(diffs) + " (HF vs checkpoint)")


def token_limit(cfg, max_tokens: int = 4096) -> int:
    return min(max_tokens, cfg.max_position_embeddings)


def fixed_tokens(load_dir, hf_dir=None, text: Optional[str] = None, random_tokens: Optional[int] = None,
                 vocab_size: Optional[int] = None, max_tokens: int = 4096, info: Optional[dict] = None) -> List[int]:
    """The verification input: ``text`` (default DEFAULT_TEXT) through the checkpoint's tokenizer,
    or, with no tokenizer or with ``random_tokens``, fixed pseudo-random ids (seed 1234).

    Raises ConversionError for ``random_tokens`` beyond the limit (max positions, ``max_tokens``),
    for an explicit ``text`` without a tokenizer or with fewer than 2 tokens, and for a tokenizer
    that does not load. A text longer than the limit is cut; ``info["truncated_from"]`` then
    holds its length.
    """
    cfg = read_model_config(load_dir)
    vocab_size = vocab_size or cfg.vocab_size
    limit = token_limit(cfg, max_tokens)
    if random_tokens is not None and random_tokens > limit:
        raise ConversionError(f"--random-tokens {random_tokens} is more than this model takes: at most {limit} "
                              f"(max_position_embeddings {cfg.max_position_embeddings}, cap {max_tokens})")
    if not random_tokens:
        for candidate in (Path(load_dir) / TOKENIZER_DIR, hf_dir):
            if candidate is None or not Path(candidate).is_dir():
                continue
            if not any((Path(candidate) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                  "tokenizer.model", "vocab.json")):
                continue
            from transformers import AutoTokenizer

            check_tokenizer_files(candidate)
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(candidate), local_files_only=True)
            except Exception as exc:  # a broken or incomplete tokenizer directory
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ConversionError(f"cannot load the tokenizer in {candidate}: {first}") from None
            ids = tokenizer(text or DEFAULT_TEXT, add_special_tokens=True)["input_ids"]
            if len(ids) > limit and info is not None:
                info["truncated_from"] = len(ids)
            ids = ids[:limit]
            if ids and max(ids) >= vocab_size:
                raise ConversionError(f"the tokenizer in {candidate} gives token id {max(ids)}, beyond the "
                                      f"model's vocab_size {vocab_size}")
            if len(ids) >= 2:
                return [int(i) for i in ids]
            if text is not None:
                raise ConversionError(f"--text gives {len(ids)} token(s) with the tokenizer in {candidate}; "
                                      f"at least 2 are needed")
        if text is not None:
            raise ConversionError(f"--text needs a tokenizer, and there is none in {Path(load_dir) / TOKENIZER_DIR} "
                                  f"or {hf_dir}; use --random-tokens N")
    n = min(random_tokens or DEFAULT_RANDOM_TOKENS, limit)
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (n,), generator=g).tolist()


def hf_logits(hf_dir, tokens: Sequence[int]) -> torch.Tensor:
    """[T, V] fp32 logits of the HF model (eager attention, the reference implementation)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager",
                                                     local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:  # e.g. tensor data that does not load
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConversionError(f"transformers cannot load the model in {hf_dir}: {first}") from None
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([list(tokens)])).logits[0].float()
    del model
    return out


def megatron_logits(load_dir, tokens: Sequence[int], transformer_impl: str = "local",
                    verify: bool = True) -> Optional[torch.Tensor]:
    """Run on every rank (parallel state initialised): [T, V] fp32 logits on the last pipeline
    stage's TP rank 0 (vocab padding removed), None elsewhere. ``verify``: as load_model_checkpoint's."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_pref.model import ParallelConfig, PrecisionConfig, build_gpt_model, packed_forward_inputs

    cfg = read_model_config(load_dir)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    # Every weight comes from the checkpoint (strict load): skip the random initialisation.
    model = build_gpt_model(cfg, ParallelConfig(tp, pp), PrecisionConfig(bf16=False, transformer_impl=transformer_impl),
                            perform_initialization=False)
    load_model_checkpoint(model, load_dir, verify=verify)
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor(list(tokens), dtype=torch.long, device=device)
    T = ids.numel()
    inputs = packed_forward_inputs(ids, torch.arange(T, device=device),
                                   torch.tensor([0, T], dtype=torch.int32, device=device),
                                   use_thd=False)

    def run(m):
        return m(inputs.input_ids, inputs.position_ids, inputs.attention_mask,
                 packed_seq_params=inputs.packed_seq_params)

    with torch.no_grad():
        if pp == 1:
            logits = run(model)
        else:
            def forward_step(data_iterator, m):
                return run(m), None  # no loss: the schedule returns the last stage's output

            outputs = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
                num_microbatches=1, seq_length=T, micro_batch_size=1, forward_only=True)
            logits = outputs[0] if ps.is_pipeline_last_stage() else None
        if logits is None:
            return None
        full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    if ps.get_tensor_model_parallel_rank() != 0:
        return None
    return full[0, :, :cfg.vocab_size].float().cpu()


def check_verify_inputs(hf_dir, load_dir, tensor_model_parallel_size: int = 1,
                        pipeline_model_parallel_size: int = 1):
    """Every check that needs no model: the HF directory as the converter checks it (never a Hub
    name), the checkpoint's config and files, the same architecture on both sides, the layout.
    Returns the checkpoint's ModelConfig; raises ConversionError (one line)."""
    from megatron_pref.convert.hf_to_megatron import inspect_hf_checkpoint
    from megatron_pref.model import ParallelConfig

    if not Path(load_dir).is_dir():
        raise ConversionError(f"--load {load_dir} is not a directory")
    hf = inspect_hf_checkpoint(hf_dir, allow_sliding_window_as_full=True)  # the window shows in the logits
    hf.reader.close()
    cfg = read_model_config(load_dir)
    resolve_iteration_dir(load_dir)
    check_tokenizer_files(Path(load_dir) / TOKENIZER_DIR)
    source = read_checkpoint_metadata(load_dir).get("source")
    ckpt_type = source.get("model_type") if isinstance(source, dict) else None
    check_same_architecture(hf.model_cfg, f"{hf.model_type} in {hf_dir}", cfg,
                            f"{ckpt_type or 'megatron_pref'} in {load_dir}")
    parallel = ParallelConfig(tensor_model_parallel_size, pipeline_model_parallel_size)
    try:
        parallel.validate_for(cfg)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    return cfg


def _rank_error(exc: RuntimeError) -> Optional[str]:
    """The message of a ConversionError raised in a forked rank (run_on_ranks reports a traceback)."""
    marker = ConversionError.__name__ + ": "
    for line in reversed(str(exc).splitlines()):
        if marker in line:
            return line.split(marker, 1)[1]
    return None


def verify_conversion(hf_dir, load_dir, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                      atol: float = 1e-4, min_argmax_agreement: float = 1.0, text: Optional[str] = None,
                      random_tokens: Optional[int] = None, tokens: Optional[Sequence[int]] = None,
                      report: Optional[Callable[[VerifyResult], None]] = None, verify: bool = True) -> VerifyResult:
    """Compare the two models at TP x PP ranks: gloo ranks forked from this process (CPU), or,
    under torchrun, torchrun's ranks (exactly TP x PP of them; every rank returns the result).

    ``report(result)`` is called once, on one process, before any rank returns (under torchrun
    a rank that returns first may have the others stopped). Bad input (directories, mismatched
    models, options, files that differ from their checksums unless ``verify`` is False) raises
    ConversionError before either model is built."""
    from megatron_pref.cli_errors import launched_by_torchrun
    from megatron_pref.forked_ranks import run_on_ranks
    from megatron_pref.model import ParallelConfig

    if not (math.isfinite(atol) and atol >= 0):
        raise ConversionError(f"--atol must be a finite number >= 0, got {atol}")
    if not 0.0 <= min_argmax_agreement <= 1.0:
        raise ConversionError(f"--min-argmax-agreement must be between 0 and 1, got {min_argmax_agreement}")
    if text is not None and random_tokens is not None:
        raise ConversionError("--text and --random-tokens are exclusive")
    cfg = check_verify_inputs(hf_dir, load_dir, tensor_model_parallel_size, pipeline_model_parallel_size)
    parallel = ParallelConfig(tensor_model_parallel_size, pipeline_model_parallel_size)
    info: dict = {}
    if tokens is None:
        tokens = fixed_tokens(load_dir, hf_dir, text=text, random_tokens=random_tokens, info=info)
    elif len(tokens) > cfg.max_position_embeddings or any(not 0 <= int(t) < cfg.vocab_size for t in tokens):
        raise ConversionError(f"tokens must be ids below {cfg.vocab_size}, at most {cfg.max_position_embeddings} "
                              f"of them")
    check_dist_checkpoint(load_dir)
    verify_checksums(resolve_iteration_dir(load_dir), "--load", verify, ConversionError)
    world = tensor_model_parallel_size * pipeline_model_parallel_size
    if launched_by_torchrun():
        if int(os.environ.get("WORLD_SIZE", "1")) != world:
            raise ConversionError(f"torchrun started {os.environ.get('WORLD_SIZE')} rank(s); TP x PP = {world} "
                                  f"are needed")
        return _verify_on_torchrun_ranks(hf_dir, load_dir, parallel, list(tokens), atol, min_argmax_agreement,
                                         info.get("truncated_from"), report, verify)
    reference = hf_logits(hf_dir, tokens)
    try:
        # The files were just verified (above): the ranks need not hash them again.
        results = run_on_ranks(megatron_logits, world, parallel, str(load_dir), list(tokens), "local", False)
    except RuntimeError as exc:
        message = _rank_error(exc)
        if message is None:
            raise
        raise ConversionError(message) from None
    ours = next(r for r in results if r is not None)
    result = compare_logits(ours, reference, atol=atol, min_argmax_agreement=min_argmax_agreement)
    result.truncated_from = info.get("truncated_from")
    if report is not None:
        report(result)
    return result


def _verify_on_torchrun_ranks(hf_dir, load_dir, parallel, tokens: list, atol: float, min_argmax_agreement: float,
                              truncated_from: Optional[int], report, verify: bool = True) -> VerifyResult:
    """torchrun's ranks are the TP x PP ranks. The rank that ends up with the full logits also
    runs the HF model and compares; every rank receives the result; rank 0 reports it before
    the last collective, so no rank exits before the report is out."""
    import torch.distributed as dist

    from megatron_pref import parallel as process_groups

    # The other ranks wait in the gather while this one runs the HF model (minutes for a large
    # model on the CPU): a generous collective timeout.
    process_groups.initialize(parallel, seed=1234, timeout_minutes=120)
    try:
        ours = megatron_logits(load_dir, tokens, verify=verify)
        mine = None
        if ours is not None:
            mine = compare_logits(ours, hf_logits(hf_dir, tokens), atol=atol,
                                  min_argmax_agreement=min_argmax_agreement)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        result = next(r for r in gathered if r is not None)
        result.truncated_from = truncated_from
        if report is not None and dist.get_rank() == 0:
            report(result)
        dist.barrier()
    finally:
        process_groups.destroy()
    return result
