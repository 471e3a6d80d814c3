"""CPU path of `aa::int8_linear`: a native int8 GEMV/skinny-GEMM for decode-sized ``M``, blocked
dequantise + GEMM for the rest.

- ``M <= SMALL_M`` (64) rows (batch-1 decode up to small batches) with float32/bfloat16/float16
  input: :mod:`aa_compile.kernels.int8_linear.cpu_avx2`, an AVX2 C kernel that reads each int8
  weight once (1 byte per weight instead of float32's 4) and widens it in registers. It computes
  in float32 (half-type input is widened first, the output rounded once to ``x.dtype``).
- Otherwise (``M > SMALL_M``, float64 input, or no native kernel on this machine): `blocked_linear`:
  ``BLOCK_ELEMS`` weights at a time are converted to the compute dtype (float32; float64 for
  float64 input) into one reused, cache-sized scratch block and multiplied with ``torch.mm``
  straight into that block's output columns; the per-channel scale and the bias are applied to
  the output. No full-size float copy of the weight is ever made.

Why not ATen's ``_weight_int8pack_mm`` (the previous path): on the AVX2 dev VM (torch 2.13,
no AVX512/AMX) it ran at 0.1-0.3x float32 ``F.linear`` at ``M = 1`` and 0.06-0.1x at
``M = 16-64`` (4096 x 4096), slower than both paths here at every ``M``; it also segfaulted on
half-type input with ``K % 8 != 0``. Inductor's own code for a pointwise-times-reduction form of
the op (``(x[:, None, :] * w.to(x.dtype)).sum(-1) * scales``, one fused vectorised loop reading
int8) measured 0.2x too: its int8 vector loads of 8 lanes go through a scalar copy.

``SMALL_M`` and ``BLOCK_ELEMS`` come from measurements on that VM (one thread, medians of
interleaved runs; the VM is shared and noisy), as speed-ups over float32 ``F.linear`` for
4096 x 4096 / 11008 x 4096: the native kernel 2.5x / 2.2x at ``M = 32``, 1.6x / 1.6x at 64,
1.2x / 1.2x at 128, 0.9x / 0.8x at 256; `blocked_linear` with 2 MiB blocks 1.4x / 1.4x at 64,
1.1x / 1.4x at 128, with 8 MiB blocks 1.2x / 1.5x at 128, 1.0x / 1.0x at 256, 1.3x at 512
(4096 x 4096) and 0.5 MiB blocks up to 30% slower at large ``M``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import cpu_avx2

#: largest ``M`` (rows of ``x``) that takes the native kernel
SMALL_M = 64
#: weights converted per GEMM block of `blocked_linear` (1 Mi: 4 MiB in float32, between the
#: 2 and 8 MiB blocks measured, see the module doc)
BLOCK_ELEMS = 1 << 20


def int8_linear(x: Tensor, w_int8: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """``[..., K] x [N, K] -> [..., N]`` in ``x.dtype`` (see the module doc for the route)."""
    k = x.shape[-1]
    n = w_int8.shape[0]
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else x.reshape(math.prod(lead), k)
    if x2.shape[0] <= SMALL_M and x.dtype != torch.float64 and cpu_avx2.available():
        y = cpu_avx2.int8_linear(x2, w_int8, scales, bias)
    else:
        y = blocked_linear(x2, w_int8, scales, bias)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*lead, n)


def blocked_linear(x2: Tensor, w_int8: Tensor, scales: Tensor, bias: Tensor | None,
                   block_rows: int | None = None) -> Tensor:
    """``[M, K] x [N, K] -> [M, N]`` in the compute dtype (float64 for float64 ``x2``, else
    float32): ``block_rows`` weight rows at a time (default: ``BLOCK_ELEMS // K``) are converted
    into one scratch block and multiplied into their output columns; then ``* scales + bias``."""
    acc = torch.float64 if x2.dtype == torch.float64 else torch.float32
    m, k = x2.shape
    n = w_int8.shape[0]
    xa = x2.to(acc)
    y = torch.empty((m, n), dtype=acc, device=x2.device)
    if m and n:
        rows = min(n, block_rows or max(1, BLOCK_ELEMS // max(k, 1)))
        scratch = torch.empty((rows, k), dtype=acc, device=x2.device)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            blk = scratch[: r1 - r0]
            blk.copy_(w_int8[r0:r1])
            torch.mm(xa, blk.t(), out=y[:, r0:r1])
        y.mul_(scales.to(acc))
        if bias is not None:
            y.add_(bias.to(acc))
    return y
