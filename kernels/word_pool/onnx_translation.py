"""ONNX translation of `aa::word_pool` (onnxscript, standard ONNX ops; the numerics of
``reference.py``), and the CSR helper the other segment ops' translations share.

ONNX has no ragged attention, so the pooling is dense over all bytes with a mask (byte t may
serve word w only if it lies in w): ``[H, W, T]`` scores, fine for export-sized inputs and
exact; empty words get a zero row. Imported only when exporting.
"""

from __future__ import annotations

import math
from typing import Any

from onnxscript import ir
from onnxscript import opset18 as op

from aa_compile.kernels.rms_norm.onnx_translation import round_to, upcast


def ints(*values: int) -> Any:
    """A constant int64 vector."""
    return op.Constant(value_ints=list(values))


def dim(x: Any, axis: int) -> Any:
    """``x.shape[axis]`` as a 1-element int64 tensor (works for dynamic dimensions)."""
    return op.Shape(x, start=axis, end=axis + 1 if axis != -1 else None)


def segment_ids(offsets: Any, n: Any) -> Any:
    """``[n]`` int64: the segment of every position ``0..n-1`` of the CSR ``offsets [S + 1]``
    (``searchsorted(offsets, pos, right=True) - 1``; empty segments own no position): a 1
    scattered onto each inner boundary, then a running sum. ``n`` is a 1-element int64."""
    inner = op.Cast(op.Slice(offsets, ints(1), ints(-1)), to=ir.DataType.INT64)
    marks = op.ConstantOfShape(op.Add(n, ints(1)),
                               value=ir.tensor([0], dtype=ir.DataType.INT64))
    ones = op.ConstantOfShape(op.Shape(inner), value=ir.tensor([1], dtype=ir.DataType.INT64))
    marks = op.ScatterElements(marks, inner, ones, axis=0, reduction="add")
    return op.Slice(op.CumSum(marks, op.Constant(value_int=0)), ints(0), n)


def word_pool(q: Any, k: Any, v: Any, word_offsets: Any, scale: float | None = None) -> Any:
    """``aa::word_pool(q [Wq, H, D], k/v [T, Hkv, D], word_offsets [W + 1], scale)``."""
    heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    s = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    qf, kf, vf = upcast(q), upcast(k), upcast(v)
    if heads != kv_heads:  # query head h reads kv head h // group
        group = heads // kv_heads
        heads_of = ints(*[h // group for h in range(heads)])
        kf, vf = op.Gather(kf, heads_of, axis=1), op.Gather(vf, heads_of, axis=1)
    n_bytes = dim(k, 0)
    n_words = op.Sub(dim(word_offsets, 0), ints(1))
    word_of_byte = segment_ids(word_offsets, n_bytes)                            # [T]
    words = op.Range(op.Constant(value_int=0), op.Squeeze(n_words), op.Constant(value_int=1))
    inside = op.Equal(op.Unsqueeze(words, ints(1)), op.Unsqueeze(word_of_byte, ints(0)))  # [W, T]
    scores = op.MatMul(op.Transpose(qf, perm=[1, 0, 2]), op.Transpose(kf, perm=[1, 2, 0]))
    scores = op.Mul(scores, op.CastLike(op.Constant(value_float=s), qf))         # [H, Wq, T]
    low = op.CastLike(op.Constant(value_float=-1e30), qf)
    masked = op.Where(inside, scores, low)                                       # [H, W, T]
    top = op.ReduceMax(masked, ints(-1), keepdims=1)
    zero = op.CastLike(op.Constant(value_float=0.0), qf)
    weights = op.Where(inside, op.Exp(op.Sub(masked, top)), zero)
    total = op.ReduceSum(weights, ints(-1), keepdims=1)
    tiny = op.CastLike(op.Constant(value_float=1e-30), qf)
    probs = op.Div(weights, op.Max(total, tiny))                                 # empty word: 0
    out = op.MatMul(probs, op.Transpose(vf, perm=[1, 0, 2]))                     # [H, W, D]
    return round_to(op.Transpose(out, perm=[1, 0, 2]), q)
