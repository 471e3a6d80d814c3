"""Rewrite the T-FREE reference input embedding into `aa::trigram_bag`.

The reference (``aa_compile.models.tfree.TFreeEmbedding``, and the public T-FREE code) computes
a word's embedding as the sum over its trigrams of the sum (or mean) of the ``m`` rows its
trigram hashes to::

    per_trigram = weight[slots]            # [n, m, h] gather  (or F.embedding(slots, weight))
    per_trigram = per_trigram.sum(-2)      # [n, h]            (or .mean(-2), torch.sum(dim=1))
    out = per_trigram.new_zeros(n_words, h)                    # (or torch.zeros(...))
    out.index_add_(0, word_of_trigram, per_trigram)            # (or torch.index_add / index_add)

Eagerly that materializes ``[n, m, h]`` and scatters ``[n, h]`` row by row; `aa::trigram_bag`
sums every word's ``m * t`` rows in one pass (an embedding bag) and has a deterministic,
sort-based weight gradient.

**Conversion.** ``word_of_trigram`` need not be sorted, but the op takes CSR bags. The rewrite
emits ``aa::tfree_words_to_csr(slots, word_of_trigram, n_words)`` in the graph: a stable sort of
the word ids orders the trigram rows word by word, keeping each word's trigrams in their
original order; ``indices = slots[perm].reshape(-1)``; ``offsets = m * [0, cumsum(trigrams per
word)]`` (int64, ``[n_words + 1]``). A word without trigrams is an empty bag, hence a zero row,
as in the reference. A word id outside ``[0, n_words)`` raises ``ValueError`` on CPU (the
reference's ``index_add_`` raises ``IndexError``/``RuntimeError``). The conversion is an op
(ATen calls, one Python dispatch) rather than traced torch code because inductor would turn the
gather into a parallel C++ loop of its own, and on a loaded 2-core machine every such loop
costs milliseconds of OpenMP thread wake-ups (measured: aa 0.5x ``F.embedding_bag`` at load 8,
1.0x with those loops serialized).

**Numerics.** ``sum``: the op accumulates all of a word's ``m * t`` rows in float32 (float64 for
float64 weights) and rounds once to the weight's dtype; the reference rounds each trigram's sum
and then every ``index_add_`` step in the weight's dtype. Float32 results agree to rounding
(a few ulps of the row's magnitude); for float16/bfloat16 the op is the closer one to the exact
sum. ``mean``: the op's sum divided by ``m`` afterwards (`mean_over_slots`: one more rounding in
the weight's dtype; the reference divides each trigram's sum by ``m`` before scattering). The
weight gradient is the op's (``grad / m`` for the mean), equal to the reference's to rounding.

Guards (a failing guard leaves the nodes alone and records why): the source of ``index_add`` is
a sum/mean over dim 1 (= -2, no ``keepdim``, no ``dtype``) of a gather of a 2-D float ``weight``
(on cpu or cuda) by 2-D int32/int64 ``slots`` (``F.embedding`` without ``padding_idx``,
``max_norm``, ``scale_grad_by_freq`` or ``sparse``); ``index_add`` over dim 0 with ``alpha``
absent or 1 into a freshly made zeros ``[n_words, h]`` in the weight's dtype and device that
nothing else reads before it (uses after an in-place ``index_add_`` are redirected to the
result); word ids 1-D int32/int64 with one entry per trigram; the gather and per-trigram
vectors used only by the pattern; ``m >= 1`` for the mean.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.nn.functional as F
from torch import Tensor, fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import match
from .base import GraphPass, PassContext

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX = (torch.int32, torch.int64)
_DEVICES = ("cpu", "cuda")

_INDEX_ADD_FUNCS = (torch.index_add, torch.Tensor.index_add, torch.Tensor.index_add_)
_INDEX_ADD_METHODS = ("index_add", "index_add_")
_SUM = ((torch.sum, torch.Tensor.sum), ("sum",))
_MEAN = ((torch.mean, torch.Tensor.mean), ("mean",))
_ZEROS_FUNCS = (torch.zeros,)
_ZEROS_METHODS = ("new_zeros",)


def mean_over_slots(out: Tensor, slots: Tensor) -> Tensor:
    """The mean aggregation: the bag sum divided by ``m`` (``slots.shape[1]``)."""
    return out / slots.shape[1]


@dataclasses.dataclass
class TFreeMatch:
    index_add: fx.Node
    zeros: fx.Node
    agg: fx.Node
    gather: fx.Node
    weight: fx.Node
    slots: fx.Node
    word: fx.Node
    n_words: object  # int or a node producing a SymInt
    mean: bool


def _arg(node: fx.Node, index: int, *names: str, default=None):
    """Positional ``index`` or the first of ``names`` given as a keyword."""
    if len(node.args) > index:
        return node.args[index]
    for name in names:
        if name in node.kwargs:
            return node.kwargs[name]
    return default


def _dim_is(dim, ndim: int, want: int) -> bool:
    if isinstance(dim, (list, tuple)):
        if len(dim) != 1:
            return False
        dim = dim[0]
    if not isinstance(dim, int) or isinstance(dim, bool) or not -ndim <= dim < ndim:
        return False
    return dim % ndim == want


def _gather(node) -> tuple[fx.Node, fx.Node] | str | None:
    """``(weight, slots)`` if ``node`` gathers rows of a table, a reason if it does but with
    options the op cannot honour, None if it is something else."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
        weight, slots = node.args
        if isinstance(weight, fx.Node) and isinstance(slots, fx.Node):
            s = match.tensor_value(slots)
            if s is not None and s.dtype in _INDEX:
                return weight, slots
        return None
    if match.is_op(node, (F.embedding,)):
        slots, weight = _arg(node, 0, "input"), _arg(node, 1, "weight")
        if _arg(node, 2, "padding_idx") is not None:
            return "F.embedding with padding_idx (its row gets no gradient)"
        if _arg(node, 3, "max_norm") is not None:
            return "F.embedding with max_norm (renormalizes the weight in place)"
        if _arg(node, 5, "scale_grad_by_freq"):
            return "F.embedding with scale_grad_by_freq=True"
        if _arg(node, 6, "sparse"):
            return "F.embedding with sparse=True (sparse gradients)"
        if isinstance(weight, fx.Node) and isinstance(slots, fx.Node):
            return weight, slots
    return None


def _zeros_first_dim(node) -> tuple[bool, object]:
    """``(is a zeros constructor, its first size argument)``."""
    if match.is_op(node, (), _ZEROS_METHODS):
        size = list(node.args[1:]) or node.kwargs.get("size")
    elif match.is_op(node, _ZEROS_FUNCS):
        size = list(node.args) or node.kwargs.get("size")
    else:
        return False, None
    if size is not None and len(size) == 1 and isinstance(size[0], (list, tuple, torch.Size)):
        size = size[0]
    if not size:
        return True, None
    return True, size[0]


def _match(node: fx.Node) -> TFreeMatch | str | None:
    """The reference pattern ending in index_add ``node``: a match, a reason (it is the pattern
    but a guard fails), or None (not this pattern at all)."""
    if not match.is_op(node, _INDEX_ADD_FUNCS, _INDEX_ADD_METHODS):
        return None
    zeros = _arg(node, 0, "self", "input")
    dim = _arg(node, 1, "dim")
    word = _arg(node, 2, "index")
    agg = _arg(node, 3, "source")
    alpha = node.kwargs.get("alpha", 1)
    is_sum = match.is_op(agg, *_SUM)
    is_mean = match.is_op(agg, *_MEAN)
    if not (is_sum or is_mean):
        return None
    gather = _gather(agg.args[0] if agg.args else None)
    if gather is None:
        return None
    if isinstance(gather, str):
        return gather
    weight, slots = gather

    w, s, wd = (match.tensor_value(x) for x in (weight, slots, word))
    out, g = match.tensor_value(node), match.tensor_value(agg.args[0])
    if w is None or s is None or wd is None or out is None or g is None:
        return "no shape information for weight, slots, word ids or output"
    agg_dim = _arg(agg, 1, "dim")
    if agg_dim is None or not _dim_is(agg_dim, g.dim(), 1) or g.dim() != 3:
        return f"the {'mean' if is_mean else 'sum'} is not over the m slots (dim 1 of [n, m, h])"
    if _arg(agg, 2, "keepdim", default=False):
        return "keepdim=True in the aggregation"
    if agg.kwargs.get("dtype") is not None:
        return "the aggregation has a dtype argument"
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha == 1):
        return f"index_add with alpha={alpha!r} (only alpha=1 is rewritten)"
    if not _dim_is(dim, out.dim(), 0) or out.dim() != 2:
        return f"index_add over dim {dim!r} of a {out.dim()}-D tensor (only dim 0 of [n_words, h])"
    is_zeros, n_words = _zeros_first_dim(zeros)
    if not is_zeros:
        return "index_add does not accumulate into a fresh zeros tensor (new_zeros / torch.zeros)"
    if n_words is None:
        return "could not read n_words from the zeros constructor"
    if w.dim() != 2 or w.dtype not in _FLOAT:
        return f"weight is not a 2-D float tensor ({w.dtype}, {w.dim()}-D)"
    if w.device.type not in _DEVICES:
        return f"no aa::trigram_bag kernel for device {w.device.type!r}"
    if s.dim() != 2 or s.dtype not in _INDEX:
        return f"slots are not a 2-D int32/int64 tensor ({s.dtype}, {s.dim()}-D)"
    if wd.dim() != 1 or wd.dtype not in _INDEX:
        return f"word ids are not a 1-D int32/int64 tensor ({wd.dtype}, {wd.dim()}-D)"
    if not statically_known_true(wd.shape[0] == s.shape[0]):
        return "word ids do not have one entry per trigram (slots.shape[0])"
    if s.device != w.device or wd.device != w.device or out.device != w.device:
        return "weight, slots, word ids and output are on different devices"
    if out.dtype != w.dtype:
        return f"output dtype {out.dtype} is not the weight's dtype {w.dtype}"
    if not statically_known_true(out.shape[1] == w.shape[1]):
        return "the output's width is not the weight's"
    if is_mean and not statically_known_true(s.shape[1] >= 1):
        return "mean over m = 0 slots"
    if not match.only_used_by(agg.args[0], [agg]):
        return "the gathered [n, m, h] rows are used outside the pattern"
    if not match.only_used_by(agg, [node, zeros]):  # zeros: ``per_trigram.new_zeros(...)``
        return "the per-trigram vectors are used outside the pattern"
    # the zeros may be read only through the index_add result (or, for the in-place form,
    # after it: those uses see the result and are redirected to it)
    inplace = node.op == "call_method" and node.target == "index_add_" or (
        node.op == "call_function" and node.target is torch.Tensor.index_add_)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    for user in zeros.users:
        if user is node:
            continue
        if not inplace or order[user] < order[node]:
            return "the zeros accumulator is used elsewhere"
    return TFreeMatch(node, zeros, agg, agg.args[0], weight, slots, word, n_words, is_mean)


class TFreeEmbeddingPass(GraphPass):
    name = "tfree_embedding"
    description = ("T-FREE reference embedding (gather, sum/mean over m, index_add by word) "
                   "-> aa::trigram_bag")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        for node in list(graph.nodes):
            if node.graph is not graph or node not in graph.nodes:  # pragma: no cover
                continue
            found = _match(node)
            if found is None:
                continue
            if isinstance(found, str):
                ctx.skip(node, found)
                continue
            new = self._replace(graph, found)
            ctx.rewrote(new)
        gm.recompile()

    @staticmethod
    def _replace(graph: fx.Graph, m: TFreeMatch) -> fx.Node:
        node = m.index_add
        with graph.inserting_before(node):
            to_csr = torch.ops.aa.tfree_words_to_csr.default
            csr = graph.call_function(to_csr, (m.slots, m.word, m.n_words))
            indices = graph.call_function(operator.getitem, (csr, 0))
            offsets = graph.call_function(operator.getitem, (csr, 1))
            out = graph.call_function(torch.ops.aa.trigram_bag.default,
                                      (m.weight, indices, offsets))
            if m.mean:
                out = graph.call_function(mean_over_slots, (out, m.slots))
        out.meta.update(node.meta)
        if m.mean:  # the op's output has the same shape and dtype as the mean's
            out.args[0].meta.update(node.meta)
        node.replace_all_uses_with(out)
        for user in list(m.zeros.users):  # in-place form: later reads of the accumulator
            if user is not node:
                user.replace_input_with(m.zeros, out)
        for dead in (node, m.zeros, m.agg, m.gather):
            if not dead.users:
                graph.erase_node(dead)
        return out
