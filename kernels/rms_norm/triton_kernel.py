"""Triton RMSNorm forward and backward (numerics: :mod:`aa_compile.kernels.rms_norm.reference`).

Why a kernel: eager RMSNorm reads ``x`` several times and materialises float32 temporaries.
Here each program reads a row once (rows up to ``MAX_BLOCK_N`` stay in registers; longer rows
are streamed in ``MAX_BLOCK_N`` chunks, reading them twice), accumulates in float32 and rounds
once on store. The backward recomputes ``rstd`` from ``x``. ``dweight`` is deterministic: each
program sums ``grad * xhat`` over its own block of rows into its own float32 row of a
``[programs, N]`` buffer, which is then reduced with ``torch.sum`` (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

#: Widest row block held in registers; longer rows are processed in chunks of this size.
MAX_BLOCK_N = 8192

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    N,
    eps,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    row_off = tl.program_id(0).to(tl.int64) * N
    x_row = x_ptr + row_off
    y_row = y_ptr + row_off
    cols = tl.arange(0, BLOCK_N)
    if ONE_PASS:
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        y = x * rstd
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            offs = start + cols
            x = tl.load(x_row + offs, mask=offs < N, other=0.0).to(tl.float32)
            sq += x * x
        rstd = tl.rsqrt(tl.sum(sq, axis=0) / N + eps)
        for start in range(0, N, BLOCK_N):
            offs = start + cols
            mask = offs < N
            y = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32) * rstd
            if HAS_WEIGHT:
                y = y * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    grad_ptr,
    x_ptr,
    w_ptr,
    dx_ptr,
    dw_partial_ptr,
    M,
    N,
    rows_per_program,
    eps,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    dw_row = dw_partial_ptr + pid * N
    cols = tl.arange(0, BLOCK_N)
    if ONE_PASS:
        mask = cols < N
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(row_start, row_end):
            row_off = row * N
            x = tl.load(x_ptr + row_off + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(grad_ptr + row_off + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
            xhat = x * rstd
            if HAS_WEIGHT:
                g = dy * w
                dw_acc += dy * xhat
            else:
                g = dy
            c = tl.sum(g * xhat, axis=0) / N
            dx = rstd * (g - xhat * c)
            tl.store(dx_ptr + row_off + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            tl.store(dw_row + cols, dw_acc, mask=mask)
    else:
        for row in range(row_start, row_end):
            row_off = row * N
            sq = tl.zeros([BLOCK_N], dtype=tl.float32)
            gx = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                offs = start + cols
                mask = offs < N
                x = tl.load(x_ptr + row_off + offs, mask=mask, other=0.0).to(tl.float32)
                g = tl.load(grad_ptr + row_off + offs, mask=mask, other=0.0).to(tl.float32)
                if HAS_WEIGHT:
                    g = g * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                sq += x * x
                gx += g * x
            rstd = tl.rsqrt(tl.sum(sq, axis=0) / N + eps)
            # mean(g * xhat) = rstd * mean(g * x)
            c = rstd * tl.sum(gx, axis=0) / N
            for start in range(0, N, BLOCK_N):
                offs = start + cols
                mask = offs < N
                x = tl.load(x_ptr + row_off + offs, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(grad_ptr + row_off + offs, mask=mask, other=0.0).to(tl.float32)
                xhat = x * rstd
                if HAS_WEIGHT:
                    g = dy * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    # This program's own buffer row: plain read-modify-write, no atomics.
                    part = tl.load(dw_row + offs, mask=mask, other=0.0)
                    tl.store(dw_row + offs, part + dy * xhat, mask=mask)
                else:
                    g = dy
                dx = rstd * (g - xhat * c)
                tl.store(dx_ptr + row_off + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _check_dtype(name: str, dtype: torch.dtype) -> None:
    if dtype == torch.float64:
        raise ValueError(
            f"{name}: float64 is not supported by the Triton RMSNorm kernel; "
            "use the CPU/reference path (aa_compile.kernels.rms_norm.reference)"
        )
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"{name}: dtype {dtype} is not supported; expected float32, float16 or bfloat16"
        )


def _check_inputs(x: Tensor, weight: Tensor | None) -> int:
    """Validate ``x`` and ``weight``; return the row length ``N``."""
    _check_dtype("x", x.dtype)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x: expected shape [..., N] with N > 0, got {tuple(x.shape)}")
    n = x.shape[-1]
    if weight is not None:
        _check_dtype("weight", weight.dtype)
        if tuple(weight.shape) != (n,):
            raise ValueError(f"weight: expected shape ({n},), got {tuple(weight.shape)}")
        if weight.device != x.device:
            raise ValueError(f"weight: on {weight.device}, but x is on {x.device}")
    return n


def _launch_config(n: int) -> tuple[int, bool, int]:
    """``(BLOCK_N, ONE_PASS, num_warps)`` for rows of length ``n``."""
    block_n = min(triton.next_power_of_2(n), MAX_BLOCK_N)
    num_warps = min(max(block_n // 256, 1), 16)
    return block_n, n <= block_n, num_warps


def _num_row_programs(m: int, device: torch.device) -> int:
    """Backward programs, each owning a contiguous block of rows: two per SM on GPU, else 8.

    The count fixes the order of the ``dweight`` sum, so results are bitwise reproducible for a
    given device and row count.
    """
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8
    return min(m, target)


def rms_norm_fwd(
    x: Tensor, weight: Tensor | None, eps: float, out_dtype: torch.dtype | None = None
) -> Tensor:
    """RMSNorm of ``x`` (``[..., N]``) over its last dimension; ``weight``: ``[N]`` or ``None``.

    Returns a tensor of ``x.shape`` in ``out_dtype`` (default ``x.dtype``).
    """
    n = _check_inputs(x, weight)
    out_dtype = out_dtype or x.dtype
    _check_dtype("out_dtype", out_dtype)
    x2 = x.reshape(-1, n).contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0:
        return y.reshape(x.shape)
    w = weight.contiguous() if weight is not None else x2  # unread when HAS_WEIGHT is False
    block_n, one_pass, num_warps = _launch_config(n)
    _rms_norm_fwd_kernel[(m,)](
        x2,
        w,
        y,
        n,
        float(eps),
        HAS_WEIGHT=weight is not None,
        BLOCK_N=block_n,
        ONE_PASS=one_pass,
        num_warps=num_warps,
    )
    return y.reshape(x.shape)


def rms_norm_bwd(
    grad: Tensor, x: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor | None]:
    """Gradients ``(dx, dweight)`` of :func:`rms_norm_fwd` for upstream gradient ``grad``.

    ``dx`` has ``x.shape`` and ``x.dtype``; ``dweight`` is ``weight.dtype`` (``None`` without
    weight) and bitwise reproducible for a given device and input shape.
    """
    n = _check_inputs(x, weight)
    _check_dtype("grad", grad.dtype)
    if grad.shape != x.shape:
        raise ValueError(f"grad: expected shape {tuple(x.shape)}, got {tuple(grad.shape)}")
    if grad.device != x.device:
        raise ValueError(f"grad: on {grad.device}, but x is on {x.device}")
    x2 = x.reshape(-1, n).contiguous()
    g2 = grad.reshape(-1, n).contiguous()
    m = x2.shape[0]
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        dw = None if weight is None else torch.zeros_like(weight)
        return dx.reshape(x.shape), dw
    programs = _num_row_programs(m, x.device)
    rows_per_program = triton.cdiv(m, programs)
    programs = triton.cdiv(m, rows_per_program)
    if weight is not None:
        w = weight.contiguous()
        dw_partial = torch.zeros((programs, n), dtype=torch.float32, device=x.device)
    else:
        w = dw_partial = x2  # unread when HAS_WEIGHT is False
    block_n, one_pass, num_warps = _launch_config(n)
    _rms_norm_bwd_kernel[(programs,)](
        g2,
        x2,
        w,
        dx,
        dw_partial,
        m,
        n,
        rows_per_program,
        float(eps),
        HAS_WEIGHT=weight is not None,
        BLOCK_N=block_n,
        ONE_PASS=one_pass,
        num_warps=num_warps,
    )
    dw = None if weight is None else dw_partial.sum(0).to(weight.dtype)
    return dx.reshape(x.shape), dw
