"""FSDP2 with the ``aa`` backend: shard a model per block with ``fully_shard`` and compile each
block with ``backend="aa"`` (the torchtitan recipe), and the per-rank compile reports.

FSDP2 all-gathers a block's parameters in a forward pre-hook that runs *outside* the compiled
block, so the graphs dynamo hands the backend read plain local tensors (the full, unsharded
parameters) and every pass and ``aa::`` op works unchanged; gradients leave the block as plain
tensors and FSDP2 reduce-scatters them afterwards. ``docs/distributed.md`` lists each op.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard

from aa_compile.config import Config
from aa_compile.models.umup import UmupTransformer
from aa_compile.report import reports

from .fp8_all_gather import cast_before_all_gather
from .work import gather_objects


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every item of every ``nn.ModuleList`` in ``model`` (outermost lists
    only): the transformer blocks of the reference, u-μP and T-FREE models, and the encoder,
    backbone and decoder blocks of HAT."""
    found: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, nn.ModuleList):
            inside.append(name)
            found += [(f"{name}.{i}", child) for i, child in enumerate(module)]
    return found


def shard_blocks(model: nn.Module, *, compile_options: Mapping[str, Any] | Config | None = None,
                 compile: bool = True, mesh: Any = None,
                 gradient_divide_factor: float | None = None, fp8_all_gather: bool = False,
                 **fsdp_kwargs: Any) -> nn.Module:
    """Compile every block (see `blocks`) with ``backend="aa"`` and ``fully_shard`` it, then
    ``fully_shard`` the root (embedding, final norm, head) and compile it too; returns
    ``model`` (changed in place). The root's graphs break at each block's FSDP hooks, so the
    passes see the embedding and head in graphs of their own and each block in its own graph.

    ``compile_options``: the ``aa`` backend options (checked now). ``compile=False`` shards
    only. ``mesh`` and ``fsdp_kwargs`` go to ``fully_shard`` (default: the world, 1-D mesh).
    ``gradient_divide_factor``: what the reduce-scatter divides the summed gradients by
    (FSDP2's default: the world size, a mean). A u-μP model gets ``sqrt(world)`` unless given:
    its weight gradients are scaled by ``1/sqrt(tokens)`` of the *local* batch, so only that
    factor gives the one-process gradients of the global batch. ``fp8_all_gather``: all-gather
    the weights ``fp8="static"`` runs in FP8 as E4M3 bytes (`aa_compile.distributed.fp8_all_gather`);
    needs ``compile_options`` with ``fp8="static"``. Needs an initialised process group.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"shard_blocks: model must be an nn.Module, got {type(model).__name__}")
    found = blocks(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks to shard: "
                         "call torch.distributed.fsdp.fully_shard on its blocks yourself")
    options = Config.from_options(compile_options).__dict__ if compile else None
    if fp8_all_gather:  # before fully_shard: FSDP2 reads the extension hooks when it shards
        cast_before_all_gather(model, compile_options)
    for _, block in found:
        if compile:
            block.compile(backend="aa", options=options)
        fully_shard(block, mesh=mesh, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, **fsdp_kwargs)
    if compile:
        model.compile(backend="aa", options=options)
    if gradient_divide_factor is None and isinstance(model, UmupTransformer):
        gradient_divide_factor = math.sqrt(mesh.size() if mesh is not None
                                           else dist.get_world_size())
    if gradient_divide_factor is not None:
        if not gradient_divide_factor > 0:
            raise ValueError(f"gradient_divide_factor must be > 0, got {gradient_divide_factor}")
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(gradient_divide_factor)
                # sum, then divide: gloo has no PREMUL_SUM, the fused scaled reduction
                module.set_force_sum_reduction_for_comms(True)
    return model


def rewrites_per_rank(group: Any) -> list[dict[str, int]]:
    """On every rank: for each rank of ``group``, the ``aa`` rewrites per pass summed over every
    compile that rank has made (`aa_compile.reports`), in rank order."""
    total: dict[str, int] = {}
    for rep in reports():
        for name, n in rep.rewrites.items():
            total[name] = total.get(name, 0) + n
    return gather_objects(total, group)
