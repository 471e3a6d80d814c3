"""CPU kernel of `aa::atman_attention` (numerics: ``reference.py``): the keys are split into up to
three disjoint parts (a shared prefix, each row's own keys with the suppression in an additive
mask, and for ``multiplicative`` the left-out suppressed keys), each run through ATen's fused
CPU flash attention or a small GEMM, and merged exactly by their log-sum-exp. Nothing is
subtracted, so tiny factors lose no precision; a shared prefix is never copied per row. The
parts in detail: ``docs/atman.md``."""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import allowed_mask, dense_factors, with_prefix

TILE_BYTES = 8 << 20
QUERY_CHUNK = 128  # causal own-key attention runs in query chunks of this many rows
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_NEG = float("-inf")


def _suppressed(suppress_idx: Tensor, suppress_factor: Tensor, n_keys: int,
                dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
    """Deduplicated spec: key positions ``[B, w]`` (``-1`` pads) and factors ``[B, w]`` (``1``
    pads) of the keys whose factor is below 1, or None when no row suppresses anything."""
    if suppress_idx.numel() == 0:
        return None
    fac = dense_factors(suppress_idx, suppress_factor, n_keys, dtype)  # [B, Sk], min wins
    hit = fac < 1
    w = int(hit.sum(1).max())
    if w == 0:
        return None
    order = torch.argsort(hit.to(torch.int8), dim=1, descending=True, stable=True)[:, :w]
    valid = hit.gather(1, order)
    return order.masked_fill(~valid, -1), fac.gather(1, order).masked_fill(~valid, 1.0)


def _flash(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool,
           scale: float) -> tuple[Tensor, Tensor]:
    out, lse = _FLASH(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
    return out, lse.to(q.dtype)


def _prefix_part(q: Tensor, pk: Tensor, pv: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Every query against the shared prefix keys ``[1, Hkv, P, D]`` (no mask)."""
    bsz, h, sq, d = q.shape
    qf = q.transpose(0, 1).reshape(1, h, bsz * sq, d)
    out, lse = _flash(qf, pk, pv, None, False, scale)
    out = out.view(h, bsz, sq, out.shape[-1]).transpose(0, 1)
    return out, lse.view(h, bsz, sq).transpose(0, 1)


def _own_part(q: Tensor, k: Tensor, v: Tensor, sup, mode: str, is_causal: bool, shift: int,
              first: int, scale: float) -> tuple[Tensor, Tensor]:
    """Each row's queries against its own keys: query ``i`` sees key ``j`` iff
    ``j <= i + shift`` (causal); ``first`` is the absolute position of key 0."""
    bsz, _, sq, _ = q.shape
    sk = k.shape[2]
    chunked = is_causal and shift >= 0 and sq > 2 * QUERY_CHUNK
    if sup is None and (not is_causal or (shift == 0 and not chunked)):
        return _flash(q, k, v, None, is_causal, scale)
    mask = torch.zeros(sq, sk, dtype=q.dtype, device=q.device)
    mask = mask.masked_fill_(~allowed_mask(sq, sk, is_causal, shift, q.device), _NEG)[None, None]
    if sup is not None:
        pos, fac = sup
        col = torch.where(pos < 0, sk, pos - first)
        val = fac.log() if mode == "log_additive" else torch.full_like(fac, _NEG)
        val = val.masked_fill(pos < 0, 0.0)
        bias = torch.zeros(bsz, sk + 1, dtype=q.dtype, device=q.device)
        bias.scatter_(1, col, val)
        mask = mask + bias[:, None, None, :sk]  # [B, 1, Sq, Sk]
    if chunked:
        # query chunks see only the keys up to their last query: skip the masked-out blocks
        outs, lses = [], []
        for a in range(0, sq, QUERY_CHUNK):
            b = min(sq, a + QUERY_CHUNK)
            n_keys = min(sk, b + shift)
            o, l = _flash(q[:, :, a:b], k[:, :, :n_keys], v[:, :, :n_keys],
                          mask[:, :, a:b, :n_keys], False, scale)
            outs.append(o)
            lses.append(l)
        out, lse = torch.cat(outs, 2), torch.cat(lses, 2)
    else:
        out, lse = _flash(q, k, v, mask, False, scale)
    if (is_causal and shift < 0) or (sup is not None and mode == "multiplicative"):
        # a row that sees no key here: the kernel reports lse 0, it must not count
        empty = (mask == _NEG).all(-1)  # [B or 1, 1, Sq]
        lse = lse.masked_fill(empty, _NEG)
    return out, lse


def _row_min(q: Tensor, pk: Tensor | None, k: Tensor, is_causal: bool, shift: int,
             scale: float) -> Tensor:
    """``min_j s[b, h, i, j]`` over every key query ``i`` may see (prefix and own keys)."""
    bsz, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = h // hkv
    n_pre = 0 if pk is None else pk.shape[2]
    out = torch.empty(bsz, h, sq, dtype=q.dtype, device=q.device)
    blk = max(1, min(sq, TILE_BYTES // max(1, q.element_size() * bsz * h * max(sk, n_pre))))
    qg = q.view(bsz, hkv, g, sq, d)
    kt = k.transpose(-1, -2)
    for start in range(0, sq, blk):
        stop = min(sq, start + blk)
        n = stop - start
        qb = qg[:, :, :, start:stop].reshape(bsz, hkv, g * n, d) * scale
        s = torch.matmul(qb, kt).view(bsz, hkv, g, n, sk)
        if is_causal:
            s.masked_fill_(~allowed_mask(n, sk, True, start + shift, q.device), float("inf"))
        m = s.amin(-1) if sk else s.new_full(s.shape[:-1], float("inf"))
        if n_pre:
            qf = qb.transpose(0, 1).reshape(hkv, bsz * g * n, d)
            sp = torch.matmul(qf, pk[0].transpose(-1, -2)).amin(-1)  # [Hkv, B*G*n]
            m = torch.minimum(m, sp.view(hkv, bsz, g, n).transpose(0, 1))
        out[:, :, start:stop] = m.reshape(bsz, h, n)
    return out


def _suppressed_part(q: Tensor, k: Tensor, v: Tensor, sup, row_min: Tensor, is_causal: bool,
                     q_offset: int, first: int, scale: float) -> tuple[Tensor, Tensor]:
    """``multiplicative``: the left-out keys with score ``rowmin + f·(s − rowmin)``."""
    bsz, h, sq, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    pos, fac = sup
    w = pos.shape[1]
    col = (pos - first).clamp(min=0)
    ks = k.gather(2, col[:, None, :, None].expand(bsz, hkv, w, d))
    vs = v.gather(2, col[:, None, :, None].expand(bsz, hkv, w, v.shape[3]))
    s = torch.matmul(q.reshape(bsz, hkv, g * sq, d), ks.transpose(-1, -2)).view(bsz, h, sq, w)
    s = s * scale
    rm = row_min[..., None]
    s = rm + fac[:, None, None, :].to(s.dtype) * (s - rm)
    hidden = (pos < 0)[:, None, None, :]
    if is_causal:
        qpos = torch.arange(sq, device=q.device) + q_offset
        hidden = hidden | (pos[:, None, None, :] > qpos[None, None, :, None])
    s = s.masked_fill(hidden, _NEG)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num_(0.0)
    out = torch.matmul(p.view(bsz, hkv, g * sq, w), vs).view(bsz, h, sq, v.shape[3])
    return out, lse


def atman_attention(q: Tensor, k: Tensor, v: Tensor, suppress_idx: Tensor,
                    suppress_factor: Tensor, mode: str, is_causal: bool, q_offset: int = 0,
                    scale: float | None = None, prefix_k: Tensor | None = None,
                    prefix_v: Tensor | None = None) -> Tensor:
    """The op's signature (``aa_compile/ops/atman_attention.py``); returns ``q.dtype``."""
    bsz, h, sq, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_pre = 0 if prefix_k is None else prefix_k.shape[2]
    sup = _suppressed(suppress_idx, suppress_factor, n_pre + k.shape[2], cdt)
    if n_pre and (
        (prefix_k.shape[0] != 1 and bsz != 1)
        or (is_causal and q_offset < n_pre - 1)  # some query does not see the whole prefix
        or (sup is not None and bool(((sup[0] >= 0) & (sup[0] < n_pre)).any()))
    ):
        k, v = with_prefix(k, v, prefix_k, prefix_v)
        n_pre = 0
    # contiguous: ATen's CPU flash kernel ignores the stride of the last dim (sdpa makes it 1
    # before calling it; we call the kernel directly), and the parts below view q
    qc, kc, vc = (t.contiguous().to(cdt) for t in (q, k, v))
    pk = prefix_k.contiguous().to(cdt) if n_pre else None
    pv = prefix_v.contiguous().to(cdt) if n_pre else None
    dv = v.shape[3]
    if dv != d:  # the fused kernel wants one head size: zero-pad (scale is explicit)
        e = max(d, dv)
        qc, kc, vc = _pad(qc, e), _pad(kc, e), _pad(vc, e)
        pk, pv = (_pad(pk, e), _pad(pv, e)) if n_pre else (None, None)
    shift = q_offset - n_pre  # query i sees own key j iff j <= i + shift
    parts = []
    if n_pre:
        parts.append(_prefix_part(qc, pk, pv, scale))
    if kc.shape[2]:
        parts.append(_own_part(qc, kc, vc, sup, mode, is_causal, shift, n_pre, scale))
    if sup is not None and mode == "multiplicative":
        rmin = _row_min(qc, pk, kc, is_causal, shift, scale)
        parts.append(_suppressed_part(qc, kc, vc, sup, rmin, is_causal, q_offset, n_pre, scale))
    if not parts:  # no keys at all
        return q.new_zeros(bsz, h, sq, dv)
    if len(parts) == 1:
        out = parts[0][0]
    else:  # o = Σ o_p · exp(lse_p − lse)
        lse = parts[0][1]
        for _, l in parts[1:]:
            lse = torch.logaddexp(lse, l)
        out = torch.empty(bsz, h, sq, parts[0][0].shape[-1], dtype=cdt, device=q.device)
        torch.mul(parts[0][0], torch.exp(parts[0][1] - lse)[..., None], out=out)
        for o, l in parts[1:]:
            out.addcmul_(o, torch.exp(l - lse)[..., None])
    return out[..., :dv].nan_to_num_(0.0).to(q.dtype).contiguous()


def _pad(t: Tensor, size: int) -> Tensor:
    return torch.nn.functional.pad(t, (0, size - t.shape[-1])) if t.shape[-1] < size else t
