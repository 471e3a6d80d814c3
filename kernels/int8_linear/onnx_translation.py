"""ONNX translation of `aa::int8_linear` (onnxscript, standard ONNX ops; the numerics of
``reference.py``, computed in float32, or float64 for float64 input): the int8 codes stay int8
in the file and a per-row ``DequantizeLinear`` (axis 0, the output channels) feeds a MatMul.

onnxruntime's ``MatMulNBits`` (``com.microsoft``) takes 8-bit codes packed in blocks along K
with a zero point; the per-channel absmax codes here are symmetric and unblocked, so using it
needs a repacking step (not done: see ``docs/export.md``). Imported only when exporting.
"""

from __future__ import annotations

from typing import Any

from onnxscript import ir
from onnxscript import opset18 as op

from aa_compile.kernels.rms_norm.onnx_translation import round_to, upcast
from aa_compile.kernels.word_pool.onnx_translation import ints


def int8_linear(x: Any, w_int8: Any, scales: Any, bias: Any | None) -> Any:
    """``aa::int8_linear(x [..., K], w_int8 [N, K], scales [N], bias [N])``."""
    xf = upcast(x)
    if xf.dtype == ir.DataType.FLOAT:
        w = op.DequantizeLinear(w_int8, op.CastLike(scales, xf), axis=0)       # [N, K]
    else:  # float64 input: dequantize in float64, as the reference does
        w = op.Mul(op.CastLike(w_int8, xf), op.Unsqueeze(op.CastLike(scales, xf), ints(1)))
    y = op.MatMul(xf, op.Transpose(w, perm=[1, 0]))
    if bias is not None:
        y = op.Add(y, op.CastLike(bias, xf))
    return round_to(y, x)
