"""`aa::word_pool`: HAT's word pooling, one query per word attending to the word's own bytes
(segment / varlen softmax attention), forward and backward.

    aa::word_pool(Tensor q, Tensor k, Tensor v, Tensor word_offsets, float? scale=None)
        -> Tensor
    aa::word_pool_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor word_offsets,
                           float? scale) -> (Tensor dq, Tensor dk, Tensor dv)

``q [W or 1, H, D]`` (one query per word, or HAT's shared latent query), ``k``/``v [T, Hkv, D]``
over the byte stream itself and CSR ``word_offsets [W + 1]``: nothing is padded, and an empty
word pools to zeros. Numerics: ``kernels/word_pool/reference.py``. Kernels: CPU
``kernels/word_pool/cpu.py`` (segment ops, device generic: also the op's body, for CUDA float64
and other devices), CUDA ``kernels/word_pool/triton_kernel.py``. Design notes: ``docs/hat.md``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from aa_compile.kernels.word_pool import cpu, reference

from .registry import (TRAINING_ONLY, register_kernels, register_onnx, register_samples,
                       triton_kernel)

#: Check ``word_offsets`` values off the CPU too (a device sync per call); CPU always checks.
CHECK_OFFSETS: bool = os.environ.get("AA_WORD_POOL_CHECK_OFFSETS", "0").strip().lower() \
    not in ("", "0", "false", "no", "off")

_TRITON = "aa_compile.kernels.word_pool.triton_kernel"


def check(q: Tensor, k: Tensor, v: Tensor, word_offsets: Tensor, scale: float | None = None,
          *, values: bool = True, op: str = "aa::word_pool") -> None:
    """``ValueError`` naming the argument; ``values=False`` (the fake impl) reads no data."""
    check_values = values and (q.device.type == "cpu" or CHECK_OFFSETS)
    reference.check_inputs(q, k, v, word_offsets, scale, check_values=check_values, op=op)


def check_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, word_offsets: Tensor,
                   scale: float | None, *, values: bool = True) -> None:
    op = "aa::word_pool_backward"
    check(q, k, v, word_offsets, scale, values=values, op=op)
    shape = (word_offsets.shape[0] - 1, q.shape[1], q.shape[2])
    if tuple(grad.shape) != shape or grad.dtype != q.dtype or grad.device != q.device:
        raise ValueError(f"{op}: grad must be {shape} [W, H, D] {q.dtype} on {q.device}, got "
                         f"({tuple(grad.shape)}, {grad.dtype}, {grad.device})")


@torch.library.custom_op("aa::word_pool", mutates_args=())
def word_pool(q: Tensor, k: Tensor, v: Tensor, word_offsets: Tensor,
              scale: float | None = None) -> Tensor:
    check(q, k, v, word_offsets, scale)
    return cpu.word_pool_fwd(q, k, v, word_offsets, scale)


@word_pool.register_fake
def _(q, k, v, word_offsets, scale=None):
    check(q, k, v, word_offsets, scale, values=False)
    return q.new_empty(word_offsets.shape[0] - 1, q.shape[1], q.shape[2])


@torch.library.custom_op("aa::word_pool_backward", mutates_args=())
def word_pool_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, word_offsets: Tensor,
                       scale: float | None) -> tuple[Tensor, Tensor, Tensor]:
    check_backward(grad, q, k, v, word_offsets, scale)
    return cpu.word_pool_bwd(grad, q, k, v, word_offsets, scale)


@word_pool_backward.register_fake
def _(grad, q, k, v, word_offsets, scale):
    check_backward(grad, q, k, v, word_offsets, scale, values=False)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_triton_forward = triton_kernel(_TRITON, "word_pool_fwd", fallback=cpu.word_pool_fwd)
_triton_backward = triton_kernel(_TRITON, "word_pool_bwd", fallback=cpu.word_pool_bwd)


def _cuda_forward(q, k, v, word_offsets, scale=None):
    """Triton for 16/32-bit floats; float64 runs the segment path."""
    fn = cpu.word_pool_fwd if q.dtype == torch.float64 else _triton_forward
    return fn(q, k, v, word_offsets, scale)


def _cuda_backward(grad, q, k, v, word_offsets, scale):
    fn = cpu.word_pool_bwd if q.dtype == torch.float64 else _triton_backward
    return fn(grad, q, k, v, word_offsets, scale)


register_kernels(word_pool, check=check, cpu=cpu.word_pool_fwd, cuda=_cuda_forward)
register_kernels(word_pool_backward, check=check_backward, cpu=cpu.word_pool_bwd,
                 cuda=_cuda_backward)


def _setup_context(ctx, inputs, output):
    q, k, v, word_offsets, scale = inputs
    ctx.save_for_backward(q, k, v, word_offsets)
    ctx.scale = scale


def _backward(ctx, grad):
    q, k, v, word_offsets = ctx.saved_tensors
    if not any(ctx.needs_input_grad[:3]):
        return None, None, None, None, None
    dq, dk, dv = torch.ops.aa.word_pool_backward(grad.contiguous(), q, k, v, word_offsets,
                                                 ctx.scale)
    need = ctx.needs_input_grad
    return (dq if need[0] else None), (dk if need[1] else None), (dv if need[2] else None), \
        None, None


word_pool.register_autograd(_backward, setup_context=_setup_context)


def _samples(device: str):
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(grad)

    def offsets(lengths, dtype=torch.int64):
        o = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        o[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
        return o.to(dtype).to(device), int(o[-1])

    # shared query (HAT), an empty word, odd D
    off, t = offsets([3, 1, 0, 5])
    yield (randn(1, 4, 7, grad=True), randn(t, 4, 7, grad=True), randn(t, 4, 7, grad=True),
           off), {}
    # one query per word, GQA, int32 offsets, explicit scale, a word longer than a tile
    off, t = offsets([2, 17, 1], torch.int32)
    yield (randn(3, 4, 8, grad=True), randn(t, 2, 8, grad=True), randn(t, 2, 8, grad=True),
           off), {"scale": 0.3}
    # bfloat16
    off, t = offsets([4, 2])
    bf = torch.bfloat16
    yield (randn(1, 2, 16, dtype=bf, grad=True), randn(t, 2, 16, dtype=bf, grad=True),
           randn(t, 2, 16, dtype=bf, grad=True), off), {}
    # no words; only empty words
    off, _ = offsets([])
    yield (randn(1, 2, 4, grad=True), randn(0, 2, 4, grad=True), randn(0, 2, 4, grad=True),
           off), {}
    off, _ = offsets([0, 0])
    yield (randn(2, 2, 4, grad=True), randn(0, 1, 4, grad=True), randn(0, 1, 4, grad=True),
           off), {}


def _backward_samples(device: str):
    for (q, k, v, off), kwargs in _samples(device):
        q, k, v = q.detach(), k.detach(), v.detach()
        grad = torch.randn(off.numel() - 1, q.shape[1], q.shape[2], dtype=q.dtype).to(device)
        yield (grad, q, k, v, off, kwargs.get("scale")), {}


register_samples(word_pool, _samples)
register_samples(word_pool_backward, _backward_samples)

register_onnx(word_pool, "aa_compile.kernels.word_pool.onnx_translation:word_pool")
register_onnx(word_pool_backward, reason=TRAINING_ONLY)
