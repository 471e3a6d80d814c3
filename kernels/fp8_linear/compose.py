"""The forward and backward of `aa::fp8_linear` composed from one device's FP8 NT GEMM
``gemm_nt(a, bt, a_fmt, b_fmt, scaling, a_static, b_static, mult, bias, out_dtype)`` (the
``gemm_nt`` of ``cpu.py`` or ``triton_kernel.py``; numerics: ``reference.py``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .reference import E4M3, E5M2


def cuda_capability_problem(device: torch.device) -> str | None:
    """Why the CUDA ``device`` has no FP8 tensor cores (compute capability < 8.9), or None."""
    return capability_problem(torch.cuda.get_device_capability(device), str(device))


def capability_problem(cap: tuple[int, int], where: str) -> str | None:
    """Why a GPU of compute capability ``cap`` (named ``where`` in the message) has no FP8
    tensor cores (capability < 8.9), or None."""
    if tuple(cap) >= (8, 9):
        return None
    return (f"FP8 matmul needs a GPU with compute capability >= 8.9 (Ada, Hopper or newer); "
            f"{where} is sm_{cap[0]}{cap[1]}. Use F.linear in bfloat16 there, or run on CPU")


def gemm(gemm_nt: Callable, a: Tensor, bt: Tensor, a_fmt, b_fmt, scaling: str,
         a_static: float, b_static: float, mult: float, bias: Tensor | None,
         out_dtype: torch.dtype) -> Tensor:
    """``gemm_nt`` for ``[P, R] x [Q, R]^T -> [P, Q]``; with nothing to multiply (a zero
    dimension) the empty or all-bias result without calling it."""
    p, r = a.shape
    q = bt.shape[0]
    if p == 0 or q == 0 or r == 0:
        out = torch.zeros((p, q), dtype=out_dtype, device=a.device)
        return out if bias is None else out.add_(bias.to(out_dtype))
    return gemm_nt(a, bt, a_fmt, b_fmt, scaling, a_static, b_static, mult, bias, out_dtype)


def forward(gemm_nt: Callable, x: Tensor, w: Tensor, bias: Tensor | None, scaling: str,
            x_scale: float, w_scale: float, out_scale: float) -> Tensor:
    """``[..., K] x [N, K] -> [..., N]`` in ``x.dtype``: x and w in E4M3."""
    x2 = x.reshape(-1, x.shape[-1])
    y = gemm(gemm_nt, x2, w, E4M3, E4M3, scaling, x_scale, w_scale, out_scale, bias, x.dtype)
    return y.reshape(*x.shape[:-1], w.shape[0])


def backward(gemm_nt: Callable, grad: Tensor, x: Tensor, w: Tensor, scaling: str,
             x_scale: float, w_scale: float, grad_scale: float, grad_x_mult: float,
             grad_w_mult: float, need_x: bool, need_w: bool,
             need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dw, dbias)``, an empty tensor for each one not needed: grad in E5M2, x and w in
    E4M3, each quantised along its GEMM's contraction dimension; dbias in float32."""
    n, k = w.shape
    g2 = grad.reshape(-1, n)
    dx, dw, db = x.new_empty(0), x.new_empty(0), x.new_empty(0)  # three tensors: no aliases
    if need_x:
        dx = gemm(gemm_nt, g2, w.t(), E5M2, E4M3, scaling, grad_scale, w_scale, grad_x_mult,
                  None, x.dtype).reshape(x.shape)
    if need_w:
        dw = gemm(gemm_nt, g2.t(), x.reshape(-1, k).t(), E5M2, E4M3, scaling, grad_scale,
                  x_scale, grad_w_mult, None, w.dtype)
    if need_bias:
        db = g2.sum(0, dtype=torch.float32)
    return dx, dw, db
