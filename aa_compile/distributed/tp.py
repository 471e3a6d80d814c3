"""Tensor parallelism with ``backend="aa"``: Megatron-style column/row splits of the attention
and SwiGLU projections through ``parallelize_module``, for the reference transformer and the
models built on its block layout (the T-FREE LM's blocks are reference blocks; u-μP's mirror
them with unit-scaled linears).

q/k/v and gate/up are split by output features (colwise), o_proj and down_proj by input
features (rowwise, which all-reduces their outputs), so each rank holds ``n_heads / tp`` query
heads, ``kv_heads / tp`` key/value heads and ``ffn_dim / tp`` hidden units. Both styles hand
their outputs on as plain local tensors (``use_local_output``): RoPE, attention and the SwiGLU
product run on each rank's heads and units, and the norms, embeddings and heads, replicated,
see whole plain tensors, so the ``aa`` passes on them work unchanged. The matmuls themselves
run on DTensors (the weights are sharded DTensors): plain ``F.linear`` has DTensor's own rule,
``aa::fp8_linear`` (u-μP with ``fp8="static"``) the one in `aa_compile.distributed.sharding`.

Replicated by design: the T-FREE embedding (a sum of trigram-slot rows, ``aa::trigram_bag``)
and its multi-hot head (sigmoid/BCE over all slots, ``aa::dictionary_score`` when decoding),
u-μP's embedding and readout, every RMSNorm. Splitting them would need a vocabulary-parallel
bag and loss; they are a small part of the weights at the sizes where TP matters.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn
from torch.distributed.tensor import Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

from aa_compile.models.tfree import TFreeLM
from aa_compile.models.transformer import Transformer
from aa_compile.models.umup import UmupTransformer, UnitScaledLinear

#: the models `parallelize_transformer` splits
SUPPORTED = (Transformer, TFreeLM, UmupTransformer)


class UnitColwiseParallel(ColwiseParallel):
    """``ColwiseParallel`` that also splits a u-μP `UnitScaledLinear` (weight ``Shard(0)``):
    its weight stays a DTensor with the global shape, so the u-μP scales, computed from
    ``weight.shape``, are those of the whole layer."""

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        if isinstance(module, UnitScaledLinear):
            return linear_style(self, module, device_mesh)
        return super()._apply(module, device_mesh)


class UnitRowwiseParallel(RowwiseParallel):
    """``RowwiseParallel`` that also splits a u-μP `UnitScaledLinear` (weight ``Shard(1)``, input
    sharded on its last dimension, output all-reduced)."""

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        if isinstance(module, UnitScaledLinear):
            self.desired_input_layouts = (Shard(-1),)
            return linear_style(self, module, device_mesh)
        return super()._apply(module, device_mesh)


def linear_style(style: ColwiseParallel | RowwiseParallel, module: nn.Module,
                 device_mesh: Any) -> nn.Module:
    """Apply ``style`` to a bias-free linear that is not an ``nn.Linear``: the partition and the
    input / output hooks ``style`` uses for ``nn.Linear``."""
    return distribute_module(
        module, device_mesh, style._partition_linear_fn,
        partial(style._prepare_input_fn, style.input_layouts, style.desired_input_layouts),
        partial(style._prepare_output_fn, style.output_layouts, style.use_local_output))


def transformer_tp_plan() -> dict[str, Any]:
    """The per-block plan of the reference transformer and the T-FREE LM: module path inside a
    block -> ``ParallelStyle``."""
    return {
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }


def umup_tp_plan() -> dict[str, Any]:
    """The per-block plan of the u-μP transformer: the same splits of its unit-scaled
    linears."""
    return {
        "attn.q_proj": UnitColwiseParallel(),
        "attn.k_proj": UnitColwiseParallel(),
        "attn.v_proj": UnitColwiseParallel(),
        "attn.o_proj": UnitRowwiseParallel(),
        "mlp.gate_proj": UnitColwiseParallel(),
        "mlp.up_proj": UnitColwiseParallel(),
        "mlp.down_proj": UnitRowwiseParallel(),
    }


def head_counts(model: nn.Module) -> tuple[int, int, int]:
    """``(n_heads, kv_heads, ffn_dim)`` of a supported model's blocks."""
    cfg = model.tcfg if isinstance(model, TFreeLM) else model.config
    return cfg.n_heads, cfg.kv_heads, cfg.ffn_dim


def parallelize_transformer(model: nn.Module, mesh: Any) -> nn.Module:
    """Split every block of a reference `Transformer`, a `TFreeLM` or a `UmupTransformer` over
    the 1-D device mesh ``mesh`` (`transformer_tp_plan` / `umup_tp_plan`); returns ``model``,
    changed in place. Compile it afterwards (``torch.compile(model, backend="aa")``). Every
    rank must feed the same batch. Training and full-sequence forwards only: the KV caches of
    ``generate`` are sized for all heads."""
    if not isinstance(model, SUPPORTED):
        raise TypeError(f"parallelize_transformer takes the reference Transformer, a TFreeLM or "
                        f"a UmupTransformer, got {type(model).__name__}; write a plan for "
                        "parallelize_module instead (transformer_tp_plan shows the splits)")
    if mesh is None or mesh.ndim != 1:
        raise ValueError("mesh must be a 1-D DeviceMesh, e.g. init_device_mesh('cpu', (2,))")
    tp = mesh.size()
    n_heads, kv_heads, ffn_dim = head_counts(model)
    for name, value in (("n_heads", n_heads), ("kv_heads", kv_heads), ("ffn_dim", ffn_dim)):
        if value % tp:
            raise ValueError(f"tensor parallelism over {tp} ranks needs {name}={value} to be a "
                             f"multiple of {tp}: pick a mesh size that divides it")
    plan = umup_tp_plan() if isinstance(model, UmupTransformer) else transformer_tp_plan()
    for block in model.layers:
        parallelize_module(block, mesh, plan)
        # the attention reshapes by its own head counts: each rank now holds 1/tp of them
        block.attn.n_heads = n_heads // tp
        block.attn.kv_heads = kv_heads // tp
    return model
