"""`aa::guide_add` and `aa::guide_add_rms_norm`: HAT's decoder guide vectors (one vector per
word added to each of the word's bytes), plain and fused with the next RMSNorm.

    aa::guide_add(Tensor x, Tensor g, Tensor word_offsets) -> Tensor
    aa::guide_add_backward(Tensor grad, Tensor word_offsets) -> Tensor dg
    aa::guide_add_rms_norm(Tensor x, Tensor g, Tensor word_offsets, Tensor? weight, float eps,
                           ScalarType? out_dtype=None) -> (Tensor y, Tensor normed)
    aa::guide_add_rms_norm_backward(Tensor? grad_y, Tensor? grad_normed, Tensor y,
                                    Tensor? weight, Tensor word_offsets, float eps)
        -> (Tensor dx, Tensor dg, Tensor dweight)

``x [T, d]``, ``g [W, d]`` (x's dtype and device), ``word_offsets [W + 1]`` int64 (or int32)
CSR word boundaries over T (``0 = o_0 <= ... <= o_W = T``; an empty word's guide is unused and
gets a zero gradient)::

    y[t]   = x[t] + g[w]                 t in [o_w, o_{w+1}), rounded to x's dtype
    normed = rms_norm(y) * weight        float32 (float64 for float64), one rounding to
                                         out_dtype (default x's dtype)

This is the reference `ByteDecoder`: ``x = x + guide(pred)[byte_word]`` (``GuideVector``: the
cross-attention with one key per byte, softmax 1, so ``o_proj(v_proj(kv_norm(pred)))``, which
stays outside the op), then the first block's ``attn_norm(x)`` (``ByteBlock``); ``y`` is the
block's residual stream and ``normed`` the attention input. The reference RMSNorm rounds
``y * rstd`` to x's dtype before ``* weight``; the op rounds once (the ``aa::rms_norm``
convention), so the two agree exactly in float32 and to a rounding in half types. With a float32
``weight`` and half ``x`` the reference returns float32: pass ``out_dtype=torch.float32``.

Gradients: ``dx = dy_total``, ``dg[w] = sum over word w's bytes of dy_total`` (float32
accumulation), ``dweight = sum_t grad_normed * yhat``, with ``dy_total = grad_y +
rms_norm_backward(grad_normed)`` in float32. The backward ops return an empty tensor in place of
``dweight`` without a weight; a None incoming gradient counts as zeros. Not differentiable twice.

Kernels: CPU (and CUDA float64), gather into the output + in-place add, ``segment_reduce`` for
``dg``; CUDA, Triton with one program per word (its guide row loaded once). See
``aa_compile.kernels.guide_add``. Under inductor on CPU the fused op and its backward are
decomposed into ``aa::guide_add`` / ``aa::guide_add_backward`` plus RMSNorm math that inductor
generates (``kernels.guide_add.cpu.inductor_decompositions``); the pass ``hat_guide_add``
(``passes/hat.py``) puts the fused op into HAT decoders.

Input validation (``ValueError`` naming the argument): dtypes, shapes and devices always;
``word_offsets`` values on CPU always, elsewhere when `CHECK_OFFSETS` (environment
``AA_GUIDE_ADD_CHECK_OFFSETS=1``) is true.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from aa_compile.kernels import guide_add as kernels
from aa_compile.kernels.guide_add import reference
from aa_compile.kernels.word_pool.reference import check_offsets

from .registry import OpEntry, register

#: Check ``word_offsets`` values off the CPU too (a device sync per call); CPU always checks.
CHECK_OFFSETS: bool = os.environ.get("AA_GUIDE_ADD_CHECK_OFFSETS", "0").strip().lower() \
    not in ("", "0", "false", "no", "off")


def _values(t: Tensor, values: bool) -> bool:
    return values and (t.device.type == "cpu" or CHECK_OFFSETS)


def _check(x, g, word_offsets, *, values: bool, op: str) -> None:
    reference.check_inputs(x, g, word_offsets, check_values=_values(x, values), op=op)


# -- aa::guide_add ---------------------------------------------------------------------------

@torch.library.custom_op("aa::guide_add", mutates_args=())
def guide_add(x: Tensor, g: Tensor, word_offsets: Tensor) -> Tensor:
    _check(x, g, word_offsets, values=True, op="aa::guide_add")
    return kernels.forward(x, g, word_offsets)


@guide_add.register_fake
def _(x, g, word_offsets):
    _check(x, g, word_offsets, values=False, op="aa::guide_add")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _check_grad(grad: Tensor, word_offsets: Tensor, *, values: bool) -> None:
    op = "aa::guide_add_backward"
    if not isinstance(grad, Tensor) or grad.dtype not in reference._FLOAT or grad.dim() != 2:
        raise ValueError(f"{op}: grad must be a 2-D [T, d] float tensor, got "
                         f"{getattr(grad, 'dtype', type(grad).__name__)} "
                         f"{tuple(getattr(grad, 'shape', ()))}")
    check_offsets(word_offsets, grad.shape[0], grad.device,
                  check_values=_values(grad, values), op=op)


@torch.library.custom_op("aa::guide_add_backward", mutates_args=())
def guide_add_backward(grad: Tensor, word_offsets: Tensor) -> Tensor:
    _check_grad(grad, word_offsets, values=True)
    return kernels.backward(grad, word_offsets)


@guide_add_backward.register_fake
def _(grad, word_offsets):
    _check_grad(grad, word_offsets, values=False)
    return grad.new_empty(word_offsets.shape[0] - 1, grad.shape[1])


def _setup_context(ctx, inputs, output):
    _, _, word_offsets = inputs
    ctx.save_for_backward(word_offsets)


def _backward(ctx, grad):
    (word_offsets,) = ctx.saved_tensors
    dg = None
    if ctx.needs_input_grad[1]:
        dg = torch.ops.aa.guide_add_backward(grad.contiguous(), word_offsets)
    return (grad if ctx.needs_input_grad[0] else None), dg, None


guide_add.register_autograd(_backward, setup_context=_setup_context)


# -- aa::guide_add_rms_norm ------------------------------------------------------------------

def _check_norm(x, g, word_offsets, weight, eps, out_dtype, *, values: bool, op: str) -> None:
    _check(x, g, word_offsets, values=values, op=op)
    reference.check_norm(x, weight, eps, out_dtype, op=op)


@torch.library.custom_op("aa::guide_add_rms_norm", mutates_args=())
def guide_add_rms_norm(x: Tensor, g: Tensor, word_offsets: Tensor, weight: Tensor | None,
                       eps: float, out_dtype: torch.dtype | None = None
                       ) -> tuple[Tensor, Tensor]:
    _check_norm(x, g, word_offsets, weight, eps, out_dtype, values=True,
                op="aa::guide_add_rms_norm")
    return kernels.norm_forward(x, g, word_offsets, weight, eps, out_dtype)


@guide_add_rms_norm.register_fake
def _(x, g, word_offsets, weight, eps, out_dtype=None):
    _check_norm(x, g, word_offsets, weight, eps, out_dtype, values=False,
                op="aa::guide_add_rms_norm")
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, torch.empty_like(y, dtype=out_dtype or x.dtype)


def _check_norm_grads(grad_y, grad_normed, y, weight, word_offsets, eps, *, values: bool):
    op = "aa::guide_add_rms_norm_backward"
    if not isinstance(y, Tensor) or y.dtype not in reference._FLOAT or y.dim() != 2:
        raise ValueError(f"{op}: y must be the forward's 2-D [T, d] float output, got "
                         f"{getattr(y, 'dtype', type(y).__name__)}")
    for name, t in (("grad_y", grad_y), ("grad_normed", grad_normed)):
        if t is None:
            continue
        if t.shape != y.shape or t.device != y.device or t.dtype not in reference._FLOAT:
            raise ValueError(f"{op}: {name} must be a float tensor of y's shape "
                             f"{tuple(y.shape)} on {y.device}, got {tuple(t.shape)} "
                             f"{t.dtype} on {t.device}")
    if grad_y is not None and grad_y.dtype != y.dtype:
        raise ValueError(f"{op}: grad_y must have y's dtype {y.dtype}, got {grad_y.dtype}")
    reference.check_norm(y, weight, eps, None, op=op)
    check_offsets(word_offsets, y.shape[0], y.device, check_values=_values(y, values), op=op)


@torch.library.custom_op("aa::guide_add_rms_norm_backward", mutates_args=())
def guide_add_rms_norm_backward(grad_y: Tensor | None, grad_normed: Tensor | None, y: Tensor,
                                weight: Tensor | None, word_offsets: Tensor, eps: float
                                ) -> tuple[Tensor, Tensor, Tensor]:
    _check_norm_grads(grad_y, grad_normed, y, weight, word_offsets, eps, values=True)
    dx, dg, dw = kernels.norm_backward(grad_y, grad_normed, y, weight, word_offsets, eps)
    return dx, dg, (dw if dw is not None else y.new_empty(0))


@guide_add_rms_norm_backward.register_fake
def _(grad_y, grad_normed, y, weight, word_offsets, eps):
    _check_norm_grads(grad_y, grad_normed, y, weight, word_offsets, eps, values=False)
    dw = weight.new_empty(weight.shape) if weight is not None else y.new_empty(0)
    return (torch.empty_like(y, memory_format=torch.contiguous_format),
            y.new_empty(word_offsets.shape[0] - 1, y.shape[1]), dw)


def _norm_setup_context(ctx, inputs, output):
    _, _, word_offsets, weight, eps, _ = inputs
    y, _ = output
    ctx.save_for_backward(y, weight, word_offsets)
    ctx.eps = eps


def _norm_backward(ctx, grad_y, grad_normed):
    y, weight, word_offsets = ctx.saved_tensors
    need = ctx.needs_input_grad
    if not (need[0] or need[1] or need[3]):
        return None, None, None, None, None, None
    dx, dg, dw = torch.ops.aa.guide_add_rms_norm_backward(
        None if grad_y is None else grad_y.contiguous(),
        None if grad_normed is None else grad_normed.contiguous(),
        y, weight, word_offsets, ctx.eps)
    return ((dx if need[0] else None), (dg if need[1] else None), None,
            (dw if weight is not None and need[3] else None), None, None)


guide_add_rms_norm.register_autograd(_norm_backward, setup_context=_norm_setup_context)


# -- registry --------------------------------------------------------------------------------

def _offsets(lengths, device, dtype=torch.int64):
    o = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    o[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return o.to(dtype).to(device), int(o[-1])


def _samples(device: str):
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(grad)

    off, t = _offsets([3, 1, 0, 9], device)  # an empty word, a word longer than a tile
    yield (randn(t, 33, grad=True), randn(4, 33, grad=True), off), {}
    off, t = _offsets([2, 5], device, torch.int32)
    yield (randn(t, 16, dtype=torch.bfloat16, grad=True),
           randn(2, 16, dtype=torch.bfloat16, grad=True), off), {}
    off, t = _offsets([], device)
    yield (randn(0, 8, grad=True), randn(0, 8, grad=True), off), {}


def _backward_samples(device: str):
    for (x, _, off), _ in _samples(device):
        yield (torch.randn(x.shape, dtype=x.dtype).to(device), off), {}


def _norm_samples(device: str):
    g = torch.Generator().manual_seed(1)

    def randn(*shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(grad)

    off, t = _offsets([3, 1, 0, 9], device)
    yield (randn(t, 33, grad=True), randn(4, 33, grad=True), off, randn(33, grad=True),
           1e-6), {}
    off, t = _offsets([2, 5], device, torch.int32)
    bf = torch.bfloat16
    yield (randn(t, 16, dtype=bf, grad=True), randn(2, 16, dtype=bf, grad=True), off,
           randn(16, grad=True), 1e-5), {"out_dtype": torch.float32}
    off, t = _offsets([4], device)
    yield (randn(t, 8, grad=True), randn(1, 8, grad=True), off, None, 1e-6), {}
    off, t = _offsets([], device)
    yield (randn(0, 8, grad=True), randn(0, 8, grad=True), off, randn(8, grad=True), 1e-6), {}


def _norm_backward_samples(device: str):
    for (x, g, off, w, eps), kwargs in _norm_samples(device):
        y, normed = kernels.norm_forward(x.detach(), g.detach(), off,
                                         None if w is None else w.detach(), eps,
                                         kwargs.get("out_dtype"))
        gy = torch.randn(y.shape, dtype=y.dtype).to(device)
        gn = torch.randn(normed.shape, dtype=normed.dtype).to(device)
        wd = None if w is None else w.detach()
        yield (gy, gn, y, wd, off, eps), {}
        yield (None, gn, y, wd, off, eps), {}


_KERNELS = {
    "cpu": "aa_compile.kernels.guide_add.cpu",
    "cuda": "aa_compile.kernels.guide_add.triton_kernel",
    "reference": "aa_compile.kernels.guide_add.reference",
}

for _name, _op, _samp, _decomp in (
    ("aa::guide_add", torch.ops.aa.guide_add, _samples, None),
    ("aa::guide_add_backward", torch.ops.aa.guide_add_backward, _backward_samples, None),
    # (one table for the fused op and its backward)
    ("aa::guide_add_rms_norm", torch.ops.aa.guide_add_rms_norm, _norm_samples,
     kernels.cpu.inductor_decompositions),
    ("aa::guide_add_rms_norm_backward", torch.ops.aa.guide_add_rms_norm_backward,
     _norm_backward_samples, None),
):
    register(OpEntry(name=_name, op=_op, kernels=_KERNELS, samples=_samp,
                     decompositions=_decomp))
