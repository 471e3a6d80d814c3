"""Pass ``hat_guide_add``: the HAT decoder's guide add ``y = x + g[byte_word]`` (``x [1, T, d]``
or ``[T, d]``, ``g [W, d]``), usually read by the next block's ``attn_norm``, becomes ``y, normed
= aa::guide_add_rms_norm(x.reshape(T, d), g, word_offsets, weight, eps, out_dtype=...)``, or
``aa::guide_add(x.reshape(T, d), g, word_offsets)`` when no RMSNorm can fuse (the report says
why). No ``[T, d]`` gather either way.

Its guard: `prove_byte_words` proves by evaluation that ``byte_word`` is each byte's word under
the offsets, and `find_norm` finds the norm that may fuse (``docs/hat.md``).
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
from torch import Tensor, fx

from aa_compile.passes import match
from aa_compile.passes.base import PassContext
from aa_compile.passes.hat.proof import INDEX_DTYPES, ProofCache, bounded_layout, subgraph
from aa_compile.passes.hat.rewrite import (FLOAT_DTYPES, HatPass, ancestors, check_tensors,
                                           erase_dead)
from aa_compile.passes.hat.shapes import same, same_or_guard, shape_arg, size_at
from aa_compile.passes.rms_norm import RMSNormMatch, is_cast, match_rms_norm


def prove_byte_words(gm: fx.GraphModule, index: fx.Node, n_words) -> fx.Node | str:
    """The ``word_offsets`` node if ``index`` ``[T]`` is each byte's word under a [W + 1]
    offsets input (empty words allowed), else the reason."""
    sub = subgraph(gm, [index])
    if isinstance(sub, str):
        return sub
    length = match.tensor_value(sub.leaf).shape[0]
    n = match.tensor_value(index).shape[0]
    if not same_or_guard(length, n_words + 1):
        return f"the byte-to-word index's input {sub.leaf.name} is not [W + 1] offsets"
    why = sub.include(n)
    if why:
        return why
    gen = torch.Generator().manual_seed(0)
    for sizes in sub.size_probes(lambda s: size_at(length, s) >= 2):
        try:
            t, w = size_at(n, sizes), size_at(length, sizes) - 1
        except ValueError as e:
            return str(e)
        layouts = [bounded_layout(w, t, lo, t, gen) for lo in (1, 1, 1, 0, 0, 0)]
        layouts = [x for x in layouts if x is not None]
        if not layouts:
            return "no word layout fits T and W"
        for lay in layouts:
            try:
                (got,) = sub(lay, sizes)
            except Exception as e:  # noqa: BLE001
                return f"evaluating the byte-to-word index failed ({type(e).__name__}: {e})"
            want = torch.repeat_interleave(torch.arange(w), lay.diff())
            if not isinstance(got, Tensor) or not torch.equal(got.to(torch.int64), want):
                return "the gather index is not the word of each byte under the word offsets"
    return sub.leaf


# -- which RMSNorm fuses ----------------------------------------------------------------------

@dataclasses.dataclass
class NormUse:
    """An RMSNorm of the guided sum ``y`` (through reshapes and exact casts): ``aa::rms_norm``
    from the rms_norm pass, or a form that pass matches, with its guard holding."""

    output: fx.Node  # its uses go to the fused op's ``normed``
    weight: fx.Node | None
    eps: float | fx.Node  # a node when dynamo made eps a symbolic float
    out_dtype: torch.dtype
    nodes: list[fx.Node]  # the norm's own nodes (erased once unused)
    chain: list[fx.Node]  # the reshapes/casts from y to the norm's input


def decomposed_norms(gm: fx.GraphModule) -> dict[fx.Node, tuple[fx.Node, RMSNormMatch]]:
    """The RMSNorms the rms_norm pass would rewrite but that are still spelled out (that pass
    disabled, or run after this one), by input node."""
    found = {}
    for node in gm.graph.nodes:
        m = match_rms_norm(node)
        if isinstance(m, RMSNormMatch):
            found.setdefault(m.x, (node, m))
    return found


def _exact_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The dtypes ``y`` may be cast to on its way to the norm without changing what the fused
    op computes: its own, and float32 for a half type (an exact upcast; the op normalizes
    half types in float32 too)."""
    return (dtype, torch.float32) if dtype in (torch.float16, torch.bfloat16) else (dtype,)


def _passthrough(user: fx.Node, y: Tensor) -> str | None:
    """``"exact"`` if ``user`` keeps ``y``'s elements in order (a reshape/view with the last
    dimension kept, ``t[0]`` of a leading 1, or an exact cast), ``"cast"`` for another cast
    (followed, so that a norm behind it is reported, but not fused), else None."""
    uv = match.tensor_value(user)
    if uv is None or uv.dim() < 1 or not same(uv.shape[-1], y.shape[-1]) \
            or not same(uv.numel(), y.numel()):
        return None
    if match.is_op(user, (torch.reshape, torch.Tensor.reshape, torch.Tensor.view),
                   ("reshape", "view")):
        return "exact"
    if user.op == "call_function" and user.target is operator.getitem \
            and type(user.args[1]) is int and user.args[1] == 0:
        src = match.tensor_value(user.args[0])
        ok = src is not None and src.dim() >= 2 and same(src.shape[0], 1)
        return "exact" if ok else None
    if is_cast(user):
        return "exact" if uv.dtype in _exact_dtypes(y.dtype) else "cast"
    return None


def find_norm(y: fx.Node, decomposed: dict) -> NormUse | str | None:
    """The first RMSNorm (graph order) that reads the guided sum ``y`` through reshapes and
    exact casts; a reason when there is one but a guard fails; None when there is none."""
    rms_norm = torch.ops.aa.rms_norm.default  # resolved here: the ops load with aa_compile
    yv = match.tensor_value(y)
    chain, frontier, why = [], [y], None
    order = {n: i for i, n in enumerate(y.graph.nodes)}
    candidates, recast = [], set()  # recast: reached through an inexact cast
    while frontier:
        c = frontier.pop()
        for u in c.users:
            if u.op == "call_function" and u.target is rms_norm and u.args[0] is c:
                candidates.append((c, u, None))
            elif u not in chain and (kind := _passthrough(u, yv)):
                chain.append(u)
                frontier.append(u)
                if kind == "cast" or c in recast:
                    recast.add(u)
        if c in decomposed:
            root, m = decomposed[c]
            candidates.append((c, root, m))
    for c, norm, m in sorted(candidates, key=lambda x: order[x[1]]):
        cv = match.tensor_value(c)
        if c in recast:
            why = why or (f"it reads the sum cast to another precision ({yv.dtype} -> "
                          f"{cv.dtype}; the op normalizes {yv.dtype} in its own precision)")
            continue
        if m is None:
            weight, eps = match.arg(norm, 1, "weight"), match.arg(norm, 2, "eps")
            output, nodes = norm, [norm]
        else:
            weight, eps, output, nodes = m.weight, m.eps, m.output, list(m.interior)
        ov = match.tensor_value(output)
        wv = match.tensor_value(weight) if weight is not None else None
        if ov is None or ov.dtype not in FLOAT_DTYPES or ov.dim() != cv.dim() \
                or not all(same(a, b) for a, b in zip(ov.shape, cv.shape)):
            why = why or "the norm's output is not a float tensor of its input's shape"
        elif weight is not None and (wv is None or wv.dim() != 1
                                     or wv.dtype not in FLOAT_DTYPES
                                     or not same(wv.shape[0], yv.shape[-1])
                                     or wv.device != yv.device):
            why = why or "the norm's weight is not a 1-D float tensor of width d on y's device"
        elif isinstance(eps, fx.Node):
            if not isinstance(match.value(eps), (float, torch.SymFloat)):
                why = why or "the norm's eps is not a float"
            else:
                return NormUse(output, weight, eps, ov.dtype, nodes, chain)
        elif not match.is_number(eps) or not math.isfinite(eps) or eps < 0:
            why = why or f"the norm's eps {eps!r} is not a finite number >= 0"
        else:
            return NormUse(output, weight, float(eps), ov.dtype, nodes, chain)
    return why


def _hoistable(values, before: fx.Node) -> bool:
    """Whether each of ``values`` (nodes, or not nodes) is available at ``before``, or can be
    moved there in turn: a call whose inputs all come before ``before`` or move there first."""
    order = {n: i for i, n in enumerate(before.graph.nodes)}
    moved = set()
    for value in values:
        if not isinstance(value, fx.Node) or order[value] < order[before]:
            continue
        if value.op not in ("call_function", "call_method") \
                or any(order[a] >= order[before] and a not in moved
                       for a in value.all_input_nodes):
            return False
        moved.add(value)
    return True


def _hoist(values, before: fx.Node) -> None:
    """Move the ``values`` that `_hoistable` admitted, in turn, to just before ``before``."""
    for value in values:
        order = {n: i for i, n in enumerate(before.graph.nodes)}
        if isinstance(value, fx.Node) and order[value] > order[before]:
            before.prepend(value)


# -- the pass ---------------------------------------------------------------------------------

def _guided_sum(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node] | None:
    """``(x, g[index], g [W, d], index [T])`` if ``node`` is ``x + g[index]`` (either order)."""
    if not match.is_add(node) or len(node.args) != 2 or node.kwargs:
        return None
    for x, gathered in (node.args, node.args[::-1]):
        if (isinstance(gathered, fx.Node) and gathered.op == "call_function"
                and gathered.target is operator.getitem and isinstance(x, fx.Node)):
            g, index = gathered.args
            gv, iv = match.tensor_value(g), match.tensor_value(index)
            if isinstance(g, fx.Node) and gv is not None and iv is not None \
                    and gv.dim() == 2 and iv.dim() == 1 and iv.dtype in INDEX_DTYPES:
                return x, gathered, g, index
    return None


@dataclasses.dataclass
class GuideAdd:
    """A guided sum the guard admitted, and what the op call needs."""

    x: fx.Node
    g: fx.Node
    offsets: fx.Node
    n: int | torch.SymInt  # T
    d: int
    out_shape: tuple  # the sum's shape as reshape arguments
    gathered: fx.Node  # g[byte_word], erased once unused
    norm: NormUse | str | None  # the norm to fuse, why the one that reads the sum cannot, or None
    norm_shape: tuple | None  # the norm output's shape as reshape arguments, when fused


class GuideAddPass(HatPass):
    name = "hat_guide_add"
    description = ("x + g[byte_word] with a proven byte-to-word index -> aa::guide_add, or "
                   "aa::guide_add_rms_norm when an RMSNorm reads the sum")

    @staticmethod
    def check(gm: fx.GraphModule, node: fx.Node, cache: ProofCache, decomposed: dict
              ) -> GuideAdd | str | None:
        """The guard: ``x`` ``[(1, ...,) T, d]`` and ``g`` ``[W, d]`` float tensors on one
        cpu/cuda device, at most one symbolic dimension, and ``byte_word`` proven to be each
        byte's word; then whether an RMSNorm reading the sum can fuse (pure: nothing moves)."""
        found = _guided_sum(node)
        if found is None:
            return None
        x, gathered, g, index = found
        xv, gv, ov = (match.tensor_value(a) for a in (x, g, node))
        why = check_tensors(x, g)
        if why:
            return why.replace("q, k, v", "x and the guide")
        n, d = match.tensor_value(index).shape[0], gv.shape[1]
        if ov is None or ov.dtype != xv.dtype or xv.dim() < 2 or not isinstance(d, int) \
                or d < 1 or not same(xv.shape[-2], n) or not same(xv.shape[-1], d) \
                or not all(same(s, 1) for s in xv.shape[:-2]) \
                or len(ov.shape) != len(xv.shape) \
                or not all(same(a, b) for a, b in zip(ov.shape, xv.shape)):
            return "x is not [(1, ...,) T, d] with T bytes and the guide's width d"
        out_shape = shape_arg(xv.shape)
        if out_shape is None:
            return "x has more than one symbolic dimension"
        proof = cache.get((index, str(gv.shape[0])),
                          lambda i=index, w=gv.shape[0]: prove_byte_words(gm, i, w))
        if isinstance(proof, str):
            return proof
        norm, norm_shape = find_norm(node, decomposed), None
        if isinstance(norm, NormUse):
            norm_shape = shape_arg(match.tensor_value(norm.output).shape)
            if norm_shape is None:
                norm = "the norm's output has more than one symbolic dimension"
            elif not _hoistable((norm.weight, norm.eps), node):
                norm = "the norm's weight or eps is computed after the guided sum"
        return GuideAdd(x, g, proof, n, d, out_shape, gathered, norm, norm_shape)

    @staticmethod
    def rewrite(graph: fx.Graph, node: fx.Node, found: GuideAdd) -> fx.Node:
        """Replace the sum (and the fused norm) with the op; return the new sum."""
        norm = found.norm if isinstance(found.norm, NormUse) else None
        if norm is not None:
            _hoist((norm.weight, norm.eps), node)
        with graph.inserting_before(node):
            n = -1 if not isinstance(found.n, int) else found.n
            x2 = graph.call_method("reshape", (found.x, n, found.d))
            if norm is not None:
                fused = graph.call_function(
                    torch.ops.aa.guide_add_rms_norm.default,
                    (x2, found.g, found.offsets, norm.weight, norm.eps),
                    {"out_dtype": norm.out_dtype})
                y = graph.call_function(operator.getitem, (fused, 0))
                normed = graph.call_function(operator.getitem, (fused, 1))
                n_out = graph.call_method("reshape", (normed, found.norm_shape))
                n_out.meta.update(norm.output.meta)
            else:
                y = graph.call_function(torch.ops.aa.guide_add.default,
                                        (x2, found.g, found.offsets))
            out = graph.call_method("reshape", (y, found.out_shape))
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        if norm is not None:
            norm.output.replace_all_uses_with(n_out)
            erase_dead(graph, norm.nodes + norm.chain)
        return out

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        graph, cache = gm.graph, ProofCache()
        decomposed = decomposed_norms(gm)
        for node in list(graph.nodes):
            found = self.check(gm, node, cache, decomposed)
            if found is None:
                continue
            if isinstance(found, str):
                ctx.skip(node, found)
                continue
            if isinstance(found.norm, str):
                ctx.skip(node, f"kept the unfused aa::guide_add: an RMSNorm reads the sum, "
                               f"but {found.norm}")
            out = self.rewrite(graph, node, found)
            if isinstance(found.norm, NormUse):
                alive = set(graph.nodes)
                decomposed = {k: v for k, v in decomposed.items()
                              if k in alive and v[0] in alive}
            ctx.rewrote(out)
            erase_dead(graph, ancestors([found.gathered]))
        gm.recompile()
