"""Plain-PyTorch RMSNorm: the numerics every `aa::rms_norm` kernel is tested against.

Semantics (shared by all kernels):

    y = x / sqrt(mean(x**2, dim=-1) + eps) * weight

The reduction and the scaling happen in float32 (float64 for float64 input); the result is
rounded once to ``out_dtype`` (default: ``x.dtype``). ``weight`` may be ``None`` (no affine
scale). The backward recomputes ``rstd`` from ``x`` instead of saving it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(
    x: Tensor, weight: Tensor | None, eps: float, out_dtype: torch.dtype | None = None
) -> Tensor:
    """Forward. ``x``: ``[..., N]``; ``weight``: ``[N]`` or ``None``."""
    acc = compute_dtype(x.dtype)
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = xf * rstd
    if weight is not None:
        y = y * weight.to(acc)
    return y.to(out_dtype or x.dtype)


def rms_norm_backward(
    grad: Tensor, x: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor | None]:
    """Gradients ``(dx, dweight)`` of :func:`rms_norm` for upstream gradient ``grad``.

    With ``xhat = x * rstd`` and ``g = grad * weight``:
    ``dx = rstd * (g - xhat * mean(g * xhat, -1))`` and ``dweight = sum(grad * xhat)`` over all
    leading dimensions.
    """
    acc = compute_dtype(x.dtype)
    xf = x.to(acc)
    gf = grad.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xf * rstd
    g = gf * weight.to(acc) if weight is not None else gf
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    dweight = None
    if weight is not None:
        dweight = (gf * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return dx.to(x.dtype), dweight
