"""`aa::rms_norm`: RMSNorm with float32 accumulation and one rounding, forward and backward.

    aa::rms_norm(Tensor x, Tensor? weight, float eps, ScalarType? out_dtype=None) -> Tensor
    aa::rms_norm_backward(Tensor grad, Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)

Numerics: ``kernels/rms_norm/reference.py``. Kernels: CPU ``kernels/rms_norm/cpu.py`` (eager;
under inductor the decompositions below let it generate fused loops), CUDA
``kernels/rms_norm/triton_kernel.py``; other devices run the reference. The backward
recomputes ``rstd`` from ``x`` instead of saving it; without ``weight`` it returns an empty
``dweight``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from aa_compile.kernels.rms_norm import cpu, reference

from .registry import (TRAINING_ONLY, register_decompositions, register_kernels, register_onnx,
                       register_samples,
                       triton_kernel)

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON = "aa_compile.kernels.rms_norm.triton_kernel"


def check(x: Tensor, weight: Tensor | None, eps: float, out_dtype=None) -> None:
    if x.dtype not in _FLOAT:
        raise ValueError(f"aa::rms_norm: x must be float16/bfloat16/float32/float64, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"aa::rms_norm: x must have a non-empty last dimension, got {tuple(x.shape)}")
    if weight is not None:
        if weight.dtype not in _FLOAT:
            raise ValueError(f"aa::rms_norm: weight must be a float tensor, got {weight.dtype}")
        if weight.shape != (x.shape[-1],):
            raise ValueError(
                f"aa::rms_norm: weight must have shape ({x.shape[-1]},) to match x's last "
                f"dimension, got {tuple(weight.shape)}"
            )
    _check_eps(eps, "aa::rms_norm")
    if out_dtype is not None and out_dtype not in _FLOAT:  # an int dtype would truncate
        raise ValueError(f"aa::rms_norm: out_dtype must be a float dtype "
                         f"(float16/bfloat16/float32/float64) or None, got {out_dtype}")


def _check_eps(eps: float, op: str) -> None:
    """``eps < 0`` or NaN makes ``rsqrt`` NaN for small rows (NaN: every row)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) \
            or eps < 0:
        raise ValueError(f"{op}: eps must be a finite float >= 0, got {eps!r}")


def check_backward(grad: Tensor, x: Tensor, weight: Tensor | None, eps: float) -> None:
    if grad.shape != x.shape:
        raise ValueError(
            f"aa::rms_norm_backward: grad shape {tuple(grad.shape)} != x shape {tuple(x.shape)}"
        )
    _check_eps(eps, "aa::rms_norm_backward")


def _dweight_or_empty(kernel: Callable) -> Callable:
    """The backward kernels return ``dweight`` None without a weight; the op an empty tensor
    (a custom op's outputs are tensors)."""

    @functools.wraps(kernel)
    def run(grad, x, weight, eps):
        dx, dw = kernel(grad, x, weight, eps)
        return dx, (dw if dw is not None else x.new_empty(0))

    return run


_backward_reference = _dweight_or_empty(reference.rms_norm_backward)


@torch.library.custom_op("aa::rms_norm", mutates_args=())
def rms_norm(
    x: Tensor, weight: Tensor | None, eps: float, out_dtype: torch.dtype | None = None
) -> Tensor:
    check(x, weight, eps, out_dtype)
    return reference.rms_norm(x, weight, eps, out_dtype)


@rms_norm.register_fake
def _(x, weight, eps, out_dtype=None):
    check(x, weight, eps, out_dtype)
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype)


@torch.library.custom_op("aa::rms_norm_backward", mutates_args=())
def rms_norm_backward(
    grad: Tensor, x: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    check_backward(grad, x, weight, eps)
    return _backward_reference(grad, x, weight, eps)


@rms_norm_backward.register_fake
def _(grad, x, weight, eps):
    dw = weight.new_empty(weight.shape) if weight is not None else x.new_empty(0)
    return x.new_empty(x.shape), dw


_cpu_backward = _dweight_or_empty(cpu.rms_norm_bwd)
_triton_forward = triton_kernel(_TRITON, "rms_norm_fwd", fallback=reference.rms_norm)
_triton_backward = _dweight_or_empty(
    triton_kernel(_TRITON, "rms_norm_bwd", fallback=reference.rms_norm_backward))


def _cuda_forward(x, weight, eps, out_dtype=None):
    """Triton for 16/32-bit floats; float64 runs the reference."""
    fn = reference.rms_norm if x.dtype == torch.float64 else _triton_forward
    return fn(x, weight, eps, out_dtype)


def _cuda_backward(grad, x, weight, eps):
    fn = _backward_reference if x.dtype == torch.float64 else _triton_backward
    return fn(grad, x, weight, eps)


register_kernels(rms_norm, check=check, cpu=cpu.rms_norm_fwd, cuda=_cuda_forward)
register_kernels(rms_norm_backward, check=check_backward, cpu=_cpu_backward, cuda=_cuda_backward)


def _setup_context(ctx, inputs, output):
    x, weight, eps, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dx, dw = torch.ops.aa.rms_norm_backward(grad.contiguous(), x, weight, ctx.eps)
    return dx, (dw if weight is not None else None), None, None


rms_norm.register_autograd(_backward, setup_context=_setup_context)


def _inductor_decompositions() -> dict:
    """On CPU, inductor generates the reference math in place of the opaque op (below
    autograd, so the op's own backward formula is kept) and fuses it with its neighbours; on
    other devices they decline and the device kernel runs."""

    def fwd(x, weight, eps, out_dtype=None):
        if x.device.type != "cpu":
            return NotImplemented
        return reference.rms_norm(x, weight, eps, out_dtype)

    def bwd(grad, x, weight, eps):
        if x.device.type != "cpu":
            return NotImplemented
        return _backward_reference(grad, x, weight, eps)

    return {torch.ops.aa.rms_norm.default: fwd, torch.ops.aa.rms_norm_backward.default: bwd}


register_decompositions(rms_norm, _inductor_decompositions)


def _samples(device: str):
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32, grad=False):
        t = torch.randn(*shape, generator=g, dtype=dtype).to(device)
        return t.requires_grad_(grad)

    for dtype in (torch.float32, torch.bfloat16):
        yield (randn(3, 7, 33, dtype=dtype, grad=True), randn(33, dtype=dtype, grad=True), 1e-6), {}
    yield (randn(5, 64, grad=True), None, 1e-5), {}
    yield (randn(4, 16, dtype=torch.bfloat16), randn(16), 1e-6), {"out_dtype": torch.float32}


def _backward_samples(device: str):
    for (x, w, eps), _ in _samples(device):
        x = x.detach()
        w = w.detach() if w is not None else None
        yield (torch.randn_like(x), x, w, eps), {}


register_samples(rms_norm, _samples)
register_samples(rms_norm_backward, _backward_samples)

register_onnx(rms_norm, "aa_compile.kernels.rms_norm.onnx_translation:rms_norm")
register_onnx(rms_norm_backward, reason=TRAINING_ONLY)
