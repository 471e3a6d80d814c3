"""Kernels of `aa::atman_attention` (AtMan attention with a compact per-row suppression spec).

- ``reference.py``: dense float64 evaluation, the numerics spec;
- ``cpu.py``: fused flash attention per key part (shared prefix, own keys with the suppression
  in the mask, multiplicative's left-out keys), merged by log-sum-exp;
- ``triton_kernel.py``: flash-style Triton kernel with the suppression inside the key loop.

A shared ``prefix_k``/``prefix_v`` (``[1, Hkv, P, D]``, the keys before the row's own keys) is
used as such by the CPU path; the other kernels get it concatenated in front of every row.
"""

from __future__ import annotations

from aa_compile.kernels.lazy_triton import triton_module
from torch import Tensor

from . import cpu, reference


def forward(q: Tensor, k: Tensor, v: Tensor, suppress_idx: Tensor, suppress_factor: Tensor,
            mode: str, is_causal: bool, q_offset: int, scale: float | None,
            prefix_k: Tensor | None = None, prefix_v: Tensor | None = None) -> Tensor:
    if q.device.type == "cpu":
        return cpu.atman_attention(q, k, v, suppress_idx, suppress_factor, mode, is_causal,
                                   q_offset, scale, prefix_k, prefix_v)
    k, v = reference.with_prefix(k, v, prefix_k, prefix_v)
    if q.device.type == "cuda" and triton_module(__name__) is not None and q.dtype.itemsize < 8:
        impl = triton_module(__name__).atman_attention
    else:
        impl = reference.atman_attention
    return impl(q, k, v, suppress_idx, suppress_factor, mode, is_causal, q_offset, scale)
