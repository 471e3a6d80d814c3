"""Kernels of `aa::sae_encode` on CPU (and on any device: ATen ops). Forward: one ``addmm``, a
TopK, the activation on the k kept values; rows whose TopK meets equal values are re-ranked
by the reference's tie rule (ascending latent index), found with one compare pass. Backward:
sparse, on the trigram-bag kernels through `aa_compile.kernels.sae_decode` (``dx`` is a bag of
k encoder rows per token, ``dweight`` the bag's weight gradient with ``x - pre_bias`` as the
upstream rows); no ``[N, L]`` tensor."""

from __future__ import annotations

import torch
from torch import Tensor

from aa_compile.kernels.sae_decode import cpu as decode

from .reference import activate, activation_grad, compute_dtype, ordered_topk


def sae_encode_fwd(x: Tensor, weight: Tensor, bias: Tensor, pre_bias: Tensor, k: int,
                   sigmoid: bool = False) -> tuple[Tensor, Tensor]:
    """``(values [N, k] in weight.dtype, indices [N, k] int64)`` (input assumed valid)."""
    ct = compute_dtype(weight.dtype)
    if ct == weight.dtype:
        pre = torch.addmm(bias, x - pre_bias, weight.t())
    else:  # 16-bit: accumulate in float32 (ATen's CPU matmul does, the sum with bias too)
        pre = torch.addmm(bias.to(ct), (x.to(ct) - pre_bias.to(ct)), weight.to(ct).t())
    top, indices = tie_ordered_topk(pre, k)
    return activate(top, sigmoid).to(weight.dtype), indices


def tie_ordered_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``pre.topk(k)`` (descending) with ties ranked by ascending latent index.

    ATen's TopK breaks ties as it pleases. One more entry is taken (k + 1): a row can differ
    from the rule only where two neighbours of that sorted list are equal (a tie inside the
    kept set, or across its boundary) or it holds NaN; those rows (in trained SAEs usually
    none) are redone with a stable sort. On CUDA the check costs one device sync."""
    n_latents = pre.shape[-1]
    more = min(k + 1, n_latents)
    top, indices = pre.topk(more, dim=-1, sorted=True)
    if k == 0 or pre.shape[0] == 0:
        return top[:, :k].contiguous(), indices[:, :k].contiguous()
    tied = (top[:, 1:] == top[:, :-1]).any(-1) | top[:, :k].isnan().any(-1)
    rows = tied.nonzero().squeeze(1)
    top, indices = top[:, :k].contiguous(), indices[:, :k].contiguous()
    if rows.numel():
        top[rows], indices[rows] = ordered_topk(pre[rows], k)
    return top, indices


def latent_bias_grad(g: Tensor, indices: Tensor, n_latents: int) -> Tensor:
    """``dbias [L]``: the kept entries' gradients summed per latent."""
    out = torch.zeros(n_latents, dtype=compute_dtype(g.dtype), device=g.device)
    return out.index_add_(0, indices.reshape(-1), g.reshape(-1).to(out.dtype))


def sae_encode_bwd(grad: Tensor, x: Tensor, weight: Tensor, pre_bias: Tensor, values: Tensor,
                   indices: Tensor, sigmoid: bool = False, bag=decode.sae_decode_fwd,
                   bag_bwd=decode.sae_decode_bwd) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias, dpre_bias)`` in the inputs' dtypes (see ``reference.py``);
    ``bag`` / ``bag_bwd``: the decode kernels to use (CPU here, Triton from the CUDA module)."""
    g = activation_grad(grad.to(compute_dtype(weight.dtype)),
                        values.to(compute_dtype(weight.dtype)), sigmoid).to(weight.dtype)
    dx = bag(weight, indices, g)
    xc = (x - pre_bias).contiguous()
    dweight, _ = bag_bwd(xc, weight, indices, g, True, False)
    dbias = latent_bias_grad(g, indices, weight.shape[0]).to(weight.dtype)
    dpre_bias = -dx.to(compute_dtype(weight.dtype)).sum(0).to(weight.dtype)
    return dx, dweight, dbias, dpre_bias
