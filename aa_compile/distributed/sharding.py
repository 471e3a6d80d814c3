"""DTensor sharding rules for the ``aa::`` ops (installed on ``import aa_compile.distributed``).

FSDP2 and the TP plans of `aa_compile.distributed.tp` hand most ops plain local tensors, so they
need no rule. A plan that keeps DTensors flowing (``use_local_output=False``,
``SequenceParallel`` on the norms) reaches the ops with DTensors: ``aa::rms_norm`` and its
backward then shard along any dimension but the normalised last one (the weight replicated, its
gradient a partial sum). ``aa::fp8_linear`` and its backward see DTensors under TP whenever the
FP8 pass rewrites a split projection (u-μP with ``fp8="static"``): with static scaling the cast
is elementwise, so it commutes with any split and the op runs colwise (weight ``Shard(0)``),
rowwise (weight ``Shard(1)``, output a partial sum; no bias) or on batch-sharded inputs, as a
plain matmul does, provided every local K and N stays a multiple of 16; the dynamic scalings
take their amax over whole tensors, so their only strategy is replicated (DTensor gathers the
operands first: the one-process numerics, at the cost of the gather). Every other op raises
`MissingShardingRule`, naming the op and the fix, instead of DTensor's bare "no sharding
strategy".
"""

from __future__ import annotations

from typing import Any

from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

from aa_compile.ops import OPS

#: ops with a sharding rule below; the others get `refuse`
RULES = ("aa::rms_norm", "aa::rms_norm_backward", "aa::fp8_linear", "aa::fp8_linear_backward")
#: index of the first non-tensor argument a rule reads (``scaling``; the backward's ``need_*``)
RULE_READS_ARGS_FROM = {"aa::fp8_linear": 3, "aa::fp8_linear_backward": 3}
#: every local K and N of an FP8 GEMM must be a multiple of this
FP8_MULTIPLE = 16


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


def splits_evenly(size: int, spec: Any) -> bool:
    """True if ``size`` split over ``spec``'s mesh leaves FP8-sized pieces (multiples of 16)."""
    parts = spec.mesh.size()
    return size % parts == 0 and (size // parts) % FP8_MULTIPLE == 0


def fp8_linear_strategies(x: Any, w: Any, bias: Any = None, scaling: str = "static",
                          *scales: Any) -> list:
    """Replicated; with static scaling also colwise, rowwise (no bias) and batch-sharded."""
    b = Replicate() if bias is not None else None
    rest = [None] * 7  # scaling and the six scales
    out = [([Replicate()], [Replicate(), Replicate(), b, *rest])]
    if scaling != "static":
        return out
    last = x.ndim - 1
    n, k = w.shape
    if splits_evenly(n, w):
        out.append(([Shard(last)], [Replicate(), Shard(0), Shard(0) if bias is not None else None,
                                    *rest]))
    if bias is None and splits_evenly(k, w):
        out.append(([Partial()], [Shard(last), Shard(1), None, *rest]))
    for d in range(last):
        out.append(([Shard(d)], [Shard(d), Replicate(), b, *rest]))
    return out


def fp8_linear_backward_strategies(grad: Any, x: Any, w: Any, scaling: str, x_scale: float,
                                   w_scale: float, grad_scale: float, grad_x_mult: float,
                                   grad_w_mult: float, need_x: bool, need_w: bool,
                                   need_bias: bool) -> list:
    """The forward's strategies for ``(dx, dw, dbias)``; a gradient not asked for is an empty
    tensor, the same on every rank (replicated)."""
    rest = [None] * 9

    def outs(dx: Any, dw: Any, db: Any) -> list:
        return [dx if need_x else Replicate(), dw if need_w else Replicate(),
                db if need_bias else Replicate()]

    out = [(outs(Replicate(), Replicate(), Replicate()),
            [Replicate(), Replicate(), Replicate(), *rest])]
    if scaling != "static":
        return out
    last = x.ndim - 1
    n, k = w.shape
    if splits_evenly(n, w):  # colwise: grad split like the output
        out.append((outs(Partial(), Shard(0), Shard(0)),
                    [Shard(last), Replicate(), Shard(0), *rest]))
    if splits_evenly(k, w):  # rowwise
        out.append((outs(Shard(last), Shard(1), Replicate()),
                    [Replicate(), Shard(last), Shard(1), *rest]))
    for d in range(last):
        out.append((outs(Shard(d), Partial(), Partial()),
                    [Shard(d), Shard(d), Replicate(), *rest]))
    return out


def hash_rule_args(overload: Any, first: int) -> None:
    """Make DTensor's sharding cache tell calls apart by their non-tensor arguments from index
    ``first`` on. ``register_sharding`` keys the cache on the tensor arguments only (it assumes
    only int arguments matter), so a rule that reads ``scaling`` would otherwise see its first
    answer reused for another scaling."""
    propagator = DTensor._op_dispatcher.sharding_propagator
    info = propagator.op_to_schema_info[overload]
    propagator.op_to_schema_info[overload] = type(info)(
        static_argnum=min(first, info.static_argnum), static_kwargkey=info.static_kwargkey,
        needs_pytree=info.needs_pytree)


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
    register_sharding(OPS["aa::fp8_linear"].op.default)(fp8_linear_strategies)
    register_sharding(OPS["aa::fp8_linear_backward"].op.default)(fp8_linear_backward_strategies)
    for name, first in RULE_READS_ARGS_FROM.items():
        hash_rule_args(OPS[name].op.default, first)
    for name, entry in OPS.items():
        if name not in RULES:
            for overload in entry.op.overloads():
                register_sharding(getattr(entry.op, overload))(refuse(name))


install()
