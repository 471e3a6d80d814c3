"""`aa::window_attention`: causal sliding-window attention over a packed stream of documents
(HAT's byte encoder and decoder), forward and backward.

    aa::window_attention(Tensor q, Tensor k, Tensor v, Tensor? doc_offsets, int window,
                         float? scale=None) -> (Tensor out, Tensor lse)
    aa::window_attention_backward(Tensor grad, Tensor? grad_lse, Tensor q, Tensor k, Tensor v,
                                  Tensor out, Tensor lse, Tensor? doc_offsets, int window,
                                  float? scale) -> (Tensor dq, Tensor dk, Tensor dv)

``q [..., Hq, T, D]``, ``k``, ``v [..., Hkv, T, D]`` (same leading dims, dtype and device;
``Hq`` a multiple of ``Hkv``: query head ``h`` uses key head ``h // (Hq // Hkv)``, grouped-query
attention). ``doc_offsets [n_docs + 1]`` int64 (or int32): CSR document boundaries along T
(``0 = d_0 <= d_1 <= ... <= d_n = T``; empty documents allowed), shared by every leading row;
None = one document per row. ``window >= 1``; ``scale`` defaults to ``1 / sqrt(D)``::

    query i attends key j  iff  same document and 0 <= i - j < window

(``window`` counts the query itself: Hugging Face / Mistral ``sliding_window``, flash-attn
``window_size=(window - 1, 0)``). Documents never see each other; ``window >= T`` is causal
attention per document. ``out [..., Hq, T, D]`` is in q's dtype; ``lse [..., Hq, T]`` is the
softmax's logsumexp in float32 (float64 for float64), the softmax's own precision. ``T = 0``
gives empty outputs. Numerics: ``aa_compile.kernels.window_attention.reference``.

Why ``lse`` is an output: the backward needs it (flash-attention style), and a custom op's
autograd only sees its outputs; recomputing it would cost a forward pass per backward (+30% on
the CPU path). Callers that want only the attention use `attention` (``out`` alone). Both
outputs are differentiable (``d lse`` enters as ``dS += P * dlse``); q, k and v get gradients,
``doc_offsets`` none. The backward is its own op and is not differentiable (no double backward).

Kernels: CPU, ATen's flash-attention kernel over query blocks that read only the window's keys
(O(T * (window + block)) time and memory); CUDA, Triton flash attention that skips key blocks
outside the window and document; CUDA float64, a device-generic blocked path. See
``aa_compile.kernels.window_attention``.

Input validation (``ValueError`` naming the argument): dtypes, shapes, head divisibility,
devices, window and scale always; ``doc_offsets`` values (0 ... T, non-decreasing) on CPU
always, on other devices only when `CHECK_OFFSETS` is true (a device sync; environment
``AA_WINDOW_ATTENTION_CHECK_OFFSETS=1``): malformed offsets there give wrong attention.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from aa_compile.kernels import window_attention as kernels
from aa_compile.kernels.window_attention import reference

from .registry import OpEntry, register

#: Check ``doc_offsets`` values off the CPU too (a device sync per call); CPU always checks.
CHECK_OFFSETS: bool = os.environ.get("AA_WINDOW_ATTENTION_CHECK_OFFSETS", "0").strip().lower() \
    not in ("", "0", "false", "no", "off")


def _check(q, k, v, doc_offsets, window, scale, *, values: bool, op: str) -> None:
    check_values = values and (q.device.type == "cpu" or CHECK_OFFSETS)
    reference.check_inputs(q, k, v, doc_offsets, window, scale, check_values=check_values,
                           op=op)


def _lse_like(q: Tensor) -> Tensor:
    return q.new_empty(q.shape[:-1], dtype=reference.compute_dtype(q.dtype))


@torch.library.custom_op("aa::window_attention", mutates_args=())
def window_attention(q: Tensor, k: Tensor, v: Tensor, doc_offsets: Tensor | None, window: int,
                     scale: float | None = None) -> tuple[Tensor, Tensor]:
    _check(q, k, v, doc_offsets, window, scale, values=True, op="aa::window_attention")
    return kernels.forward(q, k, v, doc_offsets, window, scale)


@window_attention.register_fake
def _(q, k, v, doc_offsets, window, scale=None):
    _check(q, k, v, doc_offsets, window, scale, values=False, op="aa::window_attention")
    return q.new_empty(q.shape), _lse_like(q)


def _check_grads(grad, grad_lse, q, out, lse) -> None:
    op = "aa::window_attention_backward"
    for name, t, like in (("grad", grad, q), ("out", out, q)):
        if t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
            raise ValueError(f"{op}: {name} must match q ({tuple(q.shape)}, {q.dtype}, "
                             f"{q.device}), got ({tuple(t.shape)}, {t.dtype}, {t.device})")
    for name, t in (("lse", lse), ("grad_lse", grad_lse)):
        if t is None:
            continue
        if t.shape != q.shape[:-1] or t.dtype != reference.compute_dtype(q.dtype) \
                or t.device != q.device:
            raise ValueError(f"{op}: {name} must be {tuple(q.shape[:-1])} "
                             f"{reference.compute_dtype(q.dtype)} on {q.device}, got "
                             f"({tuple(t.shape)}, {t.dtype}, {t.device})")


@torch.library.custom_op("aa::window_attention_backward", mutates_args=())
def window_attention_backward(
    grad: Tensor, grad_lse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
    lse: Tensor, doc_offsets: Tensor | None, window: int, scale: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    op = "aa::window_attention_backward"
    _check(q, k, v, doc_offsets, window, scale, values=True, op=op)
    _check_grads(grad, grad_lse, q, out, lse)
    return kernels.backward(grad, grad_lse, q, k, v, out, lse, doc_offsets, window, scale)


@window_attention_backward.register_fake
def _(grad, grad_lse, q, k, v, out, lse, doc_offsets, window, scale):
    op = "aa::window_attention_backward"
    _check(q, k, v, doc_offsets, window, scale, values=False, op=op)
    _check_grads(grad, grad_lse, q, out, lse)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, doc_offsets, window, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, doc_offsets)
    ctx.window, ctx.scale = window, scale


def _backward(ctx, grad, grad_lse):
    q, k, v, out, lse, doc_offsets = ctx.saved_tensors
    if not any(ctx.needs_input_grad[:3]):
        return None, None, None, None, None, None
    if grad is None:
        grad = torch.zeros_like(out)
    dq, dk, dv = torch.ops.aa.window_attention_backward(
        grad.contiguous(), grad_lse, q, k, v, out, lse, doc_offsets, ctx.window, ctx.scale)
    needs = ctx.needs_input_grad
    return (dq if needs[0] else None), (dk if needs[1] else None), (dv if needs[2] else None), \
        None, None, None


window_attention.register_autograd(_backward, setup_context=_setup_context)


def attention(q: Tensor, k: Tensor, v: Tensor, doc_offsets: Tensor | None, window: int,
              scale: float | None = None) -> Tensor:
    """The attention output alone: ``aa::window_attention(...)[0]``."""
    return torch.ops.aa.window_attention(q, k, v, doc_offsets, window, scale)[0]


def _samples(device: str):
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32, grad=True):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(grad)

    def offs(*bounds):
        return torch.tensor(bounds, dtype=torch.int64, device=device)

    # packed GQA (4 query heads on 2 key heads), an empty and a one-token document, odd D
    yield (randn(4, 19, 5), randn(2, 19, 5), randn(2, 19, 5), offs(0, 1, 1, 8, 19), 4), {}
    # batched, one document per row, window >= T, explicit scale
    yield (randn(2, 3, 9, 8), randn(2, 3, 9, 8), randn(2, 3, 9, 8), None, 50), {"scale": 0.3}
    # bfloat16, window 1 (each query sees only itself); float64 MQA
    yield (randn(2, 7, 16, dtype=torch.bfloat16), randn(2, 7, 16, dtype=torch.bfloat16),
           randn(2, 7, 16, dtype=torch.bfloat16), offs(0, 3, 7), 1), {}
    yield (randn(3, 6, 4, dtype=torch.float64), randn(1, 6, 4, dtype=torch.float64),
           randn(1, 6, 4, dtype=torch.float64), offs(0, 6), 3), {}
    # T = 0
    yield (randn(2, 0, 4), randn(2, 0, 4), randn(2, 0, 4), offs(0), 2), {}


_KERNELS = {
    "cpu": "aa_compile.kernels.window_attention.cpu",
    "cuda": "aa_compile.kernels.window_attention.triton_kernel",
    "reference": "aa_compile.kernels.window_attention.reference",
}

register(OpEntry(name="aa::window_attention", op=torch.ops.aa.window_attention,
                 kernels=_KERNELS, samples=_samples))


def _backward_samples(device: str):
    for i, (args, kwargs) in enumerate(_samples(device)):
        q, k, v = (a.detach() for a in args[:3])
        out, lse = torch.ops.aa.window_attention(q, k, v, *args[3:], **kwargs)
        grad_lse = torch.randn_like(lse) if i % 2 else None
        yield (torch.randn_like(out), grad_lse, q, k, v, out, lse, args[3], args[4],
               kwargs.get("scale")), {}


register(OpEntry(name="aa::window_attention_backward",
                 op=torch.ops.aa.window_attention_backward, kernels=_KERNELS,
                 samples=_backward_samples))
