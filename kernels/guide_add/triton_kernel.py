"""Triton guide-vector add, plain and fused with RMSNorm, forward and backward (numerics:
:mod:`.reference`): the CUDA path of `aa::guide_add` and `aa::guide_add_rms_norm`. A program
owns whole words (contiguous runs of rows: nothing padded or scattered, no atomics; the fused
backward's ``dweight`` is summed per program and reduced with ``torch.sum``, bitwise
reproducible). Rows wider than `MAX_FUSED_D` use the plain add and ``aa::rms_norm``'s Triton
kernels. float64 is refused (the op routes it to ``cpu.py``). Runs under ``TRITON_INTERPRET=1``
on CPU tensors. Design: ``docs/hat.md``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from aa_compile.kernels.rms_norm import triton_kernel as rms_triton
from torch import Tensor

from .reference import check_inputs, check_norm

#: widest row the fused kernels hold in registers (wider rows would spill in the backward)
MAX_FUSED_D = 8192
#: widest column block of the plain kernels
MAX_BLOCK_D = 512
#: elements of one fused tile (rows x padded row width)
_FUSED_TILE = 8192
#: register spill stores (bytes per thread) each kernel may have in the AOT compile check
AOT_SPILL_BUDGET: dict[str, int] = {}


@triton.jit
def _guide_add_kernel(x_ptr, g_ptr, offsets_ptr, out_ptr, D, BLOCK_L: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    w = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < D
    start = tl.load(offsets_ptr + w).to(tl.int64)
    end = tl.load(offsets_ptr + w + 1).to(tl.int64)
    g = tl.load(g_ptr + w * D + cols, mask=dmask, other=0.0)
    for s0 in range(start, end, BLOCK_L):
        rows = s0 + tl.arange(0, BLOCK_L)
        offs = rows[:, None] * D + cols[None, :]
        mask = (rows < end)[:, None] & dmask[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        y = x.to(tl.float32) + g.to(tl.float32)[None, :]
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _segment_sum_kernel(grad_ptr, offsets_ptr, dg_ptr, D, BLOCK_L: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    w = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < D
    start = tl.load(offsets_ptr + w).to(tl.int64)
    end = tl.load(offsets_ptr + w + 1).to(tl.int64)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(start, end, BLOCK_L):
        rows = s0 + tl.arange(0, BLOCK_L)
        mask = (rows < end)[:, None] & dmask[None, :]
        gr = tl.load(grad_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(gr.to(tl.float32), axis=0)
    tl.store(dg_ptr + w * D + cols, acc.to(dg_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _guide_add_rms_norm_fwd_kernel(x_ptr, g_ptr, offsets_ptr, w_ptr, y_ptr, n_ptr, D, eps,
                                   HAS_WEIGHT: tl.constexpr, BLOCK_L: tl.constexpr,
                                   BLOCK_D: tl.constexpr):
    w = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    start = tl.load(offsets_ptr + w).to(tl.int64)
    end = tl.load(offsets_ptr + w + 1).to(tl.int64)
    g = tl.load(g_ptr + w * D + cols, mask=dmask, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        wt = tl.load(w_ptr + cols, mask=dmask, other=0.0).to(tl.float32)
    for s0 in range(start, end, BLOCK_L):
        rows = s0 + tl.arange(0, BLOCK_L)
        offs = rows[:, None] * D + cols[None, :]
        mask = (rows < end)[:, None] & dmask[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x + g[None, :]).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs, y, mask=mask)
        yf = y.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(yf * yf, axis=1) / D + eps)
        normed = yf * rstd[:, None]
        if HAS_WEIGHT:
            normed = normed * wt[None, :]
        tl.store(n_ptr + offs, normed.to(n_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _guide_add_rms_norm_bwd_kernel(gy_ptr, gn_ptr, y_ptr, w_ptr, offsets_ptr, dx_ptr, dg_ptr,
                                   dw_partial_ptr, W, D, words_per_program, eps,
                                   HAS_GY: tl.constexpr, HAS_GN: tl.constexpr,
                                   HAS_WEIGHT: tl.constexpr, BLOCK_L: tl.constexpr,
                                   BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    w0 = pid * words_per_program
    w1 = tl.minimum(w0 + words_per_program, W)
    cols = tl.arange(0, BLOCK_D)
    dmask = cols < D
    if HAS_WEIGHT:
        wt = tl.load(w_ptr + cols, mask=dmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_D], tl.float32)
    for w in range(w0, w1):
        start = tl.load(offsets_ptr + w).to(tl.int64)
        end = tl.load(offsets_ptr + w + 1).to(tl.int64)
        dg_acc = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(start, end, BLOCK_L):
            rows = s0 + tl.arange(0, BLOCK_L)
            offs = rows[:, None] * D + cols[None, :]
            mask = (rows < end)[:, None] & dmask[None, :]
            total = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
            if HAS_GN:
                yf = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                gn = tl.load(gn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                rstd = tl.rsqrt(tl.sum(yf * yf, axis=1) / D + eps)
                xhat = yf * rstd[:, None]
                if HAS_WEIGHT:
                    gw = gn * wt[None, :]
                    dw_acc += tl.sum(gn * xhat, axis=0)
                else:
                    gw = gn
                proj = tl.sum(gw * xhat, axis=1) / D
                total = rstd[:, None] * (gw - xhat * proj[:, None])
            if HAS_GY:
                total += tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + offs, total.to(dx_ptr.dtype.element_ty), mask=mask)
            dg_acc += tl.sum(total, axis=0)
        tl.store(dg_ptr + w * D + cols, dg_acc.to(dg_ptr.dtype.element_ty), mask=dmask)
    if HAS_WEIGHT:
        tl.store(dw_partial_ptr + pid * D + cols, dw_acc, mask=dmask)


def _check_dtype(name: str, dtype: torch.dtype, op: str) -> None:
    if dtype == torch.float64:
        raise ValueError(f"{op}: {name}: float64 is not supported by the Triton guide-add "
                         "kernels; use the CPU path (aa_compile.kernels.guide_add.cpu)")


def _plain_launch(d: int) -> tuple[int, int, int]:
    """``(BLOCK_L, BLOCK_D, num_warps)`` of the plain kernels."""
    block_d = min(max(triton.next_power_of_2(d), 16), MAX_BLOCK_D)
    return 8, block_d, 4 if block_d >= 256 else 2


def _fused_launch(d: int, backward: bool) -> tuple[int, int, int]:
    """``(BLOCK_L, BLOCK_D, num_warps)`` of the fused kernels: a tile of up to `_FUSED_TILE`
    elements, 16 per thread in the forward, 8 in the backward (up to 32 warps), whose row
    tiles and ``dg``/``dweight`` accumulators must stay in registers too."""
    block_d = max(triton.next_power_of_2(d), 16)
    block_l = max(1, min(16, _FUSED_TILE // block_d))
    per_thread, most = (256, 32) if backward else (512, 16)
    return block_l, block_d, min(max(block_l * block_d // per_thread, 1), most)


def guide_add_fwd(x: Tensor, g: Tensor, word_offsets: Tensor) -> Tensor:
    """``x + g[word of byte]``. The offsets' values are not checked here (the op does that)."""
    check_inputs(x, g, word_offsets, check_values=False, op="guide_add_fwd")
    _check_dtype("x", x.dtype, "guide_add_fwd")
    t, d = x.shape
    out = torch.empty(t, d, dtype=x.dtype, device=x.device)
    n_words = g.shape[0]
    if t == 0 or d == 0 or n_words == 0:
        return out
    block_l, block_d, warps = _plain_launch(d)
    _guide_add_kernel[(n_words, triton.cdiv(d, block_d))](
        x.contiguous(), g.contiguous(), word_offsets.contiguous(), out, d,
        BLOCK_L=block_l, BLOCK_D=block_d, num_warps=warps)
    return out


def segment_sum(rows: Tensor, word_offsets: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``[W, d]`` per-word row sums in float32, rounded to ``out_dtype``."""
    n_words = word_offsets.numel() - 1
    d = rows.shape[1]
    out = torch.empty(n_words, d, dtype=out_dtype, device=rows.device)
    if n_words == 0 or d == 0:
        return out
    block_l, block_d, warps = _plain_launch(d)
    _segment_sum_kernel[(n_words, triton.cdiv(d, block_d))](
        rows.contiguous(), word_offsets.contiguous(), out, d,
        BLOCK_L=block_l, BLOCK_D=block_d, num_warps=warps)
    return out


def guide_add_bwd(grad: Tensor, word_offsets: Tensor) -> Tensor:
    """``dg [W, d]`` in grad's dtype (``dx`` is ``grad`` itself)."""
    _check_dtype("grad", grad.dtype, "guide_add_bwd")
    if grad.dim() != 2:
        raise ValueError(f"guide_add_bwd: grad must be 2-D [T, d], got {tuple(grad.shape)}")
    return segment_sum(grad, word_offsets, grad.dtype)


def _num_programs(n_words: int, device: torch.device) -> int:
    """Backward programs (each a contiguous range of words): two per SM on GPU, else 8. The
    count fixes the order of the ``dweight`` sum (reproducible per device and shape)."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8
    return max(1, min(n_words, target))


def guide_add_rms_norm_fwd(x: Tensor, g: Tensor, word_offsets: Tensor, weight: Tensor | None,
                           eps: float, out_dtype: torch.dtype | None = None
                           ) -> tuple[Tensor, Tensor]:
    op = "guide_add_rms_norm_fwd"
    check_inputs(x, g, word_offsets, check_values=False, op=op)
    check_norm(x, weight, eps, out_dtype, op=op)
    out_dtype = out_dtype or x.dtype
    for name, dt in (("x", x.dtype), ("out_dtype", out_dtype),
                     ("weight", None if weight is None else weight.dtype)):
        if dt is not None:
            _check_dtype(name, dt, op)
    t, d = x.shape
    if d > MAX_FUSED_D:
        y = guide_add_fwd(x, g, word_offsets)
        return y, rms_triton.rms_norm_fwd(y, weight, eps, out_dtype)
    y = torch.empty(t, d, dtype=x.dtype, device=x.device)
    normed = torch.empty(t, d, dtype=out_dtype, device=x.device)
    n_words = g.shape[0]
    if t == 0 or n_words == 0:
        return y, normed
    block_l, block_d, warps = _fused_launch(d, backward=False)
    _guide_add_rms_norm_fwd_kernel[(n_words,)](
        x.contiguous(), g.contiguous(), word_offsets.contiguous(),
        weight.contiguous() if weight is not None else x, y, normed, d, float(eps),
        HAS_WEIGHT=weight is not None, BLOCK_L=block_l, BLOCK_D=block_d, num_warps=warps)
    return y, normed


def guide_add_rms_norm_bwd(grad_y: Tensor | None, grad_normed: Tensor | None, y: Tensor,
                           weight: Tensor | None, word_offsets: Tensor, eps: float
                           ) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(dx, dg, dweight)``; a None gradient counts as zeros (see :mod:`.reference`)."""
    op = "guide_add_rms_norm_bwd"
    _check_dtype("y", y.dtype, op)
    if weight is not None:
        _check_dtype("weight", weight.dtype, op)
    t, d = y.shape
    n_words = word_offsets.numel() - 1
    if d > MAX_FUSED_D:
        total = torch.zeros(t, d, dtype=torch.float32, device=y.device)
        dweight = None if weight is None else torch.zeros_like(weight)
        if grad_normed is not None and t:
            # (rounded to y's dtype before grad_y is added: one extra rounding for half
            # types, on this wide-row fallback only)
            dn, dweight = rms_triton.rms_norm_bwd(grad_normed, y, weight, eps)
            total += dn
        if grad_y is not None:
            total += grad_y
        return total.to(y.dtype), segment_sum(total, word_offsets, y.dtype), dweight
    dx = torch.empty(t, d, dtype=y.dtype, device=y.device)
    dg = torch.zeros(n_words, d, dtype=y.dtype, device=y.device)
    programs = _num_programs(n_words, y.device)
    has_w = weight is not None and grad_normed is not None
    partial = torch.zeros(programs if has_w else 0, d, dtype=torch.float32, device=y.device)
    if n_words and t:
        block_l, block_d, warps = _fused_launch(d, backward=True)
        _guide_add_rms_norm_bwd_kernel[(programs,)](
            grad_y.contiguous() if grad_y is not None else y,
            grad_normed.contiguous() if grad_normed is not None else y,
            y.contiguous(), weight.contiguous() if weight is not None else y,
            word_offsets.contiguous(), dx, dg, partial, n_words, d,
            triton.cdiv(n_words, programs), float(eps),
            HAS_GY=grad_y is not None, HAS_GN=grad_normed is not None, HAS_WEIGHT=has_w,
            BLOCK_L=block_l, BLOCK_D=block_d, num_warps=warps)
    elif t:
        dx.zero_()
    dweight = None
    if weight is not None:
        dweight = (partial.sum(0) if has_w else torch.zeros(d)).to(weight.dtype)
        dweight = dweight.to(weight.device)
    return dx, dg, dweight

