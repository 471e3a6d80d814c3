"""Segment (varlen) path of `aa::word_pool` (numerics: :mod:`.reference`): vectorized torch over
the bytes actually present, no ``[W, L]`` padding: scores per byte with its word's query,
per-word max and sum with ``torch.segment_reduce`` on the CSR offsets, in float32 (float64 for
float64), outputs rounded once. The backward recomputes the softmax from q and k. Every op here
is device generic: also the op's path for CUDA float64 and other devices. Design and the
backward's formulas: ``docs/hat.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import compute_dtype, default_scale


def byte_word(word_offsets: Tensor, n_bytes: int) -> Tensor:
    """``[T]`` int64: the word of every byte (no host sync: ``output_size``)."""
    n_words = word_offsets.numel() - 1
    lengths = word_offsets.diff().long()
    words = torch.arange(n_words, device=word_offsets.device)
    return torch.repeat_interleave(words, lengths, output_size=n_bytes)


def _segment_sum(x: Tensor, offsets: Tensor) -> Tensor:
    return torch.segment_reduce(x, "sum", offsets=offsets, axis=0, unsafe=True)


def _scores(qf: Tensor, kf: Tensor, bw: Tensor) -> Tensor:
    """``q . k`` per byte and query head: ``[T, Hkv, G]`` (unscaled). ``vecdot`` (one fused
    multiply-reduce): ``bmm``/``einsum`` with a one-column right side is a slow mat-vec path."""
    t, hkv, d = kf.shape
    group = qf.shape[1] // hkv
    if qf.shape[0] == 1:
        return torch.linalg.vecdot(kf.unsqueeze(2), qf[0].view(1, hkv, group, d), dim=-1)
    qb = qf.index_select(0, bw).view(t, hkv, group, d)
    return torch.linalg.vecdot(qb, kf.unsqueeze(2), dim=-1)


def _group_sum(x: Tensor) -> Tensor:
    """``[T, Hkv, G, D]`` -> ``[T, Hkv, D]``: the query heads of a key head summed."""
    return x.sum(2) if x.shape[2] > 1 else x.squeeze(2)


def _probs(qf, kf, offsets, bw, scale) -> Tensor:
    """Softmax weights ``p [T, Hkv, G]`` of every byte within its word."""
    s = _scores(qf, kf, bw).mul_(scale)
    t, hkv, group = s.shape
    s2 = s.view(t, hkv * group)
    m = torch.segment_reduce(s2, "max", offsets=offsets, axis=0, unsafe=True)
    p = s2.sub_(m.index_select(0, bw)).exp_()
    denom = _segment_sum(p, offsets)
    p.div_(denom.index_select(0, bw))
    return p.view(t, hkv, group)


def _prepare(q, k, v, word_offsets):
    acc = compute_dtype(q.dtype)
    offsets = word_offsets.long()
    bw = byte_word(offsets, k.shape[0])
    return acc, offsets, bw, q.to(acc), k.to(acc), v.to(acc)


def word_pool_fwd(q: Tensor, k: Tensor, v: Tensor, word_offsets: Tensor,
                  scale: float | None = None) -> Tensor:
    """Forward ``[W, H, D]`` in q's dtype (see the package doc)."""
    n_words = word_offsets.numel() - 1
    t, _, d = k.shape
    h = q.shape[1]
    if n_words == 0 or t == 0:
        return q.new_zeros(n_words, h, d)
    _, offsets, bw, qf, kf, vf = _prepare(q, k, v, word_offsets)
    p = _probs(qf, kf, offsets, bw, default_scale(scale, d))
    out = _segment_sum(p.unsqueeze(-1) * vf.unsqueeze(2), offsets)  # [W, Hkv, G, D]
    return out.view(n_words, h, d).to(q.dtype)


def word_pool_bwd(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, word_offsets: Tensor,
                  scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` in the inputs' shapes and dtype."""
    n_words = word_offsets.numel() - 1
    t, hkv, d = k.shape
    h = q.shape[1]
    group = h // hkv
    if n_words == 0 or t == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    scale = default_scale(scale, d)
    acc, offsets, bw, qf, kf, vf = _prepare(q, k, v, word_offsets)
    p = _probs(qf, kf, offsets, bw, scale)  # [T, Hkv, G]
    gb = grad.to(acc).index_select(0, bw).view(t, hkv, group, d)  # grad[b(t)]
    dp = torch.linalg.vecdot(gb, vf.unsqueeze(2), dim=-1)
    pdp = p * dp
    delta = _segment_sum(pdp.reshape(t, h), offsets)  # [W, H]
    ds = pdp.sub_(p * delta.index_select(0, bw).view(t, hkv, group)).mul_(scale)
    dv = _group_sum(p.unsqueeze(-1) * gb)
    if q.shape[0] == 1:
        q0 = qf[0].view(hkv, group, d)
        dk = _group_sum(ds.unsqueeze(-1) * q0)
        dq = torch.bmm(ds.permute(1, 2, 0), kf.transpose(0, 1)).reshape(1, h, d)
    else:
        qb = qf.index_select(0, bw).view(t, hkv, group, d)
        dk = _group_sum(ds.unsqueeze(-1) * qb)
        dq = _segment_sum(ds.unsqueeze(-1) * kf.unsqueeze(2), offsets).view(n_words, h, d)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
