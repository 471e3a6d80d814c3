"""Pass ``hat_window_attention``: the HAT reference's byte attention, SDPA with a dense ``[T, T]``
bool mask built from the document offsets, becomes ``aa::window_attention(q, k, v, offsets,
window, scale)[0]`` (O(T * window) instead of O(T^2); a GQA ``repeat_interleave`` of k/v is
dropped, the op reads the shared heads itself). Its guard, `prove_window_mask`, proves by
evaluation that the mask is the causal sliding-window document mask (``docs/hat.md``)."""

from __future__ import annotations

import dataclasses
import operator

import sympy
import torch
from torch import Tensor, fx

from aa_compile.passes import match
from aa_compile.passes.hat.proof import ProofCache, doc_layouts, subgraph
from aa_compile.passes.hat.rewrite import SdpaRewritePass, check_tensors, sdpa_args
from aa_compile.passes.hat.shapes import expr, same, size_at

#: the largest T a window-disambiguation probe may use (a [T, T] mask is evaluated)
MAX_PROBE_T = 8192


def window_definition(offsets: Tensor, n: int, window: int) -> Tensor:
    """`aa::window_attention`'s mask: same document and ``0 <= i - j < window``."""
    t = torch.arange(n)
    doc = torch.searchsorted(offsets[1:], t, right=True)
    d = t[:, None] - t[None, :]
    return (doc[:, None] == doc[None, :]) & (d >= 0) & (d < window)


def prove_window_mask(gm: fx.GraphModule, mask: fx.Node, n) -> tuple[fx.Node, int] | str:
    """``(offsets node, window)`` if ``mask`` is the document sliding-window mask of a [D+1]
    offsets input over ``n`` (an int, or a SymInt in a dynamic-shape graph) bytes, else the
    reason."""
    sub = subgraph(gm, [mask])
    if isinstance(sub, str):
        return sub
    length = match.tensor_value(sub.leaf).shape[0]
    why = sub.include(n)
    if why:
        return why
    gen = torch.Generator().manual_seed(0)
    evaluated: list[tuple[int, list[Tensor], list[Tensor]]] = []  # (T, layouts, masks)

    def evaluate(sizes: dict) -> str | None:
        try:
            t, n_docs = size_at(n, sizes), size_at(length, sizes) - 1
        except ValueError as e:
            return str(e)
        layouts = doc_layouts(n_docs, t, gen)
        if not layouts:
            return "the mask's input cannot be a [D + 1] offsets tensor (it is empty)"
        try:
            values = [sub(lay, sizes)[0] for lay in layouts]
        except Exception as e:  # noqa: BLE001  (not an offsets function at all)
            return f"evaluating the mask on probe offsets failed ({type(e).__name__}: {e})"
        if any(not isinstance(x, Tensor) or x.dtype != torch.bool or tuple(x.shape) != (t, t)
               for x in values):
            return "the mask evaluated on probe offsets is not a [T, T] bool tensor"
        evaluated.append((t, layouts, values))
        return None

    for sizes in sub.size_probes(lambda s: size_at(length, s) >= 2):
        why = evaluate(sizes)
        if why:
            return why

    def fitting() -> list[int]:
        return [w for w in sub.constants()
                if all(torch.equal(x, window_definition(lay, t, w))
                       for t, layouts, values in evaluated for x, lay in zip(values, layouts))]

    fits = fitting()
    # a dynamic T: two windows that both fit every probe differ once T exceeds the smaller, so
    # probe at that T until one window is left (a static T needs no such probe: any window
    # >= T gives the same mask there)
    rounds = 0
    while sub.dynamic and len(fits) > 1:
        t_expr = expr(n)
        if rounds == 4 or not isinstance(t_expr, sympy.Symbol) or fits[0] + 1 > MAX_PROBE_T:
            return (f"the window is ambiguous: constants {fits} all fit at the probe sizes and "
                    f"a larger probe T is not available")
        sizes = dict(sub.hints())
        sizes[t_expr] = sympy.Integer(fits[0] + 1)
        why = evaluate(sizes)
        if why:
            return why
        fits, rounds = fitting(), rounds + 1
    if fits:
        return sub.leaf, fits[0]
    return ("the mask is not the causal sliding-window document mask of its offsets input "
            f"({sub.leaf.name}) for any window among the graph's constants {sub.constants()}")


def _unrepeat(k: fx.Node, n_heads: int) -> fx.Node:
    """The key/value heads before a GQA ``repeat_interleave(r, dim=1)``, else ``k``."""
    if match.is_op(k, (torch.repeat_interleave, torch.Tensor.repeat_interleave),
                   ("repeat_interleave",)):
        src, reps = k.args[0], match.arg(k, 1, "repeats")
        dim = match.arg(k, 2, "dim")
        sv = match.tensor_value(src)
        if (isinstance(reps, int) and dim == 1 and sv is not None and sv.dim() == 4
                and same(sv.shape[1] * reps, n_heads) and "output_size" not in k.kwargs):
            return src
    return k


@dataclasses.dataclass
class WindowAttention:
    """A masked SDPA node the guard admitted, and what the op call needs."""

    q: fx.Node
    k: fx.Node  # the shared heads when a GQA repeat_interleave was dropped
    v: fx.Node
    offsets: fx.Node
    window: int
    scale: float | None
    used: list[fx.Node]  # the SDPA's inputs that may go dead with it


class WindowAttentionPass(SdpaRewritePass):
    name = "hat_window_attention"
    description = ("SDPA with a proven causal sliding-window document mask "
                   "-> aa::window_attention")

    def check(self, gm: fx.GraphModule, node: fx.Node, cache: ProofCache
              ) -> WindowAttention | str | None:
        """The guard: self-attention over float q, k, v on one cpu/cuda device, no SDPA option
        the op lacks, and a ``[T, T]`` bool mask proven to be the window mask."""
        args = sdpa_args(node)
        mask = args[3] if not isinstance(args, str) else match.arg(node, 3, "attn_mask")
        mv = match.tensor_value(mask)
        if mv is None or mv.dim() != 2:
            return None  # no mask or not a [T, T] one: not this pattern (word pooling is 4-D)
        if isinstance(args, str):
            return args
        q, k, v, _, scale = args
        why = check_tensors(q, k, v)
        if why:
            return why
        qv, kv, vv = (match.tensor_value(x) for x in (q, k, v))
        n = qv.shape[-2]
        if qv.dim() < 3 or not same(kv.shape[-2], n) or not same(vv.shape[-2], n) \
                or mv.dtype != torch.bool or not all(same(s, n) for s in mv.shape):
            return "not self-attention with a [T, T] bool mask"
        proof = cache.get((mask,), lambda m=mask, n=n: prove_window_mask(gm, m, n))
        if isinstance(proof, str):
            return proof
        offsets, window = proof
        k2, v2 = _unrepeat(k, qv.shape[-3]), _unrepeat(v, qv.shape[-3])
        if (k2 is k) != (v2 is v):
            k2, v2 = k, v
        return WindowAttention(q, k2, v2, offsets, window, scale, [k, v, mask])

    def rewrite(self, graph: fx.Graph, node: fx.Node, found: WindowAttention
                ) -> tuple[fx.Node, list[fx.Node]]:
        wa = graph.call_function(torch.ops.aa.window_attention.default,
                                 (found.q, found.k, found.v, found.offsets, found.window,
                                  found.scale))
        return graph.call_function(operator.getitem, (wa, 0)), found.used
