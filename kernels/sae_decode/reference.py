"""Plain-PyTorch sparse SAE decode: the numerics every `aa::sae_decode` kernel is tested
against, and the definition of valid input (`check_inputs`).

For decoder rows ``weight [L, d]`` (the transpose of ``nn.Linear(L, d).weight``), TopK latent
indices ``indices [N, k]`` and their values ``values [N, k]``::

    out[n]        = sum_j values[n, j] * weight[indices[n, j]]              # [N, d]
    dweight[i]    = sum_{(n, j) : indices[n, j] == i} values[n, j] * grad[n] # [L, d]
    dvalues[n, j] = <grad[n], weight[indices[n, j]]>                         # [N, k]

i.e. a sum embedding bag of k rows per token with the latent values as per-sample weights,
accumulated in float32 (float64 for float64 weights) and rounded once. No dense ``[N, L]``
latent tensor exists on any path. A repeated index in a row counts twice.
"""

from __future__ import annotations

import torch
from torch import Tensor

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX = (torch.int32, torch.int64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(weight: Tensor, indices: Tensor, values: Tensor, *, check_values: bool = True,
                 op: str = "aa::sae_decode") -> None:
    """Raise ``ValueError`` naming the argument for invalid input (``check_values``: also read
    the indices, a device sync off CPU)."""
    if not isinstance(weight, Tensor) or weight.dtype not in _FLOAT or weight.dim() != 2:
        raise ValueError(f"{op}: weight must be a 2-D [n_latents, d] floating tensor, got "
                         f"{getattr(weight, 'dtype', type(weight))} of shape "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    if not isinstance(indices, Tensor) or indices.dtype not in _INDEX or indices.dim() != 2:
        raise ValueError(f"{op}: indices must be a 2-D [tokens, k] int32/int64 tensor, got "
                         f"{getattr(indices, 'dtype', type(indices))} of shape "
                         f"{tuple(getattr(indices, 'shape', ()))}")
    if not isinstance(values, Tensor) or values.shape != indices.shape:
        raise ValueError(f"{op}: values must have the shape of indices {tuple(indices.shape)}, "
                         f"got {tuple(getattr(values, 'shape', ()))}")
    if values.dtype != weight.dtype:
        raise ValueError(f"{op}: values must have weight's dtype {weight.dtype}, got "
                         f"{values.dtype}")
    for name, t in (("indices", indices), ("values", values)):
        if t.device != weight.device:
            raise ValueError(f"{op}: {name} is on {t.device}, but weight is on {weight.device}")
    if check_values and indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"{op}: indices must lie in [0, n_latents) = [0, {weight.shape[0]}), "
                             f"found {lo if lo < 0 else hi}")


def sae_decode(weight: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """Forward (see the module docstring)."""
    check_inputs(weight, indices, values)
    ct = compute_dtype(weight.dtype)
    rows = weight.to(ct)[indices.long()]                       # [N, k, d]
    return (values.to(ct)[..., None] * rows).sum(1).to(weight.dtype)


def sae_decode_backward(grad: Tensor, weight: Tensor, indices: Tensor, values: Tensor
                        ) -> tuple[Tensor, Tensor]:
    """``(dweight [L, d], dvalues [N, k])`` (see the module docstring)."""
    check_inputs(weight, indices, values)
    ct = compute_dtype(weight.dtype)
    idx = indices.long()
    g = grad.to(ct)
    dweight = torch.zeros(weight.shape, dtype=ct, device=weight.device)
    contrib = values.to(ct)[..., None] * g[:, None, :]          # [N, k, d]
    dweight.index_add_(0, idx.reshape(-1), contrib.reshape(-1, weight.shape[1]))
    dvalues = (weight.to(ct)[idx] * g[:, None, :]).sum(-1)
    return dweight.to(weight.dtype), dvalues.to(weight.dtype)
