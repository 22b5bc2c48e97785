"""Logit-level verification of a conversion: the HF model and the megatron-core model (at a
chosen TP/PP, CPU gloo ranks) run in fp32 on the same fixed tokens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from megatron_pref.convert.checkpoint_io import TOKENIZER_DIR, load_model_checkpoint, read_model_config
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


def fixed_tokens(load_dir, hf_dir=None, text: Optional[str] = None, random_tokens: Optional[int] = None,
                 vocab_size: Optional[int] = None, max_tokens: int = 4096) -> List[int]:
    """The verification input: ``text`` (default DEFAULT_TEXT) through the checkpoint's tokenizer,
    or, with no tokenizer or with ``random_tokens``, fixed pseudo-random ids (seed 1234)."""
    cfg = read_model_config(load_dir)
    vocab_size = vocab_size or cfg.vocab_size
    limit = min(max_tokens, cfg.max_position_embeddings)
    if not random_tokens:
        for candidate in (Path(load_dir) / TOKENIZER_DIR, hf_dir):
            if candidate is None or not Path(candidate).is_dir():
                continue
            if not any((Path(candidate) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                  "tokenizer.model", "vocab.json")):
                continue
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(candidate))
            ids = tokenizer(text or DEFAULT_TEXT, add_special_tokens=True)["input_ids"][:limit]
            if len(ids) >= 2:
                return [int(i) for i in ids]
    n = min(random_tokens or DEFAULT_RANDOM_TOKENS, limit)
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (n,), generator=g).tolist()


def hf_logits(hf_dir, tokens: Sequence[int]) -> torch.Tensor:
    """[T, V] fp32 logits of the HF model (eager attention, the reference implementation)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([list(tokens)])).logits[0].float()
    del model
    return out


def megatron_logits(load_dir, tokens: Sequence[int], transformer_impl: str = "local") -> Optional[torch.Tensor]:
    """Run on every rank (parallel state initialised): [T, V] fp32 logits on the last pipeline
    stage's TP rank 0 (vocab padding removed), None elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_pref.model import ParallelConfig, PrecisionConfig, build_gpt_model, packed_forward_inputs

    cfg = read_model_config(load_dir)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    # Every weight comes from the checkpoint (strict load): skip the random initialisation.
    model = build_gpt_model(cfg, ParallelConfig(tp, pp), PrecisionConfig(bf16=False, transformer_impl=transformer_impl),
                            perform_initialization=False)
    load_model_checkpoint(model, load_dir)
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


def verify_conversion(hf_dir, load_dir, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                      atol: float = 1e-4, min_argmax_agreement: float = 1.0, text: Optional[str] = None,
                      random_tokens: Optional[int] = None, tokens: Optional[Sequence[int]] = None) -> VerifyResult:
    """Compare the two models at TP x PP gloo ranks forked from this process (CPU)."""
    from megatron_pref.model import ParallelConfig
    from megatron_pref.testing import run_on_ranks

    cfg = read_model_config(load_dir)
    parallel = ParallelConfig(tensor_model_parallel_size, pipeline_model_parallel_size)
    try:
        parallel.validate_for(cfg)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    if tokens is None:
        tokens = fixed_tokens(load_dir, hf_dir, text=text, random_tokens=random_tokens)
    reference = hf_logits(hf_dir, tokens)
    world = tensor_model_parallel_size * pipeline_model_parallel_size
    results = run_on_ranks(megatron_logits, world, parallel, str(load_dir), list(tokens))
    ours = next(r for r in results if r is not None)
    return compare_logits(ours, reference, atol=atol, min_argmax_agreement=min_argmax_agreement)
