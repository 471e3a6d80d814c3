"""CPU kernel of `aa::dictionary_score` (numerics: ``reference.py``), ATen ops only (so it runs
on every device). Raw sums: ATen's inference embedding bag over the *transposed* probabilities
(table ``p^T [v, B]``, bag w = word w's entries, weighted): deterministic, and never the
``[B, nnz]`` gather of the reference; ``B == 1`` is padded to two columns (fbgemm is much slower
for one). Normalisation in two passes (``S * a - total * c``, a few ulps from the reference).
Top-k (`ordered_topk`): ``torch.topk`` for the k-th value, then a stable sort of the candidates
not below it, which gives the tie order (lower word index first) without a full sort."""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .reference import compute_dtype


def raw_sums(p: Tensor, word_offsets: Tensor, slots: Tensor, slot_weights: Tensor) -> Tensor:
    """``S [B, n_words]`` in ``p.dtype`` (float32 or float64, see module doc)."""
    b, n_words, nnz = p.shape[0], word_offsets.numel() - 1, slots.numel()
    if b == 0 or n_words == 0 or nnz == 0:
        return p.new_zeros(b, n_words)
    table = p.t().contiguous()
    if b == 1:
        table = table.expand(-1, 2).contiguous()
    # contiguous: ATen's kernel reads the offsets and weights as if they were (and rejects
    # non-contiguous indices)
    out = torch.ops.aten._embedding_bag_forward_only(
        table, slots.contiguous(), word_offsets.to(slots.dtype).contiguous(), False, 0, False,
        slot_weights.to(p.dtype).contiguous(), True,
    )[0]
    return out[:, :b].t()


def normalise(raw: Tensor, total: Tensor, n_trigrams: Tensor, m: int, v: int) -> Tensor:
    """``score [B, n_words]`` from ``raw`` and ``total [B, 1]`` (see module doc)."""
    on = (m * n_trigrams).to(raw.dtype)
    c = (v - on).clamp(min=1).reciprocal()
    a = on.reciprocal() + c
    score = (total * c).neg_().addcmul_(raw, a)  # contiguous even for a transposed ``raw``
    empty = (n_trigrams == 0).nonzero().squeeze(1)
    if empty.numel():
        score.index_fill_(1, empty, float("-inf"))
    return score


def scores(probs, word_offsets, slots, slot_weights, n_trigrams, m: int) -> Tensor:
    p = probs.to(compute_dtype(probs.dtype))
    raw = raw_sums(p, word_offsets, slots, slot_weights)
    return normalise(raw, p.sum(-1, keepdim=True), n_trigrams, m, p.shape[1])


def ordered_topk(score: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(values, int64 indices) [B, k]``, descending, ties by lower word index (module doc)."""
    b = score.shape[0]
    if b == 0 or k == 0:
        return score.new_empty(b, k), torch.empty(b, k, dtype=torch.int64, device=score.device)
    kth = torch.topk(score, k, dim=-1).values[:, -1:]
    cand = torch.lt(score, kth).logical_not_()  # NaN scores count as the largest
    counts = cand.sum(-1)
    if bool((counts == k).all()):
        idx = cand.nonzero()[:, 1].view(b, k)  # row-major: each row's candidates in word order
        return _sort_candidates(score.gather(1, idx), idx, k)
    values, indices = [], []
    for r in range(b):
        idx = cand[r].nonzero().squeeze(1)
        val, ind = _sort_candidates(score[r, idx].unsqueeze(0), idx.unsqueeze(0), k)
        values.append(val)
        indices.append(ind)
    return torch.cat(values), torch.cat(indices)


def _sort_candidates(vals: Tensor, idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
    vals, order = torch.sort(vals, dim=-1, descending=True, stable=True)
    return vals[:, :k], idx.gather(1, order[:, :k])


def dictionary_score(probs, word_offsets, slots, slot_weights, n_trigrams, m: int, k: int
                     ) -> tuple[Tensor, Tensor]:
    """The op on CPU: the reference's `select` of these `scores`, with this `ordered_topk`."""
    return reference.select(scores(probs, word_offsets, slots, slot_weights, n_trigrams, m), k,
                            ordered_topk)
