"""ONNX translation of `aa::window_attention` (onnxscript, standard ONNX ops; the numerics of
``reference.py``): the ``[T, T]`` causal sliding-window document mask from positions and the
document of every position, dense masked scores, ``lse`` and the softmax-weighted values in
float32 (float64 for float64), ``out`` rounded once to q's type. O(T^2) memory, as dense SDPA
in an exported Hugging Face model. onnxruntime's ``GroupQueryAttention`` (``com.microsoft``)
has a local window but no document boundaries; not used. Imported only when exporting.
"""

from __future__ import annotations

import math
from typing import Any

from onnxscript import ir
from onnxscript import opset18 as op

from aa_compile.kernels.rms_norm.onnx_translation import round_to, upcast
from aa_compile.kernels.word_pool.onnx_translation import dim, ints, segment_ids


def allowed(doc_offsets: Any | None, n: Any, window: int) -> Any:
    """``[T, T]`` bool: query i may read key j (same document, ``0 <= i - j < window``)."""
    pos = op.Range(op.Constant(value_int=0), op.Squeeze(n), op.Constant(value_int=1))
    dist = op.Sub(op.Unsqueeze(pos, ints(1)), op.Unsqueeze(pos, ints(0)))
    ok = op.And(op.GreaterOrEqual(dist, op.Constant(value_int=0)),
                op.Less(dist, op.Constant(value_int=int(window))))
    if doc_offsets is not None:
        doc = segment_ids(doc_offsets, n)
        ok = op.And(ok, op.Equal(op.Unsqueeze(doc, ints(1)), op.Unsqueeze(doc, ints(0))))
    return ok


def window_attention(q: Any, k: Any, v: Any, doc_offsets: Any | None, window: int,
                     scale: float | None = None) -> tuple[Any, Any]:
    """``aa::window_attention(q [..., Hq, T, D], k/v [..., Hkv, T, D], doc_offsets, window,
    scale)``: ``(out [..., Hq, T, D], lse [..., Hq, T])``."""
    rank = len(q.shape)
    heads, kv_heads, head_dim = q.shape[-3], k.shape[-3], q.shape[-1]
    s = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    qf, kf, vf = upcast(q), upcast(k), upcast(v)
    if heads != kv_heads:  # query head h reads kv head h // group
        group = heads // kv_heads
        heads_of = ints(*[h // group for h in range(heads)])
        kf, vf = op.Gather(kf, heads_of, axis=rank - 3), op.Gather(vf, heads_of, axis=rank - 3)
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    scores = op.Mul(op.MatMul(qf, op.Transpose(kf, perm=perm)),
                    op.CastLike(op.Constant(value_float=s), qf))
    neg_inf = op.CastLike(op.Constant(value_float=float("-inf")), qf)
    scores = op.Where(allowed(doc_offsets, dim(q, -2), window), scores, neg_inf)
    top = op.ReduceMax(scores, ints(-1), keepdims=1)       # finite: every query sees itself
    weights = op.Exp(op.Sub(scores, top))
    total = op.ReduceSum(weights, ints(-1), keepdims=1)
    lse = op.Squeeze(op.Add(top, op.Log(total)), ints(-1))
    out = op.MatMul(op.Div(weights, total), vf)
    return round_to(out, q), lse
