"""`aa::rms_norm`: RMSNorm with float32 accumulation and one rounding, forward and backward.

    aa::rms_norm(Tensor x, Tensor? weight, float eps, ScalarType? out_dtype=None) -> Tensor
    aa::rms_norm_backward(Tensor grad, Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)

Numerics: ``aa_compile.kernels.rms_norm.reference``. The backward recomputes ``rstd`` from
``x`` (one extra reduction over a row the backward reads anyway) instead of saving it. When
``weight`` is None the backward returns an empty tensor in place of ``dweight``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from aa_compile.kernels import rms_norm as kernels

from .registry import OpEntry, register

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(x: Tensor, weight: Tensor | None) -> None:
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


@torch.library.custom_op("aa::rms_norm", mutates_args=())
def rms_norm(
    x: Tensor, weight: Tensor | None, eps: float, out_dtype: torch.dtype | None = None
) -> Tensor:
    _check(x, weight)
    return kernels.forward(x, weight, eps, out_dtype)


@rms_norm.register_fake
def _(x, weight, eps, out_dtype=None):
    _check(x, weight)
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype)


@torch.library.custom_op("aa::rms_norm_backward", mutates_args=())
def rms_norm_backward(
    grad: Tensor, x: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    if grad.shape != x.shape:
        raise ValueError(
            f"aa::rms_norm_backward: grad shape {tuple(grad.shape)} != x shape {tuple(x.shape)}"
        )
    dx, dw = kernels.backward(grad, x, weight, eps)
    return dx, (dw if dw is not None else x.new_empty(0))


@rms_norm_backward.register_fake
def _(grad, x, weight, eps):
    dw = weight.new_empty(weight.shape) if weight is not None else x.new_empty(0)
    return x.new_empty(x.shape), dw


def _setup_context(ctx, inputs, output):
    x, weight, eps, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dx, dw = torch.ops.aa.rms_norm_backward(grad.contiguous(), x, weight, ctx.eps)
    return dx, (dw if weight is not None else None), None, None


rms_norm.register_autograd(_backward, setup_context=_setup_context)


def _samples(device: str):
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32, grad=False):
        t = torch.randn(*shape, generator=g, dtype=dtype).to(device)
        return t.requires_grad_(grad)

    for dtype in (torch.float32, torch.bfloat16):
        yield (randn(3, 7, 33, dtype=dtype, grad=True), randn(33, dtype=dtype, grad=True), 1e-6), {}
    yield (randn(5, 64, grad=True), None, 1e-5), {}
    yield (randn(4, 16, dtype=torch.bfloat16), randn(16), 1e-6), {"out_dtype": torch.float32}


_KERNELS = {
    "cpu": "aa_compile.kernels.rms_norm.cpu",
    "cuda": "aa_compile.kernels.rms_norm.triton_kernel",
    "reference": "aa_compile.kernels.rms_norm.reference",
}

register(
    OpEntry(
        name="aa::rms_norm",
        op=torch.ops.aa.rms_norm,
        kernels=_KERNELS,
        samples=_samples,
        decompositions=kernels.cpu.inductor_decompositions,
    )
)


def _backward_samples(device: str):
    for (x, w, eps), _ in _samples(device):
        x = x.detach()
        w = w.detach() if w is not None else None
        yield (torch.randn_like(x), x, w, eps), {}


register(
    OpEntry(
        name="aa::rms_norm_backward",
        op=torch.ops.aa.rms_norm_backward,
        kernels=_KERNELS,
        samples=_backward_samples,
    )
)
