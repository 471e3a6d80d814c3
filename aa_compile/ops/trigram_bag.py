"""`aa::trigram_bag`: the T-FREE input embedding as a sum embedding bag, forward and backward,
with `aa::tfree_words_to_csr` (its input from the T-FREE reference embedding's) and the lean CPU
forward `aa::trigram_bag_cpu` that compiled graphs call.

    aa::trigram_bag(Tensor weight, Tensor indices, Tensor offsets,
                    Tensor? per_sample_weights=None, bool deterministic=True) -> Tensor
    aa::trigram_bag_backward(Tensor grad, Tensor weight, Tensor indices, Tensor offsets,
                             Tensor? per_sample_weights, bool need_weight_grad,
                             bool need_psw_grad, bool deterministic=True) -> (Tensor, Tensor)
    aa::tfree_words_to_csr(Tensor slots, Tensor word_of_trigram, SymInt n_words)
        -> (Tensor indices, Tensor offsets)
    aa::trigram_bag_cpu(Tensor weight, Tensor indices, Tensor offsets,
                        Tensor? per_sample_weights=None) -> Tensor

``out[b] = sum_{j in [offsets[b], offsets[b + 1])} per_sample_weights[j] * weight[indices[j]]``
for CSR ``offsets [n_bags + 1]``: ``F.embedding_bag(mode="sum")``, but accumulated in float32
(float64 for float64 weights) and rounded once. Numerics and valid input:
``kernels/trigram_bag/reference.py``. Kernels: CPU ``cpu.py`` (with ``cpu_avx2.py``), CUDA
``triton_kernel.py``; other devices, float64 on CUDA and CUDA without Triton run the CPU
module's ATen path, which serves any device and keeps the backward deterministic there (the
reference's ``index_add_`` would not). Semantics, validation (`CHECK_INDICES`), determinism
and the compiled path: ``docs/tfree.md``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from aa_compile.kernels.trigram_bag import cpu, cpu_avx2, reference

from .registry import (TRAINING_ONLY, register_decompositions, register_kernels, register_onnx,
                       register_samples,
                       triton_kernel)

OP = "aa::trigram_bag"
_TRITON = "aa_compile.kernels.trigram_bag.triton_kernel"

#: Check index / offset *values* on non-CPU devices too (a device sync per call). CPU always
#: checks. Initialised from the environment variable ``AA_TRIGRAM_BAG_CHECK_INDICES``.
CHECK_INDICES: bool = os.environ.get("AA_TRIGRAM_BAG_CHECK_INDICES", "0").strip().lower() not in (
    "",
    "0",
    "false",
    "no",
    "off",
)


def check_inputs(weight, indices, offsets, per_sample_weights, *, values: bool, op: str,
                 kernel_checks_indices: bool = False) -> None:
    """Metadata always; values (a device sync off CPU) when ``values`` and (CPU or
    `CHECK_INDICES`); the index range not when the kernel about to run checks it itself."""
    on_cpu = weight.device.type == "cpu"
    check_values = values and (on_cpu or CHECK_INDICES)
    reference.check_inputs(
        weight, indices, offsets, per_sample_weights, check_values=check_values,
        check_indices=not kernel_checks_indices, op=op,
    )


def _kernel_checks_indices(weight: Tensor) -> bool:
    """The CPU kernels (native float32, ATen's embedding bag) bounds-check every index as they
    read it, so the CPU forward skips a separate pass over the indices (with ``h == 0`` they
    read nothing: then the indices are checked up front)."""
    return weight.device.type == "cpu" and weight.dim() == 2 and weight.shape[1] > 0


def check(weight: Tensor, indices: Tensor, offsets: Tensor,
          per_sample_weights: Tensor | None = None, deterministic: bool = True) -> None:
    """The argument checks of `aa::trigram_bag` before any kernel (``ValueError`` naming the
    argument)."""
    check_inputs(weight, indices, offsets, per_sample_weights, values=True, op=OP,
                 kernel_checks_indices=_kernel_checks_indices(weight))


@torch.library.custom_op("aa::trigram_bag", mutates_args=())
def trigram_bag(
    weight: Tensor,
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None = None,
    deterministic: bool = True,
) -> Tensor:
    check(weight, indices, offsets, per_sample_weights)
    return cpu.trigram_bag_fwd(weight, indices, offsets, per_sample_weights)


@trigram_bag.register_fake
def _(weight, indices, offsets, per_sample_weights=None, deterministic=True):
    check_inputs(weight, indices, offsets, per_sample_weights, values=False, op=OP)
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


def check_backward(grad: Tensor, weight: Tensor, indices: Tensor, offsets: Tensor,
                   per_sample_weights: Tensor | None, need_weight_grad: bool,
                   need_psw_grad: bool, deterministic: bool = True) -> None:
    """The argument checks of `aa::trigram_bag_backward` before any kernel."""
    check_inputs(weight, indices, offsets, per_sample_weights, values=True,
                 op="aa::trigram_bag_backward")
    check_grad(grad, weight, offsets)


def _or_empty(weight: Tensor, dw: Tensor | None, dpsw: Tensor | None) -> tuple[Tensor, Tensor]:
    """The backward op's outputs: an empty tensor for a gradient not computed."""
    return (dw if dw is not None else weight.new_empty(0),
            dpsw if dpsw is not None else weight.new_empty(0))


def _aten_backward(grad, weight, indices, offsets, per_sample_weights, need_weight_grad,
                   need_psw_grad, deterministic=True):
    """The CPU module's backward (ATen ops: any device; always deterministic)."""
    return cpu.trigram_bag_bwd(grad, weight, indices, offsets, per_sample_weights,
                               need_weight_grad, need_psw_grad)


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
    args = (grad, weight, indices, offsets, per_sample_weights, need_weight_grad, need_psw_grad)
    check_backward(*args)
    return _or_empty(weight, *_aten_backward(*args))


@trigram_bag_backward.register_fake
def _(grad, weight, indices, offsets, per_sample_weights, need_weight_grad, need_psw_grad,
      deterministic=True):
    op = "aa::trigram_bag_backward"
    check_inputs(weight, indices, offsets, per_sample_weights, values=False, op=op)
    check_grad(grad, weight, offsets)
    dw = weight.new_empty(weight.shape) if need_weight_grad else weight.new_empty(0)
    has_dpsw = need_psw_grad and per_sample_weights is not None
    dpsw = weight.new_empty(indices.shape) if has_dpsw else weight.new_empty(0)
    return dw, dpsw


def _cpu_forward(weight, indices, offsets, per_sample_weights=None, deterministic=True):
    """`cpu.trigram_bag_fwd`; an index error of the kernel becomes the ``ValueError`` naming the
    bad index (`check` left the index range to the kernel)."""
    try:
        return cpu.trigram_bag_fwd(weight, indices, offsets, per_sample_weights)
    except RuntimeError:
        check_inputs(weight, indices, offsets, per_sample_weights, values=True, op=OP)
        raise


def _cpu_backward(grad, weight, indices, offsets, per_sample_weights, need_weight_grad,
                  need_psw_grad, deterministic=True):
    return _or_empty(weight, *cpu.trigram_bag_bwd(grad, weight, indices, offsets,
                                                  per_sample_weights, need_weight_grad,
                                                  need_psw_grad))


_triton_forward = triton_kernel(_TRITON, "trigram_bag_fwd", fallback=cpu.trigram_bag_fwd)
_triton_backward = triton_kernel(_TRITON, "trigram_bag_bwd", fallback=_aten_backward)


def _cuda_forward(weight, indices, offsets, per_sample_weights=None, deterministic=True):
    """Triton for 16/32-bit floats; float64 runs the CPU module's ATen path."""
    fn = cpu.trigram_bag_fwd if weight.dtype == torch.float64 else _triton_forward
    return fn(weight, indices, offsets, per_sample_weights)


def _cuda_backward(grad, weight, indices, offsets, per_sample_weights, need_weight_grad,
                   need_psw_grad, deterministic=True):
    """Triton for 16/32-bit floats (``deterministic=False``: float atomics); float64 runs the
    CPU module's ATen path."""
    fn = _aten_backward if weight.dtype == torch.float64 else _triton_backward
    return _or_empty(weight, *fn(grad, weight, indices, offsets, per_sample_weights,
                                 need_weight_grad, need_psw_grad, deterministic))


register_kernels(trigram_bag, check=check, cpu=_cpu_forward, cuda=_cuda_forward)
register_kernels(trigram_bag_backward, check=check_backward, cpu=_cpu_backward,
                 cuda=_cuda_backward)


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


# --- aa::trigram_bag_cpu: the CPU forward of compiled graphs, without the custom-op layer -------

# A plain dispatcher op (no torch.library.custom_op Python layer: validation, fake-tensor and
# autograd wrappers cost ~0.1 ms a call), emitted only by the inductor decomposition below,
# under autograd, so it has no autograd formula. Its kernel checks the values itself.
_LIB = torch.library.Library("aa", "FRAGMENT")
_LIB.define("trigram_bag_cpu(Tensor weight, Tensor indices, Tensor offsets, "
            "Tensor? per_sample_weights=None) -> Tensor")
register_kernels("aa::trigram_bag_cpu", cpu=cpu.trigram_bag_cpu)


@torch.library.register_fake("aa::trigram_bag_cpu", lib=_LIB)
def _(weight, indices, offsets, per_sample_weights=None):
    return weight.new_empty(offsets.shape[0] - 1, weight.shape[1])


def _decline(op):
    """``NotImplemented`` (the op stays in the graph), after giving inductor a fallback lowering
    for ``op`` (an extern call of the op itself): inductor refuses an op that is in its
    decomposition table but has no lowering. Called while inductor compiles, so importing its
    lowering module here loads nothing new."""
    from torch._inductor import lowering

    if op not in lowering.lowerings:
        lowering.make_fallback(op, warn=False, override_decomp=True)
    return NotImplemented


def _inductor_decompositions() -> dict:
    """The CPU forward as a direct call in inductor's generated code, without the Python
    custom-op layer: ``aa::trigram_bag_cpu`` (float32 where the AVX2 kernel is available) or
    ``aten::_embedding_bag_forward_only``. The backward op is not decomposed (it stays ours).
    Declines (``NotImplemented``) off CPU, for a width that is not a known positive int, and
    for an output known to exceed ``cpu.CHUNK_BYTES`` (there the op's chunked, huge-page
    kernel runs: the Python cost is small next to the page faults it saves)."""

    def fwd(weight, indices, offsets, per_sample_weights=None, deterministic=True):
        h = weight.shape[1] if weight.dim() == 2 else None
        if weight.device.type != "cpu" or not isinstance(h, int) or h == 0:
            return _decline(torch.ops.aa.trigram_bag.default)
        n_bags = offsets.shape[0] - 1
        if isinstance(n_bags, int) and n_bags * h * weight.element_size() > cpu.CHUNK_BYTES:
            return _decline(torch.ops.aa.trigram_bag.default)
        if cpu.native(weight):
            # the AVX2 kernel through a plain op: it checks the offsets and indices itself
            return torch.ops.aa.trigram_bag_cpu(weight, indices, offsets, per_sample_weights)
        # ATen's kernel checks every index it reads (RuntimeError naming the bad one) and
        # offsets[0]. The rest is checked by inductor asserts: offsets[-1] == nnz and
        # non-decreasing offsets. (fbgemm's kernels reject some decreasing offsets themselves,
        # but not every pattern, as a CI run showed: the loop over the offsets stays, one
        # cheap pass over n_bags + 1 integers.)
        nnz = indices.shape[0]
        msg = f"{OP}: {cpu_avx2.OFFSETS_MESSAGE}"
        torch.ops.aten._assert_async.msg(offsets[-1] == nnz, msg)
        torch.ops.aten._assert_async.msg((offsets[1:] >= offsets[:-1]).all(), msg)
        return cpu.aten_bag(weight.contiguous(), indices, offsets, per_sample_weights)

    return {torch.ops.aa.trigram_bag.default: fwd}


register_decompositions(trigram_bag, _inductor_decompositions)


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


def _backward_samples(device: str):
    for args, kwargs in _samples(device):
        weight, indices, offsets = (a.detach() for a in args[:3])
        psw = args[3].detach() if len(args) > 3 else None
        grad = torch.randn(offsets.numel() - 1, weight.shape[1], dtype=weight.dtype).to(device)
        yield (grad, weight, indices, offsets, psw, True, psw is not None), {}
        yield (grad, weight, indices, offsets, psw, False, psw is not None), dict(kwargs)


def _cpu_op_samples(device: str):
    """The forward's samples without gradients, as CPU tensors on every device: the op has
    only a CPU kernel (compiled CPU graphs are its only callers)."""
    for args, _ in _samples("cpu"):
        yield tuple(a.detach() for a in args), {}


register_samples(trigram_bag, _samples)
register_samples(trigram_bag_backward, _backward_samples)
register_samples("aa::trigram_bag_cpu", _cpu_op_samples)


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
    each word's trigrams in their original order (spec: ``reference.words_to_csr``). Word ids
    outside ``[0, n_words)`` raise ``ValueError`` (checked like `aa::trigram_bag`'s indices:
    always on CPU, elsewhere with `CHECK_INDICES`). Integer outputs: no gradient. One kernel
    for every device, ``cpu.words_to_csr`` (ATen ops; on CPU, word ids already in order skip
    the sort)."""
    presorted = _check_words(slots, word_of_trigram, n_words, values=True)
    return cpu.words_to_csr(slots, word_of_trigram, n_words, presorted)


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


register_samples(tfree_words_to_csr, _words_samples)

register_onnx(trigram_bag, "aa_compile.kernels.trigram_bag.onnx_translation:trigram_bag")
register_onnx(trigram_bag_backward, reason=TRAINING_ONLY)
register_onnx("aa::trigram_bag_cpu",
              "aa_compile.kernels.trigram_bag.onnx_translation:trigram_bag_cpu")
register_onnx(tfree_words_to_csr,
              "aa_compile.kernels.trigram_bag.onnx_translation:tfree_words_to_csr")
