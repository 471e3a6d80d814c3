"""DTensor sharding rules for the ``aa::`` ops (installed on ``import aa_compile.distributed``).

FSDP2 and the TP plan of `aa_compile.distributed.tp` hand the ops plain local tensors, so they
need no rule. A plan that keeps DTensors flowing (``use_local_output=False``,
``SequenceParallel`` on the norms) reaches the ops with DTensors: ``aa::rms_norm`` and its
backward then shard along any dimension but the normalised last one (the weight replicated, its
gradient a partial sum); every other op raises `MissingShardingRule`, naming the op and the fix,
instead of DTensor's bare "no sharding strategy".
"""

from __future__ import annotations

from typing import Any

from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

from aa_compile.ops import OPS

#: ops with a sharding rule below; the others get `refuse`
RULES = ("aa::rms_norm", "aa::rms_norm_backward")


class MissingShardingRule(NotImplementedError):
    """An ``aa::`` op received DTensor inputs but has no sharding rule."""


def rms_norm_strategies(x: Any, weight: Any, eps: float, out_dtype: Any = None) -> list:
    """All replicated, or ``x`` and the output sharded alike on a dimension before the last."""
    out = [([Replicate()], [Replicate(), Replicate() if weight is not None else None,
                            None, None])]
    for d in range(x.ndim - 1):
        out.append(([Shard(d)], [Shard(d), Replicate() if weight is not None else None,
                                 None, None]))
    return out


def rms_norm_backward_strategies(grad: Any, x: Any, weight: Any, eps: float) -> list:
    """As the forward; a sharded ``x`` makes the weight gradient a partial sum over ranks."""
    w = Replicate() if weight is not None else None
    out = [([Replicate(), Replicate()], [Replicate(), Replicate(), w, None])]
    for d in range(x.ndim - 1):
        out.append(([Shard(d), Partial() if weight is not None else Replicate()],
                    [Shard(d), Shard(d), w, None]))
    return out


def refuse(name: str):
    """A sharding function for ``name`` that raises `MissingShardingRule` with the fix."""

    def strategies(*args: Any, **kwargs: Any) -> list:
        raise MissingShardingRule(
            f"{name} has no DTensor sharding rule but received DTensor inputs: keep it on plain "
            "local tensors (parallelize with use_local_output=True, as "
            "aa_compile.distributed.parallelize_transformer does, or shard with FSDP2, which "
            "all-gathers first), or register a rule with "
            "torch.distributed.tensor.experimental.register_sharding (docs/distributed.md)"
        )

    return strategies


def install() -> None:
    """Register the rules and the refusals for every op in `aa_compile.ops.OPS`."""
    register_sharding(OPS["aa::rms_norm"].op.default)(rms_norm_strategies)
    register_sharding(OPS["aa::rms_norm_backward"].op.default)(rms_norm_backward_strategies)
    for name, entry in OPS.items():
        if name not in RULES:
            for overload in entry.op.overloads():
                register_sharding(getattr(entry.op, overload))(refuse(name))


install()
