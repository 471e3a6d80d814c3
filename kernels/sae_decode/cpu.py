"""CPU kernels of `aa::sae_decode`: the trigram-bag CPU kernels (AVX2 float32 bag sums, sorted
segment sums for the weight gradient) with one bag of k entries per token."""

from __future__ import annotations

import torch
from torch import Tensor

from aa_compile.kernels.trigram_bag import cpu as bag


def as_bags(indices: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(flat indices [N*k], CSR offsets [N + 1] int64, flat values [N*k])``."""
    n, k = indices.shape
    offsets = torch.arange(n + 1, device=indices.device, dtype=torch.int64) * k
    return indices.reshape(-1), offsets, values.reshape(-1)


def sae_decode_fwd(weight: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """``[N, d]`` in ``weight.dtype`` (input assumed valid)."""
    flat, offsets, psw = as_bags(indices, values)
    return bag.trigram_bag_fwd(weight, flat, offsets, psw.contiguous())


def sae_decode_bwd(grad: Tensor, weight: Tensor, indices: Tensor, values: Tensor,
                   need_weight_grad: bool = True, need_values_grad: bool = True
                   ) -> tuple[Tensor | None, Tensor | None]:
    """``(dweight [L, d] or None, dvalues [N, k] or None)`` in ``weight.dtype``."""
    flat, offsets, psw = as_bags(indices, values)
    if flat.numel() == 0:
        return (torch.zeros_like(weight) if need_weight_grad else None,
                torch.zeros_like(values) if need_values_grad else None)
    dw, dpsw = bag.trigram_bag_bwd(grad.contiguous(), weight, flat, offsets, psw.contiguous(),
                                   need_weight_grad, need_values_grad)
    return dw, (dpsw.reshape(values.shape) if dpsw is not None else None)
