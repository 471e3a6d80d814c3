"""Triton (CUDA) path of `aa::window_attention` (numerics: :mod:`.reference`): flash-attention
forward and backward (FlashAttention-2 style: no atomics, deterministic) that visit only the key
blocks inside the window and the document (:mod:`.layout`). float32 inputs multiply in IEEE
float32 (no TF32); float64 is refused (the op routes it to :mod:`.blocked`). Design:
``docs/hat.md``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from aa_compile.kernels import triton_target
from torch import Tensor

from .layout import bounds

_LOG2E = 1.4426950408889634
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


class Launch(NamedTuple):
    """Tiles and pipeline of one kernel launch: query rows, key rows, warps, stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


#: the interpreter (tests on CPU): small tiles, every tile is a numpy call
INTERPRETER_LAUNCH = Launch(16, 16, 4, 1)
#: GPU launches per kernel, best first; the first whose shared memory fits the target is taken.
#: Half types multiply on tensor cores; float32 ("ieee") dots run on the FMA units, whose
#: operands each thread holds whole, so their tiles are smaller (no register spills at D 128).
GPU_LAUNCHES: dict[tuple[str, bool], tuple[Launch, ...]] = {
    ("fwd", True): (Launch(64, 64, 4, 3), Launch(64, 64, 4, 2), Launch(32, 32, 4, 1)),
    ("dkdv", True): (Launch(32, 64, 8, 2), Launch(32, 64, 8, 1), Launch(16, 32, 4, 1)),
    ("dq", True): (Launch(64, 64, 8, 2), Launch(64, 64, 8, 1), Launch(32, 32, 4, 1)),
    ("fwd", False): (Launch(32, 32, 4, 2), Launch(32, 32, 4, 1), Launch(16, 16, 4, 1)),
    ("dkdv", False): (Launch(16, 32, 4, 1),),
    ("dq", False): (Launch(32, 32, 8, 2), Launch(32, 32, 8, 1), Launch(16, 16, 4, 1)),
}
#: register spill stores (bytes per thread) each kernel may have in the AOT compile check
AOT_SPILL_BUDGET: dict[str, int] = {}


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot``; with ``UPCAST`` on float32 copies (the interpreter's bfloat16 dot is wrong)."""
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PREC)
    return c


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, KEY_LO, T, HQ, HKV, GROUP, D, qk_scale,
                PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    r = pid_bh // HQ
    hk = (pid_bh % HQ) // GROUP
    q_base = pid_bh.to(tl.int64) * T * D
    kv_base = (r * HKV + hk).to(tl.int64) * T * D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < D
    q = tl.load(Q + q_base + offs_m[:, None] * D + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    lo = tl.load(KEY_LO + offs_m, mask=m_ok, other=T)
    start = (tl.load(KEY_LO + pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N
    end = tl.minimum((pid_m + 1) * BLOCK_M, T)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        kn = n0 + offs_n
        kv_mask = (kn < T)[:, None] & d_ok[None, :]
        kv_off = kv_base + kn[:, None] * D + offs_d[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale  # log2 units
        ok = (kn[None, :] >= lo[:, None]) & (kn[None, :] <= offs_m[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + q_base + offs_m[:, None] * D + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=m_ok)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KEY_LO, QUERY_HI, T, HQ, HKV, GROUP, D,
                     scale, PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)  # (row, key head)
    r = pid_bh // HKV
    hk = pid_bh % HKV
    kv_base = pid_bh.to(tl.int64) * T * D
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < T
    d_ok = offs_d < D
    kv_off = kv_base + offs_n[:, None] * D + offs_d[None, :]
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    start = ((pid_n * BLOCK_N) // BLOCK_M) * BLOCK_M
    end = tl.load(QUERY_HI + tl.minimum((pid_n + 1) * BLOCK_N, T) - 1)
    for g in range(GROUP):
        hq = (r * HQ + hk * GROUP + g).to(tl.int64)
        for m0 in range(start, end, BLOCK_M):
            qm = m0 + offs_m
            m_ok = qm < T
            q_off = hq * T * D + qm[:, None] * D + offs_d[None, :]
            q_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + q_off, mask=q_mask, other=0.0)
            do = tl.load(DO + q_off, mask=q_mask, other=0.0)
            lse = tl.load(LSE + hq * T + qm, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + hq * T + qm, mask=m_ok, other=0.0)
            lo = tl.load(KEY_LO + qm, mask=m_ok, other=T)
            s = _dot(q, tl.trans(k), PREC, UPCAST) * scale
            ok = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] <= qm[:, None])
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
            dv += _dot(tl.trans(p.to(do.dtype)), do, PREC, UPCAST)
            dp = _dot(do, tl.trans(v), PREC, UPCAST)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, PREC, UPCAST)
    tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KEY_LO, T, HQ, HKV, GROUP, D, scale,
                   PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    r = pid_bh // HQ
    hk = (pid_bh % HQ) // GROUP
    q_base = pid_bh.to(tl.int64) * T * D
    kv_base = (r * HKV + hk).to(tl.int64) * T * D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < D
    q_off = q_base + offs_m[:, None] * D + offs_d[None, :]
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    do = tl.load(DO + q_off, mask=q_mask, other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * T + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + offs_m, mask=m_ok, other=0.0)
    lo = tl.load(KEY_LO + offs_m, mask=m_ok, other=T)
    start = (tl.load(KEY_LO + pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N
    end = tl.minimum((pid_m + 1) * BLOCK_M, T)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        kn = n0 + offs_n
        kv_mask = (kn < T)[:, None] & d_ok[None, :]
        kv_off = kv_base + kn[:, None] * D + offs_d[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * scale
        ok = (kn[None, :] >= lo[:, None]) & (kn[None, :] <= offs_m[:, None])
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PREC, UPCAST)
    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


def shared_memory_bound(kernel: str, launch: Launch, block_d: int, half: bool) -> int:
    """Bytes of shared memory a launch of ``kernel`` needs at most (checked against the
    compiled kernels by the AOT test): the tiles a block keeps (``fwd`` q; ``dq`` q, dO;
    ``dkdv`` k, v), ``num_stages`` copies of the tiles it streams, and for ``dkdv`` the two
    transposed score tiles."""
    bm, bn = launch.block_m, launch.block_n
    kept, streamed = {"fwd": (bm, 2 * bn), "dq": (2 * bm, 2 * bn),
                      "dkdv": (2 * bn, 2 * bm)}[kernel]
    elem = 2 if half else 4
    scores = 2 * elem * bm * bn if kernel == "dkdv" else 0
    return elem * block_d * (kept + launch.num_stages * streamed) + scores


def _launch(kernel: str, q: Tensor, block_d: int) -> Launch:
    """The launch of ``kernel`` for ``q``'s target: the interpreter's, or the first GPU launch
    whose shared memory fits the target's per-block limit (the last one otherwise)."""
    cc = triton_target.capability(q.device)
    if cc is None:
        return INTERPRETER_LAUNCH
    half = q.dtype != torch.float32
    limit = triton_target.shared_memory_limit(cc)
    choices = GPU_LAUNCHES[kernel, half]
    fits = [c for c in choices if shared_memory_bound(kernel, c, block_d, half) <= limit]
    return fits[0] if fits else choices[-1]


def _numerics(q: Tensor) -> tuple[str, bool]:
    """``(PREC, UPCAST)``: IEEE float32 dots for float32; bfloat16 upcast in the interpreter
    (whose bfloat16 dot is wrong)."""
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    upcast = not triton_target.is_gpu_launch(q.device) and q.dtype == torch.bfloat16
    return prec, upcast


def _dims(q: Tensor, k: Tensor):
    if q.dtype not in _SUPPORTED:
        raise ValueError(f"q: dtype {q.dtype} is not supported by the Triton kernel; expected "
                         "float32/float16/bfloat16 (float64 runs on the device-generic path)")
    hq, t, d = q.shape[-3:]
    hkv = k.shape[-3]
    return math.prod(q.shape[:-3]), hq, hkv, t, d


def forward(q: Tensor, k: Tensor, v: Tensor, doc_offsets: Tensor | None, window: int,
            scale: float | None = None) -> tuple[Tensor, Tensor]:
    """``(out [..., Hq, T, D] q.dtype, lse [..., Hq, T] float32)``."""
    rows, hq, hkv, t, d = _dims(q, k)
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    key_lo, _ = bounds(doc_offsets, t, window, q.device)
    bd = max(16, triton.next_power_of_2(d))
    prec, upcast = _numerics(q)
    fwd = _launch("fwd", q, bd)
    _fwd_kernel[(triton.cdiv(t, fwd.block_m), rows * hq)](
        q.contiguous(), k.contiguous(), v.contiguous(), out, lse, key_lo, t, hq, hkv,
        hq // hkv, d, scale * _LOG2E, PREC=prec, UPCAST=upcast, BLOCK_M=fwd.block_m,
        BLOCK_N=fwd.block_n, BLOCK_D=bd, num_warps=fwd.num_warps, num_stages=fwd.num_stages)
    return out, lse


def backward(grad: Tensor, grad_lse: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
             out: Tensor, lse: Tensor, doc_offsets: Tensor | None, window: int,
             scale: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` in the inputs' dtype from the saved ``out`` and ``lse``."""
    rows, hq, hkv, t, d = _dims(q, k)
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = (grad.float() * out.float()).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    key_lo, query_hi = bounds(doc_offsets, t, window, q.device)
    bd = max(16, triton.next_power_of_2(d))
    prec, upcast = _numerics(q)
    kv, qb = _launch("dkdv", q, bd), _launch("dq", q, bd)
    q, k, v, grad = q.contiguous(), k.contiguous(), v.contiguous(), grad.contiguous()
    lse = lse.float().contiguous()
    _bwd_dkdv_kernel[(triton.cdiv(t, kv.block_n), rows * hkv)](
        q, k, v, grad, lse, delta, dk, dv, key_lo, query_hi, t, hq, hkv, hq // hkv, d, scale,
        PREC=prec, UPCAST=upcast, BLOCK_M=kv.block_m, BLOCK_N=kv.block_n, BLOCK_D=bd,
        num_warps=kv.num_warps, num_stages=kv.num_stages)
    _bwd_dq_kernel[(triton.cdiv(t, qb.block_m), rows * hq)](
        q, k, v, grad, lse, delta, dq, key_lo, t, hq, hkv, hq // hkv, d, scale,
        PREC=prec, UPCAST=upcast, BLOCK_M=qb.block_m, BLOCK_N=qb.block_n, BLOCK_D=bd,
        num_warps=qb.num_warps, num_stages=qb.num_stages)
    return dq, dk, dv
