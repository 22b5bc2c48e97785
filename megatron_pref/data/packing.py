"""Packing preference pairs into THD micro-batches, and the training loader.

Pack layout (one pack = one micro-batch, all tensors 1-D):

* pairs are packed whole: pack ``k``-th pair's chosen sequence is sequence
  ``2k`` and its rejected sequence is ``2k+1`` (``seq_pair_index`` /
  ``seq_is_chosen`` say the same explicitly);
* a sequence is ``prompt_ids + response_ids`` (the prompt is repeated for
  chosen and rejected); sequences are concatenated, then the pack is padded at
  the tail with ``pad_id`` up to a multiple of ``pad_multiple`` (or to
  ``round_up(seq_length, pad_multiple)`` with ``pad_to_seq_length``);
* ``labels[i]`` is token ``i+1`` of the same sequence; the last token of
  every sequence and all padding get label 0 and ``loss_mask`` 0;
* ``loss_mask[i] == 1`` exactly where ``labels[i]`` is a response token (so a
  sequence contributes ``len(response)`` loss tokens when its prompt is
  non-empty); prompt tokens never carry loss;
* ``position_ids`` restart at 0 at every sequence (padding counts 0, 1, ...);
* ``cu_seqlens`` (int32, ``[S+1]``) covers real sequences only,
  ``cu_seqlens[-1] == num_real_tokens <= T``; the padding tail belongs to no sequence
  (``logprobs.sequence_ids`` labels it ``S``, one past the last sequence).

One builder lays this out (:func:`build_pack`, with :func:`build_packed_batch` for pairs) and
one function pads it (:func:`pad_pack`); training, generation, the engine's interleaving
fillers and the tests all use them.

Packs are filled first-fit-decreasing with at most ``seq_length`` real tokens.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields, replace
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from megatron_pref.logprobs import sequence_ids

from .errors import DataError
from .pairs import TokenizedPair, plan_lengths, truncate_pair, validate_length_options

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- pack
@dataclass
class PackedBatch:
    """One pack of whole preference pairs (THD layout); see the module docstring."""

    tokens: torch.Tensor  # [T] int64
    labels: torch.Tensor  # [T] int64
    loss_mask: torch.Tensor  # [T] float32
    position_ids: torch.Tensor  # [T] int64
    cu_seqlens: torch.Tensor  # [S+1] int32
    seq_pair_index: torch.Tensor  # [S] int64
    seq_is_chosen: torch.Tensor  # [S] bool
    pair_ids: torch.Tensor  # [P] int64
    score_chosen: Optional[torch.Tensor] = None  # [P] float32 (NaN where a pair has none)
    score_rejected: Optional[torch.Tensor] = None

    @property
    def num_pairs(self) -> int:
        return int(self.pair_ids.numel())

    @property
    def num_sequences(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    @property
    def pack_length(self) -> int:
        return int(self.tokens.numel())

    @property
    def num_real_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    @property
    def seq_lengths(self) -> torch.Tensor:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    @property
    def max_seqlen(self) -> int:
        return int(self.seq_lengths.max()) if self.num_sequences else 0

    def _response_tokens(self, chosen: bool) -> int:
        seq_sum = per_sequence_sum(self.loss_mask, self.cu_seqlens)
        sel = self.seq_is_chosen.to(seq_sum.device) if chosen else ~self.seq_is_chosen.to(seq_sum.device)
        return int(seq_sum[sel].sum().item())

    @property
    def num_rejected_response_tokens(self) -> int:
        """Sum of ``loss_mask`` over the rejected sequences."""
        return self._response_tokens(False)

    @property
    def num_chosen_response_tokens(self) -> int:
        return self._response_tokens(True)

    def sequence_ids(self) -> torch.Tensor:
        """``[T]`` index of the sequence each position belongs to (``S`` for the padding tail)."""
        return sequence_ids(self.cu_seqlens, self.pack_length)

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return PackedBatch(**kw)

    def pin_memory(self) -> "PackedBatch":
        kw = {f.name: (getattr(self, f.name).pin_memory() if isinstance(getattr(self, f.name), torch.Tensor)
                       else getattr(self, f.name)) for f in fields(self)}
        return PackedBatch(**kw)


def round_up(x: int, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple) if multiple > 1 else int(x)


def compute_pad_multiple(fp8: bool = False, tensor_parallel: int = 1, sequence_parallel: bool = False,
                         context_parallel: int = 1, fp8_recipe: str = "delayed") -> int:
    """Pack-length multiple the kernels need: 16 for FP8, times TP with
    sequence parallelism, times 2*CP with context parallelism. Blockwise FP8 all-gathers
    sequence-parallel activations in 128-token blocks: 128 tokens per TP rank then."""
    m = 16 if fp8 else 1
    if sequence_parallel and tensor_parallel > 1:
        if fp8 and fp8_recipe == "blockwise":
            m = 128
        m *= tensor_parallel
    if context_parallel > 1:
        m *= 2 * context_parallel
    return m


def build_pack(sequences: Sequence[Sequence[int]], prompt_lengths: Optional[Sequence[int]] = None,
               pad_multiple: int = 1, pad_to: Optional[int] = None, pad_id: int = 0) -> PackedBatch:
    """The one pack builder: ``sequences`` back to back, then the padding tail up to a multiple
    of ``pad_multiple`` (at least ``pad_to`` tokens) by :func:`pad_pack`.

    ``prompt_lengths[i]``: the loss covers the labels of sequence ``i`` from its prompt on
    (None: no loss anywhere, as in generation). The sequences are of no pair
    (``pair_ids`` empty); :func:`build_packed_batch` adds the pair layout. No sequences and
    ``pad_to``: an empty pack, which adds nothing to the loss, the gradients or the pair count."""
    seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    n_real = int(lens.sum())
    tokens = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
    labels = np.zeros(n_real, dtype=np.int64)
    mask = np.zeros(n_real, dtype=np.float32)
    pos = np.zeros(n_real, dtype=np.int64)
    o = 0
    for i, s in enumerate(seqs):
        L = len(s)
        labels[o:o + L - 1] = s[1:]
        if prompt_lengths is not None:
            mask[o + max(int(prompt_lengths[i]) - 1, 0): o + L - 1] = 1.0
        pos[o:o + L] = np.arange(L)
        o += L
    cu = np.zeros(len(seqs) + 1, dtype=np.int32)
    cu[1:] = np.cumsum(lens)
    pack = PackedBatch(
        tokens=torch.from_numpy(tokens),
        labels=torch.from_numpy(labels),
        loss_mask=torch.from_numpy(mask),
        position_ids=torch.from_numpy(pos),
        cu_seqlens=torch.from_numpy(cu),
        seq_pair_index=torch.zeros(len(seqs), dtype=torch.int64),
        seq_is_chosen=torch.zeros(len(seqs), dtype=torch.bool),
        pair_ids=torch.zeros(0, dtype=torch.int64),
    )
    return pad_pack(pack, round_up(max(n_real, pad_to or 0), max(1, int(pad_multiple))), pad_id)


def pad_pack(pack: PackedBatch, length: int, pad_id: int = 0) -> PackedBatch:
    """The one padding function: ``pack`` with its padding tail grown to ``length`` tokens (a
    pack at least that long is returned as it is). The tail is outside every sequence: token
    ``pad_id``, label 0, no loss, positions counting 0, 1, ... from the end of the last one."""
    extra = length - pack.pack_length
    if extra <= 0:
        return pack
    tail = pack.pack_length - pack.num_real_tokens + extra
    return replace(
        pack,
        tokens=torch.cat([pack.tokens, pack.tokens.new_full((extra,), pad_id)]),
        labels=torch.cat([pack.labels, pack.labels.new_zeros(extra)]),
        loss_mask=torch.cat([pack.loss_mask, pack.loss_mask.new_zeros(extra)]),
        position_ids=torch.cat([pack.position_ids[:pack.num_real_tokens],
                                torch.arange(tail, dtype=pack.position_ids.dtype, device=pack.position_ids.device)]),
    )


def build_packed_batch(
    pairs: Sequence[TokenizedPair],
    pad_multiple: int = 1,
    pad_id: int = 0,
    pad_to: Optional[int] = None,
    pair_ids: Optional[Sequence[int]] = None,
    with_scores: Optional[bool] = None,
) -> PackedBatch:
    """Lay out whole pairs in one pack (chosen of pair k = sequence 2k,
    rejected = 2k+1). ``pad_to``: minimum pack length before rounding to
    ``pad_multiple``. ``with_scores``: force score tensors on/off (default: on
    if any pair has a score). No pairs: only with ``pad_to``, an empty pack
    (the interleaved schedule's filler micro-batches)."""
    if not pairs and not pad_to:
        raise ValueError("a pack needs at least one pair")
    seqs: List[np.ndarray] = []
    prompt_lens: List[int] = []
    for pair in pairs:
        p = np.asarray(pair.prompt_ids, dtype=np.int64)
        for resp in (pair.chosen_ids, pair.rejected_ids):
            seqs.append(np.concatenate([p, np.asarray(resp, dtype=np.int64)]))
            prompt_lens.append(len(p))
    P = len(pairs)
    if pair_ids is None:
        pair_ids = [p.pair_id for p in pairs]
    if with_scores is None:
        with_scores = any(p.score_chosen is not None or p.score_rejected is not None for p in pairs)
    sc = sr = None
    if with_scores:
        sc = torch.tensor([np.nan if p.score_chosen is None else p.score_chosen for p in pairs], dtype=torch.float32)
        sr = torch.tensor([np.nan if p.score_rejected is None else p.score_rejected for p in pairs],
                          dtype=torch.float32)
    return replace(
        build_pack(seqs, prompt_lens, pad_multiple, pad_to, pad_id),
        seq_pair_index=torch.arange(P, dtype=torch.int64).repeat_interleave(2),
        seq_is_chosen=torch.tensor([True, False] * P, dtype=torch.bool),
        pair_ids=torch.as_tensor(np.asarray(pair_ids, dtype=np.int64)),
        score_chosen=sc,
        score_rejected=sr,
    )


def first_fit_decreasing(sizes: Sequence[int], capacity: int) -> List[List[int]]:
    """Bin-pack item indices by size (largest first, ties by index) into bins
    of ``capacity``; each bin's indices are returned sorted. Deterministic."""
    sizes = [int(s) for s in sizes]
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    bins: List[List[int]] = []
    rem: List[int] = []
    for i in order:
        s = sizes[i]
        if s > capacity:
            raise ValueError(f"item of size {s} exceeds pack capacity {capacity}")
        for b in range(len(bins)):
            if s <= rem[b]:
                bins[b].append(i)
                rem[b] -= s
                break
        else:
            bins.append([i])
            rem.append(capacity - s)
    return [sorted(b) for b in bins]


# --------------------------------------------------------------------------- helpers for losses/tests
def per_sequence_sum(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Sum a per-position tensor ``[T, ...]`` over each real sequence ->
    ``[S, ...]`` (padding ignored; differentiable)."""
    cu_seqlens = cu_seqlens.to(values.device)
    num_sequences = cu_seqlens.numel() - 1
    # Padding gets id S: summed into an extra row that is dropped.
    ids = sequence_ids(cu_seqlens, values.shape[0])
    out = values.new_zeros((num_sequences + 1,) + tuple(values.shape[1:]))
    return out.index_add(0, ids, values)[:num_sequences]


def split_chosen_rejected(per_seq: torch.Tensor, batch: PackedBatch):
    """``[S, ...]`` per-sequence values -> ``(chosen [P, ...], rejected [P, ...])``."""
    return per_seq[batch.seq_is_chosen], per_seq[~batch.seq_is_chosen]


@dataclass
class PaddedBatch:
    tokens: torch.Tensor  # [S, Lmax] int64 (pad_id beyond each length)
    labels: torch.Tensor  # [S, Lmax] int64
    loss_mask: torch.Tensor  # [S, Lmax] float32
    position_ids: torch.Tensor  # [S, Lmax] int64
    lengths: torch.Tensor  # [S] int64


def scatter_to_padded(values: torch.Tensor, batch: PackedBatch, fill=0) -> torch.Tensor:
    """Per-position packed values ``[T, ...]`` -> ``[S, Lmax, ...]`` padded layout."""
    lens = batch.seq_lengths.to(values.device)
    S, Lmax = len(lens), (int(lens.max()) if len(lens) else 0)
    out = torch.full((S, Lmax) + tuple(values.shape[1:]), fill, dtype=values.dtype, device=values.device)
    if S == 0:
        return out
    n = batch.num_real_tokens
    seq = batch.sequence_ids().to(values.device)[:n]
    starts = batch.cu_seqlens.to(values.device).long()[:-1]
    col = torch.arange(n, device=values.device) - starts[seq]
    out[seq, col] = values[:n]
    return out


def packed_to_padded(batch: PackedBatch, pad_id: int = 0) -> PaddedBatch:
    """Collate one pack into a padded ``[S, Lmax]`` layout (for "packed equals
    padded" checks)."""
    return PaddedBatch(
        tokens=scatter_to_padded(batch.tokens, batch, fill=pad_id),
        labels=scatter_to_padded(batch.labels, batch, fill=0),
        loss_mask=scatter_to_padded(batch.loss_mask, batch, fill=0.0),
        position_ids=scatter_to_padded(batch.position_ids, batch, fill=0),
        lengths=batch.seq_lengths.clone(),
    )


# --------------------------------------------------------------------------- loader
@dataclass
class LoaderStats:
    """Dataset-level filtering counts and this rank's cumulative packing."""

    dataset_pairs: int = 0
    usable_pairs: int = 0
    truncated_pairs: int = 0
    skipped: Dict[str, int] = field(default_factory=lambda: {"too_long": 0, "identical_after_truncation": 0})
    packs: int = 0
    pairs: int = 0
    real_tokens: int = 0
    pack_tokens: int = 0
    last_packs: int = 0
    last_real_tokens: int = 0
    last_pack_tokens: int = 0

    @property
    def packing_efficiency(self) -> float:
        """Real tokens / pack tokens (padding included), cumulative on this rank."""
        return self.real_tokens / self.pack_tokens if self.pack_tokens else 0.0

    @property
    def last_packing_efficiency(self) -> float:
        return self.last_real_tokens / self.last_pack_tokens if self.last_pack_tokens else 0.0

    def as_dict(self) -> Dict[str, float]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "skipped"}
        d["skipped"] = dict(self.skipped)
        d["packing_efficiency"] = self.packing_efficiency
        d["last_packing_efficiency"] = self.last_packing_efficiency
        return d

    def summary(self) -> str:
        sk = ", ".join(f"{k}={v}" for k, v in self.skipped.items())
        text = (f"{self.usable_pairs}/{self.dataset_pairs} pairs usable ({self.truncated_pairs} truncated; "
                f"skipped {sk})")
        if self.packs:
            text += f"; packing efficiency {self.packing_efficiency:.3f} over {self.packs} packs"
        return text


class PairSource:
    """A dataset seen through the length policy: which pairs are usable, their
    pack sizes, and truncation applied on access."""

    def __init__(self, dataset, seq_length: int, max_prompt_length: Optional[int] = None,
                 bos_id: Optional[int] = None):
        validate_length_options(seq_length, max_prompt_length)
        self.dataset = dataset
        self.seq_length = int(seq_length)
        self.bos_id = bos_id if bos_id is not None else getattr(dataset, "bos_id", None)
        lengths = np.asarray(dataset.lengths(), dtype=np.int64).reshape(-1, 3)
        new, fits, truncated = plan_lengths(lengths, seq_length, max_prompt_length)
        self.stats = LoaderStats(dataset_pairs=len(lengths))
        self.stats.skipped["too_long"] = int((~fits).sum())
        # No prompt token (and no BOS): the first response token cannot be scored. Preprocessing
        # skips such pairs already; datasets written before it did are filtered here.
        no_prompt = fits & (lengths[:, 0] == 0)
        if no_prompt.any():
            fits &= ~no_prompt
            self.stats.skipped["empty_prompt"] = int(no_prompt.sum())
        # responses cut to a common cap may become identical: check those pairs
        cut = fits & ((new[:, 1] < lengths[:, 1]) | (new[:, 2] < lengths[:, 2]))
        n_ident = 0
        for i in np.nonzero(cut)[0]:
            pr = dataset[int(i)]
            c, r = np.asarray(pr.chosen_ids)[: new[i, 1]], np.asarray(pr.rejected_ids)[: new[i, 2]]
            if len(c) == len(r) and np.array_equal(c, r):
                fits[i] = False
                n_ident += 1
        self.stats.skipped["identical_after_truncation"] = n_ident
        truncated &= fits
        self.stats.truncated_pairs = int(truncated.sum())
        self.usable = np.nonzero(fits)[0].astype(np.int64)
        self.stats.usable_pairs = int(len(self.usable))
        self.new_lengths = new
        self.truncated = truncated
        self.sizes = 2 * new[:, 0] + new[:, 1] + new[:, 2]
        self.with_scores = bool(getattr(dataset, "has_scores", False))

    def get(self, i: int) -> TokenizedPair:
        i = int(i)
        pair = self.dataset[i]
        if self.truncated[i]:
            pair = truncate_pair(pair, self.new_lengths[i], self.bos_id)
        return replace(pair, pair_id=i)

    def pack(self, indices: Sequence[int], pad_multiple: int, pad_id: int,
             pad_to_seq_length: bool) -> List[PackedBatch]:
        indices = [int(i) for i in indices]
        if not indices:
            return []
        bins = first_fit_decreasing([int(self.sizes[i]) for i in indices], self.seq_length)
        pad_to = self.seq_length if pad_to_seq_length else None
        packs = []
        for b in bins:
            pairs = [self.get(indices[j]) for j in b]
            packs.append(build_packed_batch(pairs, pad_multiple, pad_id, pad_to,
                                            with_scores=self.with_scores))
        return packs


class PackedPairLoader:
    """Deterministic, resumable iterator over global batches of packed pairs.

    * Order: usable pairs (see :class:`PairSource`) are permuted per epoch
      with ``numpy.random.default_rng([seed, epoch])``; an epoch is the first
      ``floor(N / global_batch_pairs) * global_batch_pairs`` pairs of its
      permutation (the remainder is dropped for that epoch only, so no global
      batch spans two epochs or holds a pair twice). The sample stream is the
      concatenation of the epochs; ``consumed_pairs`` (global, all ranks) is
      the position in it, so a loader built with ``consumed_pairs=k``
      continues exactly where one that consumed ``k`` pairs left off.
    * Each global batch of ``global_batch_pairs`` pairs is split into
      ``dp_size`` disjoint shards of ``global_batch_pairs // dp_size`` pairs,
      balanced by token count (largest pair first to the least-loaded rank
      that still has room). Every rank computes the same split.
    * This rank's pairs are packed first-fit-decreasing into packs of at most
      ``seq_length`` real tokens, each padded to a multiple of
      ``pad_multiple``. Ranks may get different numbers of packs.
    * ``evaluation_only``: for :meth:`iter_once` only (no training batches); any number of
      usable pairs >= 1 will do, fewer than ``dp_size`` included (some ranks then get none).
    """

    def __init__(
        self,
        dataset,
        seq_length: int,
        global_batch_pairs: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 1234,
        pad_multiple: int = 1,
        consumed_pairs: int = 0,
        max_prompt_length: Optional[int] = None,
        pad_id: Optional[int] = None,
        bos_id: Optional[int] = None,
        shuffle: bool = True,
        pad_to_seq_length: bool = False,
        balance: bool = True,
        evaluation_only: bool = False,
    ):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise DataError(f"invalid data-parallel rank {dp_rank} of {dp_size}")
        if global_batch_pairs < 1 or global_batch_pairs % dp_size:
            raise DataError(
                f"global batch of {global_batch_pairs} pairs is not divisible by data-parallel size {dp_size}"
            )
        if pad_multiple < 1:
            raise DataError(f"pad_multiple must be >= 1, got {pad_multiple}")
        if consumed_pairs < 0:
            raise DataError(f"consumed_pairs must be >= 0, got {consumed_pairs}")
        self.source = PairSource(dataset, seq_length, max_prompt_length, bos_id)
        self.dataset = dataset
        self.seq_length = int(seq_length)
        self.global_batch_pairs = int(global_batch_pairs)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.seed = int(seed)
        self.pad_multiple = int(pad_multiple)
        self.pad_id = int(pad_id if pad_id is not None else (getattr(dataset, "pad_id", None) or 0))
        self.shuffle = shuffle
        self.pad_to_seq_length = pad_to_seq_length
        self.balance = balance
        self.consumed_pairs = int(consumed_pairs)
        self.stats = self.source.stats
        self._perm_cache: Dict[int, np.ndarray] = {}
        # Evaluation (iter_once) takes any number of pairs: a data-parallel rank may get none.
        self.evaluation_only = evaluation_only
        if evaluation_only and self.num_usable_pairs == 0:
            raise DataError(f"no usable pairs ({self.stats.summary()})")
        if not evaluation_only and self.num_usable_pairs < self.global_batch_pairs:
            raise DataError(
                f"only {self.num_usable_pairs} usable pairs, fewer than a global batch of "
                f"{self.global_batch_pairs} ({self.stats.summary()})"
            )
        logger.info("preference data: %s", self.stats.summary())

    # -- order -----------------------------------------------------------------
    @property
    def num_usable_pairs(self) -> int:
        return int(len(self.source.usable))

    @property
    def pairs_per_epoch(self) -> int:
        """Pairs consumed per epoch (usable pairs rounded down to whole global batches)."""
        return (self.num_usable_pairs // self.global_batch_pairs) * self.global_batch_pairs

    @property
    def epoch(self) -> int:
        return self.consumed_pairs // self.pairs_per_epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Dataset indices of the usable pairs in the order of ``epoch``."""
        if epoch not in self._perm_cache:
            if len(self._perm_cache) >= 2:
                self._perm_cache.pop(min(self._perm_cache))
            usable = self.source.usable
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(len(usable))
                self._perm_cache[epoch] = usable[perm]
            else:
                self._perm_cache[epoch] = usable
        return self._perm_cache[epoch]

    def stream_indices(self, start: int, count: int) -> np.ndarray:
        """Dataset indices at positions ``[start, start + count)`` of the stream."""
        n = self.pairs_per_epoch
        out = []
        pos = start
        while count > 0:
            e, o = divmod(pos, n)
            take = min(count, n - o)
            out.append(self.epoch_order(e)[o:o + take])
            pos += take
            count -= take
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def assign_ranks(self, indices: np.ndarray) -> List[np.ndarray]:
        """Split one global batch into ``dp_size`` disjoint equal-count shards."""
        per = len(indices) // self.dp_size
        if not self.balance or self.dp_size == 1:
            return [indices[r * per:(r + 1) * per] for r in range(self.dp_size)]
        sizes = self.source.sizes[indices]
        order = np.lexsort((np.arange(len(indices)), -sizes))
        loads = np.zeros(self.dp_size, dtype=np.int64)
        counts = np.zeros(self.dp_size, dtype=np.int64)
        owner = np.empty(len(indices), dtype=np.int64)
        big = np.iinfo(np.int64).max
        for j in order:
            r = int(np.argmin(np.where(counts < per, loads, big)))
            owner[j] = r
            loads[r] += sizes[j]
            counts[r] += 1
        return [indices[owner == r] for r in range(self.dp_size)]

    # -- batches ---------------------------------------------------------------
    def next_global_batch(self) -> List[PackedBatch]:
        """This rank's packs for the next global batch; advances
        ``consumed_pairs`` by ``global_batch_pairs``."""
        if self.evaluation_only:
            raise RuntimeError("an evaluation_only loader has no training batches (use iter_once)")
        mine, packs = self._global_batch_at(self.consumed_pairs)
        self.consumed_pairs += self.global_batch_pairs
        st = self.stats
        st.last_packs = len(packs)
        st.last_real_tokens = sum(p.num_real_tokens for p in packs)
        st.last_pack_tokens = sum(p.pack_length for p in packs)
        st.packs += st.last_packs
        st.pairs += len(mine)
        st.real_tokens += st.last_real_tokens
        st.pack_tokens += st.last_pack_tokens
        return packs

    def _global_batch_at(self, start: int):
        """This rank's pair indices and packs of the global batch at stream position ``start``."""
        idx = self.stream_indices(start, self.global_batch_pairs)
        mine = self.assign_ranks(idx)[self.dp_rank]
        return mine, self.source.pack(mine, self.pad_multiple, self.pad_id, self.pad_to_seq_length)

    def __iter__(self) -> Iterator[List[PackedBatch]]:
        while True:
            yield self.next_global_batch()

    def state_dict(self) -> Dict[str, int]:
        return {"consumed_pairs": self.consumed_pairs, "seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.consumed_pairs = int(state["consumed_pairs"])

    def iter_once(self, pairs_per_step: Optional[int] = None) -> Iterator[List[PackedBatch]]:
        """One pass over all usable pairs in dataset order (no shuffle, no
        drop-last; for evaluation): yields this rank's packs for each step of
        ``pairs_per_step`` pairs (default: the global batch). The last step
        may be smaller; shards are disjoint and cover every usable pair once.
        Does not change ``consumed_pairs``."""
        yield from self._iter_in_order(self.source.usable, pairs_per_step)

    def iter_reference_pass(self, pairs_per_step: Optional[int] = None) -> Iterator[List[PackedBatch]]:
        """Every usable pair once, for precomputed reference log-probs: the first epoch's global
        batches packed exactly as training packs them, then the pairs that epoch drops (in
        dataset order, ``pairs_per_step`` at a time, as :meth:`iter_once`). Same packs give
        bit-identical log-probs: at step 0, where the policy is the reference, every reward is
        exactly 0 and ties stay ties (other packs differ by rounding, ~1e-7, and break them).
        Does not change ``consumed_pairs``."""
        for start in range(0, self.pairs_per_epoch, self.global_batch_pairs):
            yield self._global_batch_at(start)[1]
        dropped = np.setdiff1d(self.source.usable, self.epoch_order(0)[:self.pairs_per_epoch])
        yield from self._iter_in_order(dropped, pairs_per_step)

    def _iter_in_order(self, indices: np.ndarray, pairs_per_step: Optional[int]) -> Iterator[List[PackedBatch]]:
        step = int(pairs_per_step or self.global_batch_pairs)
        for s in range(0, len(indices), step):
            chunk = indices[s:s + step]
            mine = chunk[self.dp_rank::self.dp_size]
            yield self.source.pack(mine, self.pad_multiple, self.pad_id, self.pad_to_seq_length)


def iter_packs_once(dataset, seq_length: int, dp_rank: int = 0, dp_size: int = 1, pad_multiple: int = 1,
                    max_prompt_length: Optional[int] = None, pairs_per_step: int = 256,
                    pad_id: Optional[int] = None) -> Iterator[PackedBatch]:
    """Evaluation helper: every usable pair once, in order, this rank's
    disjoint share, as a flat stream of packs."""
    step = max(pairs_per_step, dp_size)
    step -= step % dp_size
    loader = PackedPairLoader(dataset, seq_length, dp_size, dp_rank, dp_size, pad_multiple=pad_multiple,
                              max_prompt_length=max_prompt_length, pad_id=pad_id, shuffle=False,
                              evaluation_only=True)
    for packs in loader.iter_once(step):
        yield from packs
