"""Plain-PyTorch TopK SAE encoder: the numerics every `aa::sae_encode` kernel is tested against,
and the definition of valid input (`check_inputs`).

For the normalised input ``x [N, d]``, encoder rows ``weight [L, d]``, ``bias [L]`` (the latent
bias) and ``pre_bias [d]``::

    pre              = (x - pre_bias) @ weight.T + bias                     # [N, L]
    top, indices     = topk(pre, k)  (descending)                            # [N, k]
    values           = relu(top)  or  sigmoid(top)                           # [N, k]

Ties: equal pre-activations are ranked by ascending latent index, both for which latents are
kept and for their order (`ordered_topk`: a stable descending sort). ``-0.0`` equals ``+0.0``;
NaN ranks above every number (as in ``torch.sort``). Every kernel keeps this rule.

Backward from ``grad [N, k]`` (``g = grad * act'``; relu': ``values > 0``, sigmoid':
``values (1 - values)``), with ``xc = x - pre_bias``; only the k kept entries per token exist::

    dx[n]        = sum_j g[n, j] * weight[indices[n, j]]
    dweight[i]   = sum_{(n, j) : indices[n, j] == i} g[n, j] * xc[n]
    dbias[i]     = sum_{(n, j) : indices[n, j] == i} g[n, j]
    dpre_bias    = -sum_n dx[n]

Products and sums in float32 (float64 for float64 inputs), rounded once.
"""

from __future__ import annotations

import torch
from torch import Tensor

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(x: Tensor, weight: Tensor, bias: Tensor, pre_bias: Tensor, k: int,
                 op: str = "aa::sae_encode") -> None:
    """Raise ``ValueError`` naming the argument for invalid input."""
    if not isinstance(weight, Tensor) or weight.dtype not in _FLOAT or weight.dim() != 2:
        raise ValueError(f"{op}: weight must be a 2-D [n_latents, d] floating tensor, got "
                         f"{getattr(weight, 'dtype', type(weight))} of shape "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    n_latents, d = weight.shape
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != d:
        raise ValueError(f"{op}: x must be [tokens, d={d}] (SAE width mismatch), got shape "
                         f"{tuple(getattr(x, 'shape', ()))}")
    if not isinstance(bias, Tensor) or tuple(bias.shape) != (n_latents,):
        raise ValueError(f"{op}: bias must be [n_latents={n_latents}], got shape "
                         f"{tuple(getattr(bias, 'shape', ()))}")
    if not isinstance(pre_bias, Tensor) or tuple(pre_bias.shape) != (d,):
        raise ValueError(f"{op}: pre_bias must be [d={d}], got shape "
                         f"{tuple(getattr(pre_bias, 'shape', ()))}")
    for name, t in (("x", x), ("bias", bias), ("pre_bias", pre_bias)):
        if t.dtype != weight.dtype:
            raise ValueError(f"{op}: {name} must have weight's dtype {weight.dtype}, got "
                             f"{t.dtype}")
        if t.device != weight.device:
            raise ValueError(f"{op}: {name} is on {t.device}, but weight is on {weight.device}")
    known = isinstance(k, int) and isinstance(n_latents, int)  # not symbolic
    if isinstance(k, bool) or not isinstance(k, (int, torch.SymInt)) or \
            (known and not 0 <= k <= n_latents):
        raise ValueError(f"{op}: k must be in [0, n_latents={n_latents}], got {k!r}")


def activate(top: Tensor, sigmoid: bool) -> Tensor:
    return torch.sigmoid(top) if sigmoid else torch.relu(top)


def activation_grad(grad: Tensor, values: Tensor, sigmoid: bool) -> Tensor:
    """``grad * act'`` from the activated values (in their dtype)."""
    if sigmoid:
        return grad * values * (1 - values)
    return grad * (values > 0).to(grad.dtype)


def ordered_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest of each row of ``pre [N, L]``, descending; equal values by ascending
    index (a stable sort: simple and slow, the rule's definition)."""
    top, indices = pre.sort(dim=-1, descending=True, stable=True)
    return top[:, :k], indices[:, :k]


def sae_encode(x: Tensor, weight: Tensor, bias: Tensor, pre_bias: Tensor, k: int,
               sigmoid: bool = False) -> tuple[Tensor, Tensor]:
    """Forward (see the module docstring): ``(values [N, k], indices [N, k] int64)``."""
    check_inputs(x, weight, bias, pre_bias, k)
    ct = compute_dtype(weight.dtype)
    pre = (x.to(ct) - pre_bias.to(ct)) @ weight.to(ct).t() + bias.to(ct)
    top, indices = ordered_topk(pre, k)
    return activate(top, sigmoid).to(weight.dtype), indices


def sae_encode_backward(grad: Tensor, x: Tensor, weight: Tensor, pre_bias: Tensor,
                        values: Tensor, indices: Tensor, sigmoid: bool = False
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias, dpre_bias)`` through a dense ``[N, L]`` latent gradient (simple
    and precise: the tests' ground truth on float64 copies)."""
    ct = compute_dtype(weight.dtype)
    g = activation_grad(grad.to(ct), values.to(ct), sigmoid)
    dpre = torch.zeros(x.shape[0], weight.shape[0], dtype=ct, device=x.device)
    dpre.scatter_add_(1, indices.long(), g)
    xc = x.to(ct) - pre_bias.to(ct)
    dx = dpre @ weight.to(ct)
    return (dx.to(x.dtype), (dpre.t() @ xc).to(weight.dtype), dpre.sum(0).to(weight.dtype),
            (-dx.sum(0)).to(weight.dtype))
