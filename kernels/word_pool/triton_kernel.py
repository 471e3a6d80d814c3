"""Triton word pooling, forward and backward (numerics: :mod:`.reference`): the CUDA path of
`aa::word_pool`. One program per (word, query head) loops over only its word's bytes with an
online softmax in float32; the backward writes each byte's ``dk``/``dv`` rows once (no atomics)
and sums grouped heads and a shared query's ``dq`` with ``torch.sum``: bitwise reproducible.
float64 is refused (the op routes it to ``cpu.py``). Runs under ``TRITON_INTERPRET=1`` on CPU
tensors. Design: ``docs/hat.md``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import check_inputs, default_scale

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: bytes per tile (HAT words average ~5 bytes; most words take one iteration)
BLOCK_L = 16


@triton.jit
def _word_pool_fwd_kernel(q_ptr, k_ptr, v_ptr, offsets_ptr, out_ptr, H, HKV, D, scale,
                          Q_WORD_STRIDE, GROUP: tl.constexpr, BLOCK_L: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    w = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    kvh = h // GROUP
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    start = tl.load(offsets_ptr + w).to(tl.int64)
    end = tl.load(offsets_ptr + w + 1).to(tl.int64)
    q = tl.load(q_ptr + (w * Q_WORD_STRIDE + h) * D + cols, mask=dmask, other=0.0)
    q = q.to(tl.float32) * scale
    m = tl.full([1], float("-inf"), tl.float32)
    denom = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(start, end, BLOCK_L):
        rows = s0 + tl.arange(0, BLOCK_L)
        rmask = rows < end
        offs = (rows[:, None] * HKV + kvh) * D + cols[None, :]
        tmask = rmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + offs, mask=tmask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=tmask, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1)
        s = tl.where(rmask, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        denom = denom * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m = m_new
    out = acc / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + (w * H + h) * D + cols, out.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _word_pool_bwd_kernel(grad_ptr, q_ptr, k_ptr, v_ptr, offsets_ptr, dq_ptr, dk_ptr, dv_ptr,
                          H, HKV, D, scale, Q_WORD_STRIDE,
                          GROUP: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    w = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    kvh = h // GROUP
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    start = tl.load(offsets_ptr + w).to(tl.int64)
    end = tl.load(offsets_ptr + w + 1).to(tl.int64)
    q = tl.load(q_ptr + (w * Q_WORD_STRIDE + h) * D + cols, mask=dmask, other=0.0)
    q = q.to(tl.float32)
    do = tl.load(grad_ptr + (w * H + h) * D + cols, mask=dmask, other=0.0).to(tl.float32)
    # pass 1: softmax statistics and delta = sum_t p * dp, online
    m = tl.full([1], float("-inf"), tl.float32)
    denom = tl.zeros([1], tl.float32)
    dsum = tl.zeros([1], tl.float32)
    for s0 in range(start, end, BLOCK_L):
        rows = s0 + tl.arange(0, BLOCK_L)
        rmask = rows < end
        offs = (rows[:, None] * HKV + kvh) * D + cols[None, :]
        tmask = rmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + offs, mask=tmask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=tmask, other=0.0).to(tl.float32)
        s = tl.where(rmask, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
        dp = tl.sum(v * do[None, :], axis=1)
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        denom = denom * alpha + tl.sum(p, axis=0)
        dsum = dsum * alpha + tl.sum(p * dp, axis=0)
        m = m_new
    safe = tl.where(denom > 0, denom, 1.0)
    delta = dsum / safe
    # pass 2: ds, the word's rows of dk and dv, dq
    dq = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(start, end, BLOCK_L):
        rows = s0 + tl.arange(0, BLOCK_L)
        rmask = rows < end
        offs = (rows[:, None] * HKV + kvh) * D + cols[None, :]
        tmask = rmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + offs, mask=tmask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=tmask, other=0.0).to(tl.float32)
        s = tl.where(rmask, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
        p = tl.exp(s - m) / safe
        dp = tl.sum(v * do[None, :], axis=1)
        ds = p * (dp - delta) * scale
        # dk/dv rows [T, H, D]: the outputs themselves when H == Hkv, else the per-head buffer
        out_offs = (rows[:, None] * H + h) * D + cols[None, :]
        tl.store(dk_ptr + out_offs, (ds[:, None] * q[None, :]).to(dk_ptr.dtype.element_ty),
                 mask=tmask)
        tl.store(dv_ptr + out_offs, (p[:, None] * do[None, :]).to(dv_ptr.dtype.element_ty),
                 mask=tmask)
        dq += tl.sum(ds[:, None] * k, axis=0)
    tl.store(dq_ptr + (w * H + h) * D + cols, dq.to(dq_ptr.dtype.element_ty), mask=dmask)


def _check(q, k, v, word_offsets, scale, op):
    check_inputs(q, k, v, word_offsets, scale, check_values=False, op=op)
    if q.dtype == torch.float64:
        raise ValueError(f"{op}: q: float64 is not supported by the Triton word-pool kernel; "
                         "use the segment path (aa_compile.kernels.word_pool.cpu)")


def _launch(q: Tensor, k: Tensor) -> tuple[int, int]:
    """``(BLOCK_D, num_warps)``."""
    block_d = max(triton.next_power_of_2(q.shape[2]), 16)
    return block_d, 4 if block_d >= 128 else 2


def word_pool_fwd(q: Tensor, k: Tensor, v: Tensor, word_offsets: Tensor,
                  scale: float | None = None) -> Tensor:
    """Forward ``[W, H, D]`` in q's dtype. The offsets' values are not checked here:
    ``aa::word_pool`` does that."""
    _check(q, k, v, word_offsets, scale, "word_pool_fwd")
    n_words = word_offsets.numel() - 1
    _, h, d = q.shape
    hkv = k.shape[1]
    out = torch.empty(n_words, h, d, dtype=q.dtype, device=q.device)
    if n_words == 0:
        return out
    block_d, warps = _launch(q, k)
    _word_pool_fwd_kernel[(n_words, h)](
        q.contiguous(), k.contiguous(), v.contiguous(), word_offsets.contiguous(), out,
        h, hkv, d, default_scale(scale, d), 0 if q.shape[0] == 1 else h,
        GROUP=h // hkv, BLOCK_L=BLOCK_L, BLOCK_D=block_d, num_warps=warps,
    )
    return out


def word_pool_bwd(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, word_offsets: Tensor,
                  scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` in the inputs' shapes and dtype (see the module doc)."""
    _check(q, k, v, word_offsets, scale, "word_pool_bwd")
    n_words = word_offsets.numel() - 1
    t, hkv, d = k.shape
    h = q.shape[1]
    group = h // hkv
    if tuple(grad.shape) != (n_words, h, d):
        raise ValueError(f"word_pool_bwd: grad must have shape ({n_words}, {h}, {d}), got "
                         f"{tuple(grad.shape)}")
    shared = q.shape[0] == 1
    dq = torch.empty(n_words, h, d, device=q.device,
                     dtype=torch.float32 if shared else q.dtype)
    if group == 1:  # contiguous like the kernel writes them (empty_like keeps k's strides)
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    else:
        dk = torch.empty(t, h, d, dtype=torch.float32, device=k.device)
        dv = torch.empty(t, h, d, dtype=torch.float32, device=k.device)
    if n_words:
        block_d, warps = _launch(q, k)
        _word_pool_bwd_kernel[(n_words, h)](
            grad.to(q.dtype).contiguous(), q.contiguous(), k.contiguous(), v.contiguous(),
            word_offsets.contiguous(), dq, dk, dv, h, hkv, d, default_scale(scale, d),
            0 if shared else h,
            GROUP=group, BLOCK_L=BLOCK_L, BLOCK_D=block_d, num_warps=warps,
        )
    if shared:
        dq = dq.sum(0, keepdim=True).to(q.dtype)
    if group > 1:
        dk = dk.view(t, hkv, group, d).sum(2).to(k.dtype)
        dv = dv.view(t, hkv, group, d).sum(2).to(v.dtype)
    return dq, dk, dv
