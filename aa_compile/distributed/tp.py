"""Tensor parallelism for the reference transformer with ``backend="aa"``: Megatron-style
column/row splits of the attention and SwiGLU projections through ``parallelize_module``.

q/k/v and gate/up are split by output features (``ColwiseParallel``), o_proj and down_proj by
input features (``RowwiseParallel``, which all-reduces their outputs), so each rank holds
``n_heads / tp`` query heads and ``kv_heads / tp`` key/value heads and ``ffn_dim / tp`` hidden
units. Both plans hand their outputs on as plain local tensors (``use_local_output``): the RoPE,
SDPA and SwiGLU product run on each rank's heads and units, and the RMSNorms, embedding and
head, left replicated, see whole plain tensors, so every ``aa`` pass and op works unchanged.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

from aa_compile.models.transformer import Transformer


def transformer_tp_plan() -> dict[str, Any]:
    """The per-block plan: module path inside a `Block` -> ``ParallelStyle``."""
    return {
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }


def parallelize_transformer(model: nn.Module, mesh: Any) -> nn.Module:
    """Split every block of the reference `Transformer` over the 1-D device mesh ``mesh``
    (`transformer_tp_plan`); returns ``model``, changed in place. Compile it afterwards
    (``torch.compile(model, backend="aa")``). Every rank must feed the same batch."""
    if not isinstance(model, Transformer):
        raise TypeError(f"parallelize_transformer takes the reference Transformer, got "
                        f"{type(model).__name__}; write a plan for parallelize_module instead")
    if mesh is None or mesh.ndim != 1:
        raise ValueError("mesh must be a 1-D DeviceMesh, e.g. init_device_mesh('cpu', (2,))")
    tp = mesh.size()
    cfg = model.config
    for name, value in (("n_heads", cfg.n_heads), ("kv_heads", cfg.kv_heads),
                        ("ffn_dim", cfg.ffn_dim)):
        if value % tp:
            raise ValueError(f"tensor parallelism over {tp} ranks needs {name}={value} to be a "
                             f"multiple of {tp}: pick a mesh size that divides it")
    plan = transformer_tp_plan()
    for block in model.layers:
        parallelize_module(block, mesh, plan)
        # the attention reshapes by its own head counts: each rank now holds 1/tp of them
        block.attn.n_heads = cfg.n_heads // tp
        block.attn.kv_heads = cfg.kv_heads // tp
    return model
