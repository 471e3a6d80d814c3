"""ONNX translation of `aa::guide_add` and `aa::guide_add_rms_norm` (onnxscript, standard ONNX
ops; the numerics of ``reference.py``): the word of every byte from the CSR offsets, a Gather
of the guide vectors, an Add in x's type, and the fused form's RMSNorm of the rounded sum.
Imported only when exporting.
"""

from __future__ import annotations

from typing import Any

from onnxscript import opset18 as op

from aa_compile.kernels.rms_norm.onnx_translation import normalize, round_to, upcast
from aa_compile.kernels.word_pool.onnx_translation import dim, segment_ids


def guide_add(x: Any, g: Any, word_offsets: Any) -> Any:
    """``aa::guide_add(x [T, d], g [W, d], word_offsets [W + 1])``: ``x + g[word of byte]``."""
    return op.Add(x, op.Gather(g, segment_ids(word_offsets, dim(x, 0)), axis=0))


def guide_add_rms_norm(x: Any, g: Any, word_offsets: Any, weight: Any | None, eps: float,
                       out_dtype: Any = None) -> tuple[Any, Any]:
    """``aa::guide_add_rms_norm``: ``(y, rms_norm(y) * weight)`` with ``y`` in x's type."""
    y = guide_add(x, g, word_offsets)
    return y, round_to(normalize(upcast(y), weight, eps), x, out_dtype)
