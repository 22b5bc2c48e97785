"""Greedy decoding (megatron_pref.generation): packs padded to the kernels' multiple decode the same."""

from __future__ import annotations

import torch

from megatron_pref.model import ModelConfig, ParallelConfig, PrecisionConfig

VOCAB = 50
MODEL = ModelConfig(vocab_size=VOCAB, num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                    max_position_embeddings=64, make_vocab_size_divisible_by=16, init_method_std=0.2)
PROMPTS = [[1, 5, 9, 3], [2, 7], [4, 4, 4, 8, 11, 6, 2], [13]]


def test_pack_tail_is_padded_outside_every_sequence():
    from megatron_pref.data.packing import build_pack  # what greedy_generate packs with

    pack = build_pack(PROMPTS, pad_multiple=16)
    real = sum(len(p) for p in PROMPTS)
    assert pack.tokens.numel() == 16 and real == 14
    assert pack.cu_seqlens.tolist() == [0, 4, 6, 13, 14]  # the tail is not a sequence
    assert pack.tokens[:real].tolist() == [t for p in PROMPTS for t in p]
    assert pack.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 4, 5, 6, 0, 0, 1]
    assert pack.loss_mask.sum() == 0  # no loss: decoding only reads the last logits
    assert build_pack(PROMPTS).tokens.numel() == real


def _decode(pad_multiple):
    from megatron_pref.engine import build_model_chunks
    from megatron_pref.generation import greedy_generate
    from megatron_pref.model import layout_invariant_init

    chunks = build_model_chunks(MODEL, ParallelConfig(), PrecisionConfig(), wrap_ddp=False)
    layout_invariant_init(chunks[0], MODEL, 7)
    return greedy_generate(chunks, PROMPTS, VOCAB, eos_id=None, max_new_tokens=6, use_thd=False,
                           pad_multiple=pad_multiple)


def test_padded_packs_decode_like_unpadded(distributed):
    (plain,) = distributed(_decode, 1, ParallelConfig(), 1)
    (padded,) = distributed(_decode, 1, ParallelConfig(), 16)
    assert padded == plain
    assert all(len(a) == 6 for a in plain)
    # Control: the answers depend on the prompt (a decoder ignoring its input would also agree).
    assert len({tuple(a) for a in plain}) > 1
    assert torch.tensor([t for a in plain for t in a]).lt(VOCAB).all()  # padded vocabulary never chosen
