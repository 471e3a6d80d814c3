"""`aa::word_pool`: HAT's word pooling, one query per word attending to the word's own bytes
(segment / varlen softmax attention), forward and backward.

    aa::word_pool(Tensor q, Tensor k, Tensor v, Tensor word_offsets, float? scale=None)
        -> Tensor
    aa::word_pool_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor word_offsets,
                           float? scale) -> (Tensor dq, Tensor dk, Tensor dv)

``q [W, H, D]`` (one query per word) or ``[1, H, D]`` (one query shared by all words: HAT's
latent query), ``k``/``v [T, Hkv, D]`` (q's dtype and device; ``H`` a multiple of ``Hkv``: head
``h`` reads key head ``h // (H // Hkv)``), ``word_offsets [W + 1]`` int64 (or int32) CSR word
boundaries over T: ``0 = o_0 <= o_1 <= ... <= o_W = T``. Output ``[W, H, D]`` in q's dtype::

    out[w, h] = softmax_t(scale * q[w, h] . k[t, h // G]) @ v[t, h // G],  t in [o_w, o_{w+1})

Non-causal; ``scale`` defaults to ``1 / sqrt(D)``; softmax in float32 (float64 for float64),
one rounding. An **empty word** (``o_w == o_{w+1}``) gives a zero row and no gradient (SDPA with
an all-False key mask would give NaN; `ByteBatch` never has empty words). ``W = 0`` or ``T = 0``
are fine. Equals the reference `WordPooling`'s ``F.scaled_dot_product_attention`` on the padded
``[W, H, L, hd]`` tensors with key mask ``word_mask[:, None, None, :]``; the projections, the
per-head q/k RMSNorms and ``o_proj`` stay outside the op, and k/v are the projections of the
byte stream ``h [T, d_enc]`` itself (``k_proj(h)[word_bytes] == k_proj(h[word_bytes])``), so
nothing is padded. Numerics: ``aa_compile.kernels.word_pool.reference``.

Gradients for q, k, v (a shared query gets the sum over words); the backward is its own op,
recomputes the softmax from q and k (no saved statistics) and is not differentiable itself.

Kernels: CPU (and CUDA float64), vectorized segment ops over the T bytes (``segment_reduce``
on the offsets); CUDA, Triton with one program per (word, head) and an online softmax over the
word's bytes. See ``aa_compile.kernels.word_pool``.

Input validation (``ValueError`` naming the argument): dtypes, shapes, head divisibility,
devices and scale always; ``word_offsets`` values (0 ... T, non-decreasing) on CPU always, on
other devices only when `CHECK_OFFSETS` is true (a device sync; environment
``AA_WORD_POOL_CHECK_OFFSETS=1``): malformed offsets there read out of bounds.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from aa_compile.kernels import word_pool as kernels
from aa_compile.kernels.word_pool import reference

from .registry import OpEntry, register

#: Check ``word_offsets`` values off the CPU too (a device sync per call); CPU always checks.
CHECK_OFFSETS: bool = os.environ.get("AA_WORD_POOL_CHECK_OFFSETS", "0").strip().lower() \
    not in ("", "0", "false", "no", "off")


def _check(q, k, v, word_offsets, scale, *, values: bool, op: str) -> None:
    check_values = values and (q.device.type == "cpu" or CHECK_OFFSETS)
    reference.check_inputs(q, k, v, word_offsets, scale, check_values=check_values, op=op)


def _out_like(q: Tensor, word_offsets: Tensor) -> Tensor:
    return q.new_empty(word_offsets.shape[0] - 1, q.shape[1], q.shape[2])


@torch.library.custom_op("aa::word_pool", mutates_args=())
def word_pool(q: Tensor, k: Tensor, v: Tensor, word_offsets: Tensor,
              scale: float | None = None) -> Tensor:
    _check(q, k, v, word_offsets, scale, values=True, op="aa::word_pool")
    return kernels.forward(q, k, v, word_offsets, scale)


@word_pool.register_fake
def _(q, k, v, word_offsets, scale=None):
    _check(q, k, v, word_offsets, scale, values=False, op="aa::word_pool")
    return _out_like(q, word_offsets)


def _check_grad(grad: Tensor, q: Tensor, word_offsets: Tensor) -> None:
    op = "aa::word_pool_backward"
    shape = (word_offsets.shape[0] - 1, q.shape[1], q.shape[2])
    if tuple(grad.shape) != shape or grad.dtype != q.dtype or grad.device != q.device:
        raise ValueError(f"{op}: grad must be {shape} [W, H, D] {q.dtype} on {q.device}, got "
                         f"({tuple(grad.shape)}, {grad.dtype}, {grad.device})")


@torch.library.custom_op("aa::word_pool_backward", mutates_args=())
def word_pool_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, word_offsets: Tensor,
                       scale: float | None) -> tuple[Tensor, Tensor, Tensor]:
    op = "aa::word_pool_backward"
    _check(q, k, v, word_offsets, scale, values=True, op=op)
    _check_grad(grad, q, word_offsets)
    return kernels.backward(grad, q, k, v, word_offsets, scale)


@word_pool_backward.register_fake
def _(grad, q, k, v, word_offsets, scale):
    op = "aa::word_pool_backward"
    _check(q, k, v, word_offsets, scale, values=False, op=op)
    _check_grad(grad, q, word_offsets)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


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


_KERNELS = {
    "cpu": "aa_compile.kernels.word_pool.cpu",
    "cuda": "aa_compile.kernels.word_pool.triton_kernel",
    "reference": "aa_compile.kernels.word_pool.reference",
}

register(OpEntry(name="aa::word_pool", op=torch.ops.aa.word_pool, kernels=_KERNELS,
                 samples=_samples))


def _backward_samples(device: str):
    for (q, k, v, off), kwargs in _samples(device):
        q, k, v = q.detach(), k.detach(), v.detach()
        grad = torch.randn(off.numel() - 1, q.shape[1], q.shape[2], dtype=q.dtype).to(device)
        yield (grad, q, k, v, off, kwargs.get("scale")), {}


register(OpEntry(name="aa::word_pool_backward", op=torch.ops.aa.word_pool_backward,
                 kernels=_KERNELS, samples=_backward_samples))
