"""CPU kernel of `aa::int8_linear`: for decode-sized ``M`` (up to `SMALL_M` rows, non-float64
input) the AVX2 C kernel of ``cpu_avx2.py``, which reads each int8 weight once; otherwise
`blocked_linear`, which converts ``BLOCK_ELEMS`` weights at a time into one reused float scratch
block and multiplies it with ``torch.mm`` (no full-size float copy of the weight). Why not ATen's
``_weight_int8pack_mm``, and the measurements behind ``SMALL_M`` and ``BLOCK_ELEMS``:
``docs/dtm.md`` and ``docs/performance.md``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import cpu_avx2

#: largest ``M`` (rows of ``x``) that takes the native kernel
SMALL_M = 64
#: weights converted per GEMM block of `blocked_linear` (1 Mi: 4 MiB in float32, between the
#: 2 and 8 MiB blocks measured, see docs/performance.md)
BLOCK_ELEMS = 1 << 20


def int8_linear(x: Tensor, w_int8: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """``[..., K] x [N, K] -> [..., N]`` in ``x.dtype`` (see the module doc for the route; empty
    inputs take `blocked_linear`: zeros plus the bias)."""
    k = x.shape[-1]
    n = w_int8.shape[0]
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else x.reshape(math.prod(lead), k)
    if (0 < x2.numel() and n and x2.shape[0] <= SMALL_M and x.dtype != torch.float64
            and cpu_avx2.available()):
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
