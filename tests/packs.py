"""Random packs of whole pairs for model-level tests, built by data.packing's builder."""

import numpy as np
import torch

from megatron_pref.data.packing import build_packed_batch
from megatron_pref.data.pairs import TokenizedPair


def random_pairs(num_pairs, vocab, seed=0, prompt=(3, 8), response=(2, 9)):
    """[(prompt, chosen, rejected)] token lists with ragged lengths."""
    g = torch.Generator().manual_seed(seed)

    def draw(lo_hi):
        n = int(torch.randint(lo_hi[0], lo_hi[1] + 1, (1,), generator=g))
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    return [(draw(prompt), draw(response), draw(response)) for _ in range(num_pairs)]


def make_pack(pairs, pair_ids=None, pad_to_multiple=8, scores=None):
    """One pack by the project's builder: chosen of pair k is sequence 2k, rejected 2k+1; loss
    on response labels only."""
    tokenized = [TokenizedPair(np.asarray(p), np.asarray(c), np.asarray(r)) for p, c, r in pairs]
    return build_packed_batch(tokenized, pad_multiple=pad_to_multiple, with_scores=False,
                              pair_ids=pair_ids if pair_ids is not None else list(range(len(pairs))))


def split_into_packs(pairs, sizes):
    """Consecutive packs of the given numbers of pairs, with global pair ids."""
    packs, start = [], 0
    for n in sizes:
        packs.append(make_pack(pairs[start:start + n], pair_ids=list(range(start, start + n))))
        start += n
    assert start == len(pairs)
    return packs
