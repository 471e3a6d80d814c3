"""`aa::int8_linear`: int8 weight-only linear with per-output-channel scales.

    aa::int8_linear(Tensor x, Tensor w_int8, Tensor scales, Tensor? bias) -> Tensor

``x``: ``[..., K]`` float16/bfloat16/float32/float64; ``w_int8``: ``[N, K]`` int8; ``scales``:
``[N]`` float; ``bias``: ``[N]`` float or None. Returns ``[..., N]`` in ``x.dtype``. Numerics:
``kernels/int8_linear/reference.py`` (float64 matmul with the dequantised weight). Kernels: CPU
``kernels/int8_linear/cpu.py``, CUDA ``kernels/int8_linear/triton_kernel.py`` (float64 there runs
the reference, as do other devices).

Autograd: for ``x`` and ``bias`` only (``dx = (grad * scales) @ w_int8``, one GEMM in the
gradient's dtype; ``dbias = sum(grad)``): cheap, and enough to backpropagate *through* a
quantised layer (e.g. to heal other, unquantised layers). The int8 weight and its scales are
frozen (no gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor

from aa_compile.kernels.int8_linear import cpu, reference

from .registry import register_kernels, register_onnx, register_samples, triton_kernel

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON = "aa_compile.kernels.int8_linear.triton_kernel"


def check(x: Tensor, w_int8: Tensor, scales: Tensor, bias: Tensor | None) -> None:
    if x.dtype not in _FLOAT:
        raise ValueError(f"aa::int8_linear: x must be a float tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("aa::int8_linear: x must have at least one dimension [..., K]")
    if w_int8.dtype != torch.int8 or w_int8.dim() != 2:
        raise ValueError(
            f"aa::int8_linear: w_int8 must be a 2-D int8 tensor [N, K], got {w_int8.dtype} "
            f"of shape {tuple(w_int8.shape)} (quantise with kernels.int8_linear.reference."
            "quantize_absmax)"
        )
    if w_int8.shape[1] != x.shape[-1]:
        raise ValueError(
            f"aa::int8_linear: x's last dimension {x.shape[-1]} != w_int8.shape[1] "
            f"{w_int8.shape[1]}"
        )
    n = w_int8.shape[0]
    if scales.dtype not in _FLOAT or tuple(scales.shape) != (n,):
        raise ValueError(
            f"aa::int8_linear: scales must be a float tensor of shape ({n},), got {scales.dtype} "
            f"of shape {tuple(scales.shape)}"
        )
    if bias is not None and (bias.dtype not in _FLOAT or tuple(bias.shape) != (n,)):
        raise ValueError(
            f"aa::int8_linear: bias must be a float tensor of shape ({n},), got {bias.dtype} "
            f"of shape {tuple(bias.shape)}"
        )
    for name, t in (("w_int8", w_int8), ("scales", scales), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"aa::int8_linear: {name} is on {t.device}, x on {x.device}")


@torch.library.custom_op("aa::int8_linear", mutates_args=())
def int8_linear(x: Tensor, w_int8: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    check(x, w_int8, scales, bias)
    return reference.int8_linear(x, w_int8, scales, bias)


@int8_linear.register_fake
def _(x, w_int8, scales, bias):
    check(x, w_int8, scales, bias)
    return x.new_empty((*x.shape[:-1], w_int8.shape[0]))


_triton = triton_kernel(_TRITON, "int8_linear", fallback=reference.int8_linear)


def _cuda(x, w_int8, scales, bias):
    """Triton for 16/32-bit floats; float64 runs the reference."""
    fn = reference.int8_linear if x.dtype == torch.float64 else _triton
    return fn(x, w_int8, scales, bias)


register_kernels(int8_linear, check=check, cpu=cpu.int8_linear, cuda=_cuda)


def _setup_context(ctx, inputs, output):
    x, w_int8, scales, bias = inputs
    ctx.save_for_backward(w_int8, scales)
    ctx.x_shape = x.shape
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad):
    w_int8, scales = ctx.saved_tensors
    g2 = grad.reshape(-1, w_int8.shape[0])
    dx = (g2 * scales.to(grad.dtype)) @ w_int8.to(grad.dtype)
    dbias = g2.sum(0).to(ctx.bias_dtype) if ctx.has_bias else None
    return dx.reshape(ctx.x_shape), None, None, dbias


int8_linear.register_autograd(_backward, setup_context=_setup_context)


def _samples(device: str):
    g = torch.Generator().manual_seed(0)

    def case(shape, n, dtype=torch.float32, bias=True, grad=False):
        k = shape[-1]
        x = torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(device)
        s = (torch.rand(n, generator=g) / 100 + 1e-3).to(device)
        b = torch.randn(n, generator=g).to(device=device, dtype=dtype) if bias else None
        if b is not None:
            b.requires_grad_(grad)
        return (x, w, s, b), {}

    yield case((3, 5, 33), 17, grad=True)
    yield case((1, 64), 48, bias=False, grad=True)
    yield case((4, 16), 8, dtype=torch.bfloat16)
    yield case((2, 7), 3, dtype=torch.float64, grad=True)


register_samples(int8_linear, _samples)

register_onnx(int8_linear, "aa_compile.kernels.int8_linear.onnx_translation:int8_linear")
