"""Plain-PyTorch guide-vector add: the numerics spec every `aa::guide_add` /
`aa::guide_add_rms_norm` kernel is tested against, and the definition of valid input.

Semantics, for ``x [T, d]`` (the decoder's byte stream), ``g [W, d]`` (one guide vector per
word, x's dtype) and CSR word boundaries ``word_offsets [W + 1]`` over T
(``0 = o_0 <= ... <= o_W = T``; empty words allowed)::

    y[t] = x[t] + g[w]            for the bytes t in [o_w, o_{w+1})    (rounded to x.dtype)
    normed = rms_norm(y) * weight                                       (fused form)

``rms_norm`` is the repo's (``aa_compile.kernels.rms_norm.reference``): the rounded ``y`` is
normalized in float32 (float64 for float64), multiplied by ``weight`` there, and rounded once
to ``out_dtype`` (default x.dtype). This is HAT's decoder: ``x = x + guide[byte_word]`` followed
by the first block's ``attn_norm(x)``; ``y`` is the block's residual stream.

Gradients: ``dx = dy_total``, ``dg[w] = sum_{t in word w} dy_total[t]`` (float32 accumulation),
``dweight = sum_t grad_normed * yhat``, where ``dy_total = grad_y + rms_norm_backward(
grad_normed)`` (added in float32 before the one rounding).
"""

from __future__ import annotations

import math

import torch
from aa_compile.kernels.rms_norm import reference as rms_reference
from aa_compile.kernels.word_pool.reference import check_offsets
from torch import Tensor

#: the dtypes ``x``, ``g``, ``weight`` and the gradients may have
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

compute_dtype = rms_reference.compute_dtype


def check_inputs(x: Tensor, g: Tensor, word_offsets: Tensor, *, check_values: bool = True,
                 op: str = "aa::guide_add") -> None:
    """Raise ``ValueError`` naming the argument when ``x``, ``g`` or ``word_offsets`` are not
    valid; ``check_values`` also reads the offsets (a device sync off the CPU)."""
    for name, t in (("x", x), ("g", g)):
        if not isinstance(t, Tensor) or t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} must be a float16/bfloat16/float32/float64 tensor, "
                             f"got {getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() != 2:
            want = "[T, d] (bytes x features)" if name == "x" else "[W, d] (words x features)"
            raise ValueError(f"{op}: {name} must be 2-D {want}, got shape {tuple(t.shape)}")
    if g.dtype != x.dtype:
        raise ValueError(f"{op}: g must have x's dtype {x.dtype}, got {g.dtype} (cast the "
                         "guide vectors first)")
    if g.device != x.device:
        raise ValueError(f"{op}: g is on {g.device}, but x is on {x.device}")
    if g.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: g must be as wide as x ({x.shape[1]}), got {tuple(g.shape)}")
    check_offsets(word_offsets, x.shape[0], x.device, check_values=check_values, op=op)
    if g.shape[0] != word_offsets.shape[0] - 1:
        raise ValueError(f"{op}: g must have one row per word ({word_offsets.shape[0] - 1} = "
                         f"word_offsets.numel() - 1), got {g.shape[0]}")


def check_norm(x: Tensor, weight: Tensor | None, eps: float, out_dtype, *, op: str) -> None:
    if x.shape[1] == 0:
        raise ValueError(f"{op}: x must have a non-empty feature dimension to normalize, got "
                         f"{tuple(x.shape)}")
    if weight is not None:
        if not isinstance(weight, Tensor) or weight.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: weight must be a float tensor or None, got "
                             f"{getattr(weight, 'dtype', type(weight).__name__)}")
        if tuple(weight.shape) != (x.shape[1],):
            raise ValueError(f"{op}: weight must have shape ({x.shape[1]},) to match x's last "
                             f"dimension, got {tuple(weight.shape)}")
        if weight.device != x.device:
            raise ValueError(f"{op}: weight is on {weight.device}, but x is on {x.device}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{op}: eps must be a finite float >= 0, got {eps!r}")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: out_dtype must be a float dtype or None, got {out_dtype}")


def byte_word(word_offsets: Tensor, n_bytes: int) -> Tensor:
    """``[T]`` int64: the word of every byte."""
    lengths = word_offsets.diff().long()
    words = torch.arange(lengths.numel(), device=word_offsets.device)
    return torch.repeat_interleave(words, lengths, output_size=n_bytes)


def guide_add(x: Tensor, g: Tensor, word_offsets: Tensor) -> Tensor:
    """``x + g[word of byte]`` ``[T, d]`` in x's dtype."""
    return x + g[byte_word(word_offsets, x.shape[0])]


def segment_sum(grad: Tensor, word_offsets: Tensor) -> Tensor:
    """``[W, d]``: the rows of ``grad`` summed per word, in the compute dtype, rounded once."""
    acc = compute_dtype(grad.dtype)
    n_words = word_offsets.numel() - 1
    out = torch.zeros(n_words, grad.shape[1], dtype=acc, device=grad.device)
    out.index_add_(0, byte_word(word_offsets, grad.shape[0]), grad.to(acc))
    return out.to(grad.dtype)


def guide_add_backward(grad: Tensor, word_offsets: Tensor) -> Tensor:
    """``dg [W, d]`` (``dx`` is ``grad`` itself)."""
    return segment_sum(grad, word_offsets)


def guide_add_rms_norm(x: Tensor, g: Tensor, word_offsets: Tensor, weight: Tensor | None,
                       eps: float, out_dtype: torch.dtype | None = None
                       ) -> tuple[Tensor, Tensor]:
    """``(y, normed)``: ``y = x + g[word]`` in x's dtype, ``normed = rms_norm(y) * weight``."""
    y = guide_add(x, g, word_offsets)
    return y, rms_reference.rms_norm(y, weight, eps, out_dtype or x.dtype)


def guide_add_rms_norm_backward(grad_y: Tensor | None, grad_normed: Tensor | None, y: Tensor,
                                weight: Tensor | None, word_offsets: Tensor, eps: float
                                ) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(dx, dg, dweight)`` (``dweight`` None without weight); a None gradient counts as
    zeros."""
    acc = compute_dtype(y.dtype)
    total = torch.zeros(y.shape, dtype=acc, device=y.device)
    if grad_y is not None:
        total = total + grad_y.to(acc)
    dweight = None
    if grad_normed is not None:
        w = None if weight is None else weight.to(acc)
        dy, dw = rms_reference.rms_norm_backward(grad_normed.to(acc), y.to(acc), w, eps)
        total = total + dy
        dweight = None if dw is None else dw.to(weight.dtype)
    elif weight is not None:
        dweight = torch.zeros_like(weight)
    n_words = word_offsets.numel() - 1
    dg = torch.zeros(n_words, y.shape[1], dtype=acc, device=y.device)
    dg.index_add_(0, byte_word(word_offsets, y.shape[0]), total)
    return total.to(y.dtype), dg.to(y.dtype), dweight
