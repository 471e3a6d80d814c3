"""CPU kernel of `aa::fp8_linear`: quantise with a few vectorised torch passes, then
``torch._scaled_mm`` (ATen's CPU FP8 GEMM, float32 accumulation) with the unit scale folded into
``b``'s dequantisation scale. Numerics: ``reference.py``; notes: ``docs/fp8.md``."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import reference


@functools.lru_cache(maxsize=256)
def _const(value: float) -> Tensor:
    """A cached 0-dim float32 CPU tensor: static scales cost no tensor op per call."""
    return torch.tensor(value, dtype=torch.float32)


def _scale_tensor(s: Tensor | float, device: torch.device) -> Tensor:
    if isinstance(s, Tensor):
        return s
    return _const(float(s))


def gemm_nt(a: Tensor, bt: Tensor, a_fmt: torch.dtype, b_fmt: torch.dtype, scaling: str,
            a_static: float, b_static: float, mult: float, bias: Tensor | None,
            out_dtype: torch.dtype) -> Tensor:
    """``out [P, Q] = mult * dq(q(a)) @ dq(q(bt))^T + bias`` in ``out_dtype`` (see
    `reference.gemm_nt`); ``a [P, R]``, ``bt [Q, R]``, ``R > 0``."""
    sa = reference.quant_scale(a, a_fmt, scaling, a_static)
    sb = reference.quant_scale(bt, b_fmt, scaling, b_static)
    qa = reference.quantize(a, a_fmt, sa)
    qb = reference.quantize(bt, b_fmt, sb)
    da = _scale_tensor(reference.recip32(sa), a.device)
    db = reference.recip32(sb)
    if isinstance(db, Tensor):
        db = db.mul_(mult) if scaling == "tensorwise" else db.t().mul_(mult)  # [1, Q]
    else:
        db = _scale_tensor(db * mult, a.device)
    if bias is not None:
        bias = bias.to(out_dtype)
    return torch._scaled_mm(qa, qb.t(), scale_a=da, scale_b=db, bias=bias, out_dtype=out_dtype)
