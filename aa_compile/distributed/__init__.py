"""Scale-out on torch.distributed (``docs/distributed.md``): FSDP2 and tensor parallelism with
``backend="aa"``, and the work-splitting helpers the task APIs (`aa_compile.dtm.sweep`,
`aa_compile.atman.explain`) use when given a process group.

    from aa_compile import distributed as aad
    model = aad.shard_blocks(model, compile_options={"inner_compiler": "inductor"})   # FSDP2
    model = aad.parallelize_transformer(model, mesh)                                   # TP
    aad.rewrites_per_rank(dist.group.WORLD)     # what the aa passes did, per rank
    aad.run_local(fn, 2)                        # fn on 2 local gloo processes (tests, notebooks)
    aad.save_checkpoint(d, model, opt, step)    # DCP; resumes on another world size:
    step = aad.load_checkpoint(d, model, opt)
"""

from .checkpoint import load_checkpoint, model_from_checkpoint, read_checkpoint, save_checkpoint
from .fp8_all_gather import (
    AllGatherBytes,
    Float8AllGatherWeight,
    cast_before_all_gather,
    count_all_gather_bytes,
)
from .fsdp import blocks, rewrites_per_rank, shard_blocks
from .launch import init_from_env, run_local, torchrun_group
from .sharding import MissingShardingRule
from .tp import parallelize_transformer, transformer_tp_plan, umup_tp_plan
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
    "AllGatherBytes",
    "Float8AllGatherWeight",
    "MissingShardingRule",
    "blocks",
    "broadcast_tensor",
    "cast_before_all_gather",
    "check_close",
    "check_group",
    "check_same",
    "count_all_gather_bytes",
    "fingerprint",
    "gather_objects",
    "init_from_env",
    "is_writer",
    "load_checkpoint",
    "merge_owned",
    "model_from_checkpoint",
    "owned",
    "parallelize_transformer",
    "rank_of",
    "read_checkpoint",
    "rewrites_per_rank",
    "run_local",
    "save_checkpoint",
    "shard_batch",
    "shard_blocks",
    "sum_over_ranks",
    "torchrun_group",
    "transformer_tp_plan",
    "umup_tp_plan",
    "world_of",
]
