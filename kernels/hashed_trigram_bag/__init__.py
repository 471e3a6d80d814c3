"""Kernels of `aa::hashed_trigram_bag` (T-FREE embedding bag that takes trigram *ids* and
computes the fast-mode slots itself), one module per device, with the reference beside them.

- ``reference.py``: slots by the spec's numpy hash (`aa_compile.models.tfree.hashing`), then
  the `aa::trigram_bag` reference; ``check_inputs`` (what valid input is);
- ``cpu.py``: the fast-mode hash vectorized in torch (int64 emulating uint64), then the
  `aa::trigram_bag` CPU kernels on the materialized slots;
- ``triton_kernel.py``: the CUDA path, the hash computed inside the forward kernel (only the
  ids are read); the backward materializes the slots in a Triton kernel and reuses the
  `aa::trigram_bag` Triton ``dweight``.

`forward` and `backward` pick the implementation for the tensor's device. The CPU module only
calls torch ops that exist on every device, so it also serves float64 on CUDA and CUDA without
Triton.
"""

from __future__ import annotations

import torch
from aa_compile.kernels.lazy_triton import triton_module
from torch import Tensor

from . import cpu, reference  # noqa: F401  (reference: re-exported for tests)


def _triton():
    return triton_module(__name__)


def _use_triton(weight: Tensor) -> bool:
    return (weight.device.type == "cuda" and weight.dtype != torch.float64
            and _triton() is not None)


def forward(weight: Tensor, trigram_ids: Tensor, trigram_offsets: Tensor, m: int, k_lower: int,
            whole_word_slots: Tensor | None) -> Tensor:
    if _use_triton(weight):
        return _triton().hashed_trigram_bag_fwd(weight, trigram_ids, trigram_offsets, m,
                                                k_lower, whole_word_slots)
    return cpu.hashed_trigram_bag_fwd(weight, trigram_ids, trigram_offsets, m, k_lower,
                                      whole_word_slots)


def backward(grad: Tensor, weight: Tensor, trigram_ids: Tensor, trigram_offsets: Tensor, m: int,
             k_lower: int, whole_word_slots: Tensor | None, deterministic: bool = True) -> Tensor:
    """``dweight [v, h]``. ``deterministic`` only matters on the Triton path (the CPU path is
    always deterministic)."""
    if _use_triton(weight):
        return _triton().hashed_trigram_bag_bwd(grad, weight, trigram_ids, trigram_offsets, m,
                                                k_lower, whole_word_slots, deterministic)
    return cpu.hashed_trigram_bag_bwd(grad, weight, trigram_ids, trigram_offsets, m, k_lower,
                                      whole_word_slots)
