"""Query blocking shared by the non-Triton paths, and a device-generic blocked attention.

Block ``[s, e)`` of consecutive queries reads only the keys ``[key_lo[s], e)`` (:mod:`.layout`)
with a small mask for the window, document and causal edges: O(T * (window + block)) time and
memory. `forward` / `backward` here use plain matmuls and a float32 (float64) softmax, so they
run on any device: the op's path for CUDA float64, CUDA without Triton and other devices; the
CPU path (:mod:`.cpu`) runs the same blocks through ATen's faster flash kernel. Design:
``docs/hat.md``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .layout import bounds
from .reference import compute_dtype

#: Queries per block: each block reads at most ``window - 1 + BLOCK`` keys.
BLOCK = 256
#: Blocks whose masks are built together (memory: CHUNK * BLOCK * (window + BLOCK) elements).
CHUNK = 16


def split(q: Tensor, k: Tensor) -> tuple[int, int, int, int, int]:
    """``(rows, Hkv, group, T, D)``, ``rows`` the flattened leading dims."""
    hq, t, d = q.shape[-3:]
    hkv = k.shape[-3]
    return math.prod(q.shape[:-3]), hkv, hq // hkv, t, d


def blocks(doc_offsets: Tensor | None, t: int, window: int, device: torch.device, block: int,
           additive: torch.dtype | None = None):
    """Yield ``(s, e, ks, mask [e - s, e - ks])`` for the query blocks ``[s, e)``: ``mask`` is
    bool (True = attend), or with ``additive`` 0 / -inf in that dtype.

    The masks are built for `CHUNK` blocks at a time with a few large tensor ops: per-block
    small ops would each pay a thread-pool fork/join (they dominated the 2-thread profile).
    """
    key_lo, _ = bounds(doc_offsets, t, window, device)
    lo = key_lo.tolist()
    for c0 in range(0, t, block * CHUNK):
        starts = list(range(c0, min(c0 + block * CHUNK, t), block))
        ends = [min(s + block, t) for s in starts]
        span = max(e - lo[s] for s, e in zip(starts, ends))
        n = len(starts)
        rows = torch.arange(c0, c0 + n * block, device=device)
        row_lo = torch.full((n * block,), t, dtype=key_lo.dtype, device=device)
        row_lo[: ends[-1] - c0] = key_lo[c0 : ends[-1]]
        ks = key_lo[c0 : ends[-1] : block]
        j = ks.view(n, 1, 1) + torch.arange(span, device=device).view(1, 1, span)
        allowed = (j >= row_lo.view(n, block, 1)) & (j <= rows.view(n, block, 1))
        if additive is not None:
            zero = torch.zeros((), dtype=additive, device=device)
            allowed = torch.where(allowed, zero, zero - float("inf"))
        for b, (s, e) in enumerate(zip(starts, ends)):
            yield s, e, lo[s], allowed[b, : e - s, : e - lo[s]]


def block_rows(x: Tensor, s: int, e: int) -> Tensor:
    """Block ``[s, e)`` of ``x [rows, Hkv, group, T, ...]`` as ``[rows, Hkv, group*(e-s), ...]``."""
    xb = x[:, :, :, s:e]
    return xb.reshape(xb.shape[0], xb.shape[1], xb.shape[2] * (e - s), *xb.shape[4:])


def forward(q: Tensor, k: Tensor, v: Tensor, doc_offsets: Tensor | None, window: int,
            scale: float | None = None, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """``(out [..., Hq, T, D] q.dtype, lse [..., Hq, T] float32/float64)``."""
    rows, hkv, group, t, d = split(q, k)
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    if q.numel() == 0:
        return q.new_zeros(q.shape), q.new_zeros(q.shape[:-1], dtype=compute_dtype(q.dtype))
    cdt = compute_dtype(q.dtype)
    q5 = q.reshape(rows, hkv, group, t, d)
    k4, v4 = k.reshape(rows, hkv, t, d), v.reshape(rows, hkv, t, d)
    out = q.new_empty(rows, hkv, group, t, d)
    lse = q.new_empty(rows, hkv, group, t, dtype=cdt)
    for s, e, ks, allowed in blocks(doc_offsets, t, window, q.device, block):
        qb = block_rows(q5, s, e).to(cdt)
        scores = (qb @ k4[:, :, ks:e].to(cdt).transpose(-1, -2)) * scale
        scores.masked_fill_(~allowed.repeat(group, 1), float("-inf"))
        lb = torch.logsumexp(scores, dim=-1)
        ob = torch.exp(scores - lb.unsqueeze(-1)) @ v4[:, :, ks:e].to(cdt)
        out[:, :, :, s:e] = ob.view(rows, hkv, group, e - s, d)
        lse[:, :, :, s:e] = lb.view(rows, hkv, group, e - s)
    return out.view(q.shape), lse.view(q.shape[:-1])


def backward(grad: Tensor, grad_lse: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
             out: Tensor, lse: Tensor, doc_offsets: Tensor | None, window: int,
             scale: float | None, block: int = BLOCK) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` from the saved ``out`` and ``lse``: ``dS = P * (dO V^T - delta)``,
    ``delta = rowsum(dO * O) - dlse``."""
    rows, hkv, group, t, d = split(q, k)
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    if q.numel() == 0 or k.numel() == 0:
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    cdt = compute_dtype(q.dtype)
    q5, g5 = q.reshape(rows, hkv, group, t, d), grad.reshape(rows, hkv, group, t, d)
    delta = (grad.to(cdt) * out.to(cdt)).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(cdt)
    delta = delta.reshape(rows, hkv, group, t)
    l4 = lse.to(cdt).reshape(rows, hkv, group, t)
    k4, v4 = k.reshape(rows, hkv, t, d).to(cdt), v.reshape(rows, hkv, t, d).to(cdt)
    dq = q.new_empty(rows, hkv, group, t, d)
    dk = torch.zeros(rows, hkv, t, d, dtype=cdt, device=q.device)
    dv = torch.zeros_like(dk)
    for s, e, ks, allowed in blocks(doc_offsets, t, window, q.device, block):
        qb, gb = block_rows(q5, s, e).to(cdt), block_rows(g5, s, e).to(cdt)
        kb, vb = k4[:, :, ks:e], v4[:, :, ks:e]
        scores = (qb @ kb.transpose(-1, -2)) * scale
        p = torch.exp(scores - block_rows(l4, s, e).unsqueeze(-1))
        p.masked_fill_(~allowed.repeat(group, 1), 0.0)
        dv[:, :, ks:e] += p.transpose(-1, -2) @ gb
        ds = p * (gb @ vb.transpose(-1, -2) - block_rows(delta, s, e).unsqueeze(-1))
        dq[:, :, :, s:e] = (ds @ kb * scale).view(rows, hkv, group, e - s, d)
        dk[:, :, ks:e] += ds.transpose(-1, -2) @ qb * scale
    return dq.view(q.shape), dk.to(k.dtype).view(k.shape), dv.to(v.dtype).view(v.shape)
