"""`aa::sae_encode`: TopK SAE encoder (linear → TopK → ReLU or sigmoid) returning the kept
values and their latent indices, with a sparse backward.

    aa::sae_encode(Tensor x, Tensor weight, Tensor bias, Tensor pre_bias, int k,
                   bool sigmoid=False) -> (Tensor values, Tensor indices)
    aa::sae_encode_backward(Tensor grad, Tensor x, Tensor weight, Tensor pre_bias,
                            Tensor values, Tensor indices, bool sigmoid)
        -> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dpre_bias)

``x`` is the SAE's normalised input ``[N, d]``, ``weight`` the encoder ``[L, d]``, ``bias`` the
latent bias, ``pre_bias`` the input bias; ``values [N, k]`` in x's dtype, ``indices [N, k]``
int64, TopK in descending order, equal pre-activations by ascending latent index. On CUDA the
forward is one fused Triton kernel (linear, TopK and activation; no ``[N, L]`` tensor) for
16/32-bit floats and ``k <= 128``, else ``addmm`` + TopK. The backward touches only the k kept
entries per token (the dense ``[N, L]`` latent gradient never exists). Numerics and valid
input: ``kernels/sae_encode/reference.py``; kernels in ``kernels/sae_encode/``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from aa_compile.kernels.sae_encode import cpu, reference

from .registry import (TRAINING_ONLY, register_kernels, register_onnx, register_samples,
                       triton_kernel)

OP = "aa::sae_encode"
_TRITON = "aa_compile.kernels.sae_encode.triton_kernel"


def check(x: Tensor, weight: Tensor, bias: Tensor, pre_bias: Tensor, k: int,
          sigmoid: bool = False) -> None:
    reference.check_inputs(x, weight, bias, pre_bias, k, op=OP)


@torch.library.custom_op("aa::sae_encode", mutates_args=())
def sae_encode(x: Tensor, weight: Tensor, bias: Tensor, pre_bias: Tensor, k: int,
               sigmoid: bool = False) -> tuple[Tensor, Tensor]:
    check(x, weight, bias, pre_bias, k)
    return cpu.sae_encode_fwd(x, weight, bias, pre_bias, k, sigmoid)


@sae_encode.register_fake
def _(x, weight, bias, pre_bias, k, sigmoid=False):
    check(x, weight, bias, pre_bias, k)
    return (x.new_empty(x.shape[0], k),
            x.new_empty(x.shape[0], k, dtype=torch.int64))


def check_backward(grad, x, weight, pre_bias, values, indices, sigmoid) -> None:
    op = "aa::sae_encode_backward"
    if indices.dim() != 2 or indices.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: indices must be [tokens={x.shape[0]}, k], got "
                         f"{tuple(indices.shape)}")
    reference.check_inputs(x, weight, weight.new_empty(weight.shape[0]), pre_bias,
                           indices.shape[1], op=op)
    shape = (x.shape[0], indices.shape[1])
    for name, t in (("grad", grad), ("values", values)):
        if tuple(t.shape) != shape or t.dtype != weight.dtype:
            raise ValueError(f"{op}: {name} must be {shape} {weight.dtype}, got "
                             f"{tuple(t.shape)} {t.dtype}")
    if indices.dtype != torch.int64:
        raise ValueError(f"{op}: indices must be int64, got {indices.dtype}")


@torch.library.custom_op("aa::sae_encode_backward", mutates_args=())
def sae_encode_backward(grad: Tensor, x: Tensor, weight: Tensor, pre_bias: Tensor,
                        values: Tensor, indices: Tensor, sigmoid: bool
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_backward(grad, x, weight, pre_bias, values, indices, sigmoid)
    return cpu.sae_encode_bwd(grad, x, weight, pre_bias, values, indices, sigmoid)


@sae_encode_backward.register_fake
def _(grad, x, weight, pre_bias, values, indices, sigmoid):
    check_backward(grad, x, weight, pre_bias, values, indices, sigmoid)
    # contiguous, as the kernels return them (a transposed weight's gradient is not)
    return (x.new_empty(x.shape), weight.new_empty(weight.shape),
            weight.new_empty(weight.shape[0]), pre_bias.new_empty(pre_bias.shape))


def _cpu_forward(x, weight, bias, pre_bias, k, sigmoid=False):
    return cpu.sae_encode_fwd(x, weight, bias, pre_bias, k, sigmoid)


def _cpu_backward(grad, x, weight, pre_bias, values, indices, sigmoid):
    return cpu.sae_encode_bwd(grad, x, weight, pre_bias, values, indices, sigmoid)


# the fused Triton encoder; it sends float64 and k > 128 to addmm + TopK itself
_triton_forward = triton_kernel(_TRITON, "sae_encode_fwd", fallback=cpu.sae_encode_fwd)
_triton_backward = triton_kernel(_TRITON, "sae_encode_bwd", fallback=cpu.sae_encode_bwd)


def _cuda_backward(grad, x, weight, pre_bias, values, indices, sigmoid):
    """Triton bag kernels for 16/32-bit floats; float64 runs the ATen path."""
    fn = cpu.sae_encode_bwd if weight.dtype == torch.float64 else _triton_backward
    return fn(grad, x, weight, pre_bias, values, indices, sigmoid)


register_kernels(sae_encode, check=check, cpu=_cpu_forward, cuda=_triton_forward)
register_kernels(sae_encode_backward, check=check_backward, cpu=_cpu_backward,
                 cuda=_cuda_backward)


def _setup_context(ctx, inputs, output):
    x, weight, bias, pre_bias, k, sigmoid = inputs
    values, indices = output
    ctx.save_for_backward(x, weight, pre_bias, values, indices)
    ctx.sigmoid = sigmoid
    ctx.mark_non_differentiable(indices)


def _backward(ctx, grad_values, grad_indices):
    x, weight, pre_bias, values, indices = ctx.saved_tensors
    if not any(ctx.needs_input_grad[:4]):
        return None, None, None, None, None, None
    dx, dw, db, dpb = torch.ops.aa.sae_encode_backward(grad_values.contiguous(), x, weight,
                                                       pre_bias, values, indices, ctx.sigmoid)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, dw if need[1] else None, db if need[2] else None,
            dpb if need[3] else None, None, None)


sae_encode.register_autograd(_backward, setup_context=_setup_context)


def _samples(device: str):
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32, grad=True):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(grad)

    # relu, odd sizes
    yield (randn(5, 7), randn(13, 7), randn(13), randn(7), 3), {}
    # sigmoid, input without gradient, k = n_latents
    yield (randn(4, 8, grad=False), randn(6, 8), randn(6), randn(8), 6), {"sigmoid": True}
    # the encoder stored as W_enc [d, L] (sae-lens), read through its transpose
    yield (randn(5, 6), randn(6, 11).t(), randn(11), randn(6), 4), {}
    # no tokens; k = 0
    yield (randn(0, 5), randn(9, 5), randn(9), randn(5), 2), {}
    yield (randn(3, 5), randn(9, 5), randn(9), randn(5), 0), {"sigmoid": True}


def _backward_samples(device: str):
    for args, kwargs in _samples(device):
        x, weight, bias, pre_bias = (a.detach() for a in args[:4])
        sigmoid = kwargs.get("sigmoid", False)
        values, indices = reference.sae_encode(x, weight, bias, pre_bias, args[4], sigmoid)
        grad = torch.randn(values.shape, dtype=values.dtype).to(device)
        yield (grad, x, weight, pre_bias, values, indices, sigmoid), {}


register_samples(sae_encode, _samples)
register_samples(sae_encode_backward, _backward_samples)

register_onnx(sae_encode, "aa_compile.kernels.sae_encode.onnx_translation:sae_encode")
register_onnx(sae_encode_backward, reason=TRAINING_ONLY)
