"""`aa::sae_decode`: sparse TopK SAE decode as an embedding bag over decoder rows, fwd + bwd.

    aa::sae_decode(Tensor weight, Tensor indices, Tensor values) -> Tensor
    aa::sae_decode_backward(Tensor grad, Tensor weight, Tensor indices, Tensor values,
                            bool need_weight_grad, bool need_values_grad) -> (Tensor, Tensor)

``out[n] = sum_j values[n, j] * weight[indices[n, j]]`` for decoder rows ``weight [L, d]`` and
the TopK latents ``(values, indices) [N, k]`` (no decoder bias: the caller adds it). The dense
``[N, L]`` latents and their gradient never exist. Numerics and valid input:
``kernels/sae_decode/reference.py``; kernels: the trigram-bag CPU and Triton kernels
(``kernels/sae_decode/cpu.py``, ``triton_kernel.py``); float64 on CUDA runs the CPU module's
ATen path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from aa_compile.kernels.sae_decode import cpu, reference

from .registry import (TRAINING_ONLY, register_kernels, register_onnx, register_samples,
                       triton_kernel)

OP = "aa::sae_decode"
_TRITON = "aa_compile.kernels.sae_decode.triton_kernel"


def check(weight: Tensor, indices: Tensor, values: Tensor) -> None:
    """Argument checks before any kernel (index values read on CPU only: no device sync)."""
    reference.check_inputs(weight, indices, values, check_values=weight.device.type == "cpu",
                           op=OP)


@torch.library.custom_op("aa::sae_decode", mutates_args=())
def sae_decode(weight: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    check(weight, indices, values)
    return cpu.sae_decode_fwd(weight, indices, values)


@sae_decode.register_fake
def _(weight, indices, values):
    reference.check_inputs(weight, indices, values, check_values=False, op=OP)
    return weight.new_empty(indices.shape[0], weight.shape[1])


def check_backward(grad: Tensor, weight: Tensor, indices: Tensor, values: Tensor,
                   need_weight_grad: bool, need_values_grad: bool) -> None:
    op = "aa::sae_decode_backward"
    reference.check_inputs(weight, indices, values, check_values=weight.device.type == "cpu",
                           op=op)
    shape = (indices.shape[0], weight.shape[1])
    if tuple(grad.shape) != shape or grad.dtype != weight.dtype or grad.device != weight.device:
        raise ValueError(f"{op}: grad must be {shape} {weight.dtype} on {weight.device}, got "
                         f"{tuple(grad.shape)} {grad.dtype} on {grad.device}")


def _or_empty(weight: Tensor, dw: Tensor | None, dv: Tensor | None) -> tuple[Tensor, Tensor]:
    return (dw if dw is not None else weight.new_empty(0),
            dv if dv is not None else weight.new_empty(0))


@torch.library.custom_op("aa::sae_decode_backward", mutates_args=())
def sae_decode_backward(grad: Tensor, weight: Tensor, indices: Tensor, values: Tensor,
                        need_weight_grad: bool, need_values_grad: bool
                        ) -> tuple[Tensor, Tensor]:
    check_backward(grad, weight, indices, values, need_weight_grad, need_values_grad)
    return _or_empty(weight, *cpu.sae_decode_bwd(grad, weight, indices, values,
                                                 need_weight_grad, need_values_grad))


@sae_decode_backward.register_fake
def _(grad, weight, indices, values, need_weight_grad, need_values_grad):
    reference.check_inputs(weight, indices, values, check_values=False,
                           op="aa::sae_decode_backward")
    return (weight.new_empty(weight.shape) if need_weight_grad else weight.new_empty(0),
            weight.new_empty(values.shape) if need_values_grad else weight.new_empty(0))


def _cpu_forward(weight, indices, values):
    return cpu.sae_decode_fwd(weight, indices, values)


def _cpu_backward(grad, weight, indices, values, need_weight_grad, need_values_grad):
    return _or_empty(weight, *cpu.sae_decode_bwd(grad, weight, indices, values,
                                                 need_weight_grad, need_values_grad))


_triton_forward = triton_kernel(_TRITON, "sae_decode_fwd", fallback=cpu.sae_decode_fwd)
_triton_backward = triton_kernel(_TRITON, "sae_decode_bwd", fallback=cpu.sae_decode_bwd)


def _cuda_forward(weight, indices, values):
    fn = cpu.sae_decode_fwd if weight.dtype == torch.float64 else _triton_forward
    return fn(weight, indices, values)


def _cuda_backward(grad, weight, indices, values, need_weight_grad, need_values_grad):
    fn = cpu.sae_decode_bwd if weight.dtype == torch.float64 else _triton_backward
    return _or_empty(weight, *fn(grad, weight, indices, values, need_weight_grad,
                                 need_values_grad))


register_kernels(sae_decode, check=check, cpu=_cpu_forward, cuda=_cuda_forward)
register_kernels(sae_decode_backward, check=check_backward, cpu=_cpu_backward,
                 cuda=_cuda_backward)


def _setup_context(ctx, inputs, output):
    weight, indices, values = inputs
    ctx.save_for_backward(weight, indices, values)


def _backward(ctx, grad):
    weight, indices, values = ctx.saved_tensors
    need_w, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if not (need_w or need_v):
        return None, None, None
    dw, dv = torch.ops.aa.sae_decode_backward(grad.contiguous(), weight, indices, values,
                                              need_w, need_v)
    return (dw if need_w else None), None, (dv if need_v else None)


sae_decode.register_autograd(_backward, setup_context=_setup_context)


def _samples(device: str):
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(grad)

    def idx(n, k, latents, dtype=torch.int64):
        return torch.randint(0, latents, (n, k), generator=g).to(dtype).to(device)

    # odd width, a repeated latent in a row
    i = idx(5, 3, 11)
    i[0, 1] = i[0, 0]
    yield (randn(11, 7, grad=True), i, randn(5, 3, grad=True)), {}
    # int32 indices, values without gradient
    yield (randn(20, 16, grad=True), idx(4, 6, 20, torch.int32), randn(4, 6)), {}
    # bfloat16
    yield (randn(9, 33, dtype=torch.bfloat16, grad=True), idx(3, 2, 9),
           randn(3, 2, dtype=torch.bfloat16, grad=True)), {}
    # no tokens, and k = 0
    yield (randn(6, 5, grad=True), idx(0, 4, 6), randn(0, 4, grad=True)), {}
    yield (randn(6, 5, grad=True), idx(3, 0, 6), randn(3, 0, grad=True)), {}


def _backward_samples(device: str):
    for args, _ in _samples(device):
        weight, indices, values = (a.detach() for a in args)
        grad = torch.randn(indices.shape[0], weight.shape[1], dtype=weight.dtype).to(device)
        yield (grad, weight, indices, values, True, True), {}
        yield (grad, weight, indices, values, False, True), {}


register_samples(sae_decode, _samples)
register_samples(sae_decode_backward, _backward_samples)

register_onnx(sae_decode, "aa_compile.kernels.sae_decode.onnx_translation:sae_decode")
register_onnx(sae_decode_backward, reason=TRAINING_ONLY)
