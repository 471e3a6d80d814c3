"""Rewrite the HAT reference's padded attentions into `aa::window_attention` and `aa::word_pool`,
and its decoder guide add into `aa::guide_add`.

The reference (``aa_compile.models.hat``) computes, over a packed byte stream of T bytes:

- **byte attention** (encoder and decoder blocks): ``F.scaled_dot_product_attention(q, k, v,
  attn_mask=mask)`` with a dense boolean ``[T, T]`` mask built in the forward from the document
  byte offsets (``document_window_mask(batch.byte_doc_offsets, T, window)``). Pass
  ``hat_window_attention`` replaces it with ``aa::window_attention(q, k, v, offsets, window,
  scale)[0]`` (O(T * window) instead of O(T^2); GQA ``repeat_interleave`` of k/v is dropped,
  the op reads the shared heads itself);
- **word pooling**: SDPA of the shared latent query ``[W, H, 1, hd]`` (an ``expand``) over the
  padded keys/values ``k_bytes[word_bytes]`` ``[W, L, H, hd]`` (transposed) with the key mask
  ``word_mask[:, None, None, :]``, where ``word_bytes``/``word_mask`` are built in the forward from
  ``word_offsets`` (``word_grid``). Pass ``hat_word_pool`` replaces it with ``aa::word_pool(q
  [1, H, hd], k_bytes [T, H, hd], v_bytes, word_offsets, scale).unsqueeze(2)``: nothing padded.

- **guide add**: ``x + g[byte_word]`` (``x [1, T, d]`` or ``[T, d]``, ``g [W, d]``) with
  ``byte_word`` built in the forward from ``word_offsets`` (``byte_words``). Pass
  ``hat_guide_add`` replaces it with ``aa::guide_add(x.reshape(T, d), g, word_offsets)``
  reshaped back (no ``[T, d]`` gather; ``dg`` is a segment sum). The index is proven like the
  masks: ``byte_word[t] == w`` for ``word_offsets[w] <= t < word_offsets[w + 1]``, empty words
  included.

**The guard is a proof by evaluation.** Whether a mask is "the" sliding-window mask cannot be
read off the node that consumes it, so each pass takes the mask's producing subgraph (every
ancestor of the mask, back to the graph inputs), requires that it reads exactly one graph input,
a 1-D integer tensor of static length (the offsets), and no float input, parameter, module call
or random op, copies it into a small GraphModule and runs it at compile time on probe offsets:
random document / word layouts with empty documents, one-document and one-byte-word extremes,
at the graph's own (static) T, D and L. The outputs must equal the op's definition exactly:

- window attention: ``mask[i, j] == same document(i, j) and 0 <= i - j < window`` for some
  ``window`` among the positive integer constants of the subgraph (the smallest that fits; a
  window >= T is full causal attention, for which every such window is the same);
- word pooling: ``word_mask[w, l] == l < len(w)`` and, where the mask is set,
  ``word_bytes[w, l] == word_offsets[w] + l`` (padding indices in range).

Any other mask (non-causal, a window that is a graph input, a float mask, a mask passed in as
an input, dynamic shapes that make T or the offsets' length symbolic) is left alone, with the
reason in the report. The probes establish equality on the layouts tried, not a formal proof; the
subgraph being integer arithmetic of one input at fixed shapes, a mismatch would need a mask that
agrees on every probe layout and differs elsewhere.

**Numerics.** float32: the ops' results equal the SDPA reference to a few ulps (softmax in
float32 in both); gradients likewise (the ops have their own backward). One difference: a word
with no bytes pools to zeros with the op (SDPA with an all-False key mask gives NaN); `ByteBatch`
never has empty words.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from . import match
from .base import GraphPass, PassContext

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX = (torch.int32, torch.int64)
_DEVICES = ("cpu", "cuda")
_RANDOM = ("rand", "dropout", "bernoulli", "normal", "multinomial", "uniform", "exponential",
           "poisson")
_N_PROBES = 8


# -- the mask subgraph ----------------------------------------------------------------------

class Subgraph:
    """The ancestors of some output nodes, back to the graph inputs, runnable on probe values
    of its single input."""

    def __init__(self, gm: fx.GraphModule, outputs: list[fx.Node], leaf: fx.Node,
                 nodes: list[fx.Node]) -> None:
        self.leaf, self.nodes, self.outputs = leaf, nodes, outputs
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in nodes:
            env[n] = graph.node_copy(n, lambda a: env[a])
        graph.output(tuple(env[o] for o in outputs))
        self.module = fx.GraphModule(gm, graph)

    def __call__(self, value: Tensor) -> tuple:
        """The outputs on ``value`` (moved to the input's device), back on the CPU."""
        like = match.tensor_value(self.leaf)
        with torch.no_grad():
            out = self.module(value.to(device=like.device, dtype=like.dtype))
        return tuple(o.cpu() if isinstance(o, Tensor) else o for o in out)

    def constants(self) -> list[int]:
        """The positive integer literals in the subgraph's arguments, smallest first."""
        found: set[int] = set()

        def visit(a):
            if isinstance(a, (list, tuple)):
                for x in a:
                    visit(x)
            elif isinstance(a, dict):
                for x in a.values():
                    visit(x)
            elif isinstance(a, int) and not isinstance(a, bool) and a > 0:
                found.add(a)
        for n in self.nodes:
            visit(n.args)
            visit(n.kwargs)
        return sorted(found)


def _target_name(node: fx.Node) -> str:
    t = node.target
    return (t if isinstance(t, str) else getattr(t, "__name__", str(t))).lower()


def subgraph(gm: fx.GraphModule, outputs: list[fx.Node]) -> Subgraph | str:
    """The producing subgraph of ``outputs`` if it reads exactly one graph input, a 1-D integer
    tensor of static length, and is made of deterministic function/method calls; else why not."""
    seen: set[fx.Node] = set()
    stack = list(outputs)
    leaves = []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            leaves.append(n)
            continue
        if n.op not in ("call_function", "call_method"):
            return f"the mask depends on {n.op} {n.name} (only tensor arithmetic is probed)"
        if any(r in _target_name(n) for r in _RANDOM):
            return f"the mask depends on a random op ({n.name})"
        stack.extend(n.all_input_nodes)
    if len(leaves) != 1:
        names = ", ".join(sorted(p.name for p in leaves)) or "nothing"
        return (f"the mask reads {len(leaves)} graph inputs ({names}); expected only the "
                f"offsets (a window or shape given at run time, a float or dynamic-shape mask)")
    leaf = leaves[0]
    v = match.tensor_value(leaf)
    if v is None or v.dim() != 1 or v.dtype not in _INDEX:
        return f"the mask's input {leaf.name} is not a 1-D int32/int64 tensor"
    if not isinstance(v.shape[0], int):
        return f"the mask's input {leaf.name} has a dynamic length"
    for n in seen:
        for o in (match.value(n),) if n is not leaf else ():
            if isinstance(o, Tensor) and any(not isinstance(s, int) for s in o.shape):
                return f"dynamic shapes in the mask subgraph ({n.name})"
    nodes = [n for n in gm.graph.nodes if n in seen]
    return Subgraph(gm, outputs, leaf, nodes)


def _bounded_layout(n_parts: int, total: int, low: int, high: int, gen: torch.Generator
                    ) -> Tensor | None:
    """Random part lengths in [low, high] summing to ``total``, as ``[n_parts + 1]`` offsets."""
    if n_parts < 1 or n_parts * low > total or n_parts * high < total:
        return None
    lengths = torch.full((n_parts,), low, dtype=torch.int64)
    rest = total - n_parts * low
    while rest > 0:  # each round adds one byte to up to `rest` random parts with room
        room = (lengths < high).to(torch.float32)
        take = torch.multinomial(room, min(rest, int(room.sum())), generator=gen)
        lengths[take] += 1
        rest -= len(take)
    out = torch.zeros(n_parts + 1, dtype=torch.int64)
    out[1:] = lengths.cumsum(0)
    return out


def _doc_layouts(n_docs: int, total: int, gen: torch.Generator) -> list[Tensor]:
    """Document offsets (empty documents allowed): both extremes and random cuts."""
    layouts = []
    if n_docs >= 1:
        layouts.append(torch.tensor([0] + [total] * n_docs))      # everything in document 0
        layouts.append(torch.tensor([0] * n_docs + [total]))      # everything in the last one
        for _ in range(_N_PROBES):
            cuts = torch.randint(0, total + 1, (n_docs - 1,), generator=gen).sort().values
            layouts.append(torch.cat([torch.zeros(1, dtype=torch.int64), cuts,
                                      torch.tensor([total])]))
        if total >= n_docs:
            layouts.append(_bounded_layout(n_docs, total, 1, total, gen))
    return [x for x in layouts if x is not None]


def window_definition(offsets: Tensor, n: int, window: int) -> Tensor:
    """`aa::window_attention`'s mask: same document and ``0 <= i - j < window``."""
    t = torch.arange(n)
    doc = torch.searchsorted(offsets[1:], t, right=True)
    d = t[:, None] - t[None, :]
    return (doc[:, None] == doc[None, :]) & (d >= 0) & (d < window)


# -- window attention -------------------------------------------------------------------------

def _sdpa_args(node: fx.Node):
    """q, k, v, mask, scale of an SDPA node, or a reason when options the ops lack are set."""
    q, k, v = (match.arg(node, i, name) for i, name in ((0, "query"), (1, "key"), (2, "value")))
    mask = match.arg(node, 3, "attn_mask")
    dropout = match.arg(node, 4, "dropout_p", 0.0)
    causal = match.arg(node, 5, "is_causal", False)
    scale = match.arg(node, 6, "scale")
    gqa = node.kwargs.get("enable_gqa", False)
    if dropout not in (0, 0.0):
        return f"dropout_p={dropout!r}"
    if causal is not False:
        return "is_causal together with a mask"
    if gqa:
        return "enable_gqa=True"
    if scale is not None and not match.is_number(scale):
        return "scale is not a constant number"
    return q, k, v, mask, scale


def _tensor_ok(*nodes) -> str | None:
    vals = [match.tensor_value(n) for n in nodes]
    if any(v is None for v in vals):
        return "no shape information for q, k or v"
    if any(v.dtype not in _FLOAT for v in vals) or len({v.dtype for v in vals}) != 1:
        return "q, k, v are not float tensors of one dtype"
    if any(v.device.type not in _DEVICES for v in vals) or len({v.device for v in vals}) != 1:
        return f"q, k, v not on one cpu/cuda device ({vals[0].device})"
    return None


def _unrepeat(k: fx.Node, n_heads: int) -> fx.Node:
    """The key/value heads before a GQA ``repeat_interleave(r, dim=1)``, else ``k``."""
    if match.is_op(k, (torch.repeat_interleave, torch.Tensor.repeat_interleave),
                   ("repeat_interleave",)):
        src, reps = k.args[0], match.arg(k, 1, "repeats")
        dim = match.arg(k, 2, "dim")
        sv = match.tensor_value(src)
        if (isinstance(reps, int) and dim == 1 and sv is not None and sv.dim() == 4
                and sv.shape[1] * reps == n_heads and "output_size" not in k.kwargs):
            return src
    return k


class _Cache:
    """Per graph: mask node -> proven (offsets node, constant) or the reason it is not."""

    def __init__(self) -> None:
        self.results: dict[tuple[fx.Node, ...], object] = {}

    def get(self, key, compute: Callable[[], object]):
        if key not in self.results:
            self.results[key] = compute()
        return self.results[key]


def prove_window_mask(gm: fx.GraphModule, mask: fx.Node, n: int) -> tuple[fx.Node, int] | str:
    """``(offsets node, window)`` if ``mask`` is the document sliding-window mask of a [D+1]
    offsets input, else the reason."""
    sub = subgraph(gm, [mask])
    if isinstance(sub, str):
        return sub
    leaf = match.tensor_value(sub.leaf)
    gen = torch.Generator().manual_seed(0)
    layouts = _doc_layouts(leaf.shape[0] - 1, n, gen)
    if not layouts:
        return "the mask's input cannot be a [D + 1] offsets tensor (it is empty)"
    try:
        values = [sub(lay)[0] for lay in layouts]
    except Exception as e:  # noqa: BLE001  (not an offsets function at all)
        return f"evaluating the mask on probe offsets failed ({type(e).__name__}: {e})"
    if any(not isinstance(x, Tensor) or x.dtype != torch.bool or tuple(x.shape) != (n, n)
           for x in values):
        return "the mask evaluated on probe offsets is not a [T, T] bool tensor"
    for window in sub.constants():
        if all(torch.equal(x, window_definition(lay, n, window))
               for x, lay in zip(values, layouts)):
            return sub.leaf, window
    return ("the mask is not the causal sliding-window document mask of its offsets input "
            f"({sub.leaf.name}) for any window among the graph's constants {sub.constants()}")


def _erase_dead(graph: fx.Graph, nodes) -> None:
    nodes = set(nodes)
    for n in reversed([x for x in graph.nodes if x in nodes]):
        inplace = _target_name(n).endswith("_") and not _target_name(n).startswith("_")
        if n.op in ("call_function", "call_method") and not n.users and not inplace:
            graph.erase_node(n)


class WindowAttentionPass(GraphPass):
    name = "hat_window_attention"
    description = ("SDPA with a proven causal sliding-window document mask "
                   "-> aa::window_attention")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        graph, cache, dead = gm.graph, _Cache(), []
        for node in list(graph.nodes):
            if not match.is_op(node, _SDPA):
                continue
            args = _sdpa_args(node)
            mask = args[3] if not isinstance(args, str) else match.arg(node, 3, "attn_mask")
            mv = match.tensor_value(mask)
            if mv is None or mv.dim() != 2:
                continue  # no mask or not a [T, T] one: not this pattern (word pooling is 4-D)
            if isinstance(args, str):
                ctx.skip(node, args)
                continue
            q, k, v, _, scale = args
            why = _tensor_ok(q, k, v)
            if why:
                ctx.skip(node, why)
                continue
            qv, kv, vv = (match.tensor_value(x) for x in (q, k, v))
            n = qv.shape[-2]
            if qv.dim() < 3 or kv.shape[-2] != n or vv.shape[-2] != n or mv.dtype != torch.bool \
                    or tuple(mv.shape) != (n, n) or not isinstance(n, int):
                ctx.skip(node, "not self-attention with a static [T, T] bool mask")
                continue
            proof = cache.get((mask,), lambda m=mask, n=n: prove_window_mask(gm, m, n))
            if isinstance(proof, str):
                ctx.skip(node, proof)
                continue
            offsets, window = proof
            k2, v2 = _unrepeat(k, qv.shape[-3]), _unrepeat(v, qv.shape[-3])
            if (k2 is k) != (v2 is v):
                k2, v2 = k, v
            with graph.inserting_before(node):
                wa = graph.call_function(torch.ops.aa.window_attention.default,
                                         (q, k2, v2, offsets, window, scale))
                out = graph.call_function(operator.getitem, (wa, 0))
            out.meta.update(node.meta)
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            dead += [k, v, mask]
            ctx.rewrote(out)
        _erase_dead(graph, _ancestors(dead))
        gm.recompile()


def _ancestors(nodes) -> list[fx.Node]:
    seen, stack = set(), [n for n in nodes if isinstance(n, fx.Node)]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return list(seen)


# -- word pooling -----------------------------------------------------------------------------

def prove_word_grid(gm: fx.GraphModule, index: fx.Node, mask: fx.Node, n: int
                    ) -> fx.Node | str:
    """The ``word_offsets`` node if ``index`` ``[W, L]`` and ``mask`` (``[W, 1|H, 1, L]``) are
    the padded word grid of a [W + 1] offsets input over ``n`` bytes, else the reason."""
    sub = subgraph(gm, [index, mask])
    if isinstance(sub, str):
        return sub
    leaf = match.tensor_value(sub.leaf)
    iv, mv = match.tensor_value(index), match.tensor_value(mask)
    n_words, width = iv.shape
    if leaf.shape[0] != n_words + 1:
        return f"the word grid's input {sub.leaf.name} is not [W + 1] offsets"
    gen = torch.Generator().manual_seed(0)
    layouts = [_bounded_layout(n_words, n, 1, width, gen) for _ in range(_N_PROBES)]
    layouts += [_bounded_layout(n_words, n, lo, hi, gen)
                for lo, hi in ((1, 1), (width, width), (1, max(1, width // 2)))]
    layouts = [x for x in layouts if x is not None]
    if not layouts:
        return "no word layout fits T, W and L (T < W or T > W * L)"
    cols = torch.arange(width)
    for lay in layouts:
        try:
            got_index, got_mask = sub(lay)
        except Exception as e:  # noqa: BLE001
            return f"evaluating the word grid on probe offsets failed ({type(e).__name__}: {e})"
        want = cols < lay.diff()[:, None]
        if got_mask.dtype != torch.bool or tuple(got_mask.shape) != tuple(mv.shape) \
                or not torch.equal(got_mask[:, :, 0, :],
                                   want[:, None, :].expand(-1, got_mask.shape[1], -1)):
            return "the key mask is not the word-length mask of the word offsets"
        starts = (lay[:-1, None] + cols).expand_as(got_index)
        if not torch.equal(got_index[want], starts[want]) or got_index.min() < 0 \
                or got_index.max() >= n:
            return "the gathered byte indices are not the word offsets' grid"
    return sub.leaf


def _gathered(node) -> tuple[fx.Node, fx.Node] | None:
    """``(base [T, H, hd], index [W, L])`` if ``node`` is ``base[index].transpose(1, 2)``."""
    if not match.is_op(node, (torch.transpose, torch.Tensor.transpose), ("transpose",)):
        return None
    dims = {match.arg(node, 1, "dim0"), match.arg(node, 2, "dim1")}
    if dims != {1, 2}:
        return None
    g = node.args[0]
    if not (isinstance(g, fx.Node) and g.op == "call_function" and g.target is operator.getitem):
        return None
    base, index = g.args
    bv, iv = match.tensor_value(base), match.tensor_value(index)
    if bv is None or iv is None or bv.dim() != 3 or iv.dim() != 2 or iv.dtype not in _INDEX:
        return None
    return base, index


def _query(q: fx.Node) -> fx.Node:
    """The shared ``[1, H, 1, hd]`` query under an ``expand``, else ``q`` itself."""
    if match.is_op(q, (torch.Tensor.expand,), ("expand",)):
        src = q.args[0]
        sv = match.tensor_value(src)
        if sv is not None and sv.dim() == 4 and sv.shape[0] == 1:
            return src
    return q


class WordPoolPass(GraphPass):
    name = "hat_word_pool"
    description = ("SDPA of one query per word over the padded gathered bytes with a proven "
                   "word mask -> aa::word_pool")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        graph, cache, dead = gm.graph, _Cache(), []
        for node in list(graph.nodes):
            if not match.is_op(node, _SDPA):
                continue
            args = _sdpa_args(node)
            if isinstance(args, str):
                continue  # the window pass reports SDPA options; pooling never sets them
            q, k, v, mask, scale = args
            mv, qv = match.tensor_value(mask), match.tensor_value(q)
            gk, gv = _gathered(k), _gathered(v)
            if mv is None or mv.dim() != 4 or gk is None or gv is None:
                continue  # not the padded pooling pattern
            why = _tensor_ok(q, gk[0], gv[0])
            if why:
                ctx.skip(node, why)
                continue
            (kb, index), (vb, index_v) = gk, gv
            if index_v is not index:
                ctx.skip(node, "keys and values are gathered with different index tensors")
                continue
            kbv, vbv = match.tensor_value(kb), match.tensor_value(vb)
            n_words, width = match.tensor_value(index).shape
            h = qv.shape[1]
            if qv.dim() != 4 or tuple(qv.shape) != (n_words, h, 1, qv.shape[3]) \
                    or kbv.shape[1] != h or vbv.shape[1] != h or kbv.shape[0] != vbv.shape[0] \
                    or mv.shape[0] != n_words or mv.shape[2] != 1 or mv.shape[3] != width \
                    or mv.shape[1] not in (1, h) or mv.dtype != torch.bool:
                ctx.skip(node, "shapes are not q [W, H, 1, hd], k/v [W, H, L, hd], mask "
                               "[W, 1, 1, L] bool")
                continue
            if not all(isinstance(s, int) for s in (*qv.shape, *kbv.shape, width)):
                ctx.skip(node, "dynamic shapes")
                continue
            proof = cache.get((index, mask), lambda i=index, m=mask, t=kbv.shape[0]:
                              prove_word_grid(gm, i, m, t))
            if isinstance(proof, str):
                ctx.skip(node, proof)
                continue
            src = _query(q)
            with graph.inserting_before(node):
                q3 = graph.call_method("squeeze", (src, 2))
                wp = graph.call_function(torch.ops.aa.word_pool.default,
                                         (q3, kb, vb, proof, scale))
                out = graph.call_method("unsqueeze", (wp, 2))
            out.meta.update(node.meta)
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            dead += [q, k, v, mask]
            ctx.rewrote(out)
        _erase_dead(graph, _ancestors(dead))
        gm.recompile()


# -- guide add --------------------------------------------------------------------------------

def prove_byte_words(gm: fx.GraphModule, index: fx.Node, n_words: int) -> fx.Node | str:
    """The ``word_offsets`` node if ``index`` ``[T]`` is each byte's word under a [W + 1]
    offsets input (empty words allowed), else the reason."""
    sub = subgraph(gm, [index])
    if isinstance(sub, str):
        return sub
    leaf = match.tensor_value(sub.leaf)
    n = match.tensor_value(index).shape[0]
    if leaf.shape[0] != n_words + 1:
        return f"the byte-to-word index's input {sub.leaf.name} is not [W + 1] offsets"
    gen = torch.Generator().manual_seed(0)
    layouts = [_bounded_layout(n_words, n, lo, n, gen) for lo in (1, 1, 1, 0, 0, 0)]
    layouts = [x for x in layouts if x is not None]
    if not layouts:
        return "no word layout fits T and W"
    for lay in layouts:
        try:
            (got,) = sub(lay)
        except Exception as e:  # noqa: BLE001
            return f"evaluating the byte-to-word index failed ({type(e).__name__}: {e})"
        want = torch.repeat_interleave(torch.arange(n_words), lay.diff())
        if not isinstance(got, Tensor) or not torch.equal(got.to(torch.int64), want):
            return "the gather index is not the word of each byte under the word offsets"
    return sub.leaf


class GuideAddPass(GraphPass):
    name = "hat_guide_add"
    description = ("x + g[byte_word] with a proven byte-to-word index -> aa::guide_add")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        graph, cache = gm.graph, _Cache()
        for node in list(graph.nodes):
            if not match.is_add(node) or len(node.args) != 2 or node.kwargs:
                continue
            found = None
            for x, gathered in (node.args, node.args[::-1]):
                if (isinstance(gathered, fx.Node) and gathered.op == "call_function"
                        and gathered.target is operator.getitem and isinstance(x, fx.Node)):
                    g, index = gathered.args
                    gv, iv = match.tensor_value(g), match.tensor_value(index)
                    if isinstance(g, fx.Node) and gv is not None and iv is not None \
                            and gv.dim() == 2 and iv.dim() == 1 and iv.dtype in _INDEX:
                        found = x, gathered, g, index
                        break
            if found is None:
                continue
            x, gathered, g, index = found
            xv, gv, ov = (match.tensor_value(a) for a in (x, g, node))
            why = _tensor_ok(x, g)
            if why:
                ctx.skip(node, why.replace("q, k, v", "x and the guide"))
                continue
            n, d = match.tensor_value(index).shape[0], gv.shape[1]
            shapes = (*xv.shape, *gv.shape, n)
            if not all(isinstance(s, int) for s in shapes):
                ctx.skip(node, "dynamic shapes")
                continue
            if xv.dim() < 2 or tuple(xv.shape[-2:]) != (n, d) or xv.numel() != n * d \
                    or tuple(ov.shape) != tuple(xv.shape):
                ctx.skip(node, "x is not [(1, ...,) T, d] with T bytes and the guide's width d")
                continue
            proof = cache.get((index, gv.shape[0]),
                              lambda i=index, w=gv.shape[0]: prove_byte_words(gm, i, w))
            if isinstance(proof, str):
                ctx.skip(node, proof)
                continue
            with graph.inserting_before(node):
                x2 = graph.call_method("reshape", (x, n, d))
                y = graph.call_function(torch.ops.aa.guide_add.default, (x2, g, proof))
                out = graph.call_method("reshape", (y, tuple(xv.shape)))
            out.meta.update(node.meta)
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            ctx.rewrote(out)
            _erase_dead(graph, _ancestors([gathered]))
        gm.recompile()
