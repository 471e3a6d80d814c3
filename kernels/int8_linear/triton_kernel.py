"""Triton kernel of `aa::int8_linear` (CUDA; runs in the Triton interpreter for CPU tests).

``out[M, N] = (x[M, K] @ w_int8[N, K]^T) * scales[N] + bias[N]``: each program computes one
``BLOCK_M x BLOCK_N`` tile, loads int8 weight tiles (1 byte per weight: the point of the op at
decode, where the GEMM is bound by weight bandwidth), converts them in registers to the
activation dtype (float32 for float32 input, with an ``ieee`` dot), accumulates in float32 and
applies the per-channel scale and the bias in the epilogue, rounding once to ``x.dtype``.
Numerics: ``reference.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from aa_compile.kernels import triton_target
from torch import Tensor

#: register spill stores (bytes per thread) each kernel may have in the AOT compile check
AOT_SPILL_BUDGET: dict[str, int] = {}


@triton.jit
def _int8_linear_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, o_ptr,
    M, N, K,
    sxm, sxk, swn, swk, som, son,
    HAS_BIAS: tl.constexpr, LOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[None, :] * swn + kk[:, None] * swk,
                    mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)
        if LOW:  # bf16/fp16 activations: int8 -> activation dtype is exact (|q| <= 127)
            acc += tl.dot(a, w.to(a.dtype))
        else:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    s = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    acc = acc * s[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(o_ptr + rm[:, None] * som + rn[None, :] * son,
             acc.to(o_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def _launch(m: int, x: Tensor) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps)``: 16 rows for decode-sized ``m``, else 64. On a
    GPU float32 takes 32-deep K steps (its IEEE dot runs on the FMA units, each thread holding
    its operands whole) and, for 64 rows, 8 warps."""
    bm = 16 if m <= 16 else 64
    if triton_target.is_gpu_launch(x.device) and x.dtype == torch.float32:
        return bm, 64, 32, 4 if bm == 16 else 8
    return bm, 64, 64, 4


def int8_linear(x: Tensor, w_int8: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    k = x.shape[-1]
    n = w_int8.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n:
        bm, bn, bk, warps = _launch(m, x)
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        scales = scales.contiguous()  # the kernel reads scales and bias with unit stride
        _int8_linear_kernel[grid](
            x2, w_int8, scales, bias.contiguous() if bias is not None else scales, out,
            m, n, k,
            x2.stride(0), x2.stride(1), w_int8.stride(0), w_int8.stride(1),
            out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None, LOW=x.dtype in (torch.float16, torch.bfloat16),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
        )
    return out.reshape(*x.shape[:-1], n)
