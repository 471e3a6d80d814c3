"""CPU path of `aa::window_attention` (numerics: :mod:`.reference`): the query blocks of
:mod:`.blocked` run through ATen's CPU flash-attention kernel, forward and backward. Cost and
memory O(T * (window + block)); no ``[T, T]`` tensor.

The backward reuses the saved output and logsumexp (no forward recompute) and folds a gradient
of the logsumexp in as one extra head-dim column (`_fold_grad_lse`). Design: ``docs/hat.md``;
block sizes measured: ``docs/performance.md``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .blocked import block_rows, blocks, split
from .reference import compute_dtype

#: Queries per block, forward and backward (measured: docs/performance.md).
BLOCK_FWD = 256
BLOCK_BWD = 128

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _unit_last_stride(*ts: Tensor) -> list[Tensor]:
    """ATen's CPU flash kernels ignore the stride of the head dim (sdpa makes it 1 before
    calling them; we call them directly): copy a tensor whose last stride is not 1."""
    return [t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous() for t in ts]


def _mask(additive: Tensor, group: int) -> Tensor:
    """The block's 0 / -inf mask for its ``group * (e - s)`` rows (query heads of a key head)."""
    return additive.repeat(group, 1) if group > 1 else additive


def forward(q: Tensor, k: Tensor, v: Tensor, doc_offsets: Tensor | None, window: int,
            scale: float | None = None, block: int = BLOCK_FWD) -> tuple[Tensor, Tensor]:
    """``(out [..., Hq, T, D] q.dtype, lse [..., Hq, T] float32/float64)``."""
    rows, hkv, group, t, d = split(q, k)
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    if q.numel() == 0:
        return q.new_zeros(q.shape), q.new_zeros(q.shape[:-1], dtype=compute_dtype(q.dtype))
    q, k, v = _unit_last_stride(q, k, v)
    q5 = q.reshape(rows, hkv, group, t, d)
    k4, v4 = k.reshape(rows, hkv, t, d), v.reshape(rows, hkv, t, d)
    outs, lses = [], []
    for s, e, ks, mask in blocks(doc_offsets, t, window, q.device, block, additive=q.dtype):
        ob, lb = _flash(block_rows(q5, s, e), k4[:, :, ks:e], v4[:, :, ks:e], 0.0, False,
                        attn_mask=_mask(mask, group), scale=scale)
        outs.append(ob.view(rows, hkv, group, e - s, d))
        lses.append(lb.view(rows, hkv, group, e - s))
    # one concatenation each (into contiguous buffers) instead of a copy per block
    out = torch.cat(outs, dim=3, out=q.new_empty(rows, hkv, group, t, d))
    lse = torch.cat(lses, dim=3, out=lses[0].new_empty(rows, hkv, group, t))
    return out.view(q.shape), lse.view(q.shape[:-1])


def _fold_grad_lse(qb, kb, vb, ob, gb, glb):
    """Pad the head dim by one column so that ATen's backward also applies ``dlse``.

    ATen computes ``dS = P * (dO V^T - rowsum(dO * O))``; ``lse`` adds ``P * dlse``. With ``q``,
    ``k`` and ``out`` padded by 0, ``v`` by 1 and ``dO`` by ``dlse``, the extra column adds
    ``dlse`` to ``dO V^T`` and nothing to the row sum or the scores.
    """
    def pad(x, value):
        return torch.cat([x, x.new_full((*x.shape[:-1], 1), value)], dim=-1)

    gb = torch.cat([gb, glb.unsqueeze(-1).to(gb.dtype)], dim=-1)
    return pad(qb, 0.0), pad(kb, 0.0), pad(vb, 1.0), pad(ob, 0.0), gb


def backward(grad: Tensor, grad_lse: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
             out: Tensor, lse: Tensor, doc_offsets: Tensor | None, window: int,
             scale: float | None, block: int = BLOCK_BWD) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` in the inputs' dtype from the saved ``out`` and ``lse``."""
    rows, hkv, group, t, d = split(q, k)
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    if q.numel() == 0 or k.numel() == 0:
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    if grad_lse is not None and not bool(grad_lse.any()):
        grad_lse = None  # the usual case: only the output is used
    q, k, v, out, grad = _unit_last_stride(q, k, v, out, grad)
    q5, o5, g5 = (x.reshape(rows, hkv, group, t, d) for x in (q, out, grad))
    l4 = lse.reshape(rows, hkv, group, t)
    gl4 = None if grad_lse is None else grad_lse.reshape(rows, hkv, group, t)
    k4, v4 = k.reshape(rows, hkv, t, d), v.reshape(rows, hkv, t, d)
    dqs = []
    dk = torch.zeros(rows, hkv, t, d, dtype=compute_dtype(q.dtype))
    dv = torch.zeros_like(dk)
    for s, e, ks, mask in blocks(doc_offsets, t, window, q.device, block, additive=q.dtype):
        qb, ob, gb, lb = (block_rows(x, s, e) for x in (q5, o5, g5, l4))
        kb, vb = k4[:, :, ks:e], v4[:, :, ks:e]
        if gl4 is not None:
            qb, kb, vb, ob, gb = _fold_grad_lse(qb, kb, vb, ob, gb, block_rows(gl4, s, e))
        dqb, dkb, dvb = _flash_bwd(gb, qb, kb, vb, ob, lb, 0.0, False,
                                   attn_mask=_mask(mask, group), scale=scale)
        dqs.append(dqb[..., :d].reshape(rows, hkv, group, e - s, d))
        dk[:, :, ks:e] += dkb[..., :d]
        dv[:, :, ks:e] += dvb[..., :d]
    dq = torch.cat(dqs, dim=3, out=q.new_empty(rows, hkv, group, t, d)).view(q.shape)
    return dq, dk.to(k.dtype).view(k.shape), dv.to(v.dtype).view(v.shape)
