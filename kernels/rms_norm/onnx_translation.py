"""ONNX translation of `aa::rms_norm` (onnxscript, standard ONNX ops; the numerics of
``reference.py``): square, mean over the last axis, ``1 / sqrt(. + eps)``, scale, in float32
(float64 for float64 input), rounded once to ``out_dtype`` (default: x's type).

Standard ops rather than onnxruntime's ``SimplifiedLayerNormalization``: that contrib op lives
in the default ONNX domain, where ``onnx.checker`` rejects it, and onnxruntime's graph optimizer
fuses this pattern (``Pow(x, 2)``, ReduceMean, Add, Sqrt, Div, Mul) into it when it loads the
file anyway (``tests/test_onnx_ops.py`` checks that it does). Imported only when exporting
(onnx and onnxscript are an optional extra); the shared dtype helpers live here too.
"""

from __future__ import annotations

from typing import Any

import torch
from onnxscript import ir
from onnxscript import opset18 as op

_ONNX_TYPE = {
    torch.float16: ir.DataType.FLOAT16, torch.bfloat16: ir.DataType.BFLOAT16,
    torch.float32: ir.DataType.FLOAT, torch.float64: ir.DataType.DOUBLE,
}


def compute_type(x: Any) -> ir.DataType:
    """The accumulation type of ``x``: float64 stays float64, every other float is float32."""
    return ir.DataType.DOUBLE if x.dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT


def upcast(x: Any) -> Any:
    """``x`` in its `compute_type` (no node when it already is)."""
    return x if x.dtype == compute_type(x) else op.Cast(x, to=compute_type(x))


def round_to(y: Any, like: Any, dtype: torch.dtype | int | None = None) -> Any:
    """``y`` rounded once to ``dtype`` (a torch dtype or ONNX type), else to ``like``'s type."""
    if dtype is None:
        return y if y.dtype == like.dtype else op.CastLike(y, like)
    to = _ONNX_TYPE[dtype] if isinstance(dtype, torch.dtype) else ir.DataType(dtype)
    return y if y.dtype == to else op.Cast(y, to=to)


def normalize(xf: Any, weight: Any | None, eps: float) -> Any:
    """``xf / sqrt(mean(xf**2, -1) + eps) * weight`` on ``xf`` in its compute type."""
    square = op.Pow(xf, op.CastLike(op.Constant(value_float=2.0), xf))
    mean_sq = op.ReduceMean(square, op.Constant(value_ints=[-1]), keepdims=1)
    y = op.Div(xf, op.Sqrt(op.Add(mean_sq, op.CastLike(op.Constant(value_float=eps), xf))))
    if weight is not None:
        y = op.Mul(y, op.CastLike(weight, xf))
    return y


def rms_norm(x: Any, weight: Any | None, eps: float, out_dtype: Any = None) -> Any:
    """``aa::rms_norm(x, weight, eps, out_dtype)``."""
    return round_to(normalize(upcast(x), weight, eps), x, out_dtype)
