"""Kernels of `aa::guide_add` and `aa::guide_add_rms_norm` (HAT's decoder guide vectors: one
vector per word added to each of the word's bytes, optionally fused with the following
RMSNorm), one module per device, with the reference beside them.

- ``reference.py``: plain PyTorch (gather + add, ``index_add_``), the numerics spec, and
  ``check_inputs``;
- ``cpu.py``: the CPU path (gather into the output + in-place add; ``segment_reduce`` for
  ``dg``), device generic;
- ``triton_kernel.py``: the CUDA path (Triton, one program per word: its guide row is loaded
  once for all its bytes; ``dg`` is a per-word row sum, no atomics).

Dispatch: CUDA float16/bfloat16/float32 with Triton -> ``triton_kernel``; everything else
(CPU, CUDA float64, other devices) -> ``cpu``.
"""

from __future__ import annotations

import torch
from aa_compile.kernels.lazy_triton import triton_module
from torch import Tensor

from . import cpu, reference  # noqa: F401  (reference: re-exported for tests)


def _triton():
    return triton_module(__name__)


def _impl(x: Tensor):
    if x.device.type == "cuda" and x.dtype != torch.float64 and _triton() is not None:
        return _triton()
    return cpu


def forward(x: Tensor, g: Tensor, word_offsets: Tensor) -> Tensor:
    return _impl(x).guide_add_fwd(x, g, word_offsets)


def backward(grad: Tensor, word_offsets: Tensor) -> Tensor:
    return _impl(grad).guide_add_bwd(grad, word_offsets)


def norm_forward(x: Tensor, g: Tensor, word_offsets: Tensor, weight: Tensor | None, eps: float,
                 out_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    return _impl(x).guide_add_rms_norm_fwd(x, g, word_offsets, weight, eps, out_dtype)


def norm_backward(grad_y: Tensor | None, grad_normed: Tensor | None, y: Tensor,
                  weight: Tensor | None, word_offsets: Tensor, eps: float
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
    return _impl(y).guide_add_rms_norm_bwd(grad_y, grad_normed, y, weight, word_offsets, eps)
