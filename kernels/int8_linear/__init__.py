"""Kernels of `aa::int8_linear` (int8 weight-only linear), one module per device.

- ``reference.py``: float64 matmul with the dequantised weight (the numerics spec) and the
  per-output-channel absmax quantiser;
- ``cpu.py``: the CPU path: ``cpu_avx2.py`` (an AVX2 C kernel reading the int8 weight directly,
  built on first use) for decode-sized ``M``, blocked dequantise + GEMM otherwise;
- ``triton_kernel.py``: CUDA, one Triton GEMM with int8 weight tiles converted in registers.

`forward` picks the implementation for the tensor's device.
"""

from __future__ import annotations

import torch
from aa_compile.kernels.lazy_triton import triton_module
from torch import Tensor

from . import cpu, cpu_avx2, reference


def _triton():
    return triton_module(__name__)


def forward(x: Tensor, w_int8: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """``[..., K] x [N, K] -> [..., N]`` in ``x.dtype``."""
    n = w_int8.shape[0]
    if x.numel() == 0 or n == 0 or x.shape[-1] == 0:  # nothing to multiply
        out = torch.zeros((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
        return out if bias is None else out.add_(bias.to(x.dtype))
    if x.device.type == "cpu":
        return cpu.int8_linear(x, w_int8, scales, bias)
    if x.device.type == "cuda" and x.dtype != torch.float64 and _triton() is not None:
        return _triton().int8_linear(x, w_int8, scales, bias)
    return reference.int8_linear(x, w_int8, scales, bias)


__all__ = ["cpu", "cpu_avx2", "forward", "reference"]
