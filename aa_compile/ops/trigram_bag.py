"""`aa::trigram_bag`: the T-FREE input embedding as a sum embedding bag, forward and backward.

    aa::trigram_bag(Tensor weight, Tensor indices, Tensor offsets,
                    Tensor? per_sample_weights=None, bool deterministic=True) -> Tensor
    aa::tfree_words_to_csr(Tensor slots, Tensor word_of_trigram, SymInt n_words)
        -> (Tensor indices, Tensor offsets)
    aa::trigram_bag_backward(Tensor grad, Tensor weight, Tensor indices, Tensor offsets,
                             Tensor? per_sample_weights, bool need_weight_grad,
                             bool need_psw_grad, bool deterministic=True) -> (Tensor, Tensor)

``weight [v, h]`` (float16/bfloat16/float32/float64), ``indices [nnz]`` int64 or int32 slot ids,
``offsets [n_bags + 1]`` int64 or int32 CSR bag boundaries (``offsets[0] == 0``,
non-decreasing, ``offsets[-1] == nnz``), ``per_sample_weights [nnz]`` (optional, weight's dtype).
Output ``[n_bags, h]`` in ``weight.dtype``::

    out[b] = sum_{j in [offsets[b], offsets[b + 1])} per_sample_weights[j] * weight[indices[j]]

An empty bag is a zero row; ``n_bags == 0`` gives ``[0, h]``. For T-FREE, a bag is a word and
its entries are the m slots of each of the word's trigrams (a slot hit twice counts twice).

The semantics are ``F.embedding_bag(indices, weight, offsets[:-1], mode="sum",
per_sample_weights=per_sample_weights)`` except for precision: every kernel multiplies and sums
in float32 (float64 for float64 weights) and rounds once to ``weight.dtype``. Numerics:
``aa_compile.kernels.trigram_bag.reference``.

Gradients (``register_autograd``): ``weight`` gets a dense ``[v, h]`` gradient in its dtype;
``per_sample_weights`` gets ``dpsw[j] = <grad[bag(j)], weight[indices[j]]>``; ``indices`` and
``offsets`` get none. The backward is its own op, ``aa::trigram_bag_backward``, which returns an
empty tensor in place of a gradient that was not asked for (``need_*_grad``) or has no input
(no ``per_sample_weights``). It is not differentiable itself (no double backward).

**Determinism.** ``dweight`` is computed by sorting ``indices`` (stable) and reducing each run of
equal index in a fixed order, with no float atomics: bitwise reproducible run to run, on every
device. ``deterministic=False`` lets the CUDA (Triton) path scatter with float atomics instead
(no sort; the last bits then vary between runs); other paths ignore it.

**Input validation** (``ValueError`` naming the argument): dtypes, shapes and devices are always
checked. The *values* (indices within ``[0, v)``, offsets starting at 0, non-decreasing and
ending at ``nnz``) are checked on CPU always; on other devices reading them is a device
synchronization, so there they are checked only when `CHECK_INDICES` is true (set the module
attribute, or the environment variable ``AA_TRIGRAM_BAG_CHECK_INDICES=1`` before import). With
the check off, out-of-range indices or malformed offsets on a GPU read out of bounds (undefined
results or a device fault), as with ``F.embedding`` on CUDA.

**Compiled** (``backend="aa"``, inductor, CPU): the forward is decomposed into a lean op,
``aa::trigram_bag_cpu`` (``kernels.trigram_bag.cpu.inductor_decompositions``: no Python
custom-op layer per call; the native float32 kernel, ATen's embedding bag for other dtypes),
except for an output above ``kernels.trigram_bag.cpu.CHUNK_BYTES`` (16 MiB), where this op
runs; the backward stays `aa::trigram_bag_backward`. The value checks still hold there but
raise ``RuntimeError`` (an index outside ``[0, v)`` or malformed offsets, with this op's
message, from the kernel's own checks).

``aa::tfree_words_to_csr`` turns the T-FREE reference embedding's input (trigram slots
``[n, m]`` and the word of each trigram, in any order) into this op's CSR bags; the
``tfree_embedding`` pass emits it. Integer outputs, no autograd.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from aa_compile.kernels import trigram_bag as kernels
from aa_compile.kernels.trigram_bag import reference

from .registry import OpEntry, register

#: Check index / offset *values* on non-CPU devices too (a device sync per call). CPU always
#: checks. Initialised from the environment variable ``AA_TRIGRAM_BAG_CHECK_INDICES``.
CHECK_INDICES: bool = os.environ.get("AA_TRIGRAM_BAG_CHECK_INDICES", "0").strip().lower() not in (
    "",
    "0",
    "false",
    "no",
    "off",
)


def _check(weight, indices, offsets, per_sample_weights, *, values: bool, op: str,
           kernel_checks_indices: bool = False) -> None:
    """Metadata always; values (a device sync off CPU) when ``values`` and (CPU or
    `CHECK_INDICES`); the index range not when the kernel about to run checks it itself."""
    on_cpu = weight.device.type == "cpu"
    check_values = values and (on_cpu or CHECK_INDICES)
    reference.check_inputs(
        weight, indices, offsets, per_sample_weights, check_values=check_values,
        check_indices=not kernel_checks_indices, op=op,
    )


@torch.library.custom_op("aa::trigram_bag", mutates_args=())
def trigram_bag(
    weight: Tensor,
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None = None,
    deterministic: bool = True,
) -> Tensor:
    op = "aa::trigram_bag"
    # The CPU kernels (native float32, ATen's embedding bag) bounds-check every index as they
    # read it, so the CPU forward skips a separate pass over the indices and turns the kernel's
    # error into ours.
    # (With h == 0 the kernel reads nothing, so then the indices are checked here.)
    kernel_checks = weight.device.type == "cpu" and weight.dim() == 2 and weight.shape[1] > 0
    _check(weight, indices, offsets, per_sample_weights, values=True, op=op,
           kernel_checks_indices=kernel_checks)
    try:
        return kernels.forward(weight, indices, offsets, per_sample_weights)
    except RuntimeError:
        if kernel_checks:  # raises the ValueError naming the bad index, if that was the cause
            _check(weight, indices, offsets, per_sample_weights, values=True, op=op)
        raise


@trigram_bag.register_fake
def _(weight, indices, offsets, per_sample_weights=None, deterministic=True):
    _check(weight, indices, offsets, per_sample_weights, values=False, op="aa::trigram_bag")
    return weight.new_empty(offsets.shape[0] - 1, weight.shape[1])


def check_grad(grad: Tensor, weight: Tensor, offsets: Tensor,
               op: str = "aa::trigram_bag_backward", rows: str = "n_bags") -> None:
    """The upstream gradient of a bag op: ``[len(offsets) - 1, h]``, weight's dtype and device
    (shared with `aa::hashed_trigram_bag_backward`)."""
    shape = (offsets.shape[0] - 1, weight.shape[1])
    if grad.dim() != 2 or grad.shape[0] != shape[0] or grad.shape[1] != shape[1]:
        raise ValueError(f"{op}: grad must have shape {tuple(shape)} [{rows}, h], got "
                         f"{tuple(grad.shape)}")
    if grad.dtype != weight.dtype:
        raise ValueError(f"{op}: grad must have weight's dtype {weight.dtype}, got {grad.dtype}")
    if grad.device != weight.device:
        raise ValueError(f"{op}: grad is on {grad.device}, but weight is on {weight.device}")


@torch.library.custom_op("aa::trigram_bag_backward", mutates_args=())
def trigram_bag_backward(
    grad: Tensor,
    weight: Tensor,
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None,
    need_weight_grad: bool,
    need_psw_grad: bool,
    deterministic: bool = True,
) -> tuple[Tensor, Tensor]:
    op = "aa::trigram_bag_backward"
    _check(weight, indices, offsets, per_sample_weights, values=True, op=op)
    check_grad(grad, weight, offsets)
    dw, dpsw = kernels.backward(
        grad, weight, indices, offsets, per_sample_weights, need_weight_grad, need_psw_grad,
        deterministic,
    )
    return (
        dw if dw is not None else weight.new_empty(0),
        dpsw if dpsw is not None else weight.new_empty(0),
    )


@trigram_bag_backward.register_fake
def _(grad, weight, indices, offsets, per_sample_weights, need_weight_grad, need_psw_grad,
      deterministic=True):
    op = "aa::trigram_bag_backward"
    _check(weight, indices, offsets, per_sample_weights, values=False, op=op)
    check_grad(grad, weight, offsets)
    dw = weight.new_empty(weight.shape) if need_weight_grad else weight.new_empty(0)
    has_dpsw = need_psw_grad and per_sample_weights is not None
    dpsw = weight.new_empty(indices.shape) if has_dpsw else weight.new_empty(0)
    return dw, dpsw


def _setup_context(ctx, inputs, output):
    weight, indices, offsets, psw, deterministic = inputs
    ctx.save_for_backward(weight, indices, offsets, psw)
    ctx.deterministic = deterministic


def _backward(ctx, grad):
    weight, indices, offsets, psw = ctx.saved_tensors
    need_w = ctx.needs_input_grad[0]
    need_psw = psw is not None and ctx.needs_input_grad[3]
    if not (need_w or need_psw):
        return None, None, None, None, None
    dw, dpsw = torch.ops.aa.trigram_bag_backward(
        grad.contiguous(), weight, indices, offsets, psw, need_w, need_psw, ctx.deterministic
    )
    return (dw if need_w else None), None, None, (dpsw if need_psw else None), None


trigram_bag.register_autograd(_backward, setup_context=_setup_context)


def _samples(device: str):
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(grad)

    def csr(sizes, v, idx_dtype=torch.int64):
        offsets = torch.zeros(len(sizes) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(sizes, dtype=torch.int64).cumsum(0)
        nnz = int(offsets[-1])
        indices = torch.randint(0, v, (nnz,), generator=g, dtype=torch.int64).to(idx_dtype)
        return indices.to(device), offsets.to(device)

    # an empty bag in the middle and at the end, odd h
    idx, offs = csr([3, 0, 5, 1, 0], 11)
    yield (randn(11, 7, grad=True), idx, offs), {}
    # per-sample weights (with their gradient), int32 indices, a repeated slot
    idx, offs = csr([4, 2, 0, 6], 9, torch.int32)
    idx[1] = idx[0]
    yield (randn(9, 16, grad=True), idx, offs, randn(12, grad=True)), {}
    # bfloat16, psw without gradient, non-deterministic flag (ignored off CUDA)
    idx, offs = csr([2, 5], 6)
    w = randn(6, 33, dtype=torch.bfloat16, grad=True)
    yield (w, idx, offs, randn(7, dtype=torch.bfloat16)), {"deterministic": False}
    # no bags at all, and only empty bags
    idx, offs = csr([], 4)
    yield (randn(4, 5, grad=True), idx, offs), {}
    idx, offs = csr([0, 0], 4)
    yield (randn(4, 5, grad=True), idx, offs), {}


_KERNELS = {
    "cpu": "aa_compile.kernels.trigram_bag.cpu",
    "cuda": "aa_compile.kernels.trigram_bag.triton_kernel",
    "reference": "aa_compile.kernels.trigram_bag.reference",
}

register(
    OpEntry(
        name="aa::trigram_bag",
        op=torch.ops.aa.trigram_bag,
        kernels=_KERNELS,
        samples=_samples,
        decompositions=kernels.cpu.inductor_decompositions,
    )
)


def _backward_samples(device: str):
    for args, kwargs in _samples(device):
        weight, indices, offsets = (a.detach() for a in args[:3])
        psw = args[3].detach() if len(args) > 3 else None
        grad = torch.randn(offsets.numel() - 1, weight.shape[1], dtype=weight.dtype).to(device)
        yield (grad, weight, indices, offsets, psw, True, psw is not None), {}
        yield (grad, weight, indices, offsets, psw, False, psw is not None), dict(kwargs)


register(
    OpEntry(
        name="aa::trigram_bag_backward",
        op=torch.ops.aa.trigram_bag_backward,
        kernels=_KERNELS,
        samples=_backward_samples,
    )
)


# --- aa::tfree_words_to_csr: the T-FREE reference embedding's input as CSR bags ---------------


def _check_words(slots: Tensor, word_of_trigram: Tensor, n_words: int, *, values: bool) -> bool:
    """Raise ``ValueError`` for bad input; return whether the word ids are known to be sorted
    (read on CPU only, where the values are checked anyway)."""
    op = "aa::tfree_words_to_csr"
    if slots.dtype not in (torch.int32, torch.int64) or slots.dim() != 2:
        raise ValueError(f"{op}: slots must be a 2-D [n_trigrams, m] int32/int64 tensor, got "
                         f"{slots.dtype} of shape {tuple(slots.shape)}")
    w = word_of_trigram
    if w.dtype not in (torch.int32, torch.int64) or w.dim() != 1 or w.shape[0] != slots.shape[0]:
        raise ValueError(f"{op}: word_of_trigram must be a 1-D int32/int64 tensor with one entry "
                         f"per trigram ({slots.shape[0]}), got {w.dtype} of shape {tuple(w.shape)}")
    if w.device != slots.device:
        raise ValueError(f"{op}: word_of_trigram is on {w.device}, but slots are on "
                         f"{slots.device}")
    if n_words < 0:
        raise ValueError(f"{op}: n_words must be >= 0, got {n_words}")
    if not (values and w.numel() and (w.device.type == "cpu" or CHECK_INDICES)):
        return False
    presorted = False
    if w.device.type == "cpu":
        a = w.numpy()
        presorted = bool((a[1:] >= a[:-1]).all())
        lo, hi = (int(a[0]), int(a[-1])) if presorted else (int(a.min()), int(a.max()))
    else:
        lo, hi = torch.stack(torch.aminmax(w)).tolist()
    if lo < 0 or hi >= n_words:
        raise ValueError(f"{op}: word_of_trigram must lie in [0, n_words) = [0, {n_words}), "
                         f"found {lo if lo < 0 else hi}")
    return presorted


@torch.library.custom_op("aa::tfree_words_to_csr", mutates_args=())
def tfree_words_to_csr(slots: Tensor, word_of_trigram: Tensor, n_words: int
                       ) -> tuple[Tensor, Tensor]:
    """T-FREE reference input (``slots [n, m]``, ``word_of_trigram [n]`` in any order,
    ``n_words``) -> ``(indices [n * m], offsets [n_words + 1] int64)`` for `aa::trigram_bag`,
    each word's trigrams in their original order (see
    ``aa_compile.kernels.trigram_bag.cpu.words_to_csr``; on CPU, word ids already in order, as a
    tokenizer emits them, skip the sort and gather: ``indices`` is then a plain copy of
    ``slots``). Word ids outside ``[0, n_words)`` raise ``ValueError`` (checked like
    `aa::trigram_bag`'s indices: always on CPU, elsewhere with `CHECK_INDICES`). Integer
    outputs: no gradient."""
    presorted = _check_words(slots, word_of_trigram, n_words, values=True)
    return kernels.cpu.words_to_csr(slots, word_of_trigram, n_words, presorted)


@tfree_words_to_csr.register_fake
def _(slots, word_of_trigram, n_words):
    _check_words(slots, word_of_trigram, n_words, values=False)
    n, m = slots.shape
    return slots.new_empty(n * m), slots.new_empty(n_words + 1, dtype=torch.int64)


def _words_samples(device: str):
    g = torch.Generator().manual_seed(0)
    # unsorted word ids, a word without trigrams, trailing unused words
    word = torch.tensor([2, 0, 2, 4, 0, 2])
    yield (torch.randint(0, 9, (6, 3), generator=g).to(device), word.to(device), 7), {}
    # int32, one trigram, m = 1
    yield (torch.tensor([[5]], dtype=torch.int32).to(device),
           torch.tensor([0], dtype=torch.int32).to(device), 1), {}
    # no trigrams at all
    yield (torch.zeros(0, 4, dtype=torch.int64).to(device),
           torch.zeros(0, dtype=torch.int64).to(device), 3), {}


register(
    OpEntry(
        name="aa::tfree_words_to_csr",
        op=torch.ops.aa.tfree_words_to_csr,
        kernels={"cpu": "aa_compile.kernels.trigram_bag.cpu",
                 "cuda": "aa_compile.kernels.trigram_bag.cpu",
                 "reference": "aa_compile.kernels.trigram_bag.reference"},
        samples=_words_samples,
    )
)
