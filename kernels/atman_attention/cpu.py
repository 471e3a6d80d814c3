"""CPU path of `aa::atman_attention` (numerics: :mod:`.reference`).

Blocked explicit attention: queries are processed in blocks so that the float32 score tile
``[B, H, block, Sk]`` stays within ``TILE_BYTES``; nothing of size ``[S, S]`` per perturbation
is ever built. The suppression enters as one ``[B, 1, 1, Sk]`` vector per row (log factors for
``log_additive``; factors for ``multiplicative``), broadcast over heads and queries. Grouped
query attention is handled by viewing the query heads of a group as extra query rows.

For ``log_additive`` the op can equally be written as SDPA with an additive mask
(causal + log f, built per query block); it is exact but measured slower than this path on
CPU at the benchmark shapes (the fused SDPA kernels do not take a mask cheaply), see
``bench/test_atman.py``. ``multiplicative`` needs the row minimum, which no bias can express.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import dense_factors

TILE_BYTES = 8 << 20


def atman_attention(q: Tensor, k: Tensor, v: Tensor, suppress_idx: Tensor,
                    suppress_factor: Tensor, mode: str, is_causal: bool, q_offset: int,
                    scale: float | None) -> Tensor:
    bsz, h, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    g = h // hkv
    scale = d ** -0.5 if scale is None else scale
    cdt = torch.float32 if q.dtype != torch.float64 else torch.float64
    fac = dense_factors(suppress_idx, suppress_factor, sk, cdt)  # [B, Sk]
    suppressed = bool((fac < 1).any())
    if mode == "log_additive":
        bias = fac.log()[:, None, None, :] if suppressed else None
    else:
        bias = fac[:, None, None, :] if suppressed else None
    # [B, Hkv, G, Sq, D] -> per group a [B, Hkv, G*blk, D] block of query rows
    qg = q.view(bsz, hkv, g, sq, d)
    kt = k.to(cdt).transpose(-1, -2)  # [B, Hkv, D, Sk]
    vc = v.to(cdt)
    out = q.new_empty(bsz, hkv, g, sq, dv)
    blk = max(1, min(sq, TILE_BYTES // max(1, 4 * bsz * h * sk)))
    keys = torch.arange(sk, device=q.device)
    for start in range(0, sq, blk):
        stop = min(sq, start + blk)
        n = stop - start
        qb = qg[:, :, :, start:stop].to(cdt).reshape(bsz, hkv, g * n, d)
        s = torch.matmul(qb, kt).mul_(scale).view(bsz, hkv, g, n, sk)
        if is_causal:
            pos = torch.arange(start, stop, device=q.device)[:, None] + q_offset
            masked = keys[None, :] > pos  # [n, Sk]
        else:
            masked = None
        s = s.view(bsz, hkv * g, n, sk)
        if bias is not None:
            if mode == "log_additive":
                s.add_(bias)
            else:
                if masked is not None:
                    row_min = s.masked_fill(masked, float("inf")).amin(-1, keepdim=True)
                else:
                    row_min = s.amin(-1, keepdim=True)
                s.sub_(row_min).mul_(bias)
        if masked is not None:
            s.masked_fill_(masked, float("-inf"))
        p = torch.softmax(s, dim=-1)
        if masked is not None and q_offset < 0:
            p = p.nan_to_num_(0.0)
        ob = torch.matmul(p.view(bsz, hkv, g * n, sk), vc)
        out[:, :, :, start:stop] = ob.view(bsz, hkv, g, n, dv).to(q.dtype)
    return out.view(bsz, h, sq, dv)
