"""`aa::guide_add` and `aa::guide_add_rms_norm`: HAT's decoder guide vectors (each word's vector
added to each of the word's bytes), plain and fused with the next RMSNorm, forward and backward.

    aa::guide_add(Tensor x, Tensor g, Tensor word_offsets) -> Tensor
    aa::guide_add_backward(Tensor grad, Tensor word_offsets) -> Tensor dg
    aa::guide_add_rms_norm(Tensor x, Tensor g, Tensor word_offsets, Tensor? weight, float eps,
                           ScalarType? out_dtype=None) -> (Tensor y, Tensor normed)
    aa::guide_add_rms_norm_backward(Tensor? grad_y, Tensor? grad_normed, Tensor y,
                                    Tensor? weight, Tensor word_offsets, float eps)
        -> (Tensor dx, Tensor dg, Tensor dweight)

Numerics: ``kernels/guide_add/reference.py``. Kernels: CPU ``kernels/guide_add/cpu.py`` (device
generic: also the ops' body, for CUDA float64 and other devices; under inductor on CPU the
decompositions below split the fused op into ``aa::guide_add`` plus RMSNorm math that inductor
generates), CUDA ``kernels/guide_add/triton_kernel.py``. The pass ``hat_guide_add``
(``passes/hat/guide_add.py``) puts the ops into HAT decoders; design notes: ``docs/hat.md``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
from torch import Tensor

from aa_compile.kernels.guide_add import cpu, reference
from aa_compile.kernels.guide_add.reference import FLOAT_DTYPES
from aa_compile.kernels.rms_norm import reference as rms_reference
from aa_compile.kernels.word_pool.reference import check_offsets

from .registry import (TRAINING_ONLY, register_decompositions, register_kernels, register_onnx,
                       register_samples,
                       triton_kernel)

#: Check ``word_offsets`` values off the CPU too (a device sync per call); CPU always checks.
CHECK_OFFSETS: bool = os.environ.get("AA_GUIDE_ADD_CHECK_OFFSETS", "0").strip().lower() \
    not in ("", "0", "false", "no", "off")

_TRITON = "aa_compile.kernels.guide_add.triton_kernel"


def _values(t: Tensor, values: bool) -> bool:
    return values and (t.device.type == "cpu" or CHECK_OFFSETS)


def check(x: Tensor, g: Tensor, word_offsets: Tensor, *, values: bool = True,
          op: str = "aa::guide_add") -> None:
    """``ValueError`` naming the argument; ``values=False`` (the fake impl) reads no data."""
    reference.check_inputs(x, g, word_offsets, check_values=_values(x, values), op=op)


def check_backward(grad: Tensor, word_offsets: Tensor, *, values: bool = True) -> None:
    op = "aa::guide_add_backward"
    if not isinstance(grad, Tensor) or grad.dtype not in FLOAT_DTYPES or grad.dim() != 2:
        raise ValueError(f"{op}: grad must be a 2-D [T, d] float tensor, got "
                         f"{getattr(grad, 'dtype', type(grad).__name__)} "
                         f"{tuple(getattr(grad, 'shape', ()))}")
    check_offsets(word_offsets, grad.shape[0], grad.device,
                  check_values=_values(grad, values), op=op)


def check_norm(x: Tensor, g: Tensor, word_offsets: Tensor, weight: Tensor | None, eps: float,
               out_dtype: torch.dtype | None = None, *, values: bool = True) -> None:
    op = "aa::guide_add_rms_norm"
    check(x, g, word_offsets, values=values, op=op)
    reference.check_norm(x, weight, eps, out_dtype, op=op)


def check_norm_backward(grad_y: Tensor | None, grad_normed: Tensor | None, y: Tensor,
                        weight: Tensor | None, word_offsets: Tensor, eps: float, *,
                        values: bool = True) -> None:
    op = "aa::guide_add_rms_norm_backward"
    if not isinstance(y, Tensor) or y.dtype not in FLOAT_DTYPES or y.dim() != 2:
        raise ValueError(f"{op}: y must be the forward's 2-D [T, d] float output, got "
                         f"{getattr(y, 'dtype', type(y).__name__)}")
    for name, t in (("grad_y", grad_y), ("grad_normed", grad_normed)):
        if t is None:
            continue
        if t.shape != y.shape or t.device != y.device or t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} must be a float tensor of y's shape "
                             f"{tuple(y.shape)} on {y.device}, got {tuple(t.shape)} "
                             f"{t.dtype} on {t.device}")
    if grad_y is not None and grad_y.dtype != y.dtype:
        raise ValueError(f"{op}: grad_y must have y's dtype {y.dtype}, got {grad_y.dtype}")
    reference.check_norm(y, weight, eps, None, op=op)
    check_offsets(word_offsets, y.shape[0], y.device, check_values=_values(y, values), op=op)


def _dweight_or_empty(kernel: Callable) -> Callable:
    """The fused backward kernels return ``dweight`` None without a weight; the op an empty
    tensor (a custom op's outputs are tensors)."""

    @functools.wraps(kernel)
    def run(grad_y, grad_normed, y, weight, word_offsets, eps):
        dx, dg, dw = kernel(grad_y, grad_normed, y, weight, word_offsets, eps)
        return dx, dg, (dw if dw is not None else y.new_empty(0))

    return run


def _cuda(name: str, generic: Callable, dtype_arg: int = 0) -> Callable:
    """The CUDA kernel: the Triton function ``name`` for 16/32-bit floats; float64 (which the
    Triton kernels do not take) and CUDA without Triton run ``generic``, the device-generic
    CPU path. ``dtype_arg``: the argument whose dtype decides."""
    triton = triton_kernel(_TRITON, name, fallback=generic)

    @functools.wraps(triton)
    def run(*args, **kwargs):
        return (generic if args[dtype_arg].dtype == torch.float64 else triton)(*args, **kwargs)

    return run


# -- aa::guide_add ---------------------------------------------------------------------------

@torch.library.custom_op("aa::guide_add", mutates_args=())
def guide_add(x: Tensor, g: Tensor, word_offsets: Tensor) -> Tensor:
    check(x, g, word_offsets)
    return cpu.guide_add_fwd(x, g, word_offsets)


@guide_add.register_fake
def _(x, g, word_offsets):
    check(x, g, word_offsets, values=False)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("aa::guide_add_backward", mutates_args=())
def guide_add_backward(grad: Tensor, word_offsets: Tensor) -> Tensor:
    check_backward(grad, word_offsets)
    return cpu.guide_add_bwd(grad, word_offsets)


@guide_add_backward.register_fake
def _(grad, word_offsets):
    check_backward(grad, word_offsets, values=False)
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

@torch.library.custom_op("aa::guide_add_rms_norm", mutates_args=())
def guide_add_rms_norm(x: Tensor, g: Tensor, word_offsets: Tensor, weight: Tensor | None,
                       eps: float, out_dtype: torch.dtype | None = None
                       ) -> tuple[Tensor, Tensor]:
    check_norm(x, g, word_offsets, weight, eps, out_dtype)
    return cpu.guide_add_rms_norm_fwd(x, g, word_offsets, weight, eps, out_dtype)


@guide_add_rms_norm.register_fake
def _(x, g, word_offsets, weight, eps, out_dtype=None):
    check_norm(x, g, word_offsets, weight, eps, out_dtype, values=False)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, torch.empty_like(y, dtype=out_dtype or x.dtype)


_cpu_norm_backward = _dweight_or_empty(cpu.guide_add_rms_norm_bwd)


@torch.library.custom_op("aa::guide_add_rms_norm_backward", mutates_args=())
def guide_add_rms_norm_backward(grad_y: Tensor | None, grad_normed: Tensor | None, y: Tensor,
                                weight: Tensor | None, word_offsets: Tensor, eps: float
                                ) -> tuple[Tensor, Tensor, Tensor]:
    check_norm_backward(grad_y, grad_normed, y, weight, word_offsets, eps)
    return _cpu_norm_backward(grad_y, grad_normed, y, weight, word_offsets, eps)


@guide_add_rms_norm_backward.register_fake
def _(grad_y, grad_normed, y, weight, word_offsets, eps):
    check_norm_backward(grad_y, grad_normed, y, weight, word_offsets, eps, values=False)
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


# -- kernels and inductor decompositions -----------------------------------------------------

register_kernels(guide_add, check=check, cpu=cpu.guide_add_fwd,
                 cuda=_cuda("guide_add_fwd", cpu.guide_add_fwd))
register_kernels(guide_add_backward, check=check_backward, cpu=cpu.guide_add_bwd,
                 cuda=_cuda("guide_add_bwd", cpu.guide_add_bwd))
register_kernels(guide_add_rms_norm, check=check_norm, cpu=cpu.guide_add_rms_norm_fwd,
                 cuda=_cuda("guide_add_rms_norm_fwd", cpu.guide_add_rms_norm_fwd))
register_kernels(guide_add_rms_norm_backward, check=check_norm_backward, cpu=_cpu_norm_backward,
                 cuda=_dweight_or_empty(_cuda("guide_add_rms_norm_bwd",
                                              cpu.guide_add_rms_norm_bwd, dtype_arg=2)))


def _inductor_decompositions() -> dict:
    """For inductor on CPU (declining elsewhere): the fused op as ``aa::guide_add`` followed by
    the reference RMSNorm, its backward as the RMSNorm backward math plus ``grad_y`` in float32
    followed by ``aa::guide_add_backward`` (the segment sum). Same numerics as the fused
    kernels (``y`` rounded to x's dtype before the norm, one rounding of each output); inductor
    generates the norm and fuses it with its neighbours (below autograd: the op's own backward
    formula is kept)."""

    def fwd(x, g, word_offsets, weight, eps, out_dtype=None):
        if x.device.type != "cpu":
            return NotImplemented
        y = torch.ops.aa.guide_add.default(x, g, word_offsets)
        return y, rms_reference.rms_norm(y, weight, eps, out_dtype or x.dtype)

    def bwd(grad_y, grad_normed, y, weight, word_offsets, eps):
        if y.device.type != "cpu":
            return NotImplemented
        acc = reference.compute_dtype(y.dtype)
        total, dweight = None, None
        if grad_normed is not None:  # (y in acc: the norm's dx stays unrounded)
            total, dweight = rms_reference.rms_norm_backward(grad_normed, y.to(acc), weight, eps)
        elif weight is not None:
            dweight = torch.zeros_like(weight)
        if grad_y is not None:
            total = grad_y.to(acc) if total is None else total + grad_y.to(acc)
        if total is None:
            total = torch.zeros(y.shape, dtype=acc, device=y.device)
        dg = torch.ops.aa.guide_add_backward.default(total, word_offsets).to(y.dtype)
        return total.to(y.dtype), dg, (dweight if dweight is not None else y.new_empty(0))

    return {torch.ops.aa.guide_add_rms_norm.default: fwd,
            torch.ops.aa.guide_add_rms_norm_backward.default: bwd}


register_decompositions(guide_add_rms_norm, _inductor_decompositions)


# -- opcheck samples -------------------------------------------------------------------------

def _offsets(lengths, device, dtype=torch.int64):
    o = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    o[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return o.to(dtype).to(device), int(o[-1])


def _randn_from(seed: int, device: str):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(grad)

    return randn


def _samples(device: str):
    randn = _randn_from(0, device)
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
    randn = _randn_from(1, device)
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
        wd = None if w is None else w.detach()
        y, normed = torch.ops.aa.guide_add_rms_norm(x.detach(), g.detach(), off, wd, eps,
                                                    kwargs.get("out_dtype"))
        gy = torch.randn(y.shape, dtype=y.dtype).to(device)
        gn = torch.randn(normed.shape, dtype=normed.dtype).to(device)
        yield (gy, gn, y, wd, off, eps), {}
        yield (None, gn, y, wd, off, eps), {}


register_samples(guide_add, _samples)
register_samples(guide_add_backward, _backward_samples)
register_samples(guide_add_rms_norm, _norm_samples)
register_samples(guide_add_rms_norm_backward, _norm_backward_samples)

register_onnx(guide_add, "aa_compile.kernels.guide_add.onnx_translation:guide_add")
register_onnx(guide_add_backward, reason=TRAINING_ONLY)
register_onnx(guide_add_rms_norm,
              "aa_compile.kernels.guide_add.onnx_translation:guide_add_rms_norm")
register_onnx(guide_add_rms_norm_backward, reason=TRAINING_ONLY)
