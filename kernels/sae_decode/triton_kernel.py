"""CUDA kernels of `aa::sae_decode`: the trigram-bag Triton kernels (one program per token and
column block gathers its k decoder rows; the weight gradient is a sorted segment sum, or float
atomics with ``deterministic=False``) on the TopK latents as bags. No kernel of its own: what the
trigram-bag kernels tile, and their target-GPU planning, applies unchanged."""

from __future__ import annotations

import torch
from torch import Tensor

from aa_compile.kernels.trigram_bag import triton_kernel as bag

from .cpu import as_bags


def sae_decode_fwd(weight: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """``[N, d]`` in ``weight.dtype`` (16/32-bit floats; input assumed valid)."""
    flat, offsets, psw = as_bags(indices, values)
    return bag.trigram_bag_fwd(weight, flat, offsets, psw)


def sae_decode_bwd(grad: Tensor, weight: Tensor, indices: Tensor, values: Tensor,
                   need_weight_grad: bool = True, need_values_grad: bool = True,
                   deterministic: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """``(dweight [L, d] or None, dvalues [N, k] or None)`` in ``weight.dtype``."""
    flat, offsets, psw = as_bags(indices, values)
    if flat.numel() == 0:
        return (torch.zeros_like(weight) if need_weight_grad else None,
                torch.zeros_like(values) if need_values_grad else None)
    dw, dpsw = bag.trigram_bag_bwd(grad.contiguous(), weight, flat, offsets, psw.contiguous(),
                                   need_weight_grad, need_values_grad, deterministic)
    return dw, (dpsw.reshape(values.shape) if dpsw is not None else None)
