"""Rewrite sum-mode embedding bags (``F.embedding_bag``, ``nn.EmbeddingBag``) into `aa::trigram_bag`.

Why: inductor leaves ``embedding_bag`` to ATen as an opaque fallback, whose CUDA backward
scatters with float atomics (results vary run to run). `aa::trigram_bag` has a deterministic
sorted-segment backward on every device and a Triton kernel on CUDA.

Matched: ``F.embedding_bag(input, weight, offsets, ..., mode="sum", per_sample_weights=...,
include_last_offset=...)`` with 1-D ``input`` and ``offsets``. ``include_last_offset=False``
offsets get ``nnz`` appended (the op takes CSR boundaries).

Guards (a failing guard leaves the call alone and records why): ``mode="sum"``; no
``max_norm``, ``scale_grad_by_freq``, ``padding_idx`` or ``sparse`` gradients; 1-D input with
offsets (2-D fixed-size bags are not rewritten yet); integer indices and offsets; a float weight
on cpu or cuda; per-sample weights, if any, in the weight's dtype.

Numerics: the op accumulates in float32 (float64 for float64 weights) and rounds once, like
ATen's CPU kernel; results agree with ``F.embedding_bag`` to rounding.
"""

from __future__ import annotations

import inspect

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

from . import match
from .base import GraphPass, PassContext

_SIGNATURE = inspect.signature(F.embedding_bag)
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX = (torch.int32, torch.int64)


def csr_offsets(offsets: Tensor, indices: Tensor) -> Tensor:
    """``offsets`` (bag starts) with ``nnz`` appended: the CSR boundaries the op takes."""
    return torch.cat([offsets, offsets.new_full((1,), indices.numel())])


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
    if x.dim() != 1 or off is None or off.dim() != 1:
        return "input is not 1-D with 1-D offsets (fixed-size 2-D bags are not rewritten)"
    if x.dtype not in _INDEX or off.dtype not in _INDEX:
        return f"indices/offsets dtypes {x.dtype}/{off.dtype} are not int32/int64"
    if w.dim() != 2 or w.dtype not in _FLOAT:
        return f"weight is not a 2-D float tensor ({w.dtype}, {w.dim()}-D)"
    if w.device.type not in ("cpu", "cuda") or x.device != w.device or off.device != w.device:
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
            offsets = args["offsets"]
            if not args.get("include_last_offset", False):
                with graph.inserting_before(node):
                    offsets = graph.call_function(csr_offsets, (offsets, args["input"]))
            new = match.replace_with_call(
                node, torch.ops.aa.trigram_bag.default,
                (args["weight"], args["input"], offsets, args.get("per_sample_weights")),
            )
            graph.erase_node(node)
            ctx.rewrote(new)
        gm.recompile()
