"""Triton FP8 GEMM of `aa::fp8_linear` (CUDA, compute capability >= 8.9; numerics:
``reference.py``): one kernel per GEMM with the quantisation fused into its prologue and the
dequantisation scales and bias into its epilogue. ``EMULATE_FP8`` (on in the Triton interpreter,
whose FP8 casts truncate) swaps the FP8 cast for an exact float32 rounding to the FP8 grid.
Design notes: ``docs/fp8.md``."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from aa_compile.kernels import triton_target

from . import compose, reference

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: (mantissa bits, minimum normal exponent, max) per FP8 format, for the emulated cast
_FMT = {reference.E4M3: (0, 3, -6, 448.0), reference.E5M2: (1, 2, -14, 57344.0)}
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _round_to_fp8(v, MANT: tl.constexpr, EMIN: tl.constexpr):
    """float32 ``v`` (finite, within the format's range, or NaN) rounded to the nearest FP8
    value (ties to even), returned as float32: ``rint(v / step) * step`` with the format's
    spacing ``step = 2^(max(exponent(v), EMIN) - MANT)``."""
    bits = v.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    e = tl.maximum(e, EMIN)
    step = ((e - MANT + 127) << 23).to(tl.float32, bitcast=True)
    inv_step = ((127 - e + MANT) << 23).to(tl.float32, bitcast=True)
    t = v * inv_step  # exact: a power of two
    r = (t + 12582912.0) - 12582912.0  # round to nearest even (|t| < 2^22)
    return r * step


@triton.jit
def _quantize_tile(v, s, FMT: tl.constexpr, FMT_MAX: tl.constexpr, MANT: tl.constexpr,
                   EMIN: tl.constexpr, EMULATE: tl.constexpr):
    v = v.to(tl.float32)
    v = tl.where(tl.abs(v) == float("inf"), float("nan"), v)  # Inf must not saturate
    v = v * s
    # saturate; NaN must stay NaN (the hardware max/min would drop it)
    v = tl.clamp(v, -FMT_MAX, FMT_MAX, propagate_nan=tl.PropagateNan.ALL)
    if EMULATE:
        return _round_to_fp8(v, MANT, EMIN)
    elif FMT == 0:
        return v.to(tl.float8e4nv)
    else:
        return v.to(tl.float8e5)


@triton.jit
def _fp8_gemm_nt_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr,
    sa_ptr, sb_ptr, da_ptr, db_ptr,
    sa_val, sb_val, alpha,
    P, Q, R,
    stride_ap, stride_ar, stride_bq, stride_br, stride_cp, stride_cq,
    stride_sa, stride_sb,
    A_FMT: tl.constexpr, A_MAX: tl.constexpr, A_MANT: tl.constexpr, A_EMIN: tl.constexpr,
    B_FMT: tl.constexpr, B_MAX: tl.constexpr, B_MANT: tl.constexpr, B_EMIN: tl.constexpr,
    DYNAMIC: tl.constexpr, HAS_BIAS: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_P: tl.constexpr,
):
    pid = tl.program_id(0)
    n_p = tl.cdiv(P, BLOCK_P)
    n_q = tl.cdiv(Q, BLOCK_Q)
    # grouped ordering: GROUP_P row blocks share their column blocks in L2
    group = pid // (GROUP_P * n_q)
    first_p = group * GROUP_P
    size = tl.minimum(n_p - first_p, GROUP_P)
    pid_p = first_p + (pid % (GROUP_P * n_q)) % size
    pid_q = (pid % (GROUP_P * n_q)) // size

    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rr = tl.arange(0, BLOCK_R)
    mp = rp < P
    mq = rq < Q
    rp64 = rp.to(tl.int64)
    rq64 = rq.to(tl.int64)
    if DYNAMIC:
        sa = tl.load(sa_ptr + rp64 * stride_sa, mask=mp, other=1.0)[:, None]
        sb = tl.load(sb_ptr + rq64 * stride_sb, mask=mq, other=1.0)[:, None]
    else:
        sa = sa_val
        sb = sb_val
    a_ptrs = a_ptr + rp64[:, None] * stride_ap + rr[None, :] * stride_ar
    b_ptrs = b_ptr + rq64[:, None] * stride_bq + rr[None, :] * stride_br
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        mr = (r0 + rr) < R
        a = tl.load(a_ptrs, mask=mp[:, None] & mr[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mq[:, None] & mr[None, :], other=0.0)
        a8 = _quantize_tile(a, sa, A_FMT, A_MAX, A_MANT, A_EMIN, EMULATE)
        b8 = _quantize_tile(b, sb, B_FMT, B_MAX, B_MANT, B_EMIN, EMULATE)
        if EMULATE:
            acc = tl.dot(a8, tl.trans(b8), acc, input_precision="ieee")
        else:
            acc = tl.dot(a8, tl.trans(b8), acc)
        a_ptrs += BLOCK_R * stride_ar
        b_ptrs += BLOCK_R * stride_br
    if DYNAMIC:
        da = tl.load(da_ptr + rp64 * stride_sa, mask=mp, other=1.0)
        db = tl.load(db_ptr + rq64 * stride_sb, mask=mq, other=1.0)
        acc = acc * da[:, None] * (db * alpha)[None, :]
    else:
        acc = acc * alpha
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rq, mask=mq, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    c_ptrs = c_ptr + rp64[:, None] * stride_cp + rq64[None, :] * stride_cq
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mp[:, None] & mq[None, :])


#: register spill stores (bytes per thread) each kernel may have in the AOT compile check
AOT_SPILL_BUDGET: dict[str, int] = {}
#: most pipeline stages of the GEMM's K loop
MAX_STAGES = 4


def _blocks(p: int, elem: int, device: torch.device,
            strided: bool = False) -> tuple[int, int, int, int, int]:
    """``(BLOCK_P, BLOCK_Q, BLOCK_R, num_warps, num_stages)``: small tiles in the interpreter
    (every tile is a numpy call); on a GPU 128-wide output tiles, with as many stages of the
    ``[BLOCK_P + BLOCK_Q, BLOCK_R]`` input tiles (``elem`` bytes per element, before the
    quantisation) as the target's shared memory holds, up to `MAX_STAGES`. Before Hopper the
    MMA operands live in registers: with an operand ``strided`` along R (the backward's
    transposed views, loaded without vector loads) the output tile narrows to 64 columns so
    the K loop stays within the register file."""
    cc = triton_target.capability(device)
    if cc is None:
        return 16, 16, 32, 1, 1
    bp, bq, br = (128 if p > 64 else 64), 128, 64
    if strided and cc < (9, 0):
        bq = 64
    limit = triton_target.shared_memory_limit(cc)
    while br > 16 and limit // ((bp + bq) * br * elem) < 2:
        br //= 2
    stages = max(1, min(MAX_STAGES, limit // ((bp + bq) * br * elem)))
    return bp, bq, br, 8, stages


def check_device(device: torch.device) -> None:
    """ValueError unless the launch targets a GPU with FP8 tensor cores (sm_89+: a CUDA device,
    or the capability `triton_target.assume` names), or the interpreter runs (CPU tensors)."""
    cc = triton_target.capability(device)
    if cc is not None:
        where = str(device) if device.type == "cuda" else "the target GPU"
        problem = compose.capability_problem(cc, where)
        if problem is not None:
            raise ValueError(problem)
        return
    if device.type == "cpu" and _INTERPRET:
        return
    raise ValueError(f"the Triton FP8 kernel runs on CUDA devices, got {device}")


def gemm_nt(a: Tensor, bt: Tensor, a_fmt: torch.dtype, b_fmt: torch.dtype, scaling: str,
            a_static: float, b_static: float, mult: float, bias: Tensor | None,
            out_dtype: torch.dtype, *, emulate_fp8: bool | None = None) -> Tensor:
    """``out [P, Q] = mult * dq(q(a)) @ dq(q(bt))^T + bias`` (see `reference.gemm_nt`).

    ``emulate_fp8``: None = emulate exactly when the launch runs in the Triton interpreter.
    """
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype: expected float32, bfloat16 or float16, got {out_dtype}")
    check_device(a.device)
    if emulate_fp8 is None:
        emulate_fp8 = not triton_target.is_gpu_launch(a.device)
    p, r = a.shape
    q = bt.shape[0]
    out = torch.empty((p, q), dtype=out_dtype, device=a.device)
    if p == 0 or q == 0:
        return out
    dynamic = scaling != "static"
    if dynamic:
        sa = reference.quant_scale(a, a_fmt, scaling, a_static)
        sb = reference.quant_scale(bt, b_fmt, scaling, b_static)
        da, db = sa.reciprocal(), sb.reciprocal()
        stride_sa = stride_sb = 1 if scaling == "rowwise" else 0
        sa_val = sb_val = 1.0
        alpha = float(mult)
    else:
        sa = sb = da = db = out  # unread
        stride_sa = stride_sb = 0
        sa_val, sb_val = float(a_static), float(b_static)
        alpha = float(mult) * reference.recip32(sa_val) * reference.recip32(sb_val)
    if bias is not None:
        bias = bias.to(out_dtype).contiguous()
    fa = _FMT[a_fmt]
    fb = _FMT[b_fmt]
    strided = a.stride(1) != 1 or bt.stride(1) != 1
    bp, bq, br, warps, stages = _blocks(p, a.element_size(), a.device, strided)
    grid = (triton.cdiv(p, bp) * triton.cdiv(q, bq),)
    _fp8_gemm_nt_kernel[grid](
        a, bt, out, bias if bias is not None else out,
        sa, sb, da, db,
        sa_val, sb_val, alpha,
        p, q, r,
        a.stride(0), a.stride(1), bt.stride(0), bt.stride(1), out.stride(0), out.stride(1),
        stride_sa, stride_sb,
        A_FMT=fa[0], A_MAX=fa[3], A_MANT=fa[1], A_EMIN=fa[2],
        B_FMT=fb[0], B_MAX=fb[3], B_MANT=fb[1], B_EMIN=fb[2],
        DYNAMIC=dynamic, HAS_BIAS=bias is not None, EMULATE=bool(emulate_fp8),
        BLOCK_P=bp, BLOCK_Q=bq, BLOCK_R=br, GROUP_P=8,
        num_warps=warps, num_stages=stages,
    )
    return out
