"""Kernels of `aa::trigram_bag` (T-FREE sparse trigram embedding bag), one module per device,
with the reference beside them.

- ``reference.py``: plain PyTorch (gather + ``index_add_``), the numerics spec the tests compare
  against, and ``check_inputs`` (what valid input is);
- ``cpu.py``: the CPU path (bag sums by ``cpu_avx2.py``'s native float32 kernel, ATen's
  fbgemm embedding bag otherwise; forward and a sorted-segment ``dweight``);
- ``triton_kernel.py``: the CUDA path (Triton: one program per bag x column block; deterministic
  sorted-segment backward, or float atomics on request).

`forward` and `backward` pick the implementation for the tensor's device. For tensors off the
CPU the CPU module only calls ATen ops that exist on every device (its numpy bookkeeping and
huge-page advice are for CPU tensors), so it also serves float64 on CUDA and CUDA without
Triton (still deterministic: ATen's embedding-bag forward sums each bag in one thread).
"""

from __future__ import annotations

import torch
from torch import Tensor

from aa_compile.kernels.lazy_triton import triton_module

from . import cpu, reference  # noqa: F401  (reference: re-exported for tests)


def _triton():
    return triton_module(__name__)


def _impl(weight: Tensor):
    if weight.device.type == "cuda" and weight.dtype != torch.float64 and _triton() is not None:
        return _triton().trigram_bag_fwd, _triton().trigram_bag_bwd
    return cpu.trigram_bag_fwd, cpu.trigram_bag_bwd


def forward(
    weight: Tensor, indices: Tensor, offsets: Tensor, per_sample_weights: Tensor | None
) -> Tensor:
    return _impl(weight)[0](weight, indices, offsets, per_sample_weights)


def backward(
    grad: Tensor,
    weight: Tensor,
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None,
    need_weight_grad: bool,
    need_psw_grad: bool,
    deterministic: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """``(dweight or None, dpsw or None)``. ``deterministic`` only matters on the Triton path
    (the CPU and reference paths are always deterministic)."""
    fn = _impl(weight)[1]
    if fn is cpu.trigram_bag_bwd:
        return fn(grad, weight, indices, offsets, per_sample_weights, need_weight_grad,
                  need_psw_grad)
    return fn(grad, weight, indices, offsets, per_sample_weights, need_weight_grad,
              need_psw_grad, deterministic)
