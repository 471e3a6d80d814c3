"""ONNX translation of `aa::sae_decode` (onnxscript, standard ONNX ops; the numerics of
``reference.py``): Gather the k decoder rows of every token, weight them by the latent values and
sum over k, in float32 (float64 for float64 weights), rounded once. Imported only when exporting.
"""

from __future__ import annotations

from typing import Any

from onnxscript import opset18 as op

from aa_compile.kernels.rms_norm.onnx_translation import round_to, upcast
from aa_compile.kernels.word_pool.onnx_translation import ints


def sae_decode(weight: Any, indices: Any, values: Any) -> Any:
    """``aa::sae_decode(weight [L, d], indices [N, k], values [N, k])`` -> ``[N, d]``."""
    rows = op.Gather(upcast(weight), indices, axis=0)                       # [N, k, d]
    weighted = op.Mul(rows, op.Unsqueeze(upcast(values), ints(2)))
    return round_to(op.ReduceSum(weighted, ints(1), keepdims=0), weight)
