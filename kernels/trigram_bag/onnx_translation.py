"""ONNX translation of `aa::trigram_bag`, `aa::trigram_bag_cpu` and `aa::tfree_words_to_csr`
(onnxscript, standard ONNX ops; the numerics of ``reference.py``).

The bag sum is a Gather of the rows (times the per-sample weights) and a ScatterND with
``reduction="add"`` into ``[n_bags, h]`` zeros by the bag of every entry, in float32 (float64
for float64 weights), rounded once. ``deterministic`` has no meaning there (onnxruntime's
scatter-add runs in entry order on CPU). The CSR of the T-FREE words orders the trigrams by
word with a TopK over the unique key ``word * n + position`` (a stable sort). Imported only
when exporting.
"""

from __future__ import annotations

from typing import Any

from onnxscript import ir
from onnxscript import opset18 as op

from aa_compile.kernels.rms_norm.onnx_translation import round_to, upcast
from aa_compile.kernels.word_pool.onnx_translation import dim, ints, segment_ids


def bag_sum(rows: Any, bag_of_entry: Any, n_bags: Any) -> Any:
    """``out[b] = sum of rows[j] with bag_of_entry[j] == b``: ``[n_bags, h]``."""
    shape = op.Concat(n_bags, dim(rows, 1), axis=0)
    zeros = op.Expand(op.CastLike(op.Constant(value_float=0.0), rows), shape)
    return op.ScatterND(zeros, op.Unsqueeze(bag_of_entry, ints(1)), rows, reduction="add")


def trigram_bag(weight: Any, indices: Any, offsets: Any, per_sample_weights: Any | None = None,
                deterministic: bool = True) -> Any:
    """``aa::trigram_bag(weight [v, h], indices [nnz], offsets [n_bags + 1], psw [nnz])``."""
    rows = op.Gather(upcast(weight), indices, axis=0)                        # [nnz, h]
    if per_sample_weights is not None:
        rows = op.Mul(rows, op.Unsqueeze(upcast(per_sample_weights), ints(1)))
    n_bags = op.Sub(dim(offsets, 0), ints(1))
    out = bag_sum(rows, segment_ids(offsets, dim(indices, 0)), n_bags)
    return round_to(out, weight)


def trigram_bag_cpu(weight: Any, indices: Any, offsets: Any,
                    per_sample_weights: Any | None = None) -> Any:
    """``aa::trigram_bag_cpu``: the same sum (the CPU kernel's own op)."""
    return trigram_bag(weight, indices, offsets, per_sample_weights)


def tfree_words_to_csr(slots: Any, word_of_trigram: Any, n_words: Any) -> tuple[Any, Any]:
    """``aa::tfree_words_to_csr(slots [n, m], word_of_trigram [n], n_words)``: ``(indices
    [n * m]`` of word 0's trigrams, then word 1's, ... in their order, ``offsets [n_words + 1]
    = m * trigrams before word w)``."""
    n = dim(slots, 0)
    word = op.Cast(word_of_trigram, to=ir.DataType.INT64)
    position = op.Range(op.Constant(value_int=0), op.Squeeze(n), op.Constant(value_int=1))
    key = op.Add(op.Mul(word, n), position)
    _, order = op.TopK(key, n, axis=0, largest=0, sorted=1)                  # stable by word
    indices = op.Reshape(op.Gather(slots, order, axis=0), ints(-1))
    n_words = op.Reshape(op.Cast(n_words, to=ir.DataType.INT64), ints(1))
    counts = op.ScatterElements(
        op.ConstantOfShape(n_words, value=ir.tensor([0], dtype=ir.DataType.INT64)), word,
        op.ConstantOfShape(n, value=ir.tensor([1], dtype=ir.DataType.INT64)), axis=0,
        reduction="add")
    per_word = op.Mul(counts, dim(slots, 1))
    offsets = op.Concat(ints(0), op.CumSum(per_word, op.Constant(value_int=0)), axis=0)
    return indices, offsets
