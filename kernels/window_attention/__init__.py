"""Kernels of `aa::window_attention` (causal sliding-window attention over a packed stream with
document boundaries), one module per device, with the reference beside them.

- ``reference.py``: dense masked attention, the numerics spec, and ``check_inputs``;
- ``layout.py``: each query's first key / each key's last query (what the fast paths skip by);
- ``blocked.py``: query blocking and a device-generic blocked path (plain matmuls);
- ``cpu.py``: the CPU path (the blocks through ATen's CPU flash-attention kernel);
- ``triton_kernel.py``: the CUDA path (Triton flash attention, forward and backward).

`forward` and `backward` pick the implementation for the tensors' device and dtype: CPU ->
``cpu``; CUDA float16/bfloat16/float32 with Triton -> ``triton_kernel``; anything else (CUDA
float64, CUDA without Triton, other devices) -> ``blocked``.
"""

from __future__ import annotations

import torch
from aa_compile.kernels.lazy_triton import triton_module
from torch import Tensor

from . import blocked, cpu, reference  # noqa: F401  (reference: re-exported for tests)


def _triton():
    return triton_module(__name__)


def _impl(q: Tensor):
    if q.device.type == "cpu":
        return cpu
    if q.device.type == "cuda" and q.dtype != torch.float64 and _triton() is not None:
        return _triton()
    return blocked


def forward(q: Tensor, k: Tensor, v: Tensor, doc_offsets: Tensor | None, window: int,
            scale: float | None) -> tuple[Tensor, Tensor]:
    """``(out, lse)``; see :mod:`.reference`."""
    return _impl(q).forward(q, k, v, doc_offsets, window, scale)


def backward(grad: Tensor, grad_lse: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
             out: Tensor, lse: Tensor, doc_offsets: Tensor | None, window: int,
             scale: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` from the forward's saved ``out`` and ``lse``."""
    return _impl(q).backward(grad, grad_lse, q, k, v, out, lse, doc_offsets, window, scale)
