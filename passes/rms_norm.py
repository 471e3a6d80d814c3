"""Rewrite RMSNorm, however it is spelled, into `aa::rms_norm`.

Matched forms (dynamo's torch-level graph):

- ``F.rms_norm`` / ``torch.rms_norm`` (also what ``nn.RMSNorm`` inlines to), normalizing over the
  last dimension only;
- the hand-written form of Llama-style models, Hugging Face's included::

      xf = x.to(float32)                                  # optional upcast
      var = xf.pow(2).mean(-1, keepdim=True)              # or xf * xf, xf.square(), torch.mean
      y = xf * torch.rsqrt(var + eps)                     # or xf / torch.sqrt(var + eps)
      out = weight * y.to(x.dtype)                        # optional cast, optional weight

Guards (a failing guard leaves the nodes alone and records why): a floating input on a device
with an aa kernel (cpu, cuda); the mean over the last dimension with ``keepdim=True``; a
constant ``eps``; the weight, if any, a 1-D tensor as wide as the normalized dimension; no
intermediate result (variance, rstd) used outside the pattern.

Numerics: the op accumulates in float32 and rounds once, where the hand-written form may round
between the normalization and the weight multiply; results agree to that rounding.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import match
from .base import GraphPass, PassContext

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEVICES = ("cpu", "cuda")
CAST_METHODS = ("to", "float", "type_as", "type", "half", "bfloat16", "double")


@dataclasses.dataclass
class RMSNormMatch:
    x: fx.Node
    weight: fx.Node | None
    eps: float | fx.Node  # a node when dynamo made eps a symbolic float
    output: fx.Node  # its uses are redirected to the new op
    interior: list[fx.Node]  # in graph order; erased if nothing else uses them


def is_cast(node) -> bool:
    """A dtype-only conversion (same shape, same device)."""
    if not match.is_op(node, (torch.Tensor.to, torch.Tensor.float), CAST_METHODS):
        return False
    out, src = match.tensor_value(node), match.tensor_value(node.args[0])
    return (
        out is not None
        and src is not None
        and out.shape == src.shape
        and out.device == src.device
    )


def _is_scalar(eps) -> bool:
    """A Python number, or (under ``dynamic=True``, where dynamo lifts float attributes into
    graph inputs) a node producing a symbolic float."""
    return match.is_number(eps) or isinstance(match.value(eps), (float, torch.SymFloat))


def _last_dim(dim, ndim: int) -> bool:
    if isinstance(dim, (list, tuple)):
        if len(dim) != 1:
            return False
        dim = dim[0]
    return isinstance(dim, int) and dim in (-1, ndim - 1)


def _square_input(node) -> fx.Node | None:
    """``t`` if ``node`` is ``t**2``, ``t*t`` or ``t.square()``."""
    if match.is_op(node, (torch.pow, torch.Tensor.pow, pow), ("pow",)):
        if match.arg(node, 1, "exponent") == 2:
            return node.args[0]
    if match.is_mul(node) and len(node.args) == 2 and node.args[0] is node.args[1]:
        return node.args[0]
    if match.is_op(node, (torch.square, torch.Tensor.square), ("square",)):
        return node.args[0]
    return None


def _match_decomposed(root: fx.Node) -> RMSNormMatch | str | None:
    """Match the hand-written form around ``root`` (an rsqrt or sqrt node).

    Returns a match, a reason string when it looks like RMSNorm but a guard fails, or None.
    """
    is_rsqrt = match.is_op(root, (torch.rsqrt, torch.Tensor.rsqrt), ("rsqrt",))
    denom = root.args[0]
    if not match.is_add(denom) or len(denom.args) != 2:
        return None
    var, eps = denom.args
    if match.is_number(var):
        var, eps = eps, var
    if not match.is_op(var, (torch.mean, torch.Tensor.mean), ("mean",)):
        return None
    sq = var.args[0]
    xf = _square_input(sq)
    if xf is None:
        return None
    if not _is_scalar(eps):
        return "eps is not a constant"
    xf_val = match.tensor_value(xf)
    if xf_val is None:
        return "no shape information for the input"
    if not (_last_dim(match.arg(var, 1, "dim"), xf_val.dim()) and match.arg(var, 2, "keepdim")):
        return "mean is not over the last dimension with keepdim=True"

    # the normalization: xf * rstd, or xf / sqrt(...)
    norm = None
    for user in root.users:
        if is_rsqrt and match.is_mul(user) and match.other_operand(user, root) is xf:
            norm = user
        elif not is_rsqrt and match.is_div(user) and user.args[:2] == (xf, root):
            norm = user
    if norm is None:
        return None
    for node, users in ((sq, [var]), (var, [denom]), (denom, [root]), (root, [norm])):
        if not match.only_used_by(node, users):
            return f"intermediate {node.name} is used outside the RMSNorm pattern"

    # what goes in: fold an upcast to float32 into the op (it accumulates in float32 anyway)
    x = xf
    if is_cast(xf):
        src = match.tensor_value(xf.args[0])
        if xf_val.dtype == torch.float32 and src.dtype in (torch.float16, torch.bfloat16):
            x = xf.args[0]

    # what comes out: optional cast, optional weight multiply, optional cast
    interior = [xf, sq, var, denom, root, norm]
    out, weight = norm, None
    if len(out.users) == 1 and is_cast(next(iter(out.users))):
        out = next(iter(out.users))
        interior.append(out)
    if len(out.users) == 1 and match.is_mul(next(iter(out.users))):
        user = next(iter(out.users))
        w = match.other_operand(user, out)
        w_val = match.tensor_value(w)
        if w_val is not None and w_val.dim() == 1 and w_val.shape[0] == xf_val.shape[-1]:
            out, weight = user, w
            interior.append(out)
    if weight is not None and len(out.users) == 1 and is_cast(next(iter(out.users))):
        out = next(iter(out.users))
        interior.append(out)
    return RMSNormMatch(x=x, weight=weight, eps=eps, output=out, interior=interior)


def _match_functional(node: fx.Node) -> RMSNormMatch | str | None:
    if not match.is_op(node, (F.rms_norm, torch.rms_norm)):
        return None
    x = node.args[0]
    shape = match.arg(node, 1, "normalized_shape")
    weight = match.arg(node, 2, "weight")
    eps = match.arg(node, 3, "eps")
    x_val = match.tensor_value(x)
    if x_val is None:
        return "no shape information for the input"
    if isinstance(shape, int):
        shape = (shape,)
    if not isinstance(shape, (list, tuple)) or list(shape) != [x_val.shape[-1]]:
        return f"normalized_shape {shape} is not just the last dimension"
    if eps is None:
        eps = torch.finfo(x_val.dtype).eps
    if not _is_scalar(eps):
        return "eps is not a constant"
    if weight is not None and not isinstance(weight, fx.Node):
        return "weight is not a tensor"
    return RMSNormMatch(x=x, weight=weight, eps=eps, output=node, interior=[node])


def _guard(m: RMSNormMatch) -> str | None:
    x_val = match.tensor_value(m.x)
    out_val = match.tensor_value(m.output)
    if out_val is None:
        return "no shape information for the output"
    if x_val.dtype not in FLOAT_DTYPES:
        return f"input dtype {x_val.dtype} is not a float type"
    if x_val.device.type not in DEVICES:
        return f"no aa::rms_norm kernel for device {x_val.device.type!r}"
    if out_val.shape != x_val.shape:
        return "the output shape differs from the input shape (broadcasting weight)"
    if m.weight is not None:
        w_val = match.tensor_value(m.weight)
        if w_val is None or w_val.dtype not in FLOAT_DTYPES:
            return "weight is not a float tensor"
        if w_val.device != x_val.device:
            return "weight is on another device"
    if out_val.dtype not in FLOAT_DTYPES:
        return f"output dtype {out_val.dtype} is not a float type"
    return None


def match_rms_norm(node: fx.Node) -> RMSNormMatch | str | None:
    """The RMSNorm ``node`` belongs to (spelled out, found from its ``rsqrt``/``sqrt``, or an
    ``F.rms_norm`` call), with `_guard`'s verdict applied: a match the op can take, the reason
    it cannot, or None (no RMSNorm here)."""
    if match.is_op(node, (torch.rsqrt, torch.Tensor.rsqrt, torch.sqrt, torch.Tensor.sqrt),
                   ("rsqrt", "sqrt")):
        found = _match_decomposed(node)
    else:
        found = _match_functional(node)
    if isinstance(found, RMSNormMatch):
        return _guard(found) or found
    return found


class RMSNormPass(GraphPass):
    name = "rms_norm"
    description = "RMSNorm (F.rms_norm or hand-written) -> aa::rms_norm"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        for node in list(graph.nodes):
            found = match_rms_norm(node)
            if found is None:
                continue
            if isinstance(found, RMSNormMatch):
                self._replace(graph, found)
                ctx.rewrote(node)
                continue
            ctx.skip(node, found)
        gm.recompile()

    @staticmethod
    def _replace(graph: fx.Graph, m: RMSNormMatch) -> None:
        out_dtype = match.tensor_value(m.output).dtype
        match.replace_with_call(
            m.output, torch.ops.aa.rms_norm.default, (m.x, m.weight, m.eps),
            {"out_dtype": out_dtype},
        )
        for node in reversed(m.interior):  # erase only what the pattern made dead
            if not node.users and node is not m.x:
                graph.erase_node(node)
