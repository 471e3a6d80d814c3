"""ONNX translations of `aa::int8_linear` (onnxscript). Imported only when exporting.

``int8_linear``: standard ONNX ops, the numerics of ``reference.py`` computed in float32 (float64
for float64 input): the int8 codes stay int8 in the file and a per-row ``DequantizeLinear``
(axis 0, the output channels) feeds a MatMul. Any ONNX runtime runs it.

``int8_linear_matmulnbits``: onnxruntime's contrib ``MatMulNBits`` (``com.microsoft``), for files
that onnxruntime runs. Our per-output-channel symmetric codes ``q`` in [-128, 127] map exactly to
its 8-bit blocked layout: ``B[n, b, j] = q[n, b * BLOCK_SIZE + j] + 128`` (uint8; K padded to a
whole block with the code 128, i.e. 0), every block of row ``n`` scaled by ``scales[n]``, zero
point 128 (the operator's default for 8 bits, so none is stored): ``(B - 128) * scale`` is our
dequantised weight bit for bit. The repacking is written as ONNX ops on the weight;
`aa_compile.export` folds it into uint8 initializers after exporting. ``accuracy_level`` 4 makes
onnxruntime round each ``BLOCK_SIZE`` block of every activation row to int8 (symmetric, absmax
scale) and multiply in integers; that rounding is the path's only error: each activation moves
by at most half a step (``max|x_block| / 254``), so output ``n`` by at most the sum over blocks
of ``max|x_block| / 254 * sum_block |weight[n]|`` (``docs/export.md``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx.defs
from onnxscript import ir, values
from onnxscript import opset18 as op

from aa_compile.kernels.rms_norm.onnx_translation import compute_type, round_to, upcast
from aa_compile.kernels.word_pool.onnx_translation import ints

#: codes per block along K (onnxruntime's CPU int8 path is fastest at 32)
BLOCK_SIZE = 32
#: MatMulNBits ``accuracy_level``: 4 = int8 activations (onnxruntime's integer GEMM path)
ACCURACY_INT8 = 4
#: the zero point of an 8-bit MatMulNBits code (its default when none is given)
ZERO_POINT = 128


def int8_linear(x: Any, w_int8: Any, scales: Any, bias: Any | None) -> Any:
    """``aa::int8_linear(x [..., K], w_int8 [N, K], scales [N], bias [N])``, standard ops."""
    xf = upcast(x)
    if xf.dtype == ir.DataType.FLOAT:
        w = op.DequantizeLinear(w_int8, op.CastLike(scales, xf), axis=0)       # [N, K]
    else:  # float64 input: dequantize in float64, as the reference does
        w = op.Mul(op.CastLike(w_int8, xf), op.Unsqueeze(op.CastLike(scales, xf), ints(1)))
    y = op.MatMul(xf, op.Transpose(w, perm=[1, 0]))
    if bias is not None:
        y = op.Add(y, op.CastLike(bias, xf))
    return round_to(y, x)


def _matmulnbits_schema() -> onnx.defs.OpSchema:
    """The part of onnxruntime's ``com.microsoft::MatMulNBits`` schema used here (onnx itself
    knows no contrib schema; onnxscript needs one to build the node)."""
    p, a = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.Attribute
    kind = onnx.defs.OpSchema.AttrType.INT
    return onnx.defs.OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[p("A", "T1"), p("B", "T2"), p("scales", "T1")], outputs=[p("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], "activations"),
                          ("T2", ["tensor(uint8)"], "packed codes")],
        attributes=[a("K", kind), a("N", kind), a("bits", kind), a("block_size", kind),
                    a("accuracy_level", kind)])


MatMulNBits = values.Op(values.Opset("com.microsoft", 1), "MatMulNBits",
                        op_schema=_matmulnbits_schema())


def pack_codes(w_int8: Any, n: int, k: int) -> Any:
    """``[N, ceil(K / BLOCK_SIZE), BLOCK_SIZE]`` uint8: ``q + 128``, K padded with code 128."""
    blocks = -(-k // BLOCK_SIZE)
    pad = blocks * BLOCK_SIZE - k
    w = w_int8 if pad == 0 else op.Pad(w_int8, ints(0, 0, 0, pad))
    shifted = op.Add(op.Cast(w, to=ir.DataType.INT16),
                     op.Constant(value=ir.tensor(np.array(ZERO_POINT, np.int16))))
    return op.Reshape(op.Cast(shifted, to=ir.DataType.UINT8), ints(n, blocks, BLOCK_SIZE))


def block_scales(scales: Any, n: int, k: int) -> Any:
    """``[N * ceil(K / BLOCK_SIZE)]`` float32: each row's scale repeated for every block of the
    row."""
    blocks = -(-k // BLOCK_SIZE)
    per_row = op.Unsqueeze(op.Cast(scales, to=ir.DataType.FLOAT), ints(1))
    return op.Reshape(op.Expand(per_row, ints(n, blocks)), ints(n * blocks))


def int8_linear_matmulnbits(x: Any, w_int8: Any, scales: Any, bias: Any | None) -> Any:
    """``aa::int8_linear`` as onnxruntime's ``MatMulNBits`` (8-bit codes, int8 activations).
    float64 input has no MatMulNBits kernel: it takes the standard translation."""
    if compute_type(x) == ir.DataType.DOUBLE:
        return int8_linear(x, w_int8, scales, bias)
    n, k = int(w_int8.shape[0]), int(w_int8.shape[1])
    xf = upcast(x)
    rows = op.Reshape(xf, ints(-1, k))  # MatMulNBits takes [M, K]; any leading shape folds in
    y = MatMulNBits(rows, pack_codes(w_int8, n, k), block_scales(scales, n, k), K=k, N=n,
                    bits=8, block_size=BLOCK_SIZE, accuracy_level=ACCURACY_INT8)
    if bias is not None:
        y = op.Add(y, op.CastLike(bias, xf))
    lead = op.Shape(xf, start=0, end=-1)
    return round_to(op.Reshape(y, op.Concat(lead, ints(n), axis=0)), x)

