"""CPU path of `aa::guide_add` and `aa::guide_add_rms_norm` (device-generic torch).

- forward: the guide rows are gathered straight into the output buffer and ``x`` is added in
  place (one ``[T, d]`` allocation, the output itself; no ``x + g[idx]`` temporary);
- ``dg``: ``torch.segment_reduce`` over the CSR offsets (a contiguous run per word: no index
  tensor, no scatter; about 10-20x faster than ``index_add_`` on CPU), in float32 for half
  types;
- the fused norm: `aa_compile.kernels.rms_norm.cpu` on the rounded ``y`` (forward), and one
  float32 expression for ``grad_y + rms_norm_backward(grad_normed)`` before ``dx`` and ``dg``
  are rounded (backward).

Under ``backend="aa"`` with inductor, `inductor_decompositions` replaces the fused op and its
backward (below autograd, CPU tensors only) by ``aa::guide_add`` / ``aa::guide_add_backward``
(these kernels) plus the RMSNorm math, which inductor then generates and fuses with its
neighbours, as it does for ``aa::rms_norm``: on CPU the fused op costs what the two unfused ops
cost. (The eager kernels above run the norm as separate torch calls; compiled opaquely they
made the guide add + norm + residual fwd+bwd at T=2048, d=128 about 2x slower than inductor's
loop in an interleaved micro-benchmark.)
"""

from __future__ import annotations

import torch
from aa_compile.kernels.rms_norm import cpu as rms_cpu
from aa_compile.kernels.rms_norm import reference as rms_reference
from torch import Tensor

from .reference import byte_word, compute_dtype


def guide_add_fwd(x: Tensor, g: Tensor, word_offsets: Tensor) -> Tensor:
    """``x + g[word of byte]`` ``[T, d]`` in x's dtype."""
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    out = g.index_select(0, byte_word(word_offsets, x.shape[0]))
    return out.add_(x)


def segment_sum(rows: Tensor, word_offsets: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``[W, d]``: per-word sums of ``rows`` (summed in ``rows``' dtype), cast to
    ``out_dtype``; an empty word sums to 0."""
    n_words = word_offsets.numel() - 1
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        return torch.zeros(n_words, rows.shape[1], dtype=out_dtype, device=rows.device)
    dg = torch.segment_reduce(rows, "sum", offsets=word_offsets.long(), axis=0, unsafe=True)
    return dg.to(out_dtype)


def guide_add_bwd(grad: Tensor, word_offsets: Tensor) -> Tensor:
    """``dg [W, d]`` in grad's dtype, accumulated in float32 (float64 for float64)."""
    return segment_sum(grad.to(compute_dtype(grad.dtype)), word_offsets, grad.dtype)


def guide_add_rms_norm_fwd(x: Tensor, g: Tensor, word_offsets: Tensor, weight: Tensor | None,
                           eps: float, out_dtype: torch.dtype | None = None
                           ) -> tuple[Tensor, Tensor]:
    y = guide_add_fwd(x, g, word_offsets)
    return y, rms_cpu.rms_norm_fwd(y, weight, eps, out_dtype or x.dtype)


def guide_add_rms_norm_bwd(grad_y: Tensor | None, grad_normed: Tensor | None, y: Tensor,
                           weight: Tensor | None, word_offsets: Tensor, eps: float
                           ) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(dx, dg, dweight)``; see :mod:`.reference`."""
    acc = compute_dtype(y.dtype)
    n_rows, n = y.shape
    dweight = None if weight is None else torch.zeros_like(weight)
    if grad_normed is None or n_rows == 0:
        total = (torch.zeros(y.shape, dtype=acc, device=y.device) if grad_y is None
                 else grad_y.to(acc, copy=True))  # never alias an input
    else:
        norm = torch.linalg.vector_norm(y, 2, dim=-1, keepdim=True, dtype=acc)
        rstd = norm.square_().div_(n).add_(eps).rsqrt_()
        xhat = torch.mul(y, rstd)  # acc
        if weight is not None:
            dweight = torch.mul(grad_normed, xhat).sum(0).to(weight.dtype)
            gw = torch.mul(grad_normed, weight.to(acc))
        else:
            gw = grad_normed.to(acc, copy=True)
        # rms_norm backward: rstd * (gw - xhat * mean(gw * xhat))
        proj = torch.linalg.vecdot(gw, xhat, dim=-1).unsqueeze(-1).div_(n)
        total = gw.sub_(xhat.mul_(proj)).mul_(rstd)
        if grad_y is not None:
            total.add_(grad_y)
    return total.to(y.dtype), segment_sum(total, word_offsets, y.dtype), dweight


def inductor_decompositions() -> dict:
    """For inductor on CPU (declining elsewhere): the fused op as ``aa::guide_add`` followed by
    the reference RMSNorm, its backward as the RMSNorm backward math plus ``grad_y`` in float32
    followed by ``aa::guide_add_backward`` (the segment sum); same numerics as the fused
    kernels (``y`` rounded to x's dtype before the norm, one rounding of each output)."""

    def fwd(x, g, word_offsets, weight, eps, out_dtype=None):
        if x.device.type != "cpu":
            return NotImplemented
        y = torch.ops.aa.guide_add.default(x, g, word_offsets)
        return y, rms_reference.rms_norm(y, weight, eps, out_dtype or x.dtype)

    def bwd(grad_y, grad_normed, y, weight, word_offsets, eps):
        if y.device.type != "cpu":
            return NotImplemented
        acc = compute_dtype(y.dtype)
        total, dweight = None, None
        if grad_normed is not None:  # (y in acc: the norm's dx stays unrounded)
            total, dweight = rms_reference.rms_norm_backward(grad_normed, y.to(acc), weight, eps)
        elif weight is not None:
            dweight = torch.zeros_like(weight)
        if grad_y is not None:
            total = grad_y.to(acc) if total is None else total + grad_y.to(acc)
        if total is None:
            total = torch.zeros(y.shape, dtype=acc, device=y.device)
        dg = torch.ops.aa.guide_add_backward.default(total, word_offsets).to(y.dtype)
        return total.to(y.dtype), dg, (dweight if dweight is not None else y.new_empty(0))

    return {torch.ops.aa.guide_add_rms_norm.default: fwd,
            torch.ops.aa.guide_add_rms_norm_backward.default: bwd}
