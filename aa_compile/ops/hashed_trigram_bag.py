"""`aa::hashed_trigram_bag`: the T-FREE input embedding from trigram *ids*, the fast-mode slots
computed by the kernel (only the ids travel: m times fewer index bytes than a slot list).

    aa::hashed_trigram_bag(Tensor weight, Tensor trigram_ids, Tensor trigram_offsets, int m,
                           int k_lower, Tensor? whole_word_slots=None,
                           bool deterministic=True) -> Tensor
    aa::hashed_trigram_bag_backward(Tensor grad, Tensor weight, Tensor trigram_ids,
                                    Tensor trigram_offsets, int m, int k_lower,
                                    Tensor? whole_word_slots=None,
                                    bool deterministic=True) -> Tensor

``weight [v, h]`` (float16/bfloat16/float32/float64); ``trigram_ids [n_trigrams]`` int64 or
int32; ``trigram_offsets [n_words + 1]`` int64 or int32 CSR (``[0]`` = 0, non-decreasing, last
= n_trigrams); ``1 <= m <= min(v, 2**16)``; ``0 <= k_lower <= m``; ``whole_word_slots
[n_whole, m]`` int64 or int32 in ``[0, v)`` (optional). Output ``[n_words, h]`` in
``weight.dtype``: ``out[w]`` is the sum over word w's ids t of the sum of ``weight[s]`` over
t's m slots s, where an id ``t < 2**24`` is a byte trigram whose slots are the ``"fast"`` hash
mode's (`aa_compile.models.tfree.hashing.fast_slots` with ``vocab_size = v``, lowercase sharing
``k_lower``) and an id ``t >= 2**24`` (``tokenizer.WHOLE_WORD_BASE``) is a word hashed whole,
whose slots are row ``t - 2**24`` of ``whole_word_slots``.

So for ``batch = TrigramTokenizer(vocab_size=v, m=m, k_lower=k, hash_mode="fast").encode(...)``::

    aa::hashed_trigram_bag(weight, batch.trigram_ids, batch.trigram_offsets, m, k,
                           batch.whole_word_slots)
      == aa::trigram_bag(weight, batch.indices, batch.offsets)

(same slots, same order, same kernels on CPU: bit-equal there). Precision and determinism as
`aa::trigram_bag`: float32 accumulation (float64 for float64 weights), one rounding; ``weight``
gets a dense gradient (``aa::hashed_trigram_bag_backward``, sorted segments, bitwise
reproducible; ``deterministic=False`` lets the CUDA path use float atomics); ids, offsets and
whole-word slots get none. Not differentiable twice. Kernels: ``aa_compile.kernels.
hashed_trigram_bag`` (CPU: the hash vectorized in torch, then the trigram-bag CPU kernels;
CUDA: the hash inside the Triton forward kernel).

**Input validation** (``ValueError`` naming the argument): dtypes, shapes, devices, ``m`` and
``k_lower`` always; the *values* (id range, CSR offsets, whole-word slot range) on the CPU
always, elsewhere only when ``aa_compile.ops.trigram_bag.CHECK_INDICES`` is true (one switch for
both bag ops; reading values is a device sync). Unchecked bad values on a GPU: an id in
``[2**24, 2**24 + n_whole)`` outside the table reads out of bounds; a byte-trigram id is always
hashed into ``[0, v)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from aa_compile.kernels import hashed_trigram_bag as kernels
from aa_compile.kernels.hashed_trigram_bag import reference

from . import trigram_bag as _trigram_bag_op
from .registry import OpEntry, register


def _check(weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots, *, values: bool,
           op: str) -> None:
    check_values = values and (weight.device.type == "cpu" or _trigram_bag_op.CHECK_INDICES)
    reference.check_inputs(weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots,
                           check_values=check_values, op=op)


@torch.library.custom_op("aa::hashed_trigram_bag", mutates_args=())
def hashed_trigram_bag(
    weight: Tensor,
    trigram_ids: Tensor,
    trigram_offsets: Tensor,
    m: int,
    k_lower: int,
    whole_word_slots: Tensor | None = None,
    deterministic: bool = True,
) -> Tensor:
    _check(weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots, values=True,
           op="aa::hashed_trigram_bag")
    return kernels.forward(weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots)


@hashed_trigram_bag.register_fake
def _(weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots=None,
      deterministic=True):
    _check(weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots, values=False,
           op="aa::hashed_trigram_bag")
    return weight.new_empty(trigram_offsets.shape[0] - 1, weight.shape[1])


def _check_grad(grad: Tensor, weight: Tensor, trigram_offsets: Tensor) -> None:
    _trigram_bag_op.check_grad(grad, weight, trigram_offsets,
                               op="aa::hashed_trigram_bag_backward",
                               rows="n_words")


@torch.library.custom_op("aa::hashed_trigram_bag_backward", mutates_args=())
def hashed_trigram_bag_backward(
    grad: Tensor,
    weight: Tensor,
    trigram_ids: Tensor,
    trigram_offsets: Tensor,
    m: int,
    k_lower: int,
    whole_word_slots: Tensor | None = None,
    deterministic: bool = True,
) -> Tensor:
    op = "aa::hashed_trigram_bag_backward"
    _check(weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots, values=True, op=op)
    _check_grad(grad, weight, trigram_offsets)
    return kernels.backward(grad, weight, trigram_ids, trigram_offsets, m, k_lower,
                            whole_word_slots, deterministic)


@hashed_trigram_bag_backward.register_fake
def _(grad, weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots=None,
      deterministic=True):
    op = "aa::hashed_trigram_bag_backward"
    _check(weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots, values=False,
           op=op)
    _check_grad(grad, weight, trigram_offsets)
    return weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots, deterministic = inputs
    ctx.save_for_backward(weight, trigram_ids, trigram_offsets, whole_word_slots)
    ctx.m, ctx.k_lower, ctx.deterministic = m, k_lower, deterministic


def _backward(ctx, grad):
    none = (None,) * 6
    if not ctx.needs_input_grad[0]:
        return (None, *none)
    weight, trigram_ids, trigram_offsets, whole_word_slots = ctx.saved_tensors
    dw = torch.ops.aa.hashed_trigram_bag_backward(
        grad.contiguous(), weight, trigram_ids, trigram_offsets, ctx.m, ctx.k_lower,
        whole_word_slots, ctx.deterministic)
    return (dw, *none)


hashed_trigram_bag.register_autograd(_backward, setup_context=_setup_context)


def _samples(device: str):
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(True)

    def t(values, dtype=torch.int64):
        return torch.tensor(values, dtype=dtype, device=device)

    hel, hel_upper = 0x6C6568, 0x6C6548  # "hel" and its case variant "Hel"
    # trigrams, a case variant with k_lower = 2, an empty word, a whole-word id
    ids = t([hel, hel_upper, 0x20, 12345, 1 << 24, 0xFFFFFF])
    offsets = t([0, 2, 2, 4, 5, 6])
    wws = t([[0, 5, 5, 9]])
    yield (randn(11, 7), ids, offsets, 4, 2, wws), {}
    # int32 ids and offsets, small v (hash collisions and retries), no whole words, bfloat16
    ids32 = t([hel, hel_upper, 7, 7, 100], torch.int32)
    yield (randn(5, 33, dtype=torch.bfloat16), ids32, t([0, 3, 5], torch.int32), 5, 5), {
        "deterministic": False}
    # no words; only empty words
    yield (randn(4, 5), t([]), t([0]), 2, 0), {}
    yield (randn(4, 5), t([]), t([0, 0, 0]), 3, 1, None), {}


_KERNELS = {
    "cpu": "aa_compile.kernels.hashed_trigram_bag.cpu",
    "cuda": "aa_compile.kernels.hashed_trigram_bag.triton_kernel",
    "reference": "aa_compile.kernels.hashed_trigram_bag.reference",
}

register(OpEntry(name="aa::hashed_trigram_bag", op=torch.ops.aa.hashed_trigram_bag,
                 kernels=_KERNELS, samples=_samples))


def _backward_samples(device: str):
    for args, kwargs in _samples(device):
        weight = args[0].detach()
        grad = torch.randn(args[2].numel() - 1, weight.shape[1], dtype=weight.dtype).to(device)
        yield (grad, weight, *args[1:]), dict(kwargs)


register(OpEntry(name="aa::hashed_trigram_bag_backward",
                 op=torch.ops.aa.hashed_trigram_bag_backward, kernels=_KERNELS,
                 samples=_backward_samples))
