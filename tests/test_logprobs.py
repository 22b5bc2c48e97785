"""Vocab-parallel token log-probs and segment reductions."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_pref.logprobs import segment_sums, token_logprobs
from megatron_pref.model import ParallelConfig, padded_vocab_size

TRUE_VOCAB = 1100  # not a multiple of 128*TP: padded to 1152 / 1280 / 1536 at TP 1 / 2 / 4
TOKENS = 37


def reference_logprobs(logits, labels, true_vocab):
    """Plain log-softmax over the true vocab only."""
    return torch.log_softmax(logits[:, :true_vocab].double(), -1).gather(1, labels[:, None]).squeeze(1)


def random_problem(seed=0, padded=1536):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(TOKENS, padded, generator=g) * 3
    # Padded columns hold large live values: they must not leak into the softmax.
    logits[:, TRUE_VOCAB:] += 10.0
    labels = torch.randint(0, TRUE_VOCAB, (TOKENS,), generator=g)
    upstream = torch.randn(TOKENS, generator=g)
    return logits, labels, upstream


@pytest.mark.parametrize("chunk", [1, 5, 16, 4096])
def test_matches_log_softmax_values_and_gradients(chunk):
    logits, labels, upstream = random_problem()
    x = logits[:, :1152].clone().requires_grad_(True)
    got = token_logprobs(x, labels, TRUE_VOCAB, chunk_tokens=chunk)
    (got * upstream).sum().backward()

    x_ref = logits[:, :1152].double().clone().requires_grad_(True)
    want = reference_logprobs(x_ref, labels, TRUE_VOCAB)
    (want * upstream.double()).sum().backward()

    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, atol=1e-6, rtol=0)
    assert torch.all(x.grad[:, TRUE_VOCAB:] == 0), "padded columns must get no gradient"


def test_padded_vocab_leaks_without_masking():
    """Negative control: treating the padded columns as real vocab changes the log-probs."""
    logits, labels, _ = random_problem()
    masked = token_logprobs(logits[:, :1152], labels, TRUE_VOCAB)
    unmasked = token_logprobs(logits[:, :1152], labels, 1152)
    assert (masked - unmasked).abs().max() > 1.0


def _tp_logprobs(logits, labels, upstream):
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    padded = padded_vocab_size(TRUE_VOCAB, 128, tp)
    shard = padded // tp
    local = logits[:, rank * shard:(rank + 1) * shard].clone().requires_grad_(True)
    out = token_logprobs(local, labels, TRUE_VOCAB, chunk_tokens=8)
    (out * upstream).sum().backward()
    return out.detach(), local.grad


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_invariance(distributed, tp):
    logits, labels, upstream = random_problem()
    (base, base_grad), = distributed(_tp_logprobs, 1, ParallelConfig(1), logits, labels, upstream)
    ranks = distributed(_tp_logprobs, tp, ParallelConfig(tp), logits, labels, upstream)
    for out, _ in ranks:
        torch.testing.assert_close(out, base, atol=1e-5, rtol=0)
    grad = torch.cat([g for _, g in ranks], dim=1)
    torch.testing.assert_close(grad[:, :TRUE_VOCAB], base_grad[:, :TRUE_VOCAB], atol=1e-5, rtol=0)
    assert torch.all(grad[:, TRUE_VOCAB:] == 0)


def test_no_full_fp32_copy_is_saved_for_backward():
    """Autograd keeps the bf16 logits and O(T) vectors, never a [T, V] fp32 tensor."""
    logits, labels, _ = random_problem()
    x = logits[:, :1152].to(torch.bfloat16).requires_grad_(True)
    full_fp32_bytes = x.numel() * 4

    def saved_bytes(fn):
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(x)
        # The logits themselves are the model's tensor, not an extra copy.
        extra = [t for t in saved if t.data_ptr() != x.data_ptr()]
        return out, max((t.numel() * t.element_size() for t in extra), default=0)

    _, ours = saved_bytes(lambda t: token_logprobs(t, labels, TRUE_VOCAB, chunk_tokens=8))
    assert ours < full_fp32_bytes / 100
    # Negative control: the obvious implementation saves a full fp32 [T, V] softmax.
    _, naive = saved_bytes(lambda t: torch.log_softmax(t.float(), -1).gather(1, labels[:, None]))
    assert naive >= full_fp32_bytes


def test_segment_sums_closed_form():
    values = torch.arange(10, dtype=torch.float32)
    mask = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.float32)
    cu = torch.tensor([0, 3, 7, 9], dtype=torch.int32)  # token 9 is padding
    sums, counts = segment_sums(values, mask, cu)
    torch.testing.assert_close(sums, torch.tensor([1 + 2, 4 + 5 + 6, 8.0]))
    torch.testing.assert_close(counts, torch.tensor([2.0, 3.0, 1.0]))


def test_segment_sums_ignore_non_finite_masked_values():
    values = torch.tensor([float("-inf"), 1.0, 2.0])
    sums, _ = segment_sums(values, torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0, 3], dtype=torch.int32))
    assert sums.item() == 3.0


class _HostSyncDetector(TorchDispatchMode):
    """Records ops that force the host to wait for the device."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "item", "repeat_interleave")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__ if hasattr(func, "__name__") else str(func)
        if any(s in str(func) for s in self.SYNCING):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_pair_statistics_has_no_host_sync():
    from types import SimpleNamespace

    from megatron_pref.step import pair_statistics

    logits, labels, _ = random_problem()
    pack = SimpleNamespace(labels=labels, loss_mask=torch.ones(TOKENS),
                           cu_seqlens=torch.tensor([0, 10, 20, 30], dtype=torch.int32),
                           pair_ids=torch.tensor([7, 8]), seq_pair_index=torch.tensor([0, 0, 1]),
                           seq_is_chosen=torch.tensor([True, False, True]))
    detector = _HostSyncDetector()
    with detector:
        pair_statistics(logits[:, :1152], pack, TRUE_VOCAB)
    assert detector.seen == []
    # Negative control: the detector does see a sync.
    with detector:
        torch.tensor([1.0, 2.0]).sum().item()
    assert detector.seen
