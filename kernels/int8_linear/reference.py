"""Plain-PyTorch int8 weight-only linear: the numerics every `aa::int8_linear` kernel is tested
against.

Semantics (shared by all kernels)::

    y[..., n] = sum_k x[..., k] * (w_int8[n, k] * scales[n])  (+ bias[n])

computed here in float64 from the dequantised weight and rounded once to ``x.dtype``.
``w_int8``: ``[N, K]`` int8 (per-output-channel absmax quantisation, values in [-127, 127]);
``scales``: ``[N]`` float; ``bias``: ``[N]`` or None.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dequantize(w_int8: Tensor, scales: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """``w_int8 * scales[:, None]`` in ``dtype``."""
    return w_int8.to(dtype) * scales.to(dtype)[:, None]


def int8_linear(x: Tensor, w_int8: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    y = x.to(torch.float64) @ dequantize(w_int8, scales).t()
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype)


def quantize_absmax(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel (row) absmax int8: ``scale = max|w_row| / 127``, ``q = round(w / scale)``.

    No outlier handling. All-zero rows get scale 1 (and q = 0). Returns ``(q int8, scales
    float32)``.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_absmax: w must be 2-D [out, in], got shape {tuple(w.shape)}")
    wf = w.detach().to(torch.float32)
    amax = wf.abs().amax(dim=1) if wf.shape[1] else wf.new_zeros(wf.shape[0])
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(wf / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales
