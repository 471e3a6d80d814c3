"""Kernels of `aa::word_pool` (HAT's word pooling: one query per word over the word's own
bytes), one module per device, with the reference beside them.

- ``reference.py``: padded ``[W, L]`` masked attention, the numerics spec, and
  ``check_inputs``;
- ``cpu.py``: the segment (varlen) path: vectorized torch over the ``T`` bytes present
  (``segment_reduce`` on the CSR offsets), device generic;
- ``triton_kernel.py``: the CUDA path (Triton, one program per (word, query head), online
  softmax over the word's bytes).

`forward` and `backward` pick the implementation: CUDA float16/bfloat16/float32 with Triton ->
``triton_kernel``; everything else (CPU, CUDA float64, other devices) -> ``cpu``.
"""

from __future__ import annotations

import torch
from aa_compile.kernels.lazy_triton import triton_module
from torch import Tensor

from . import cpu, reference  # noqa: F401  (reference: re-exported for tests)


def _triton():
    return triton_module(__name__)


def _impl(q: Tensor):
    if q.device.type == "cuda" and q.dtype != torch.float64 and _triton() is not None:
        t = _triton()
        return t.word_pool_fwd, t.word_pool_bwd
    return cpu.word_pool_fwd, cpu.word_pool_bwd


def forward(q: Tensor, k: Tensor, v: Tensor, word_offsets: Tensor,
            scale: float | None) -> Tensor:
    """``[W, H, D]``; see :mod:`.reference`."""
    return _impl(q)[0](q, k, v, word_offsets, scale)


def backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, word_offsets: Tensor,
             scale: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)``, recomputing the softmax from q and k."""
    return _impl(q)[1](grad, q, k, v, word_offsets, scale)
