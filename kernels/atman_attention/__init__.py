"""Kernels of `aa::atman_attention` (AtMan attention with a compact per-row suppression spec).

- ``reference.py``: dense float64 evaluation, the numerics spec;
- ``cpu.py``: blocked explicit attention in float32 with a per-row factor vector;
- ``triton_kernel.py``: flash-style Triton kernel with the suppression inside the key loop.
"""

from __future__ import annotations

from aa_compile.kernels import triton_module
from torch import Tensor

from . import cpu, reference


def forward(q: Tensor, k: Tensor, v: Tensor, suppress_idx: Tensor, suppress_factor: Tensor,
            mode: str, is_causal: bool, q_offset: int, scale: float | None) -> Tensor:
    if q.device.type == "cpu":
        impl = cpu.atman_attention
    elif q.device.type == "cuda" and triton_module(__name__) is not None and q.dtype.itemsize < 8:
        impl = triton_module(__name__).atman_attention
    else:
        impl = reference.atman_attention
    return impl(q, k, v, suppress_idx, suppress_factor, mode, is_causal, q_offset, scale)
