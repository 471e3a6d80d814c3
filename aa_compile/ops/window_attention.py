"""`aa::window_attention`: causal sliding-window attention over a packed stream of documents
(HAT's byte encoder and decoder), forward and backward.

    aa::window_attention(Tensor q, Tensor k, Tensor v, Tensor? doc_offsets, int window,
                         float? scale=None) -> (Tensor out, Tensor lse)
    aa::window_attention_backward(Tensor grad, Tensor? grad_lse, Tensor q, Tensor k, Tensor v,
                                  Tensor out, Tensor lse, Tensor? doc_offsets, int window,
                                  float? scale) -> (Tensor dq, Tensor dk, Tensor dv)

Query i attends key j iff both are in the same document and ``0 <= i - j < window``. ``lse``
(the softmax's logsumexp) is an output because the backward needs it and a custom op's autograd
sees only outputs; `attention` returns ``out`` alone. Numerics:
``kernels/window_attention/reference.py``. Kernels: CPU ``kernels/window_attention/cpu.py``
(ATen's flash kernel over query blocks), CUDA ``kernels/window_attention/triton_kernel.py``;
CUDA float64 and other devices run the op's body, the device-generic blocked path
(``blocked.py``: O(T * window), where the reference is O(T^2)). Design notes: ``docs/hat.md``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from aa_compile.kernels.window_attention import blocked, cpu, reference

from .registry import (TRAINING_ONLY, register_kernels, register_onnx, register_samples,
                       triton_kernel)

#: Check ``doc_offsets`` values off the CPU too (a device sync per call); CPU always checks.
CHECK_OFFSETS: bool = os.environ.get("AA_WINDOW_ATTENTION_CHECK_OFFSETS", "0").strip().lower() \
    not in ("", "0", "false", "no", "off")

_TRITON = "aa_compile.kernels.window_attention.triton_kernel"


def check(q: Tensor, k: Tensor, v: Tensor, doc_offsets: Tensor | None, window: int,
          scale: float | None = None, *, values: bool = True,
          op: str = "aa::window_attention") -> None:
    """``ValueError`` naming the argument; ``values=False`` (the fake impl) reads no data."""
    check_values = values and (q.device.type == "cpu" or CHECK_OFFSETS)
    reference.check_inputs(q, k, v, doc_offsets, window, scale, check_values=check_values,
                           op=op)


def check_backward(grad: Tensor, grad_lse: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
                   out: Tensor, lse: Tensor, doc_offsets: Tensor | None, window: int,
                   scale: float | None, *, values: bool = True) -> None:
    op = "aa::window_attention_backward"
    check(q, k, v, doc_offsets, window, scale, values=values, op=op)
    for name, t in (("grad", grad), ("out", out)):
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{op}: {name} must match q ({tuple(q.shape)}, {q.dtype}, "
                             f"{q.device}), got ({tuple(t.shape)}, {t.dtype}, {t.device})")
    lse_dtype = reference.compute_dtype(q.dtype)
    for name, t in (("lse", lse), ("grad_lse", grad_lse)):
        if t is None:
            continue
        if t.shape != q.shape[:-1] or t.dtype != lse_dtype or t.device != q.device:
            raise ValueError(f"{op}: {name} must be {tuple(q.shape[:-1])} {lse_dtype} on "
                             f"{q.device}, got ({tuple(t.shape)}, {t.dtype}, {t.device})")


@torch.library.custom_op("aa::window_attention", mutates_args=())
def window_attention(q: Tensor, k: Tensor, v: Tensor, doc_offsets: Tensor | None, window: int,
                     scale: float | None = None) -> tuple[Tensor, Tensor]:
    check(q, k, v, doc_offsets, window, scale)
    return blocked.forward(q, k, v, doc_offsets, window, scale)


@window_attention.register_fake
def _(q, k, v, doc_offsets, window, scale=None):
    check(q, k, v, doc_offsets, window, scale, values=False)
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1],
                                             dtype=reference.compute_dtype(q.dtype))


@torch.library.custom_op("aa::window_attention_backward", mutates_args=())
def window_attention_backward(
    grad: Tensor, grad_lse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
    lse: Tensor, doc_offsets: Tensor | None, window: int, scale: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    check_backward(grad, grad_lse, q, k, v, out, lse, doc_offsets, window, scale)
    return blocked.backward(grad, grad_lse, q, k, v, out, lse, doc_offsets, window, scale)


@window_attention_backward.register_fake
def _(grad, grad_lse, q, k, v, out, lse, doc_offsets, window, scale):
    check_backward(grad, grad_lse, q, k, v, out, lse, doc_offsets, window, scale, values=False)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_triton_forward = triton_kernel(_TRITON, "forward", fallback=blocked.forward)
_triton_backward = triton_kernel(_TRITON, "backward", fallback=blocked.backward)


def _cuda_forward(q, k, v, doc_offsets, window, scale=None):
    """Triton for 16/32-bit floats; float64 runs the blocked path."""
    fn = blocked.forward if q.dtype == torch.float64 else _triton_forward
    return fn(q, k, v, doc_offsets, window, scale)


def _cuda_backward(grad, grad_lse, q, k, v, out, lse, doc_offsets, window, scale):
    fn = blocked.backward if q.dtype == torch.float64 else _triton_backward
    return fn(grad, grad_lse, q, k, v, out, lse, doc_offsets, window, scale)


register_kernels(window_attention, check=check, cpu=cpu.forward, cuda=_cuda_forward)
register_kernels(window_attention_backward, check=check_backward, cpu=cpu.backward,
                 cuda=_cuda_backward)


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


def _backward_samples(device: str):
    for i, (args, kwargs) in enumerate(_samples(device)):
        q, k, v = (a.detach() for a in args[:3])
        out, lse = torch.ops.aa.window_attention(q, k, v, *args[3:], **kwargs)
        grad_lse = torch.randn_like(lse) if i % 2 else None
        yield (torch.randn_like(out), grad_lse, q, k, v, out, lse, args[3], args[4],
               kwargs.get("scale")), {}


register_samples(window_attention, _samples)
register_samples(window_attention_backward, _backward_samples)

register_onnx(window_attention,
              "aa_compile.kernels.window_attention.onnx_translation:window_attention")
register_onnx(window_attention_backward, reason=TRAINING_ONLY)
