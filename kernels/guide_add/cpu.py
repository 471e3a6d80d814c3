"""CPU path of `aa::guide_add` and `aa::guide_add_rms_norm` (numerics: :mod:`.reference`), in
device-generic torch: also the ops' path for CUDA float64 and for devices without a kernel.

The forward gathers the guide rows straight into the output and adds ``x`` in place (no
``x + g[idx]`` temporary); ``dg`` is a ``torch.segment_reduce`` over the CSR offsets (no index
tensor, no scatter), in float32 for half types; the fused norm runs ``aa::rms_norm``'s CPU
kernel on the rounded ``y``, its backward is one float32 expression rounded once.
"""

from __future__ import annotations

import torch
from aa_compile.kernels.rms_norm import cpu as rms_cpu
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

