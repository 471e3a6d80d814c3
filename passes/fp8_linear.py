"""Run linear layers as `aa::fp8_linear` (E4M3 operands, E5M2 gradients), per ``Config.fp8``.

Off unless the ``fp8`` option is set; then it rewrites ``F.linear`` calls (what ``nn.Linear``
and u-μP's ``UnitScaledLinear`` inline to in dynamo's graph):

- ``fp8="static"``: the unit-scaled linears of a u-μP model (`aa_compile.models.umup`). Their
  graph is ``linear(getitem(autograd_function_apply(...)), getitem(...))`` whose one user is
  another ``autograd_function_apply``: the u-μP scales (forward ``fan_in^-1/2``, gradient
  scales of input and weight) live in those autograd Functions. Only the ``linear`` node is
  replaced, by ``aa::fp8_linear(x, w, bias, "static")`` with every scale 1.0, so the u-μP
  scales stay exactly where they were and the FP8 matmul sees unit-scaled operands, which fit
  E4M3/E5M2 without an amax ("FP8 out of the box"). Other linears are left, with a reason.
- ``fp8="tensorwise"`` / ``"rowwise"``: every linear of any model, scaled per call from the
  amax per tensor / per row.

Guards (a failing one leaves the node and records why with ``ctx.skip``): in- and
out-features (K, N) positive multiples of 16 and static; x, weight and bias float32 / bfloat16
/ float16; device cpu, or cuda with compute capability >= 8.9; the module not named in
``Config.fp8_keep`` (default ``("o_proj", "down_proj", "lm_head")``: u-μP keeps the attention
out- and the FFN down-projection in bf16, the matmuls whose input scale can grow during
training; the LM head in FP8 costs the tiny u-μP model ~2% of final loss). With
``fp8="static"`` and no unit-scaled linear at all, the pass records that nothing was rewritten
and logs a warning (``"tensorwise"`` is the mode for models that are not unit-scaled).
"""

from __future__ import annotations

import operator
import re

import torch
import torch.nn.functional as F
from torch import fx

from aa_compile.logger import log

from . import match
from .base import GraphPass, PassContext

FP8_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
UNIT_SCALED_CLASS = "UnitScaledLinear"
LINEAR_FUNCS = (F.linear, torch._C._nn.linear)


def module_path(node: fx.Node) -> str | None:
    """The dotted path of the innermost module ``node`` was traced in (``layers.0.attn.o_proj``),
    from dynamo's ``nn_module_stack``; None outside any module."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['[^']*'\]\.?", "", path)  # the compiled function's argument
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[['\"]?([^\]'\"]*)['\"]?\]", r".\1", path)  # [0] / ['name'] -> .0 / .name
    return path.strip(".")


def _module_class(node: fx.Node) -> type | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    cls = list(stack.values())[-1][1]
    return cls if isinstance(cls, type) else None


def kept(path: str | None, keep: tuple[str, ...]) -> str | None:
    """The ``fp8_keep`` entry that names ``path`` (last component or dotted suffix), if any."""
    if not path:
        return None
    for name in keep:
        name = name.strip(".")
        if path == name or path.endswith("." + name):
            return name
    return None


def _is_autograd_fn_output(node) -> bool:
    """``getitem(autograd_function_apply(...), 0)``: the result of a u-μP ``scaled`` call."""
    return (isinstance(node, fx.Node) and node.op == "call_function"
            and node.target is operator.getitem and node.args[1] == 0
            and isinstance(node.args[0], fx.Node)
            and node.args[0].target is torch.ops.higher_order.autograd_function_apply)


def unit_scaled_reason(node: fx.Node) -> str | None:
    """None if ``node`` is the matmul of a u-μP unit-scaled linear, else why not."""
    cls = _module_class(node)
    if cls is None or not any(c.__name__ == UNIT_SCALED_CLASS for c in cls.__mro__):
        name = cls.__name__ if cls is not None else "no module"
        return (f"not a unit-scaled linear ({name}): fp8='static' uses scale 1, which only "
                "fits unit-scaled (u-μP) operands; use fp8='tensorwise' for this model")
    if not (len(node.args) >= 2 and _is_autograd_fn_output(node.args[0])
            and _is_autograd_fn_output(node.args[1])):
        return "unit-scaled linear without its scaled() inputs (unexpected graph form)"
    users = list(node.users)
    if len(users) != 1 or users[0].target is not torch.ops.higher_order.autograd_function_apply:
        return "unit-scaled linear whose output is not scaled() (unexpected graph form)"
    return None


def _static_int(v) -> int | None:
    return int(v) if isinstance(v, int) else None


def guard(node: fx.Node, keep: tuple[str, ...]) -> str | None:
    """None if ``F.linear`` ``node`` can run as `aa::fp8_linear`, else the reason it cannot."""
    name = kept(module_path(node), keep)
    if name is not None:
        return f"kept out of FP8 by fp8_keep ({name!r})"
    x, w = node.args[0], match.arg(node, 1, "weight")
    bias = match.arg(node, 2, "bias")
    xv, wv = match.tensor_value(x), match.tensor_value(w)
    if xv is None or wv is None:
        return "no shape information for the input or the weight"
    if wv.dim() != 2:
        return f"weight is {wv.dim()}-D, not [N, K]"
    bv = None
    if bias is not None:
        bv = match.tensor_value(bias)
        if bv is None:
            return "bias is not a tensor"
    for what, t in (("input", xv), ("weight", wv), ("bias", bv)):
        if t is not None and t.dtype not in FP8_DTYPES:
            return f"{what} dtype {t.dtype} has no FP8 path (float32, bfloat16, float16 only)"
    n, k = _static_int(wv.shape[0]), _static_int(wv.shape[1])
    if n is None or k is None:
        return "in/out features are symbolic; FP8 needs static multiples of 16"
    for dim, size, what in (("K", k, "in_features"), ("N", n, "out_features")):
        if size == 0 or size % 16:
            return f"{dim} = {size} ({what}) is not a positive multiple of 16"
    dev = xv.device
    if wv.device != dev or (bv is not None and bv.device != dev):
        return "operands on different devices"
    if dev.type == "cuda":
        try:
            cap = torch.cuda.get_device_capability(dev)
        except (RuntimeError, AssertionError) as e:  # no driver where it was traced
            return f"cannot read the compute capability of {dev}: {e}"
        if cap < (8, 9):
            return f"{dev} is sm_{cap[0]}{cap[1]}; FP8 matmuls need compute capability >= 8.9"
    elif dev.type != "cpu":
        return f"no aa::fp8_linear kernel for device {dev.type!r} (cpu, cuda only)"
    return None


class FP8LinearPass(GraphPass):
    name = "fp8_linear"
    description = "F.linear / unit-scaled linear -> aa::fp8_linear (options fp8, fp8_keep)"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        config = ctx.config
        mode = getattr(config, "fp8", None)
        if mode is None:
            return
        keep = tuple(getattr(config, "fp8_keep", ()))
        graph = gm.graph
        rewrites = 0
        for node in list(graph.nodes):
            if not match.is_op(node, LINEAR_FUNCS):
                continue
            reason = unit_scaled_reason(node) if mode == "static" else None
            if reason is None:
                reason = guard(node, keep)
            if reason is not None:
                ctx.skip(node, reason)
                continue
            x, w = node.args[0], match.arg(node, 1, "weight")
            bias = match.arg(node, 2, "bias")
            # scales all 1.0: static keeps the u-μP scales in the surrounding scaled() calls;
            # the dynamic modes compute theirs from the amax (and require 1.0 here)
            new = match.replace_with_call(
                node, torch.ops.aa.fp8_linear.default,
                (x, w, bias, mode, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0))
            new.meta["aa_fp8_module"] = module_path(node)
            graph.erase_node(node)
            ctx.rewrote(new)
            rewrites += 1
        if mode == "static" and rewrites == 0:
            reason = ("fp8='static': no unit-scaled (u-μP) linear in this graph, nothing was "
                      "rewritten; fp8='tensorwise' or 'rowwise' handle plain linears")
            ctx.skip("graph", reason)
            log.warning("aa pass fp8_linear: %s", reason)
        gm.recompile()
