"""Triton `aa::atman_attention` (CUDA; numerics: ``reference.py``): flash-style, one program per
(query block, batch row x head), reading the compact suppression spec inside the key loop, so no
dense mask or factor vector is materialised; ``multiplicative`` first sweeps the keys for each
row's minimum. On a GPU float16/bfloat16 multiply on tensor cores (float32 accumulation, the
softmax in float32); float32, and every dtype in the interpreter, in IEEE float32.
Inference only. Details: ``docs/atman.md``."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from aa_compile.kernels import triton_target
from torch import Tensor


class Launch(NamedTuple):
    """Tiles of one launch: query rows, key rows, warps."""

    block_m: int
    block_n: int
    num_warps: int


#: the interpreter (tests on CPU): 32-row tiles
INTERPRETER_LAUNCH = Launch(32, 32, 4)
#: GPU launches by whether the dots run in a half type (tensor cores) or in IEEE float32 (FMA
#: units, whose operands each thread holds whole: smaller tiles)
GPU_LAUNCHES = {True: Launch(64, 64, 4), False: Launch(32, 32, 8)}
#: register spill stores (bytes per thread) each kernel may have in the AOT compile check: the
#: float32 (IEEE) multiplicative path, with its row-minimum sweep, spills a few hundred bytes
AOT_SPILL_BUDGET: dict[str, int] = {"_atman_fwd_kernel": 400}


@triton.jit
def _factors(IDX, FAC, row, NSUP, offs_n):
    f = tl.full(offs_n.shape, 1.0, tl.float32)
    for t in range(NSUP):
        j = tl.load(IDX + row * NSUP + t)
        ft = tl.load(FAC + row * NSUP + t).to(tl.float32)
        f = tl.minimum(f, tl.where(offs_n == j, ft, 1.0))
    return f


@triton.jit
def _dot(a, b, LOW: tl.constexpr):
    """``a @ b`` in float32: on tensor cores for half types (``LOW``), else IEEE float32."""
    if LOW:
        c = tl.dot(a, b)
    else:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return c


@triton.jit
def _atman_fwd_kernel(Q, K, V, O, IDX, FAC, SQ, SK, H, HKV, NSUP, q_offset, scale,
                      D: tl.constexpr, DV: tl.constexpr, MULT: tl.constexpr,
                      CAUSAL: tl.constexpr, LOW: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
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
                mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)
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
            s = _dot(q, tl.trans(k), LOW) * scale
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
        s = _dot(q, tl.trans(k), LOW) * scale
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
        if LOW:
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, LOW)
        else:
            acc = acc * alpha[:, None] + _dot(p, v, LOW)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + o_base + offs_m[:, None] * DV + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & (offs_dv[None, :] < DV))


def atman_attention(q: Tensor, k: Tensor, v: Tensor, suppress_idx: Tensor,
                    suppress_factor: Tensor, mode: str, is_causal: bool, q_offset: int,
                    scale: float | None, block_m: int | None = None,
                    block_n: int | None = None) -> Tensor:
    """Attention with the suppression applied in the key loop (see the module doc); the tiles
    are the target's (`INTERPRETER_LAUNCH` / `GPU_LAUNCHES`) unless ``block_m`` / ``block_n``
    say otherwise."""
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
    gpu = triton_target.is_gpu_launch(q.device)
    low = gpu and q.dtype in (torch.float16, torch.bfloat16)
    launch = GPU_LAUNCHES[low] if gpu else INTERPRETER_LAUNCH
    block_m = launch.block_m if block_m is None else block_m
    block_n = launch.block_n if block_n is None else block_n
    grid = (triton.cdiv(sq, block_m), bsz * h)
    _atman_fwd_kernel[grid](
        q, k, v, out, idx, fac, sq, sk, h, hkv, idx.shape[1], q_offset, float(scale),
        D=d, DV=dv, MULT=mode == "multiplicative", CAUSAL=is_causal, LOW=low, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=launch.num_warps,
    )
    return out
