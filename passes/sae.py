"""Rewrite TopK sparse autoencoders into `aa::sae_encode` and `aa::sae_decode`.

Why: a TopK SAE written in PyTorch builds the dense ``[tokens, latents]`` pre-activation, runs
TopK on it, scatters the k kept values into a dense latent of zeros and decodes that with a
dense matmul. `aa::sae_encode` returns the k values and indices directly (on CUDA one fused
Triton kernel; a sparse backward everywhere) and `aa::sae_decode` sums k decoder rows per token
(an embedding bag), so neither the dense latent nor its gradient exists.

Matched (dynamo's torch-level graph), as our reference SAE (``aa_compile.models.sae``) and
sae-lens-style TopK SAEs write it:

- **encoder**: ``pre = linear(x - pre_bias) + bias`` → ``topk(pre, k, dim=-1)`` → ``relu`` or
  ``sigmoid`` of the values. The linear is ``F.linear(xc, W [L, d], b)`` or ``xc @ W [d, L]``
  (``torch.matmul`` / ``@``; ``W.T`` then goes to the op as a view); ``- pre_bias`` and ``+
  bias`` are optional (zeros). Other readers of ``pre`` may only select latent columns
  (``pre[..., cols]``, e.g. concept scores): they become ``(x - pre_bias) @ W[cols]^T +
  bias[cols]``, so the dense pre-activation is never built.
- **dense latent**: ``zeros_like(pre).scatter(-1, indices, values)`` (also ``scatter_``) of a
  TopK's indices (ours or ATen's). Its readers become: a decoder ``F.linear(z, W_dec [d, L],
  b)`` or ``z @ W_dec [L, d]`` → `aa::sae_decode` (+ b); a column read ``z[..., cols]`` → a
  lookup among the k kept entries (`latent_columns`). Other readers keep a dense latent,
  scattered into fresh zeros (`zeros_latents`) once the pre-activation is gone.

Guards (a failing guard leaves the nodes alone and records why): TopK over the last dimension,
``largest=True``, a constant ``0 <= k <= latents``; its values pass through relu or sigmoid and
through nothing else first; ``x``, weight, biases one float dtype on cpu or cuda, the weight
2-D and as wide as ``x``, the biases 1-D of the right width; ``pre`` and the linear read by
nothing outside the pattern; for a decode, the indices come from a TopK (no duplicates, so a
sum of rows equals the scatter) and the decoder weight has the values' dtype.

Numerics: the ops accumulate in float32 (float64 for float64) and round once; TopK keeps equal
pre-activations by ascending latent index, where ATen's TopK breaks ties as it pleases (only
exact ties can differ, and with relu only in which zero-valued latents are named). A TopK with
``sorted=False`` gets its values in descending order, one of the orders it allows.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

from . import match
from .base import GraphPass, PassContext

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEVICES = ("cpu", "cuda")
LINEAR = (F.linear, torch._C._nn.linear)
MATMUL = (operator.matmul, torch.matmul, torch.Tensor.matmul)
RELU = (torch.relu, F.relu, torch.Tensor.relu)
SIGMOID = (torch.sigmoid, F.sigmoid, torch.Tensor.sigmoid)
SCATTER = (torch.scatter, torch.Tensor.scatter, torch.Tensor.scatter_)


# -- graph helpers: what the rewrite inserts (traced through by aot_autograd / inductor) ------

def tokens_2d(t: Tensor) -> Tensor:
    """``[..., c] -> [tokens, c]``."""
    return t.reshape(-1, t.shape[-1])


def tokens_nd(t: Tensor, like: Tensor) -> Tensor:
    """``[tokens, c] -> like.shape[:-1] + [c]``."""
    return t.reshape(*like.shape[:-1], t.shape[-1])


def sae_encode_nd(x: Tensor, weight: Tensor, bias: Tensor | None, pre_bias: Tensor | None,
                  k: int, sigmoid: bool) -> tuple[Tensor, Tensor]:
    """`aa::sae_encode` on ``x [..., d]`` (absent biases are zeros): ``(values, indices)``
    shaped ``[..., k]``."""
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    if pre_bias is None:
        pre_bias = weight.new_zeros(weight.shape[1])
    values, indices = torch.ops.aa.sae_encode(tokens_2d(x), weight, bias, pre_bias, k, sigmoid)
    return tokens_nd(values, x), tokens_nd(indices, x)


def sae_decode_nd(weight: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """`aa::sae_decode` of ``(values, indices) [..., k]`` over decoder rows ``weight [L, d]``:
    ``[..., d]``."""
    out = torch.ops.aa.sae_decode(weight, tokens_2d(indices), tokens_2d(values))
    return tokens_nd(out, values)


def pre_columns(x: Tensor, weight: Tensor, bias: Tensor | None, pre_bias: Tensor | None,
                columns) -> Tensor:
    """``pre[..., columns]`` of ``pre = (x - pre_bias) @ weight.T + bias``, from the selected
    encoder rows only."""
    xc = x if pre_bias is None else x - pre_bias
    out = torch.matmul(xc, weight[columns].t())
    return out if bias is None else out + bias[columns]


def latent_columns(values: Tensor, indices: Tensor, columns, n_latents: int) -> Tensor:
    """``dense[..., columns]`` of the dense latent ``zeros.scatter(-1, indices, values)``
    (``[..., n_latents]``), read from the k kept entries (indices are distinct per token)."""
    cols = torch.arange(n_latents, device=indices.device)[columns]
    if cols.dim() == 0:
        return (values * (indices == cols)).sum(-1)
    hit = indices.unsqueeze(-1) == cols
    return (values.unsqueeze(-1) * hit).sum(-2)


def zeros_latents(values: Tensor, n_latents: int) -> Tensor:
    """Zeros shaped like the dense latent of ``values [..., k]``: ``[..., n_latents]``."""
    return values.new_zeros(*values.shape[:-1], n_latents)


# -- the guard ------------------------------------------------------------------------------

@dataclasses.dataclass
class EncoderMatch:
    """One TopK SAE encoder: ``act(topk(linear(x - pre_bias) + bias, k))``."""

    x: fx.Node
    weight: fx.Node            # as it is in the graph
    transposed: bool           # weight is [d, L] (matmul form); the op gets weight.T
    bias: fx.Node | None
    pre_bias: fx.Node | None
    k: int
    sigmoid: bool
    pre: fx.Node               # the pre-activation (erased with the pattern)
    topk: fx.Node
    activated: fx.Node         # act(values): its readers get the op's values
    indices: fx.Node | None    # topk[1]: its readers get the op's indices
    columns: list[tuple[fx.Node, object]]  # pre[..., cols] readers and their cols
    interior: list[fx.Node]    # in graph order; erased when unused


def _is_topk(node) -> bool:
    return match.is_op(node, (torch.topk, torch.Tensor.topk), ("topk",))


def _last_dim(dim, ndim: int) -> bool:
    return isinstance(dim, int) and not isinstance(dim, bool) and dim in (-1, ndim - 1)


def _over_last_dim(topk: fx.Node) -> bool:
    """A TopK over the last dimension: its indices are distinct along it."""
    src = match.tensor_value(topk.args[0] if topk.args else topk.kwargs.get("input"))
    return src is not None and _last_dim(match.arg(topk, 2, "dim", -1), src.dim())


def column_index(node: fx.Node, source: fx.Node) -> object | None:
    """``cols`` if ``node`` is ``source[..., cols]`` (or ``source[:, ..., :, cols]``) with an
    int, a slice or a 1-D integer tensor node; else None."""
    if not (match.is_op(node, (operator.getitem,)) and node.args[0] is source):
        return None
    index = node.args[1]
    if not isinstance(index, tuple) or not index:
        return None
    src = match.tensor_value(source)
    lead, cols = index[:-1], index[-1]
    full = all(isinstance(i, slice) and i == slice(None) for i in lead)
    if not ((lead == (Ellipsis,)) or (full and src is not None and len(lead) == src.dim() - 1)):
        return None
    if isinstance(cols, slice) and all(v is None or isinstance(v, int) for v in
                                       (cols.start, cols.stop, cols.step)):
        return cols
    if isinstance(cols, int) and not isinstance(cols, bool):
        return cols
    val = match.tensor_value(cols)
    if val is not None and val.dim() == 1 and not val.is_floating_point() and \
            val.dtype != torch.bool:
        return cols
    return None


def _parse_linear(pre: fx.Node):
    """``(lin, x_centred, weight, transposed, bias)`` for ``pre`` = linear (+ bias), or None."""
    lin, bias = pre, None
    if match.is_add(pre) and len(pre.args) == 2 and not pre.kwargs:
        for a, b in (pre.args, pre.args[::-1]):
            if match.is_op(a, LINEAR + MATMUL, ("matmul",)):
                lin, bias = a, b
                break
        else:
            return None
    if match.is_op(lin, LINEAR):
        w = match.arg(lin, 1, "weight")
        inner_bias = match.arg(lin, 2, "bias")
        if inner_bias is not None:
            if bias is not None:
                return None
            bias = inner_bias
        return lin, match.arg(lin, 0, "input"), w, False, bias
    if match.is_op(lin, MATMUL, ("matmul",)) and len(lin.args) == 2:
        return lin, lin.args[0], lin.args[1], True, bias
    return None


def _parse_centred(xc: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """``(x, pre_bias)`` for ``xc = x - pre_bias`` with a 1-D ``pre_bias``, else ``(xc,
    None)``."""
    if match.is_op(xc, (operator.sub, torch.sub, torch.Tensor.sub), ("sub",)) and \
            len(xc.args) == 2 and not xc.kwargs:
        x, pb = xc.args
        x_val, pb_val, out = (match.tensor_value(n) for n in (x, pb, xc))
        if x_val is not None and pb_val is not None and pb_val.dim() == 1 and \
                out is not None and out.shape == x_val.shape:
            return x, pb
    return xc, None


def match_encoder(topk: fx.Node) -> EncoderMatch | str | None:
    """The TopK SAE encoder ending in ``topk`` with the guards applied: a match, the reason
    the op cannot take it, or None (a TopK that is no SAE encoder: not over a linear)."""
    pre = topk.args[0] if topk.args else topk.kwargs.get("input")
    parsed = _parse_linear(pre) if isinstance(pre, fx.Node) else None
    if parsed is None:
        return None
    lin, xc, weight, transposed, bias = parsed
    pre_val = match.tensor_value(pre)
    if pre_val is None or pre_val.dim() == 0:
        return "no shape information for the pre-activation"
    k = match.arg(topk, 1, "k")
    if not isinstance(k, int) or isinstance(k, bool):
        return f"k is not a constant int ({k!r})"
    if not _last_dim(match.arg(topk, 2, "dim", -1), pre_val.dim()):
        return "TopK is not over the last (latent) dimension"
    if match.arg(topk, 3, "largest", True) is not True:
        return "TopK with largest=False"
    n_latents = pre_val.shape[-1]
    if not isinstance(n_latents, int) or not 0 <= k <= n_latents:
        return f"k={k} is not in [0, {n_latents} latents]"
    # the outputs: topk[0] -> relu / sigmoid only; topk[1] anywhere
    getters = {}
    for user in topk.users:
        if not (match.is_op(user, (operator.getitem,)) and user.args[1] in (0, 1)):
            return f"the TopK result is read by {user.name} (not [0] / [1])"
        getters.setdefault(user.args[1], []).append(user)
    if len(getters.get(0, [])) != 1 or len(getters.get(1, [])) > 1:
        return "the TopK values are not read exactly once"
    raw = getters[0][0]
    act = next(iter(raw.users)) if len(raw.users) == 1 else None
    if match.is_op(act, RELU, ("relu",)) and not match.arg(act, 1, "inplace", False):
        sigmoid = False
    elif match.is_op(act, SIGMOID, ("sigmoid",)):
        sigmoid = True
    else:
        return "the TopK values are not passed through relu or sigmoid alone"
    # the operands
    x, pre_bias = _parse_centred(xc)
    vals = {name: match.tensor_value(n) for name, n in
            (("x", x), ("weight", weight), ("bias", bias), ("pre_bias", pre_bias))}
    if vals["x"] is None or vals["weight"] is None or vals["weight"].dim() != 2:
        return "the encoder weight is not a 2-D tensor (or no shape information)"
    w = vals["weight"]
    n_rows, d = (w.shape[1], w.shape[0]) if transposed else tuple(w.shape)
    if vals["x"].dim() == 0 or vals["x"].shape[-1] != d or n_rows != n_latents:
        return f"x [..., {vals['x'].shape[-1:]}] and the weight {tuple(w.shape)} do not match"
    for name, want in (("bias", n_latents), ("pre_bias", d)):
        t = vals[name]
        if (bias if name == "bias" else pre_bias) is not None and (
                t is None or tuple(t.shape) != (want,)):
            return f"{name} is not a 1-D tensor of {want}"
    present = [t for t in vals.values() if t is not None]
    if w.dtype not in FLOAT_DTYPES or any(t.dtype != w.dtype for t in present):
        return f"x, weight and biases are not one float dtype ({[str(t.dtype) for t in present]})"
    if w.device.type not in DEVICES or any(t.device != w.device for t in present):
        return f"no aa::sae_encode kernel for device {w.device.type!r} (or mixed devices)"
    # the interior is read by nothing outside the pattern
    columns = []
    for user in pre.users:
        if user is topk or _is_zeros_base(user):
            continue
        cols = column_index(user, pre)
        if cols is None:
            return f"the pre-activation is read by {user.name} outside the SAE pattern"
        columns.append((user, cols))
    if lin is not pre and not match.only_used_by(lin, [pre]):
        return f"the encoder product {lin.name} is read outside the SAE pattern"
    indices = getters.get(1, [None])[0]
    interior = [n for n in (xc, lin, pre, topk, raw, act, indices) if n is not None and n is not x]
    return EncoderMatch(x=x, weight=weight, transposed=transposed, bias=bias,
                        pre_bias=pre_bias, k=k, sigmoid=sigmoid, pre=pre, topk=topk,
                        activated=act, indices=indices, columns=columns,
                        interior=sorted(set(interior), key=_position(topk.graph)))


def _position(graph: fx.Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return order.__getitem__


@dataclasses.dataclass
class DenseLatent:
    """``zeros.scatter(-1, indices, values)``: the dense latent its readers read."""

    node: fx.Node
    values: fx.Node
    indices: fx.Node
    n_latents: int
    interior: list[fx.Node]    # the zeros and the scatter


def _is_zeros_base(node) -> bool:
    """``torch.zeros_like(t)`` (same dtype and device) or a `zeros_latents` call."""
    if match.is_op(node, (zeros_latents,)):
        return True
    return match.is_op(node, (torch.zeros_like,)) and len(node.args) == 1 and \
        not {"dtype", "device", "layout"} & set(node.kwargs)


def match_dense_latent(node: fx.Node, topk_indices: set[fx.Node]) -> DenseLatent | str | None:
    """The dense latent ``node`` (a scatter into zeros) builds, or why its readers are not
    rewritten, or None (not one)."""
    if not match.is_op(node, SCATTER, ("scatter", "scatter_")) or len(node.args) != 4 or \
            node.kwargs:
        return None
    base, dim, indices, values = node.args
    out = match.tensor_value(node)
    if not _is_zeros_base(base) or out is None or not _last_dim(dim, out.dim()):
        return None
    if match.is_op(node, (torch.Tensor.scatter_,), ("scatter_",)):
        # in place: what reads the zeros after the scatter reads the latent
        order = _position(node.graph)
        for user in list(base.users):
            if user is not node and order(user) > order(node):
                user.replace_input_with(base, node)
    if not match.only_used_by(base, [node]):
        return "the zeros the latents are scattered into are read elsewhere"
    if indices not in topk_indices:
        return "the scattered indices do not come from a TopK (duplicates would differ)"
    v, i = match.tensor_value(values), match.tensor_value(indices)
    if v is None or i is None or tuple(v.shape) != tuple(i.shape) or \
            tuple(v.shape[:-1]) != tuple(out.shape[:-1]) or v.dtype != out.dtype:
        return "values, indices and latents do not line up"
    return DenseLatent(node, values, indices, out.shape[-1], [base, node])


def match_decoder(user: fx.Node, dense: DenseLatent):
    """``(weight_rows_node, transposed, bias)`` if ``user`` decodes the dense latent, or a
    reason string, or None (not a decoder)."""
    parsed = None
    if match.is_op(user, LINEAR) and user.args[0] is dense.node:
        parsed = match.arg(user, 1, "weight"), True, match.arg(user, 2, "bias")
    elif match.is_op(user, MATMUL, ("matmul",)) and len(user.args) == 2 and \
            user.args[0] is dense.node and user.args[1] is not dense.node:
        parsed = user.args[1], False, None
    if parsed is None:
        return None
    weight, transposed, bias = parsed
    w, v = match.tensor_value(weight), match.tensor_value(dense.values)
    if w is None or w.dim() != 2 or v is None:
        return "the decoder weight is not a 2-D tensor"
    rows = w.shape[1] if transposed else w.shape[0]
    if rows != dense.n_latents:
        return f"the decoder weight {tuple(w.shape)} does not have {dense.n_latents} latents"
    if w.dtype != v.dtype or w.device != v.device:
        return "the decoder weight's dtype or device differs from the latents'"
    if bias is not None and not isinstance(bias, fx.Node):
        return "the decoder bias is not a tensor"
    return weight, transposed, bias


# -- the pass -------------------------------------------------------------------------------

class SAEPass(GraphPass):
    name = "sae"
    description = ("TopK SAE encoder -> aa::sae_encode; its dense latent's decoder -> "
                   "aa::sae_decode")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        op_indices: set[fx.Node] = set()
        for node in list(graph.nodes):
            if not _is_topk(node):
                continue
            found = match_encoder(node)
            if found is None:
                continue
            if isinstance(found, str):
                ctx.skip(node, found)
                continue
            op_indices.add(self._replace_encoder(graph, found))
            ctx.rewrote(node)
        topk_indices = op_indices | {u for n in graph.nodes if _is_topk(n) and _over_last_dim(n)
                                     for u in n.users
                                     if match.is_op(u, (operator.getitem,)) and u.args[1] == 1}
        for node in list(graph.nodes):
            dense = match_dense_latent(node, topk_indices)
            if dense is None:
                continue
            if isinstance(dense, str):
                ctx.skip(node, dense)
                continue
            self._replace_readers(graph, dense, ctx)
        gm.recompile()

    @staticmethod
    def _replace_encoder(graph: fx.Graph, m: EncoderMatch) -> fx.Node:
        """Insert the op, send the pattern's readers to it; returns the new indices node."""
        with graph.inserting_before(m.topk):
            weight = (graph.call_function(torch.t, (m.weight,)) if m.transposed else m.weight)
            enc = graph.call_function(sae_encode_nd, (m.x, weight, m.bias, m.pre_bias, m.k,
                                                      m.sigmoid))
            values = graph.call_function(operator.getitem, (enc, 0))
            indices = graph.call_function(operator.getitem, (enc, 1))
        values.meta.update(m.activated.meta)
        if m.indices is not None:
            indices.meta.update(m.indices.meta)
            m.indices.replace_all_uses_with(indices)
        m.activated.replace_all_uses_with(values)
        n_latents = match.tensor_value(m.pre).shape[-1]
        for reader, cols in m.columns:
            with graph.inserting_before(reader):
                new = graph.call_function(pre_columns, (m.x, weight, m.bias, m.pre_bias, cols))
            new.meta.update(reader.meta)
            reader.replace_all_uses_with(new)
            graph.erase_node(reader)
        for user in list(m.pre.users):  # zeros_like(pre): where dense latents start
            if user is not m.topk:
                with graph.inserting_before(user):
                    zeros = graph.call_function(zeros_latents, (values, n_latents))
                zeros.meta.update(user.meta)
                user.replace_all_uses_with(zeros)
                graph.erase_node(user)
        for node in reversed(m.interior):
            if not node.users:
                graph.erase_node(node)
        return indices

    @staticmethod
    def _replace_readers(graph: fx.Graph, dense: DenseLatent, ctx: PassContext) -> None:
        """Decoders -> `aa::sae_decode`, column reads -> `latent_columns`; the dense latent
        stays only for other readers."""
        for user in list(dense.node.users):
            cols = column_index(user, dense.node)
            found = match_decoder(user, dense) if cols is None else None
            if isinstance(found, str):
                ctx.skip(user, found)
                continue
            if cols is None and found is None:
                continue
            with graph.inserting_before(user):
                if cols is not None:
                    new = graph.call_function(latent_columns, (dense.values, dense.indices,
                                                               cols, dense.n_latents))
                else:
                    weight, transposed, bias = found
                    rows = graph.call_function(torch.t, (weight,)) if transposed else weight
                    new = graph.call_function(sae_decode_nd, (rows, dense.indices,
                                                              dense.values))
                    if bias is not None:
                        new = graph.call_function(operator.add, (new, bias))
                    ctx.rewrote(user)
            new.meta.update(user.meta)
            user.replace_all_uses_with(new)
            graph.erase_node(user)
        if not dense.node.users:
            for node in reversed(dense.interior):
                if not node.users:
                    graph.erase_node(node)
