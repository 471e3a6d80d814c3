"""Eager CPU kernel of `aa::rms_norm`: the fewest full passes over the tensor eager PyTorch
allows (``vector_norm`` reduces in float32 without an upcast copy; the scaling is in place).
Compiled graphs use inductor's code instead (the op's decompositions)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference


def _rstd(x2d: Tensor, eps: float, acc: torch.dtype) -> Tensor:
    n = x2d.shape[-1]
    norm = torch.linalg.vector_norm(x2d, 2, dim=-1, keepdim=True, dtype=acc)
    return norm.square_().div_(n).add_(eps).rsqrt_()


def rms_norm_fwd(
    x: Tensor, weight: Tensor | None, eps: float, out_dtype: torch.dtype | None = None
) -> Tensor:
    out_dtype = out_dtype or x.dtype
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=out_dtype, device=x.device)
    acc = reference.compute_dtype(x.dtype)
    x2d = x.reshape(-1, x.shape[-1])
    y = torch.mul(x2d, _rstd(x2d, eps, acc))  # promotes to the accumulation dtype
    if weight is not None:
        y.mul_(weight)
    return y.to(out_dtype).reshape(x.shape)


def rms_norm_bwd(
    grad: Tensor, x: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor | None]:
    if x.numel() == 0:
        dw = None if weight is None else torch.zeros_like(weight)
        return torch.empty_like(x), dw
    acc = reference.compute_dtype(x.dtype)
    n = x.shape[-1]
    x2d = x.reshape(-1, n)
    g2d = grad.reshape(-1, n)
    rstd = _rstd(x2d, eps, acc)
    xhat = torch.mul(x2d, rstd)
    dweight = None
    if weight is not None:
        dweight = torch.mul(g2d, xhat).sum(0).to(weight.dtype)
        g = torch.mul(g2d, weight.to(acc))
    else:
        g = g2d.to(acc, copy=True)  # updated in place below: never alias grad
    # dx = rstd * (g - xhat * mean(g * xhat))
    proj = torch.linalg.vecdot(g, xhat, dim=-1).unsqueeze(-1).div_(n)
    dx = g.sub_(xhat.mul_(proj)).mul_(rstd)
    return dx.to(x.dtype).reshape(x.shape), dweight
