"""CPU path of `aa::int8_linear`: ATen's int8 weight-only GEMM ``aten._weight_int8pack_mm``.

Constraints of that kernel (checked on torch 2.13): ``x`` 2-D float32/bfloat16/float16, ``w``
``[N, K]`` int8 **contiguous**, ``scales`` ``[N]`` in ``x.dtype``; odd shapes and M = 0 work
in float32. With bfloat16/float16 input and ``K`` not a multiple of 8 (e.g. K = 33) the ATen
kernel **segfaults** on this build, so those go to the fallback too. Anything else (float64 input, a torch build without the op) falls back to the dequantise-then-
``F.linear`` path in ``x.dtype``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

HAS_INT8PACK = hasattr(torch.ops.aten, "_weight_int8pack_mm")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def int8_linear(x: Tensor, w_int8: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    k = x.shape[-1]
    n = w_int8.shape[0]
    x2 = x.reshape(-1, k)
    if HAS_INT8PACK and x.dtype in _DTYPES and (x.dtype == torch.float32 or k % 8 == 0):
        y = torch.ops.aten._weight_int8pack_mm(
            x2.contiguous(), w_int8.contiguous(), scales.to(x.dtype).contiguous()
        )
        if bias is not None:
            y = y.add_(bias.to(x.dtype))
    else:
        w = w_int8.to(x.dtype) * scales.to(x.dtype)[:, None]
        y = F.linear(x2, w, None if bias is None else bias.to(x.dtype))
    return y.reshape(*x.shape[:-1], n)
