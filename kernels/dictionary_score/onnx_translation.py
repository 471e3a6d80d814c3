"""ONNX translation of `aa::dictionary_score` and `aa::csr_offsets` (onnxscript, standard ONNX
ops; the numerics of ``reference.py``): the raw sums by a Gather of the probabilities at the
dictionary's slots and a ScatterND add per word, the normalised score, and a TopK (ONNX's tie
order, lower index first, is the op's). Imported only when exporting.
"""

from __future__ import annotations

from typing import Any

from onnxscript import ir
from onnxscript import opset18 as op

from aa_compile.kernels.rms_norm.onnx_translation import upcast
from aa_compile.kernels.word_pool.onnx_translation import dim, ints, segment_ids


def csr_offsets(row_ids: Any, n_rows: Any) -> Any:
    """``aa::csr_offsets(row_ids [nnz] sorted, n_rows)``: ``[n_rows + 1]`` int64 CSR offsets."""
    rows = op.Reshape(op.Cast(n_rows, to=ir.DataType.INT64), ints(1))
    counts = op.ScatterElements(
        op.ConstantOfShape(rows, value=ir.tensor([0], dtype=ir.DataType.INT64)),
        op.Cast(row_ids, to=ir.DataType.INT64),
        op.ConstantOfShape(dim(row_ids, 0), value=ir.tensor([1], dtype=ir.DataType.INT64)),
        axis=0, reduction="add")
    return op.Concat(ints(0), op.CumSum(counts, op.Constant(value_int=0)), axis=0)


def dictionary_score(probs: Any, word_offsets: Any, slots: Any, slot_weights: Any,
                     n_trigrams: Any, m: int, k: int) -> tuple[Any, Any]:
    """``aa::dictionary_score``: ``k >= 1``: the top-k ``(scores, indices) [B, k]``;
    ``k == 0``: ``(scores [B, n_words], [B, 0] int64)``."""
    p = upcast(probs)                                                        # [B, v]
    picked = op.Mul(op.Gather(p, slots, axis=1), op.CastLike(slot_weights, p))  # [B, nnz]
    n_words = op.Sub(dim(word_offsets, 0), ints(1))
    word = segment_ids(word_offsets, dim(slots, 0))
    zeros = op.Expand(op.CastLike(op.Constant(value_float=0.0), p),
                      op.Concat(n_words, dim(probs, 0), axis=0))
    raw = op.Transpose(op.ScatterND(zeros, op.Unsqueeze(word, ints(1)),
                                    op.Transpose(picked, perm=[1, 0]), reduction="add"),
                       perm=[1, 0])                                          # [B, n_words]
    total = op.ReduceSum(p, ints(-1), keepdims=1)
    on = op.CastLike(op.Mul(n_trigrams, op.CastLike(op.Constant(value_int=int(m)), n_trigrams)),
                     p)
    off = op.Max(op.Sub(op.CastLike(dim(probs, 1), p), on), op.CastLike(op.Constant(
        value_float=1.0), p))
    score = op.Add(op.Div(raw, on), op.Div(op.Sub(raw, total), off))
    empty = op.Equal(n_trigrams, op.CastLike(op.Constant(value_int=0), n_trigrams))
    score = op.Where(empty, op.CastLike(op.Constant(value_float=float("-inf")), p), score)
    if int(k) == 0:
        none = op.Expand(ints(0), op.Concat(dim(probs, 0), ints(0), axis=0))
        return score, none
    values, indices = op.TopK(score, ints(int(k)), axis=-1, largest=1, sorted=1)
    return values, indices
