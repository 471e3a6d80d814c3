"""The numerics spec of `aa::atman_attention` (AtMan, arXiv 2301.08110): plain PyTorch, float64.

Scores ``s = scale · q kᵀ`` (per batch row ``b``, head, query ``i``, key ``j``). Query ``i`` sits
at absolute position ``q_offset + i``; with ``is_causal`` it may attend to key ``j`` iff
``j <= q_offset + i`` ("allowed"). Each batch row carries a compact suppression spec: key
positions ``suppress_idx[b, :]`` (``-1`` = unused slot) with multipliers
``suppress_factor[b, :]``. The factor of key ``j`` in row ``b`` is

    f[b, j] = min(1, min{ suppress_factor[b, t] : suppress_idx[b, t] == j })

(the strongest suppression wins, as in Aleph Alpha's production code). It applies to the whole
key column: every query row, every head. Then

- ``log_additive``:   s[i, j] += log f[b, j]                       (production API default)
- ``multiplicative``: s[i, j] = (s[i, j] - min_{allowed j'} s[i, j']) · f[b, j]
                       (the research repo's formula: the row minimum is taken over the allowed
                       keys only, after scaling, as in ``scaling``'s ``multi_head_attention``)

followed by masking of disallowed keys, softmax over keys and ``· v``. Because a suppression of
key ``j`` changes nothing for queries that cannot see ``j`` (both the bias and the row minimum
are over allowed keys only), every position before the first suppressed one is unchanged, which
is what lets the explainer share the unperturbed prefix.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dense_factors(suppress_idx: Tensor, suppress_factor: Tensor, n_keys: int,
                  dtype: torch.dtype = torch.float64) -> Tensor:
    """Per-row key factors ``[B, n_keys]`` (1 where nothing is suppressed), min over duplicates."""
    b = suppress_idx.shape[0]
    fac = torch.ones(b, n_keys + 1, dtype=dtype, device=suppress_idx.device)
    idx = torch.where(suppress_idx < 0, n_keys, suppress_idx).long()  # unused -> dump column
    fac.scatter_reduce_(1, idx, suppress_factor.to(dtype), reduce="amin", include_self=True)
    return fac[:, :n_keys].clamp(max=1.0)


def allowed_mask(sq: int, sk: int, is_causal: bool, q_offset: int, device) -> Tensor:
    """``[sq, sk]`` bool: may query ``i`` see key ``j``."""
    if not is_causal:
        return torch.ones(sq, sk, dtype=torch.bool, device=device)
    i = torch.arange(sq, device=device)[:, None] + q_offset
    return torch.arange(sk, device=device)[None, :] <= i


def with_prefix(k: Tensor, v: Tensor, prefix_k: Tensor | None,
                prefix_v: Tensor | None) -> tuple[Tensor, Tensor]:
    """One key sequence per row: the prefix (broadcast over the batch) followed by ``k``."""
    if prefix_k is None:
        return k, v
    b = k.shape[0]
    return (torch.cat([prefix_k.expand(b, -1, -1, -1), k], dim=2),
            torch.cat([prefix_v.expand(b, -1, -1, -1), v], dim=2))


def atman_attention(q: Tensor, k: Tensor, v: Tensor, suppress_idx: Tensor,
                    suppress_factor: Tensor, mode: str, is_causal: bool, q_offset: int,
                    scale: float | None, prefix_k: Tensor | None = None,
                    prefix_v: Tensor | None = None) -> Tensor:
    """Dense float64 evaluation; returns ``q.dtype``. A ``prefix_k``/``prefix_v``
    (``[1 or B, Hkv, P, D]``) stands in front of every row's keys."""
    k, v = with_prefix(k, v, prefix_k, prefix_v)
    _bsz, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    qd, kd, vd = q.double(), k.double(), v.double()
    if hkv != h:
        kd = kd.repeat_interleave(h // hkv, dim=1)
        vd = vd.repeat_interleave(h // hkv, dim=1)
    s = qd @ kd.transpose(-1, -2) * scale  # [B, H, Sq, Sk]
    allowed = allowed_mask(sq, sk, is_causal, q_offset, q.device)
    fac = dense_factors(suppress_idx, suppress_factor, sk)[:, None, None, :]
    if mode == "log_additive":
        s = s + fac.log()
    elif mode == "multiplicative":
        row_min = s.masked_fill(~allowed, float("inf")).amin(-1, keepdim=True)
        s = (s - row_min) * fac
    else:
        raise ValueError(f"mode must be 'log_additive' or 'multiplicative', got {mode!r}")
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row that sees no key gives zeros
    return (p @ vd).to(q.dtype)
