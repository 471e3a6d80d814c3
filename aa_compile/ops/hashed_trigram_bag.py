"""`aa::hashed_trigram_bag`: the T-FREE input embedding from trigram *ids*, the fast-mode slots
computed by the kernel (only the ids travel: m times fewer index bytes than a slot list).

    aa::hashed_trigram_bag(Tensor weight, Tensor trigram_ids, Tensor trigram_offsets, int m,
                           int k_lower, Tensor? whole_word_slots=None,
                           bool deterministic=True) -> Tensor
    aa::hashed_trigram_bag_backward(Tensor grad, Tensor weight, Tensor trigram_ids,
                                    Tensor trigram_offsets, int m, int k_lower,
                                    Tensor? whole_word_slots=None,
                                    bool deterministic=True) -> Tensor

``out[w]`` sums ``weight[s]`` over the m slots s of each id of word w (CSR ``trigram_offsets``):
ids below ``2**24`` are byte trigrams hashed by the ``"fast"`` mode
(`aa_compile.kernels.tfree_hashing`), ids from ``2**24`` are rows of ``whole_word_slots``. So
for a ``TrigramTokenizer(hash_mode="fast")`` batch it equals ``aa::trigram_bag(weight,
batch.indices, batch.offsets)`` (bit-equal on CPU). Precision, determinism and validation as
`aa::trigram_bag` (values checked on CPU always, elsewhere with
``aa_compile.ops.trigram_bag.CHECK_INDICES``). Numerics: ``kernels/hashed_trigram_bag/
reference.py``. Kernels: CPU ``cpu.py``, CUDA ``triton_kernel.py`` (the hash inside the kernel);
other devices, float64 on CUDA and CUDA without Triton run the CPU module (torch ops: any
device, deterministic). More: ``docs/tfree.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from aa_compile.kernels.hashed_trigram_bag import cpu, reference

from . import trigram_bag as trigram_bag_op
from .registry import (TRAINING_ONLY, register_kernels, register_onnx, register_samples,
                       triton_kernel)

OP = "aa::hashed_trigram_bag"
_TRITON = "aa_compile.kernels.hashed_trigram_bag.triton_kernel"


def check_inputs(weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots, *,
                 values: bool, op: str) -> None:
    """Metadata always; values (a device sync off CPU) when ``values`` and (CPU or
    ``trigram_bag.CHECK_INDICES``)."""
    check_values = values and (weight.device.type == "cpu" or trigram_bag_op.CHECK_INDICES)
    reference.check_inputs(weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots,
                           check_values=check_values, op=op)


def check(weight: Tensor, trigram_ids: Tensor, trigram_offsets: Tensor, m: int, k_lower: int,
          whole_word_slots: Tensor | None = None, deterministic: bool = True) -> None:
    """The argument checks of `aa::hashed_trigram_bag` before any kernel."""
    check_inputs(weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots,
                 values=True, op=OP)


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
    check(weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots)
    return cpu.hashed_trigram_bag_fwd(weight, trigram_ids, trigram_offsets, m, k_lower,
                                      whole_word_slots)


@hashed_trigram_bag.register_fake
def _(weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots=None,
      deterministic=True):
    check_inputs(weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots,
                 values=False, op=OP)
    return weight.new_empty(trigram_offsets.shape[0] - 1, weight.shape[1])


def _check_grad(grad: Tensor, weight: Tensor, trigram_offsets: Tensor) -> None:
    trigram_bag_op.check_grad(grad, weight, trigram_offsets,
                              op="aa::hashed_trigram_bag_backward", rows="n_words")


def check_backward(grad: Tensor, weight: Tensor, trigram_ids: Tensor, trigram_offsets: Tensor,
                   m: int, k_lower: int, whole_word_slots: Tensor | None = None,
                   deterministic: bool = True) -> None:
    """The argument checks of `aa::hashed_trigram_bag_backward` before any kernel."""
    check_inputs(weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots,
                 values=True, op="aa::hashed_trigram_bag_backward")
    _check_grad(grad, weight, trigram_offsets)


def _cpu_backward(grad, weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots=None,
                  deterministic=True):
    """The CPU module's backward (torch ops: any device; always deterministic)."""
    return cpu.hashed_trigram_bag_bwd(grad, weight, trigram_ids, trigram_offsets, m, k_lower,
                                      whole_word_slots)


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
    args = (grad, weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots)
    check_backward(*args)
    return _cpu_backward(*args)


@hashed_trigram_bag_backward.register_fake
def _(grad, weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots=None,
      deterministic=True):
    check_inputs(weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots,
                 values=False, op="aa::hashed_trigram_bag_backward")
    _check_grad(grad, weight, trigram_offsets)
    return weight.new_empty(weight.shape)


def _cpu_forward(weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots=None,
                 deterministic=True):
    return cpu.hashed_trigram_bag_fwd(weight, trigram_ids, trigram_offsets, m, k_lower,
                                      whole_word_slots)


_triton_forward = triton_kernel(_TRITON, "hashed_trigram_bag_fwd",
                                fallback=cpu.hashed_trigram_bag_fwd)
_triton_backward = triton_kernel(_TRITON, "hashed_trigram_bag_bwd", fallback=_cpu_backward)


def _cuda_forward(weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots=None,
                  deterministic=True):
    """Triton (the hash inside the kernel) for 16/32-bit floats; float64 runs the CPU module."""
    fn = cpu.hashed_trigram_bag_fwd if weight.dtype == torch.float64 else _triton_forward
    return fn(weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots)


def _cuda_backward(grad, weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots=None,
                   deterministic=True):
    """Triton for 16/32-bit floats (``deterministic=False``: float atomics); float64 runs the
    CPU module."""
    fn = _cpu_backward if weight.dtype == torch.float64 else _triton_backward
    return fn(grad, weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots,
              deterministic)


register_kernels(hashed_trigram_bag, check=check, cpu=_cpu_forward, cuda=_cuda_forward)
register_kernels(hashed_trigram_bag_backward, check=check_backward, cpu=_cpu_backward,
                 cuda=_cuda_backward)


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


def _backward_samples(device: str):
    for args, kwargs in _samples(device):
        weight = args[0].detach()
        grad = torch.randn(args[2].numel() - 1, weight.shape[1], dtype=weight.dtype).to(device)
        yield (grad, weight, *args[1:]), dict(kwargs)


register_samples(hashed_trigram_bag, _samples)
register_samples(hashed_trigram_bag_backward, _backward_samples)

register_onnx(hashed_trigram_bag, reason=(
    "hashes trigram ids inside the kernel (splitmix64 on uint64), which standard ONNX "
    "integer ops do not express; way out: encode with TrigramTokenizer slots "
    "(batch.indices/offsets) so aa::trigram_bag carries the embedding"))
register_onnx(hashed_trigram_bag_backward, reason=TRAINING_ONLY)
