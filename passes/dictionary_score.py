"""Rewrite T-FREE dictionary scoring (``TFreeDictionary.scores`` / ``topk`` / argmax) into
`aa::dictionary_score`.

Why: the reference gathers ``p[:, slots]`` (``[B, nnz]``, ~70 entries per word, 10^5-10^6
words), scales it, ``index_add_``\\ s it into ``[B, n_words]`` and normalises in five more
passes; inductor keeps the scatter-add. The op sums each word's CSR segment without the gather
buffer, normalises in the same pass (Triton) or two (CPU), and fuses the top-k.

Matched (dynamo's graph of the reference)::

    raw = p.new_zeros(B, n_words)                  # or torch.zeros
    raw.index_add_(1, word_ids, p[:, slots] * slot_weights)
    on = (m * n_trigrams).float(); off = (v - on).clamp(min=1); total = p.sum(-1, keepdim=True)
    score = (raw / on + (raw - total) / off).masked_fill(n_trigrams == 0, -inf)
    [score.reshape(*lead, n_words)] then optionally .topk(k, dim=-1) or .argmax(-1)

With ``topk`` (largest, last dim) the op's top-k replaces it, with ``argmax`` its k=1 form;
otherwise the op's ``k=0`` form (all scores) replaces ``score``. ``word_ids`` (sorted COO) turn
into CSR offsets at run time with ``aa::csr_offsets``, which checks that they are sorted
(ValueError otherwise) and memoises the conversion per dictionary buffer.

Guards (a failing one leaves the graph alone and records why): the exact pattern above with
constants ``m`` and ``v == p.shape[-1]``, ``clamp(min=1)``, a ``-inf`` fill of the words with
``n_trigrams == 0``; ``p`` 2-D float32/float64 (the op's precision, so the graph's dtypes
stay) on cpu/cuda; integer ``word_ids`` / ``slots`` / ``n_trigrams``, float weights; no
intermediate (``raw``, the gather, ``score``) used outside the pattern; and, when the word ids
are a graph input whose value the backend sees, that they are non-decreasing (CSR-able).

Numerics: float32 throughout like the reference; scores agree to a few ulps. Top-k indices
follow the op's documented tie order (lower word index first), a refinement of ``torch.topk``'s
unspecified one; ``argmax`` also returns the first maximum.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx

from . import match
from .base import GraphPass, PassContext

_FLOAT = (torch.float32, torch.float64)
_INDEX = (torch.int32, torch.int64)
_SUB = (operator.sub, torch.sub, torch.Tensor.sub)
_EQ = (operator.eq, torch.eq, torch.Tensor.eq)
_CASTS = ("float", "double", "to")


class NoMatch(Exception):
    """A dictionary-scoring candidate failed a guard: the message is the reason recorded."""


class NotCandidate(NoMatch):
    """An ``index_add_`` that is not a weighted gather into zeros: not reported."""


@dataclasses.dataclass
class Found:
    p: fx.Node
    word_ids: fx.Node
    slots: fx.Node
    weights: fx.Node
    n_trigrams: fx.Node
    m: int
    n_words: int
    score: fx.Node  # the masked_fill
    interior: list[fx.Node]


def _need(cond, reason: str) -> None:
    if not cond:
        raise NoMatch(reason)


def _candidate(cond, reason: str) -> None:
    if not cond:
        raise NotCandidate(reason)


def _binary(node, funcs, methods) -> tuple | None:
    """``(a, b)`` if ``node`` is a binary call of ``funcs`` / ``methods`` without kwargs."""
    if match.is_op(node, funcs, methods) and len(node.args) == 2 and not node.kwargs:
        return node.args
    return None


def _first_is(node, funcs, methods, first) -> bool:
    """``node`` is a binary call of ``funcs`` / ``methods`` whose first operand is ``first``."""
    args = _binary(node, funcs, methods)
    return args is not None and args[0] is first


def _uncast(node):
    """``x`` for ``x.float()`` / ``x.double()`` / ``x.to(dtype)``, else ``node``."""
    if match.is_op(node, (), _CASTS) and len(node.args) <= 2:
        return node.args[0]
    return node


def _is_last_dim(dim, ndim: int) -> bool:
    return isinstance(dim, int) and dim in (-1, ndim - 1)


def _match(idx_add: fx.Node, ctx: PassContext) -> Found:
    raw, dim, word_ids, contrib = (match.arg(idx_add, i, n) for i, n in
                                   enumerate(("self", "dim", "index", "source")))
    _candidate(match.arg(idx_add, 4, "alpha", 1) == 1, "index_add_ with alpha != 1")
    _candidate(match.is_op(raw, (torch.zeros,), ("new_zeros",)), "index_add_ target is not zeros")
    raw_v = match.tensor_value(raw)
    _candidate(raw_v is not None and raw_v.dim() == 2 and _is_last_dim(dim, 2),
               "not an index_add_ along dim 1 of a 2-D [B, n_words] tensor")
    mul = _binary(contrib, match.MUL_FUNCS, ("mul",))
    _candidate(mul is not None, "index_add_ source is not gather * slot_weights")
    gather, weights = mul if match.is_op(mul[0], (operator.getitem,)) else mul[::-1]
    _candidate(match.is_op(gather, (operator.getitem,)), "source is not p[:, slots] * w")
    p, index = gather.args
    _candidate(isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None),
               "the gather is not p[:, slots]")
    slots = index[1]

    users = [u for u in raw.users if u is not idx_add]
    _need(len(users) == 2, "raw sums are used outside the normalisation")
    div1 = next((u for u in users if _first_is(u, match.DIV_FUNCS, ("div",), raw)), None)
    sub1 = next((u for u in users if _first_is(u, _SUB, ("sub",), raw)), None)
    _need(div1 is not None and sub1 is not None, "normalisation is not raw/on + (raw-total)/off")
    on, total = div1.args[1], sub1.args[1]
    _need(len(sub1.users) == 1 and len(div1.users) == 1, "intermediate used elsewhere")
    div2 = next(iter(sub1.users))
    _need(_first_is(div2, match.DIV_FUNCS, ("div",), sub1),
          "normalisation is not (raw - total) / off")
    off = div2.args[1]
    add = next(iter(div1.users))
    _need(_binary(add, match.ADD_FUNCS, ("add",)) in ((div1, div2), (div2, div1))
          and len(div2.users) == 1 and len(add.users) == 1, "score is not the sum of both terms")
    mf = next(iter(add.users))
    _need(match.is_op(mf, (torch.masked_fill,), ("masked_fill",)) and mf.args[0] is add
          and len(mf.args) == 3 and mf.args[2] == float("-inf"),
          "no masked_fill(n_trigrams == 0, -inf) of words without trigrams")

    # on = m * n_trigrams (cast), off = clamp(v - on, min=1), total = p.sum(-1, keepdim=True)
    prod = _binary(_uncast(on), match.MUL_FUNCS, ("mul",))
    _need(prod is not None, "on is not m * n_trigrams")
    m, nt = prod if match.is_number(prod[0]) else prod[::-1]
    _need(isinstance(m, int) and m >= 1, "m is not a constant int >= 1")
    eq = _binary(mf.args[1], _EQ, ("eq",))
    _need(eq is not None and eq[0] is nt and eq[1] == 0,
          "masked_fill mask is not n_trigrams == 0 of the same n_trigrams")
    _need(match.is_op(off, (torch.clamp, torch.clamp_min), ("clamp", "clamp_min")),
          "off is not clamp(v - on, min=1)")
    lo = match.arg(off, 1, "min") if off.target != "clamp_min" else off.args[1]
    _need(lo == 1 and match.arg(off, 2, "max") is None, "off is not clamped to min=1")
    diff = _binary(off.args[0], _SUB, ("sub", "rsub"))
    _need(diff is not None and diff[1] is on and match.is_number(diff[0]), "off is not v - on")
    p_v = match.tensor_value(p)
    _need(p_v is not None and p_v.dim() == 2, "probs are not 2-D [B, v]")
    _need(isinstance(p_v.shape[1], int) and diff[0] == p_v.shape[1],
          f"v in the normalisation ({diff[0]}) is not probs' width")
    _need(match.is_op(total, (torch.sum,), ("sum",)) and total.args[0] is p
          and _is_last_dim(match.arg(total, 1, "dim"), 2) and match.arg(total, 2, "keepdim"),
          "total is not p.sum(-1, keepdim=True)")

    _need(p_v.dtype in _FLOAT, f"probs are {p_v.dtype}: the pattern computes in it, the op in "
          "float32 (float64), so only float32/float64 patterns are rewritten")
    _need(p_v.device.type in ("cpu", "cuda"), f"no kernel for device {p_v.device.type!r}")
    for name, n, kinds in (("word_ids", word_ids, _INDEX), ("slots", slots, _INDEX),
                           ("n_trigrams", nt, _INDEX), ("slot_weights", weights,
                                                        (torch.float16, torch.bfloat16, *_FLOAT))):
        t = match.tensor_value(n)
        _need(t is not None and t.dim() == 1 and t.dtype in kinds and t.device == p_v.device,
              f"{name} is not a 1-D {'integer' if kinds is _INDEX else 'float'} tensor on "
              "probs' device")
    _check_sorted(word_ids, ctx)
    interior = [raw, gather, contrib, idx_add, on, _uncast(on), off.args[0], off, total, div1,
                sub1, div2, add, mf.args[1], mf]
    return Found(p, word_ids, slots, weights, nt, m, raw_v.shape[1], mf, interior)


def _check_sorted(word_ids: fx.Node, ctx: PassContext) -> None:
    """A graph-input word-id buffer whose value we can see must be non-decreasing."""
    if word_ids.op != "placeholder" or not ctx.example_inputs:
        return
    placeholders = [n for n in word_ids.graph.nodes if n.op == "placeholder"]
    i = placeholders.index(word_ids)
    real = ctx.example_inputs[i] if i < len(ctx.example_inputs) else None
    if (isinstance(real, torch.Tensor) and not isinstance(real, torch._subclasses.FakeTensor)
            and real.numel() > 1):
        _need(not bool((real.diff() < 0).any()),
              "word ids are not non-decreasing (no CSR: each word's entries must be contiguous)")


def _consumer(score: fx.Node):
    """``(kind, node, lead)``: the ``topk`` / ``argmax`` reading the scores (through an optional
    reshape, whose leading sizes ``lead`` are returned), or ``(None, None, None)``."""
    if len(score.users) != 1:
        return None, None, None
    user, lead = next(iter(score.users)), None
    if match.is_op(user, (torch.reshape,), ("reshape", "view")) and len(user.users) == 1:
        sizes = user.args[1] if len(user.args) == 2 and isinstance(user.args[1], (list, tuple)) \
            else user.args[1:]
        lead = list(sizes[:-1])
        user = next(iter(user.users))
    ndim = len(lead) + 1 if lead is not None else 2
    if match.is_op(user, (torch.topk,), ("topk",)):
        k = match.arg(user, 1, "k")
        if (isinstance(k, int) and _is_last_dim(match.arg(user, 2, "dim", -1), ndim)
                and match.arg(user, 3, "largest", True) is True
                and all(match.is_op(u, (operator.getitem,)) for u in user.users)):
            return "topk", user, lead
    if (match.is_op(user, (torch.argmax,), ("argmax",))
            and _is_last_dim(match.arg(user, 1, "dim"), ndim)
            and not match.arg(user, 2, "keepdim", False)):
        return "argmax", user, lead
    return None, None, None


def _erase_dead(graph: fx.Graph, nodes) -> set[fx.Node]:
    """Erase the ``nodes`` left without users, last first; return the erased ones."""
    pos = {n: i for i, n in enumerate(graph.nodes)}
    erased = set()
    for node in sorted({n for n in nodes if n in pos}, key=pos.__getitem__, reverse=True):
        if not node.users:
            graph.erase_node(node)
            erased.add(node)
    return erased


def _rewrite(graph: fx.Graph, f: Found) -> set[fx.Node]:
    kind, consumer, lead = _consumer(f.score)
    k = {"topk": None, "argmax": 1, None: 0}[kind]
    if kind == "topk":
        k = match.arg(consumer, 1, "k")
    aa = torch.ops.aa
    with graph.inserting_before(f.score):
        offsets = graph.call_function(aa.csr_offsets.default, (f.word_ids, f.n_words))
        op = graph.call_function(aa.dictionary_score.default,
                                 (f.p, offsets, f.slots, f.weights, f.n_trigrams, f.m, k))
        values = graph.call_function(operator.getitem, (op, 0))
        indices = graph.call_function(operator.getitem, (op, 1))
    dead = list(f.interior)
    if kind is None:
        values.meta.update(f.score.meta)
        f.score.replace_all_uses_with(values)
    else:
        dead += [u for u in f.score.users] + [consumer]
        with graph.inserting_before(consumer):
            if kind == "topk":
                outs = [values, indices]
                if lead is not None:
                    outs = [graph.call_function(torch.reshape, (t, (*lead, k))) for t in outs]
                for g in list(consumer.users):
                    g.replace_all_uses_with(outs[g.args[1]])
                    dead.append(g)
            else:
                best = graph.call_function(torch.select, (indices, 1, 0))
                if lead is not None:
                    best = graph.call_function(torch.reshape, (best, tuple(lead)))
                best.meta.update(consumer.meta)
                consumer.replace_all_uses_with(best)
    return _erase_dead(graph, dead)


class DictionaryScorePass(GraphPass):
    name = "dictionary_score"
    description = "TFreeDictionary scores / topk / argmax -> aa::dictionary_score"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        erased: set[fx.Node] = set()
        for node in list(graph.nodes):
            if node in erased or not match.is_op(
                    node, (torch.Tensor.index_add_,), ("index_add_",)):
                continue
            try:
                found = _match(node, ctx)
            except NotCandidate:
                continue
            except NoMatch as e:
                ctx.skip(node, str(e))
                continue
            erased |= _rewrite(graph, found)
            ctx.rewrote(node)
        gm.recompile()
