"""Random packs of whole pairs for model-level tests, laid out like data.packing's PackedBatch."""

from types import SimpleNamespace

import torch


def random_pairs(num_pairs, vocab, seed=0, prompt=(3, 8), response=(2, 9)):
    """[(prompt, chosen, rejected)] token lists with ragged lengths."""
    g = torch.Generator().manual_seed(seed)

    def draw(lo_hi):
        n = int(torch.randint(lo_hi[0], lo_hi[1] + 1, (1,), generator=g))
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    return [(draw(prompt), draw(response), draw(response)) for _ in range(num_pairs)]


def make_pack(pairs, pair_ids=None, pad_to_multiple=8, scores=None):
    """One pack: chosen of pair k is sequence 2k, rejected 2k+1; loss on response labels only."""
    tokens, labels, loss_mask, positions, cu, seq_pair, seq_chosen = [], [], [], [], [0], [], []
    for k, (prompt, chosen, rejected) in enumerate(pairs):
        for response, is_chosen in ((chosen, True), (rejected, False)):
            seq = prompt + response
            tokens += seq
            labels += seq[1:] + [0]
            # label i is token i+1: a response token iff i+1 >= len(prompt)
            loss_mask += [1.0 if i + 1 >= len(prompt) and i + 1 < len(seq) else 0.0 for i in range(len(seq))]
            positions += list(range(len(seq)))
            cu.append(cu[-1] + len(seq))
            seq_pair.append(k)
            seq_chosen.append(is_chosen)
    real = len(tokens)
    total = -(-real // pad_to_multiple) * pad_to_multiple
    pad = total - real
    tokens += [0] * pad
    labels += [0] * pad
    loss_mask += [0.0] * pad
    positions += list(range(pad))
    pack = SimpleNamespace(
        tokens=torch.tensor(tokens), labels=torch.tensor(labels), loss_mask=torch.tensor(loss_mask),
        position_ids=torch.tensor(positions), cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        seq_pair_index=torch.tensor(seq_pair), seq_is_chosen=torch.tensor(seq_chosen),
        pair_ids=torch.tensor(pair_ids if pair_ids is not None else list(range(len(pairs)))),
        score_chosen=None, score_rejected=None)
    pack.num_rejected_response_tokens = int(sum(len(r) for _, _, r in pairs))
    pack.num_chosen_response_tokens = int(sum(len(c) for _, c, _ in pairs))
    pack.num_pairs = len(pairs)
    return pack


def split_into_packs(pairs, sizes):
    """Consecutive packs of the given numbers of pairs, with global pair ids."""
    packs, start = [], 0
    for n in sizes:
        packs.append(make_pack(pairs[start:start + n], pair_ids=list(range(start, start + n))))
        start += n
    assert start == len(pairs)
    return packs
