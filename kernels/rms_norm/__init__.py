"""Kernels of `aa::rms_norm`, one module per device, with the reference beside them.

- ``reference.py``: plain PyTorch, the numerics spec the tests compare against;
- ``cpu.py``: the CPU path (a few-pass eager path; under inductor, a decomposition it fuses);
- ``triton_kernel.py``: the CUDA path (Triton, one program per row).

`forward` and `backward` pick the implementation for the tensor's device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from aa_compile.kernels.lazy_triton import triton_module

from . import cpu, reference


def _triton():
    return triton_module(__name__)


def _impl(x: Tensor):
    if x.device.type == "cpu":
        return cpu.rms_norm_fwd, cpu.rms_norm_bwd
    if x.device.type == "cuda" and x.dtype != torch.float64 and _triton() is not None:
        return _triton().rms_norm_fwd, _triton().rms_norm_bwd
    return reference.rms_norm, reference.rms_norm_backward


def forward(x: Tensor, weight: Tensor | None, eps: float, out_dtype: torch.dtype | None) -> Tensor:
    return _impl(x)[0](x, weight, eps, out_dtype)


def backward(
    grad: Tensor, x: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor | None]:
    return _impl(x)[1](grad, x, weight, eps)
