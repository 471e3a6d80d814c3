"""Kernels of `aa::fp8_linear`, one module per device, with the reference beside them.

- ``reference.py``: the quantisation and float64 GEMMs, the numerics spec;
- ``cpu.py``: quantise with torch, GEMM with ``torch._scaled_mm`` (CPU FP8 GEMM);
- ``triton_kernel.py``: CUDA (sm_89+), one Triton GEMM per product with the cast fused into
  its prologue and the scales into its epilogue;
- ``cutlass_emit.py``: optional (``cutlass`` extra): emits an sm90a CUTLASS FP8 GEMM with a
  unit-scale (``alpha``) epilogue as a standalone ``.cu`` (not dispatched to yet).

`forward` and `backward` compose the op's NT GEMMs (`gemm_nt`) for the tensor's device.
"""

from __future__ import annotations

import torch
from aa_compile.kernels.lazy_triton import triton_module
from torch import Tensor

from . import cpu, reference
from .reference import E4M3, E5M2


def _triton():
    return triton_module(__name__)


def gemm_nt(a: Tensor, bt: Tensor, a_fmt, b_fmt, scaling: str, a_static: float,
            b_static: float, mult: float, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """One FP8 GEMM ``[P, R] x [Q, R]^T -> [P, Q]`` on ``a``'s device (see `reference`)."""
    p, r = a.shape
    q = bt.shape[0]
    if p == 0 or q == 0 or r == 0:  # nothing to multiply: an empty or all-bias result
        out = torch.zeros((p, q), dtype=out_dtype, device=a.device)
        return out if bias is None else out.add_(bias.to(out_dtype))
    if a.device.type == "cpu":
        impl = cpu.gemm_nt
    elif a.device.type == "cuda":
        if _triton() is None:
            raise RuntimeError("aa::fp8_linear on CUDA needs Triton: pip install aa-compile[triton]")
        impl = _triton().gemm_nt
    else:
        raise ValueError(f"aa::fp8_linear has no kernel for device {a.device}; use cpu or cuda")
    return impl(a, bt, a_fmt, b_fmt, scaling, a_static, b_static, mult, bias, out_dtype)


def forward(x: Tensor, w: Tensor, bias: Tensor | None, scaling: str, x_scale: float,
            w_scale: float, out_scale: float) -> Tensor:
    """``[..., K] x [N, K] -> [..., N]`` in ``x.dtype``."""
    x2 = x.reshape(-1, x.shape[-1])
    y = gemm_nt(x2, w, E4M3, E4M3, scaling, x_scale, w_scale, out_scale, bias, x.dtype)
    return y.reshape(*x.shape[:-1], w.shape[0])


def backward(grad: Tensor, x: Tensor, w: Tensor, scaling: str, x_scale: float, w_scale: float,
             grad_scale: float, grad_x_mult: float, grad_w_mult: float, need_x: bool,
             need_w: bool, need_bias: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dw, dbias)`` (None where not needed): grad E5M2, x and w E4M3."""
    n, k = w.shape
    g2 = grad.reshape(-1, n)
    dx = dw = db = None
    if need_x:
        dx = gemm_nt(g2, w.t(), E5M2, E4M3, scaling, grad_scale, w_scale, grad_x_mult, None,
                     x.dtype).reshape(x.shape)
    if need_w:
        x2 = x.reshape(-1, k)
        dw = gemm_nt(g2.t(), x2.t(), E5M2, E4M3, scaling, grad_scale, x_scale, grad_w_mult,
                     None, w.dtype)
    if need_bias:
        db = g2.sum(0, dtype=torch.float32)
    return dx, dw, db


__all__ = ["E4M3", "E5M2", "backward", "cpu", "forward", "gemm_nt", "reference"]
