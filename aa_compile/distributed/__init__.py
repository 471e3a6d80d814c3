"""Scale-out on torch.distributed (``docs/distributed.md``): FSDP2 and tensor parallelism with
``backend="aa"``, and the work-splitting helpers the task APIs (`aa_compile.dtm.sweep`,
`aa_compile.atman.explain`) use when given a process group.

    from aa_compile import distributed as aad
    model = aad.shard_blocks(model, compile_options={"inner_compiler": "inductor"})   # FSDP2
    model = aad.parallelize_transformer(model, mesh)                                   # TP
    aad.rewrites_per_rank(dist.group.WORLD)     # what the aa passes did, per rank
    aad.run_local(fn, 2)                        # fn on 2 local gloo processes (tests, notebooks)
"""

from .fsdp import blocks, rewrites_per_rank, shard_blocks
from .launch import init_from_env, run_local, torchrun_group
from .sharding import MissingShardingRule
from .tp import parallelize_transformer, transformer_tp_plan
from .work import (
    broadcast_tensor,
    check_close,
    check_group,
    check_same,
    fingerprint,
    gather_objects,
    is_writer,
    merge_owned,
    owned,
    rank_of,
    shard_batch,
    sum_over_ranks,
    world_of,
)

__all__ = [
    "MissingShardingRule",
    "blocks",
    "broadcast_tensor",
    "check_close",
    "check_group",
    "check_same",
    "fingerprint",
    "gather_objects",
    "init_from_env",
    "is_writer",
    "merge_owned",
    "owned",
    "parallelize_transformer",
    "rank_of",
    "rewrites_per_rank",
    "run_local",
    "shard_batch",
    "shard_blocks",
    "torchrun_group",
    "sum_over_ranks",
    "transformer_tp_plan",
    "world_of",
]
