"""FP8 all-gather under FSDP2: u-μP's static-FP8 weights cross the wire as E4M3 bytes.

With ``fp8="static"`` the ``fp8_linear`` pass casts each unit-scaled weight to E4M3 at scale 1
inside the compiled block, after FSDP2 has all-gathered it in its own dtype (4 bytes per
element in float32). `cast_before_all_gather` moves that cast in front of the all-gather, as
torchao's float8 FSDP2 path does: the weights the pass will rewrite become `Float8AllGatherWeight`
parameters (a wrapper tensor subclass around the float32 master shard) whose FSDP2 extension
hooks cast the *shard* to E4M3 (``fsdp_pre_all_gather``) and widen the gathered E4M3 bytes back
to the parameter dtype (``fsdp_post_all_gather``), so 1 byte per element is all-gathered.

Static scaling is what makes this a local cast: the scale is 1 on every rank, so no amax and
no all-reduce of scales is needed before the gather (torchao's dynamic tensorwise recipe needs
one). The numerics are those of the no-cast FP8 run: the cast is the op's own
(`aa_compile.kernels.fp8_linear.reference.quantize`, saturating, round to nearest even), and
`aa::fp8_linear`'s static cast of a weight that already holds E4M3 values changes nothing. The
op takes float32/bfloat16/float16 weights only, so it still runs that (idempotent) cast: one
elementwise pass per weight and GEMM, not a second rounding. With a mixed-precision
``param_dtype`` the shard is rounded to it before the E4M3 cast, as FSDP2 rounds it before its
own all-gather, so the two runs stay bit for bit equal. The master weights, their gradients
(reduce-scattered in the parameter's dtype) and the optimiser step are untouched, and
checkpoints hold the plain master weights.

`AllGatherBytes` counts the bytes each FSDP2 all-gather sends (``set_custom_all_gather``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils import _pytree as pytree

from aa_compile.config import Config
from aa_compile.kernels.fp8_linear.reference import E4M3, quantize
from aa_compile.models.umup import UnitScaledLinear
from aa_compile.passes.fp8_linear import FP8_DTYPES, kept

#: ops whose outputs keep the subclass: what FSDP2 does to a parameter when it shards it
#: (chunk, pad with new_zeros, narrow, copy, view) and what nn.Parameter / .to() / clone need
PRESERVE = {
    torch.ops.aten.detach.default,
    torch.ops.aten.alias.default,
    torch.ops.aten.view.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.as_strided.default,
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.narrow.default,
    torch.ops.aten.split.Tensor,
    torch.ops.aten.split_with_sizes.default,
    torch.ops.aten.empty_like.default,
    torch.ops.aten.new_zeros.default,
    torch.ops.aten.new_empty.default,
    torch.ops.aten.zeros_like.default,
    torch.ops.aten.clone.default,
    torch.ops.aten._to_copy.default,
    torch.ops.aten.copy_.default,
    torch.ops.aten._pin_memory.default,
}


class Float8AllGatherWeight(Tensor):
    """A float32 (or bfloat16/float16) master weight that FSDP2 all-gathers as E4M3 bytes.

    Every op sees the plain master tensor (``.master``): the subclass is kept only through the
    view / copy / allocation ops FSDP2 uses to shard it (`PRESERVE`), so gradients, optimiser
    states and the values the model reads are plain tensors. The all-gather hooks cast the
    local shard with the same saturating E4M3 cast as ``aa::fp8_linear``'s static scaling."""

    master: Tensor

    @staticmethod
    def __new__(cls, data: Tensor) -> Float8AllGatherWeight:
        return Tensor._make_wrapper_subclass(
            cls, data.size(), strides=data.stride(), storage_offset=data.storage_offset(),
            dtype=data.dtype, layout=data.layout, device=data.device,
            requires_grad=data.requires_grad)

    def __init__(self, data: Tensor) -> None:
        self.master = data

    def __repr__(self) -> str:
        return f"Float8AllGatherWeight({self.master!r})"

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickle (``torch.save``, ``torch.distributed.checkpoint``) as the plain master weight:
        checkpoints do not depend on where the FP8 cast happens."""
        return self.master.__reduce_ex__(protocol)

    def __tensor_flatten__(self) -> tuple[list[str], None]:
        return ["master"], None

    @staticmethod
    def __tensor_unflatten__(inner: Mapping[str, Tensor], meta: Any, outer_size: Any,
                             outer_stride: Any) -> Float8AllGatherWeight:
        return Float8AllGatherWeight(inner["master"])

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (),
                           kwargs: Mapping[str, Any] | None = None) -> Any:
        def unwrap(t: Float8AllGatherWeight) -> Tensor:
            return t.master

        out = func(*pytree.tree_map_only(cls, unwrap, args),
                   **pytree.tree_map_only(cls, unwrap, kwargs or {}))
        if func not in PRESERVE:
            return out
        return pytree.tree_map_only(Tensor, cls, out)

    def fsdp_pre_all_gather(self, mesh: Any, outer_size: torch.Size,
                            outer_stride: tuple[int, ...], module: nn.Module,
                            mp_policy: Any) -> tuple[tuple[Tensor, ...], None]:
        """This rank's shard cast to E4M3 (static scale 1), as uint8 bytes: FSDP2 packs mixed
        dtypes as uint8 anyway, and gloo has no float8 all-gather. With a mixed-precision
        ``param_dtype`` the shard is rounded to it first, as FSDP2 would before gathering it,
        so the op sees bit for bit the weight of the run without this cast. An uneven last
        shard is padded to the rows of the first (FSDP2 gathers equal-sized pieces)."""
        shard = self.master
        param_dtype = getattr(mp_policy, "param_dtype", None)
        if param_dtype is not None and param_dtype != shard.dtype:
            shard = shard.to(param_dtype)
        rows = -(-outer_size[0] // mesh.size())
        if shard.shape[0] != rows:
            padded = shard.new_zeros(rows, *shard.shape[1:])
            padded[:shard.shape[0]].copy_(shard)
            shard = padded
        return (quantize(shard, E4M3, 1.0).view(torch.uint8),), None

    def fsdp_post_all_gather(self, all_gather_outputs: tuple[Tensor, ...], metadata: None,
                             param_dtype: torch.dtype, *, out: Tensor | None = None
                             ) -> tuple[Tensor, tuple[Tensor, ...]] | None:
        """The gathered E4M3 bytes widened to ``param_dtype`` (exact: every E4M3 value is a
        float32/bfloat16/float16 value); FSDP2 views the first rows as the unsharded weight and
        frees the widened copy when it reshards."""
        (gathered,) = all_gather_outputs
        values = gathered.view(E4M3)
        with torch.no_grad():
            if out is not None:  # later all-gathers refill the unsharded parameter in place
                flat = out.view(-1)
                flat.copy_(values.view(-1)[:flat.numel()])
                return None
            wide = values.to(param_dtype)
        return wide, (wide,)


@dataclasses.dataclass
class CastPlan:
    """What `cast_before_all_gather` did: the weights now all-gathered in E4M3, and the
    unit-scaled linears it left (with the reason: the pass will not rewrite them either)."""

    cast: list[str]
    left: dict[str, str]


def weight_reason(name: str, module: nn.Module, keep: tuple[str, ...]) -> str | None:
    """None if the ``fp8_linear`` pass with ``fp8="static"`` rewrites ``module``'s matmul (so
    its weight may be all-gathered in E4M3), else why not: the static guards of the pass."""
    if not isinstance(module, UnitScaledLinear):
        return "not a unit-scaled linear"
    entry = kept(name, keep)
    if entry is not None:
        return f"kept out of FP8 by fp8_keep ({entry!r})"
    w = module.weight
    if isinstance(w, Float8AllGatherWeight):
        return "already cast before the all-gather"
    if w.dtype not in FP8_DTYPES:
        return f"weight dtype {w.dtype} has no FP8 path"
    n, k = w.shape
    if n == 0 or k == 0 or n % 16 or k % 16:
        return f"weight shape {tuple(w.shape)}: FP8 needs multiples of 16"
    return None


def cast_before_all_gather(model: nn.Module,
                           compile_options: Mapping[str, Any] | Config | None) -> CastPlan:
    """Make every weight the static ``fp8_linear`` pass will run in FP8 a
    `Float8AllGatherWeight`, in place; call it *before* ``fully_shard`` (FSDP2 reads the
    extension hooks when it shards). ``compile_options`` must have ``fp8="static"``: dynamic
    scales would need an amax all-reduce before the gather, which is not implemented."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"cast_before_all_gather: model must be an nn.Module, got "
                        f"{type(model).__name__}")
    config = Config.from_options(compile_options)
    if config.fp8 != "static":
        raise ValueError(
            f"fp8_all_gather needs compile_options fp8='static' (got fp8={config.fp8!r}): the "
            "E4M3 cast before the all-gather uses u-μP's static scale 1; tensorwise/rowwise "
            "scales would need an amax all-reduce first (not implemented)")
    if isinstance(model, FSDPModule) or any(isinstance(p, DTensor)
                                            for p in model.parameters()):
        raise ValueError("fp8_all_gather: the model is already sharded (FSDP modules or "
                         "DTensor parameters); cast its weights before fully_shard "
                         "(shard_blocks does it in that order); tensor-parallel weights are "
                         "not supported")
    plan = CastPlan([], {})
    for name, module in model.named_modules():
        if not isinstance(module, UnitScaledLinear):
            continue
        reason = weight_reason(name, module, config.fp8_keep)
        if reason is not None:
            plan.left[name] = reason
            continue
        w = module.weight
        module.weight = nn.Parameter(Float8AllGatherWeight(w.detach()),
                                     requires_grad=w.requires_grad)
        plan.cast.append(f"{name}.weight")
    if not plan.cast:
        raise ValueError(
            f"fp8_all_gather: {type(model).__name__} has no weight the static fp8 pass runs "
            f"in FP8 (left: {plan.left or 'no unit-scaled linear'}); drop fp8_all_gather")
    return plan


class AllGatherBytes:
    """FSDP2's all-gather (``all_gather_into_tensor``; the ``AllGather`` interface of
    ``FSDPModule.set_custom_all_gather``) that counts what it moves: ``sent``
    (this rank's input bytes, summed over calls) and ``received`` (output bytes); install on
    every FSDP module with `count_all_gather_bytes`."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.calls = 0

    def allocate(self, size: Any, *, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: Tensor, input_tensor: Tensor, group: Any,
                 async_op: bool = False) -> Any:
        self.sent += input_tensor.numel() * input_tensor.element_size()
        self.received += output_tensor.numel() * output_tensor.element_size()
        self.calls += 1
        return dist.all_gather_into_tensor(output_tensor, input_tensor, group=group,
                                           async_op=async_op)


def count_all_gather_bytes(model: nn.Module) -> AllGatherBytes:
    """Install one `AllGatherBytes` on every FSDP module of ``model`` and return it."""
    counter = AllGatherBytes()
    found = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not found:
        raise ValueError("count_all_gather_bytes: no FSDP module in the model; shard it first "
                         "(aa_compile.distributed.shard_blocks)")
    for module in found:
        module.set_custom_all_gather(counter)
    return counter
