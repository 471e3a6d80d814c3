"""Rewrite sum-mode embedding bags (``F.embedding_bag``, ``nn.EmbeddingBag``) into `aa::trigram_bag`.

Why: inductor leaves ``embedding_bag`` to ATen as an opaque fallback, whose CUDA backward
scatters with float atomics (results vary run to run). `aa::trigram_bag` has a deterministic
sorted-segment backward on every device and a Triton kernel on CUDA.

Matched: ``F.embedding_bag(input, weight, offsets, ..., mode="sum", per_sample_weights=...,
include_last_offset=...)`` in two forms:

- 1-D ``input`` with 1-D ``offsets`` (variable-size bags). ``include_last_offset=False`` offsets
  get ``nnz`` appended (the op takes CSR boundaries);
- 2-D ``input [B, L]`` with ``offsets=None`` (B fixed-size bags of L entries): the input (and the
  per-sample weights, ``[B, L]`` too) is flattened and the CSR offsets are
  ``arange(B + 1) * L`` (int64), built in the graph (`fixed_size_csr`).

Guards (a failing guard leaves the call alone and records why): ``mode="sum"``; no
``max_norm``, ``scale_grad_by_freq``, ``padding_idx`` or ``sparse`` gradients; 1-D input with
1-D offsets, or 2-D input without offsets and with ``include_last_offset=False``; integer
indices and offsets; a float weight on cpu or cuda; per-sample weights, if any, in the weight's
dtype.

Numerics: the op accumulates in float32 (float64 for float64 weights) and rounds once, like
ATen's CPU kernel; results agree with ``F.embedding_bag`` to rounding.
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from . import match
from .base import GraphPass, PassContext

_SIGNATURE = inspect.signature(F.embedding_bag)
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX = (torch.int32, torch.int64)


def csr_offsets(offsets: Tensor, indices: Tensor) -> Tensor:
    """``offsets`` (bag starts) with ``nnz`` appended: the CSR boundaries the op takes."""
    return torch.cat([offsets, offsets.new_full((1,), indices.numel())])


def fixed_size_csr(indices: Tensor) -> tuple[Tensor, Tensor]:
    """``(indices.reshape(-1), arange(B + 1) * L)`` for fixed-size bags ``indices [B, L]``."""
    b, n = indices.shape
    offsets = torch.arange(b + 1, dtype=torch.int64, device=indices.device) * n
    return indices.reshape(-1), offsets


def flatten(t: Tensor) -> Tensor:
    return t.reshape(-1)


def _guard(args: dict) -> str | None:
    if args.get("mode", "mean") != "sum":
        return f"mode={args.get('mode', 'mean')!r} (only 'sum' is rewritten)"
    for name in ("max_norm", "padding_idx"):
        if args.get(name) is not None:
            return f"{name} is set"
    if args.get("scale_grad_by_freq"):
        return "scale_grad_by_freq=True"
    if args.get("sparse"):
        return "sparse=True (sparse gradients)"
    x, w, off = (match.tensor_value(args.get(k)) for k in ("input", "weight", "offsets"))
    if x is None or w is None:
        return "no shape information for input or weight"
    fixed = x.dim() == 2 and args.get("offsets") is None
    if not fixed and (x.dim() != 1 or off is None or off.dim() != 1):
        return "input is neither 1-D with 1-D offsets nor 2-D [B, L] without offsets"
    if fixed and args.get("include_last_offset", False):
        return "include_last_offset=True with 2-D input"
    if x.dtype not in _INDEX or (off is not None and off.dtype not in _INDEX):
        dt = None if off is None else off.dtype
        return f"indices/offsets dtypes {x.dtype}/{dt} are not int32/int64"
    if w.dim() != 2 or w.dtype not in _FLOAT:
        return f"weight is not a 2-D float tensor ({w.dtype}, {w.dim()}-D)"
    if w.device.type not in ("cpu", "cuda") or x.device != w.device or (
            off is not None and off.device != w.device):
        return f"no aa::trigram_bag kernel for device {w.device.type!r} (or mixed devices)"
    psw = args.get("per_sample_weights")
    if psw is not None:
        p = match.tensor_value(psw)
        if p is None or p.dtype != w.dtype:
            return "per_sample_weights is not in the weight's dtype"
    return None


class EmbeddingBagPass(GraphPass):
    name = "embedding_bag"
    description = "F.embedding_bag(mode='sum') / nn.EmbeddingBag -> aa::trigram_bag"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        for node in list(graph.nodes):
            if not match.is_op(node, (F.embedding_bag,)):
                continue
            try:
                args = _SIGNATURE.bind(*node.args, **node.kwargs).arguments
            except TypeError as e:
                ctx.skip(node, f"unexpected arguments: {e}")
                continue
            reason = _guard(args)
            if reason is not None:
                ctx.skip(node, reason)
                continue
            indices, offsets = args["input"], args.get("offsets")
            psw = args.get("per_sample_weights")
            with graph.inserting_before(node):
                if offsets is None:  # 2-D fixed-size bags (the guard checked)
                    csr = graph.call_function(fixed_size_csr, (indices,))
                    indices = graph.call_function(operator.getitem, (csr, 0))
                    offsets = graph.call_function(operator.getitem, (csr, 1))
                    if psw is not None:
                        psw = graph.call_function(flatten, (psw,))
                elif not args.get("include_last_offset", False):
                    offsets = graph.call_function(csr_offsets, (offsets, indices))
            new = match.replace_with_call(
                node, torch.ops.aa.trigram_bag.default, (args["weight"], indices, offsets, psw),
            )
            graph.erase_node(node)
            ctx.rewrote(new)
        gm.recompile()
