"""Masking, packing invariants, length policy, determinism, resume and DP shards."""

import numpy as np
import pytest
import torch

from megatron_pref.data import demo_task
from megatron_pref.data.datasets import InMemoryPreferenceDataset
from megatron_pref.data.errors import DataError, SkipPair
from megatron_pref.data.packing import (
    PackedPairLoader,
    build_pack,
    build_packed_batch,
    compute_pad_multiple,
    first_fit_decreasing,
    iter_packs_once,
    pad_pack,
    packed_to_padded,
    per_sequence_sum,
    round_up,
    split_chosen_rejected,
)
from megatron_pref.data.pairs import TokenizedPair, apply_length_policy, plan_lengths

BOS, EOS = 1, 2


def make_pair(rng, max_prompt=12, max_resp=12, scores=True):
    lp, lc, lr = rng.integers(1, max_prompt), rng.integers(1, max_resp), rng.integers(1, max_resp)
    p = np.concatenate([[BOS], rng.integers(5, 100, lp)]).astype(np.int32)
    c = np.concatenate([rng.integers(5, 100, lc), [EOS]]).astype(np.int32)
    r = np.concatenate([rng.integers(100, 200, lr), [EOS]]).astype(np.int32)  # never equal to c
    sc = float(rng.normal()) if scores else None
    return TokenizedPair(p, c, r, sc, (sc - 1.0) if scores else None)


def make_dataset(n=200, seed=0, **kw):
    rng = np.random.default_rng(seed)
    ds = InMemoryPreferenceDataset([make_pair(rng, **kw) for _ in range(n)])
    ds.bos_id, ds.pad_id = BOS, 0
    return ds


def check_pack(pack, ds, seq_length, pad_multiple):
    """All layout invariants of one pack against the source pairs."""
    T = pack.pack_length
    assert T % pad_multiple == 0
    assert pack.num_real_tokens <= seq_length
    assert T <= round_up(seq_length, pad_multiple)
    cu = pack.cu_seqlens
    assert cu.dtype == torch.int32 and cu[0] == 0 and torch.all(cu[1:] > cu[:-1])
    assert int(cu[-1]) <= T and pack.num_sequences == 2 * pack.num_pairs
    assert torch.equal(pack.seq_pair_index, torch.arange(pack.num_pairs).repeat_interleave(2))
    assert torch.equal(pack.seq_is_chosen, torch.tensor([True, False] * pack.num_pairs))
    rej_resp = 0
    for s in range(pack.num_sequences):
        o, e = int(cu[s]), int(cu[s + 1])
        pair = ds[int(pack.pair_ids[pack.seq_pair_index[s]])]
        resp = pair.chosen_ids if pack.seq_is_chosen[s] else pair.rejected_ids
        seq = np.concatenate([pair.prompt_ids, resp])
        lp = len(pair.prompt_ids)
        assert np.array_equal(pack.tokens[o:e].numpy(), seq)  # the pair is whole, in this pack
        assert np.array_equal(pack.labels[o:e - 1].numpy(), seq[1:])  # next token of the same sequence
        assert pack.labels[e - 1] == 0 and pack.loss_mask[e - 1] == 0  # no label across the boundary
        want_mask = np.zeros(e - o, np.float32)
        want_mask[lp - 1:e - o - 1] = 1.0  # exactly the positions whose label is a response token
        assert np.array_equal(pack.loss_mask[o:e].numpy(), want_mask)
        assert np.array_equal(pack.position_ids[o:e].numpy(), np.arange(e - o))
        if not pack.seq_is_chosen[s]:
            rej_resp += len(resp)
    n = pack.num_real_tokens
    assert torch.all(pack.tokens[n:] == getattr(ds, "pad_id", 0)) and torch.all(pack.labels[n:] == 0) and torch.all(pack.loss_mask[n:] == 0)
    assert pack.num_rejected_response_tokens == rej_resp


def test_masking_and_labels_hand_made():
    p = TokenizedPair(np.array([BOS, 10, 11]), np.array([20, 21, EOS]), np.array([30, EOS]), 1.0, 0.0)
    q = TokenizedPair(np.array([BOS]), np.array([40, EOS]), np.array([50, 51, 52, EOS]))
    pack = build_packed_batch([p, q], pad_multiple=8, pair_ids=[7, 9])
    #            chosen p              rejected p         chosen q     rejected q
    toks = [1, 10, 11, 20, 21, 2, 1, 10, 11, 30, 2, 1, 40, 2, 1, 50, 51, 52, 2]
    assert pack.tokens.tolist() == toks + [0] * 5
    assert pack.labels.tolist() == [10, 11, 20, 21, 2, 0, 10, 11, 30, 2, 0, 40, 2, 0, 50, 51, 52, 2, 0] + [0] * 5
    assert pack.loss_mask.tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 0] + [0] * 5
    assert pack.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    assert pack.cu_seqlens.tolist() == [0, 6, 11, 14, 19]
    assert pack.pair_ids.tolist() == [7, 9] and pack.num_pairs == 2 and pack.num_real_tokens == 19
    assert pack.num_rejected_response_tokens == 2 + 4 and pack.num_chosen_response_tokens == 3 + 2
    sc = pack.score_chosen.tolist()
    assert sc[0] == 1.0 and np.isnan(sc[1]) and pack.score_rejected[0] == 0.0



def test_padding_a_pack_is_building_it_longer():
    """One layout: pad_pack(pack, L) is the pack built with pad_to=L, field for field (the tail
    is one run of positions outside every sequence, labelled S by sequence_ids), and an empty
    pack (the interleaved schedule's filler) adds nothing to any per-sequence or pair sum."""
    from dataclasses import fields

    from megatron_pref.logprobs import segment_sums

    rng = np.random.default_rng(5)
    pairs = [make_pair(rng) for _ in range(3)]
    short = build_packed_batch(pairs, pad_multiple=8, pad_id=3)
    n = short.num_real_tokens
    assert short.pack_length > n  # the short pack has a tail of its own already
    long = build_packed_batch(pairs, pad_multiple=8, pad_id=3, pad_to=short.pack_length + 13)
    grown = pad_pack(short, long.pack_length, pad_id=3)
    assert long.pack_length == round_up(short.pack_length + 13, 8) > short.pack_length
    for f in fields(long):
        a, b = getattr(grown, f.name), getattr(long, f.name)
        assert (a is None and b is None) or torch.equal(a, b), f.name
    assert grown.position_ids[n:].tolist() == list(range(long.pack_length - n))
    assert pad_pack(long, short.pack_length) is long  # never shortened
    ids = grown.sequence_ids()
    assert torch.all(ids[n:] == grown.num_sequences) and torch.equal(ids[:n], short.sequence_ids()[:n])
    sums, counts = segment_sums(torch.ones(grown.pack_length), grown.loss_mask, grown.cu_seqlens, ids)
    assert torch.equal(counts, per_sequence_sum(short.loss_mask, short.cu_seqlens))

    empty = build_packed_batch([], pad_to=12, with_scores=True)
    assert (empty.pack_length, empty.num_pairs, empty.num_sequences, empty.num_real_tokens) == (12, 0, 0, 0)
    assert empty.loss_mask.sum() == 0 and empty.position_ids.tolist() == list(range(12))
    assert empty.score_chosen.shape == (0,) and per_sequence_sum(torch.ones(12), empty.cu_seqlens).numel() == 0
    with pytest.raises(ValueError, match="at least one pair"):
        build_packed_batch([])
    # Sequences of no pair (generation): the same layout, no loss.
    plain = build_pack([[5, 6, 7], [8]], pad_multiple=8)
    assert plain.cu_seqlens.tolist() == [0, 3, 4] and plain.labels.tolist()[:4] == [6, 7, 0, 0]
    assert plain.loss_mask.sum() == 0 and plain.pair_ids.numel() == 0

def test_first_fit_decreasing():
    bins = first_fit_decreasing([5, 7, 5, 2, 4, 2, 5, 1, 6], 10)
    sizes = [5, 7, 5, 2, 4, 2, 5, 1, 6]
    assert sorted(i for b in bins for i in b) == list(range(9))
    assert all(sum(sizes[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 37 units -> 4 bins is optimal
    assert bins == first_fit_decreasing(sizes, 10)
    with pytest.raises(ValueError):
        first_fit_decreasing([11], 10)


@pytest.mark.parametrize("pad_multiple", [1, 16, 24])
def test_loader_pack_invariants(pad_multiple):
    ds = make_dataset(300)
    seq_length = 96
    loader = PackedPairLoader(ds, seq_length, global_batch_pairs=40, seed=3, pad_multiple=pad_multiple)
    seen = []
    for _ in range(5):
        packs = loader.next_global_batch()
        ids = torch.cat([p.pair_ids for p in packs]).tolist()
        assert len(ids) == 40 and len(set(ids)) == 40
        real = sum(p.num_real_tokens for p in packs)
        assert real == sum(ds[i].num_tokens for i in ids)  # every real token accounted for
        for p in packs:
            check_pack(p, ds, seq_length, pad_multiple)
        seen += ids
    assert loader.consumed_pairs == 200 and loader.epoch == 0
    st = loader.stats
    assert 0.5 < st.packing_efficiency <= 1.0
    assert st.packs > 0 and st.real_tokens <= st.pack_tokens
    assert "packing efficiency" in st.summary()


def test_pad_to_seq_length_and_pad_multiple_helper():
    assert compute_pad_multiple() == 1
    assert compute_pad_multiple(fp8=True) == 16
    assert compute_pad_multiple(fp8=True, tensor_parallel=2, sequence_parallel=True, context_parallel=2) == 128
    assert compute_pad_multiple(tensor_parallel=4, sequence_parallel=False) == 1
    # Blockwise FP8 gathers sequence-parallel shards in 128-token blocks; without SP, 16.
    assert compute_pad_multiple(fp8=True, tensor_parallel=2, sequence_parallel=True, fp8_recipe="blockwise") == 256
    assert compute_pad_multiple(fp8=True, tensor_parallel=2, fp8_recipe="blockwise") == 16
    ds = make_dataset(50)
    loader = PackedPairLoader(ds, 100, 10, pad_multiple=16, pad_to_seq_length=True)
    for p in loader.next_global_batch():
        assert p.pack_length == 112


def test_determinism_and_epoch_reshuffle():
    ds = make_dataset(60)

    def run(seed, n=9):
        ld = PackedPairLoader(ds, 128, 20, seed=seed)
        return [torch.cat([p.pair_ids for p in ld.next_global_batch()]).tolist() for _ in range(n)]

    a, b, c = run(1), run(1), run(2)
    assert a == b and a != c
    # 60 pairs / 20 per batch = 3 batches per epoch; each epoch is a permutation of all pairs
    epochs = [sorted(sum(a[3 * e:3 * e + 3], [])) for e in range(3)]
    assert all(e == list(range(60)) for e in epochs)
    assert sum(a[0:3], []) != sum(a[3:6], [])  # reshuffled per epoch
    # 60 pairs / 25 per batch: 2 batches per epoch, 10 pairs dropped (different ones each epoch)
    ld = PackedPairLoader(ds, 128, 25, seed=1)
    assert ld.pairs_per_epoch == 50
    got = [torch.cat([p.pair_ids for p in ld.next_global_batch()]).tolist() for _ in range(4)]
    assert all(len(set(g)) == 25 for g in got)
    assert len(set(got[0] + got[1])) == 50 and ld.epoch == 2
    assert set(got[0] + got[1]) != set(got[2] + got[3])
    # identical packs, not just identical pair sets
    l1, l2 = PackedPairLoader(ds, 128, 20, seed=5), PackedPairLoader(ds, 128, 20, seed=5)
    for x, y in zip(l1.next_global_batch(), l2.next_global_batch()):
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.cu_seqlens, y.cu_seqlens)


@pytest.mark.parametrize("k", [0, 3, 4, 7])
def test_resume_reproduces_order(k):
    ds = make_dataset(50)
    G = 12  # not a divisor of 50: 2 pairs dropped per epoch
    full = PackedPairLoader(ds, 128, G, dp_rank=1, dp_size=2, seed=11, pad_multiple=8)
    ref = [full.next_global_batch() for _ in range(10)]
    resumed = PackedPairLoader(ds, 128, G, dp_rank=1, dp_size=2, seed=11, pad_multiple=8, consumed_pairs=k * G)
    assert resumed.epoch == (k * G) // 48
    for want in ref[k:]:
        got = resumed.next_global_batch()
        assert len(got) == len(want)
        for x, y in zip(got, want):
            assert torch.equal(x.pair_ids, y.pair_ids) and torch.equal(x.tokens, y.tokens)
    assert resumed.consumed_pairs == full.consumed_pairs
    # state_dict round trip, and an arbitrary (non batch-aligned) position in the stream
    assert resumed.state_dict()["consumed_pairs"] == 10 * G
    s1 = PackedPairLoader(ds, 128, 4, seed=11)
    s1.load_state_dict({"consumed_pairs": 5})
    assert s1.stream_indices(5, 4).tolist() == full.stream_indices(5, 4).tolist()


def test_disjoint_dp_shards_cover_global_batch():
    ds = make_dataset(120)
    G, dp = 32, 4
    loaders = [PackedPairLoader(ds, 80, G, dp_rank=r, dp_size=dp, seed=9) for r in range(dp)]
    for _ in range(6):
        start = loaders[0].consumed_pairs
        global_ids = loaders[0].stream_indices(start, G).tolist()
        shards = [torch.cat([p.pair_ids for p in ld.next_global_batch()]).tolist() for ld in loaders]
        assert all(len(s) == G // dp for s in shards)
        flat = sum(shards, [])
        assert len(set(flat)) == G and sorted(flat) == sorted(global_ids)
    # balanced: per-rank token loads are close
    loads = [ld.stats.real_tokens for ld in loaders]
    assert max(loads) - min(loads) <= 0.1 * max(loads)
    with pytest.raises(DataError, match="not divisible"):
        PackedPairLoader(ds, 80, 30, dp_rank=0, dp_size=4)


def test_iter_once_covers_each_pair_once():
    ds = make_dataset(101)
    got = []
    for r in range(3):
        got += [int(i) for p in iter_packs_once(ds, 64, dp_rank=r, dp_size=3, pad_multiple=8, pairs_per_step=30)
                for i in p.pair_ids]
    assert sorted(got) == list(range(101))


def test_reference_pass_uses_the_first_epochs_training_packs_then_covers_the_rest():
    """The precomputed reference's pass: epoch 0's global batches packed exactly as
    next_global_batch packs them (same packs -> bit-identical log-probs at step 0), then the
    pairs epoch 0 drops; every usable pair once over the data-parallel ranks."""
    ds = make_dataset(101)
    G, dp = 12, 3  # 101 = 8 x 12 + 5 pairs dropped from epoch 0
    got = []
    for r in range(dp):
        loader = PackedPairLoader(ds, 64, G, dp_rank=r, dp_size=dp, seed=5, pad_multiple=8)
        steps = list(loader.iter_reference_pass(pairs_per_step=30))
        assert loader.consumed_pairs == 0
        training = PackedPairLoader(ds, 64, G, dp_rank=r, dp_size=dp, seed=5, pad_multiple=8)
        for step in steps[:loader.pairs_per_epoch // G]:
            for a, b in zip(step, training.next_global_batch(), strict=True):
                assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pair_ids, b.pair_ids)
        got += [int(i) for step in steps for p in step for i in p.pair_ids]
    assert sorted(got) == list(range(101))
    # Negative control: evaluation's order packs differently.
    once = [p.pair_ids.tolist() for step in PackedPairLoader(ds, 64, G, seed=5).iter_once() for p in step]
    ref = [p.pair_ids.tolist() for step in PackedPairLoader(ds, 64, G, seed=5).iter_reference_pass() for p in step]
    assert once != ref


def test_length_policy():
    # (prompt, chosen, rejected) lengths, seq_length 20
    L = np.array([[3, 4, 5], [8, 3, 3], [4, 10, 2], [9, 9, 9]])
    new, fits, trunc = plan_lengths(L, 20)
    assert fits.tolist() == [True, False, True, False] and not trunc.any()
    new, fits, trunc = plan_lengths(L, 20, max_prompt_length=4)
    assert new.tolist() == [[3, 4, 5], [4, 3, 3], [4, 10, 2], [4, 6, 6]]
    assert fits.tolist() == [True, True, True, True] and trunc.tolist() == [False, True, False, True]
    assert all(2 * p + c + r <= 20 for p, c, r in new)
    # the shorter response is kept whole when possible
    new, _, _ = plan_lengths(np.array([[2, 30, 3]]), 20, max_prompt_length=2)
    assert new.tolist() == [[2, 13, 3]]

    pair = TokenizedPair(np.array([BOS, 5, 6, 7, 8, 9]), np.array([10, 11, 12, 13, EOS]), np.array([10, 11, 14, EOS]))
    out, truncated = apply_length_policy(pair, 12, max_prompt_length=3, bos_id=BOS)
    assert truncated and out.prompt_ids.tolist() == [BOS, 8, 9]  # left-truncated, BOS kept
    assert out.chosen_ids.tolist() == [10, 11, 12] and out.rejected_ids.tolist() == [10, 11, 14]
    with pytest.raises(SkipPair) as e:
        apply_length_policy(pair, 10, max_prompt_length=3, bos_id=BOS)  # cap 2: [10, 11] == [10, 11]
    assert e.value.reason == "identical_after_truncation"
    with pytest.raises(SkipPair) as e:
        apply_length_policy(pair, 12)
    assert e.value.reason == "too_long"
    with pytest.raises(DataError, match="max-prompt-length"):
        apply_length_policy(pair, 12, max_prompt_length=6)


def test_loader_skips_and_truncates_counted():
    rng = np.random.default_rng(0)
    pairs = [make_pair(rng) for _ in range(30)]
    pairs.append(TokenizedPair(np.array([BOS] + [5] * 30), np.array([6, 7, EOS]), np.array([8, EOS])))  # long prompt
    pairs.append(TokenizedPair(np.array([BOS, 5]), np.array([9] * 40 + [1]), np.array([9] * 40 + [2])))  # same start
    ds = InMemoryPreferenceDataset(pairs)
    ld = PackedPairLoader(ds, 64, 8)
    assert ld.stats.skipped["too_long"] == 2 and ld.stats.usable_pairs == 30
    ld = PackedPairLoader(ds, 64, 8, max_prompt_length=10, bos_id=BOS)
    assert ld.stats.skipped == {"too_long": 0, "identical_after_truncation": 1}
    assert ld.stats.usable_pairs == 31 and ld.stats.truncated_pairs >= 1
    long_prompt = ld.source.get(30)
    assert long_prompt.prompt_ids.tolist() == [BOS] + [5] * 9 and long_prompt.pair_id == 30
    for _ in range(8):
        for p in ld.next_global_batch():
            assert p.num_real_tokens <= 64


def test_loader_skips_pairs_without_prompt_tokens():
    """Datasets preprocessed before such pairs were skipped: the loader drops them, or a
    one-token response would enter the loss with zero scored tokens."""
    rng = np.random.default_rng(0)
    pairs = [make_pair(rng) for _ in range(8)]
    pairs.append(TokenizedPair(np.array([], dtype=np.int64), np.array([EOS]), np.array([6, EOS])))
    ld = PackedPairLoader(InMemoryPreferenceDataset(pairs), 64, 8)
    assert ld.stats.skipped["empty_prompt"] == 1 and ld.stats.usable_pairs == 8
    assert 8 not in ld.source.usable
    # Control: the scored tokens of that pair's chosen response really are zero.
    pack = build_packed_batch([pairs[8]])
    assert float(pack.loss_mask[: int(pack.cu_seqlens[1])].sum()) == 0.0


def test_packed_equals_padded():
    ds = make_dataset(40)
    packs = PackedPairLoader(ds, 100, 40, pad_multiple=16).next_global_batch()
    for pack in packs:
        pad = packed_to_padded(pack)
        S = pack.num_sequences
        assert pad.tokens.shape[0] == S and pad.lengths.tolist() == pack.seq_lengths.tolist()
        for s in range(S):
            pair = ds[int(pack.pair_ids[pack.seq_pair_index[s]])]
            seq = pair.chosen_sequence if pack.seq_is_chosen[s] else pair.rejected_sequence
            L = len(seq)
            assert pad.tokens[s, :L].tolist() == seq.tolist() and torch.all(pad.tokens[s, L:] == 0)
            assert pad.labels[s, :L - 1].tolist() == seq[1:].tolist()
            assert pad.loss_mask[s].sum() == len(seq) - len(pair.prompt_ids)
        # a per-token quantity summed per sequence agrees between layouts
        vals = torch.randn(pack.pack_length, dtype=torch.float64)
        packed_sums = per_sequence_sum(vals * pack.loss_mask, pack.cu_seqlens)
        from megatron_pref.data.packing import scatter_to_padded
        padded_sums = (scatter_to_padded(vals, pack) * pad.loss_mask).sum(1)
        assert torch.allclose(packed_sums, padded_sums)
        ch, rj = split_chosen_rejected(packed_sums, pack)
        assert ch.shape == rj.shape == (pack.num_pairs,)


def test_demo_dataset_packs_with_scores():
    ds = demo_task.load_demo_dataset("valid")
    ld = PackedPairLoader(ds, 128, 64, dp_rank=0, dp_size=2, pad_multiple=16, seed=0)
    packs = ld.next_global_batch()
    assert sum(p.num_pairs for p in packs) == 32
    for p in packs:
        check_pack(p, ds, 128, 16)
        assert p.score_chosen is not None and torch.all(p.score_chosen == 1.0)
        assert torch.all(p.score_rejected == 0.0)
    assert ld.stats.packing_efficiency > 0.85
    ds2 = make_dataset(20, scores=False)
    assert PackedPairLoader(ds2, 64, 4).next_global_batch()[0].score_chosen is None
