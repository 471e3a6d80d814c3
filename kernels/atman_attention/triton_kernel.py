"""Triton `aa::atman_attention` (CUDA; numerics: ``reference.py``): flash-style, one program per
(query block, batch row x head), reading the compact suppression spec inside the key loop, so no
dense mask or factor vector is materialised; ``multiplicative`` first sweeps the keys for each
row's minimum. Inference only. Details: ``docs/atman.md``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _factors(IDX, FAC, row, NSUP, offs_n):
    f = tl.full(offs_n.shape, 1.0, tl.float32)
    for t in range(NSUP):
        j = tl.load(IDX + row * NSUP + t)
        ft = tl.load(FAC + row * NSUP + t).to(tl.float32)
        f = tl.minimum(f, tl.where(offs_n == j, ft, 1.0))
    return f


@triton.jit
def _atman_fwd_kernel(Q, K, V, O, IDX, FAC, SQ, SK, H, HKV, NSUP, q_offset, scale,
                      D: tl.constexpr, DV: tl.constexpr, MULT: tl.constexpr,
                      CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    row = pid_bh // H
    hq = pid_bh % H
    hk = hq // (H // HKV)
    q_base = pid_bh.to(tl.int64) * SQ * D
    o_base = pid_bh.to(tl.int64) * SQ * DV
    k_base = (row * HKV + hk).to(tl.int64) * SK * D
    v_base = (row * HKV + hk).to(tl.int64) * SK * DV
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < SQ
    q = tl.load(Q + q_base + offs_m[:, None] * D + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    if CAUSAL:
        end = tl.minimum(SK, q_offset + (pid_m + 1) * BLOCK_M)
    else:
        end = SK
    pos = offs_m + q_offset
    row_min = tl.full([BLOCK_M], float("inf"), tl.float32)
    if MULT:
        for start in range(0, end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            k = tl.load(K + k_base + offs_n[:, None] * D + offs_d[None, :],
                        mask=(offs_n[:, None] < SK) & (offs_d[None, :] < D), other=0.0)
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
            ok = offs_n[None, :] < SK
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= pos[:, None])
            row_min = tl.minimum(row_min, tl.min(tl.where(ok, s, float("inf")), 1))
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(0, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = tl.load(K + k_base + offs_n[:, None] * D + offs_d[None, :],
                    mask=(offs_n[:, None] < SK) & (offs_d[None, :] < D), other=0.0)
        v = tl.load(V + v_base + offs_n[:, None] * DV + offs_dv[None, :],
                    mask=(offs_n[:, None] < SK) & (offs_dv[None, :] < DV), other=0.0)
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
        f = _factors(IDX, FAC, row, NSUP, offs_n)
        if MULT:
            s = (s - row_min[:, None]) * f[None, :]
        else:
            s = s + tl.log(f)[None, :]
        ok = offs_n[None, :] < SK
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= pos[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + o_base + offs_m[:, None] * DV + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & (offs_dv[None, :] < DV))


def atman_attention(q: Tensor, k: Tensor, v: Tensor, suppress_idx: Tensor,
                    suppress_factor: Tensor, mode: str, is_causal: bool, q_offset: int,
                    scale: float | None, block_m: int = 32, block_n: int = 32) -> Tensor:
    bsz, h, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    scale = d ** -0.5 if scale is None else scale
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    idx = suppress_idx.to(torch.int64).contiguous()
    fac = suppress_factor.to(torch.float32).contiguous()
    out = q.new_empty(bsz, h, sq, dv)
    if out.numel() == 0:
        return out
    block_d = max(16, triton.next_power_of_2(d))
    block_dv = max(16, triton.next_power_of_2(dv))
    grid = (triton.cdiv(sq, block_m), bsz * h)
    _atman_fwd_kernel[grid](
        q, k, v, out, idx, fac, sq, sk, h, hkv, idx.shape[1], q_offset, float(scale),
        D=d, DV=dv, MULT=mode == "multiplicative", CAUSAL=is_causal, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
    )
    return out
