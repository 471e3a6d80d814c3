"""Reference numerics of `aa::fp8_linear`: the spec every kernel is tested against.

Every FP8 GEMM of the op (forward and both backward GEMMs) is one *NT GEMM*
``out[P, Q] = mult * dq(a)[P, R] @ dq(bt)[Q, R]^T (+ bias)`` of two operands quantised along
their last (contraction) dimension:

1. **Scale** (float32): a quantisation scale ``s`` per tensor or per row (`quant_scale`):

   - ``"static"``: the given number (u-μP: 1.0, the tensors are already ~unit scale);
   - ``"tensorwise"``: ``fmt_max / max(amax(|t|), 1e-12)`` over the whole tensor;
   - ``"rowwise"``: the same per row of the operand (so per row of ``x`` and per row of ``w``
     in the forward; per contraction-free row of each operand in the backward).

2. **Quantise** (`quantize`), all in float32: ``v = t * s``; ``±inf`` become NaN first (they
   must not saturate into a finite value); then ``clamp(v, -fmt_max, fmt_max)`` (saturation:
   finite values beyond the range become ``±fmt_max``) and a round-to-nearest-even cast to the
   FP8 format. NaN stays NaN.
3. **Dequantise**: multiply by ``1 / s`` (float32 reciprocal) per operand row.
4. **GEMM** in float64 here (float32 accumulation in the kernels), times ``mult`` (the unit
   scale, e.g. ``1/sqrt(K)``), plus ``bias`` (cast to the output dtype first).

Formats: activations and weights E4M3 (``torch.float8_e4m3fn``, max 448), gradients E5M2
(``torch.float8_e5m2``, max 57344). `fp8_linear` / `fp8_linear_backward` compose the GEMMs
exactly as the op does; the kernels must agree with them to float32 rounding.
"""

from __future__ import annotations

import struct

import torch
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FORMATS = (E4M3, E5M2)
#: largest finite value of each format (the saturation bound)
FMT_MAX = {E4M3: 448.0, E5M2: 57344.0}
#: a scaled magnitude beyond this would round past the largest finite value without the clamp
#: (halfway between the max and the next power of the grid): what counts as "saturated"
OVERFLOW_AT = {E4M3: 464.0, E5M2: 61440.0}
SCALINGS = ("static", "tensorwise", "rowwise")
AMAX_EPS = 1e-12


def quant_scale(t: Tensor, fmt: torch.dtype, scaling: str,
                static_scale: float) -> Tensor | float:
    """Quantisation scale of ``t [P, R]``: for ``"static"`` the Python float itself (no device
    work, no tensor); otherwise a float32 tensor of shape ``[]`` (tensorwise) or ``[P, 1]``
    (rowwise)."""
    if scaling == "static":
        return float(static_scale)
    fmax = FMT_MAX[fmt]
    if scaling == "tensorwise":
        if t.numel() == 0:
            return torch.ones((), dtype=torch.float32, device=t.device)
        amax = torch.linalg.vector_norm(t, float("inf")).float()  # exact: a max
    elif scaling == "rowwise":
        if t.shape[-1] == 0:
            return torch.ones(t.shape[0], 1, dtype=torch.float32, device=t.device)
        amax = torch.linalg.vector_norm(t, float("inf"), dim=-1, keepdim=True).float()
    else:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    return torch.clamp(amax, min=AMAX_EPS).reciprocal_().mul_(fmax)


def recip32(scale: Tensor | float) -> Tensor | float:
    """The float32 reciprocal of a scale: the dequantisation factor (a Python float for a
    static scale: no tensor op)."""
    if isinstance(scale, Tensor):
        return scale.reciprocal()
    return struct.unpack("f", struct.pack("f", 1.0 / float(scale)))[0]


def scaled(t: Tensor, scale: Tensor | float) -> Tensor:
    """``t * scale`` in float32 with ``±inf`` turned into NaN (always a new tensor)."""
    nan = float("nan")
    v = t.to(torch.float32, copy=True).nan_to_num_(nan=nan, posinf=nan, neginf=nan)
    if isinstance(scale, Tensor) or scale != 1.0:
        v.mul_(scale)
    return v


def quantize(t: Tensor, fmt: torch.dtype, scale: Tensor | float) -> Tensor:
    """``t`` scaled, saturated and cast to ``fmt`` (see the module doc)."""
    fmax = FMT_MAX[fmt]
    return scaled(t, scale).clamp_(-fmax, fmax).to(fmt)


def saturated(t: Tensor, fmt: torch.dtype, scale: Tensor | float) -> Tensor:
    """Number of finite elements of ``t`` that the clamp saturated (0-dim int64 tensor):
    ``|t * scale|`` beyond `OVERFLOW_AT` (E4M3: > 464; E5M2: >= 61440), i.e. values that a
    non-saturating cast would have turned into Inf/NaN."""
    v = scaled(t, scale).abs_()
    bound = OVERFLOW_AT[fmt]
    over = v > bound if fmt == E4M3 else v >= bound
    return (over & torch.isfinite(t)).sum()


def gemm_nt(a: Tensor, bt: Tensor, a_fmt: torch.dtype, b_fmt: torch.dtype, scaling: str,
            a_static: float, b_static: float, mult: float, bias: Tensor | None = None) -> Tensor:
    """float64 ``mult * dq(q(a)) @ dq(q(bt))^T + bias`` (see the module doc)."""
    sa = quant_scale(a, a_fmt, scaling, a_static)
    sb = quant_scale(bt, b_fmt, scaling, b_static)
    qa = quantize(a, a_fmt, sa).double() * _f64(recip32(sa))
    qb = quantize(bt, b_fmt, sb).double() * _f64(recip32(sb))
    out = (qa @ qb.t()) * mult
    if bias is not None:
        out = out + bias.double()
    return out


def _f64(s: Tensor | float) -> Tensor | float:
    return s.double() if isinstance(s, Tensor) else s


def fp8_linear(x: Tensor, w: Tensor, bias: Tensor | None, scaling: str, x_scale: float = 1.0,
               w_scale: float = 1.0, out_scale: float = 1.0) -> Tensor:
    """The op's forward in float64: ``x [..., K]``, ``w [N, K]`` -> ``[..., N]``.

    ``bias`` is rounded to ``x.dtype`` first (as the kernels add it in the output dtype)."""
    x2 = x.reshape(-1, x.shape[-1])
    b = None if bias is None else bias.to(x.dtype)
    y = gemm_nt(x2, w, E4M3, E4M3, scaling, x_scale, w_scale, out_scale, b)
    return y.reshape(*x.shape[:-1], w.shape[0])


def fp8_linear_backward(grad: Tensor, x: Tensor, w: Tensor, scaling: str, x_scale: float,
                        w_scale: float, grad_scale: float, grad_x_mult: float,
                        grad_w_mult: float) -> tuple[Tensor, Tensor, Tensor]:
    """float64 ``(dx, dw, dbias)``: ``dx = grad_x_mult * dq(g_e5m2) @ dq(w_e4m3)``,
    ``dw = grad_w_mult * dq(g_e5m2)^T @ dq(x_e4m3)``, ``dbias = sum of grad over rows``
    (unquantised). Rowwise scaling quantises each operand per row of the GEMM's output
    (``w`` and ``x`` per column, i.e. along the other axis than in the forward)."""
    k = x.shape[-1]
    n = w.shape[0]
    g2 = grad.reshape(-1, n)
    x2 = x.reshape(-1, k)
    dx = gemm_nt(g2, w.t(), E5M2, E4M3, scaling, grad_scale, w_scale, grad_x_mult)
    dw = gemm_nt(g2.t(), x2.t(), E5M2, E4M3, scaling, grad_scale, x_scale, grad_w_mult)
    return dx.reshape(x.shape), dw, g2.double().sum(0)


def fp8_linear_unquantised(x: Tensor, w: Tensor, bias: Tensor | None,
                           out_scale: float = 1.0) -> Tensor:
    """float64 ``out_scale * x @ w^T + bias`` without any quantisation (for SQNR)."""
    y = (x.double() @ w.double().t()) * out_scale
    return y if bias is None else y + bias.double()


def sqnr_db(got: Tensor, want: Tensor) -> float:
    """Signal-to-quantisation-noise ratio ``10 log10(|want|^2 / |got - want|^2)`` in dB."""
    want = want.double()
    noise = (got.double() - want).pow(2).sum().item()
    signal = want.pow(2).sum().item()
    if noise == 0.0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise)).item()
