"""ONNX translation of `aa::sae_encode` (onnxscript, standard ONNX ops; the numerics of
``reference.py``): ``(x - pre_bias) @ weight.T + bias`` in float32 (float64 for float64 inputs),
TopK (largest, sorted), then ReLU or sigmoid on the kept values, rounded once. Imported only when
exporting.
"""

from __future__ import annotations

from typing import Any

from onnxscript import opset18 as op

from aa_compile.kernels.rms_norm.onnx_translation import round_to, upcast
from aa_compile.kernels.word_pool.onnx_translation import ints


def sae_encode(x: Any, weight: Any, bias: Any, pre_bias: Any, k: int,
               sigmoid: bool = False) -> tuple[Any, Any]:
    """``aa::sae_encode(x [N, d], weight [L, d], bias [L], pre_bias [d], k, sigmoid)`` ->
    ``(values [N, k], indices [N, k] int64)``."""
    centred = op.Sub(upcast(x), upcast(pre_bias))
    pre = op.Add(op.MatMul(centred, op.Transpose(upcast(weight), perm=[1, 0])), upcast(bias))
    top, indices = op.TopK(pre, ints(k), axis=-1, largest=1, sorted=1)
    values = op.Sigmoid(top) if sigmoid else op.Relu(top)
    return round_to(values, x), indices
