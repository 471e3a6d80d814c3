"""Rewrite the HAT reference's padded attentions into `aa::window_attention` and `aa::word_pool`,
and its decoder guide add into `aa::guide_add_rms_norm` (fused with the RMSNorm that reads the
sum) or `aa::guide_add`.

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
- **guide add**: ``y = x + g[byte_word]`` (``x [1, T, d]`` or ``[T, d]``, ``g [W, d]``) with
  ``byte_word`` built in the forward from ``word_offsets`` (``byte_words``), followed in the
  decoder by the block's ``attn_norm(y)`` (every guided layer: the first, or all of them with
  ``guide_every_layer``). Pass ``hat_guide_add`` replaces the pair with ``y, normed =
  aa::guide_add_rms_norm(x.reshape(T, d), g, word_offsets, weight, eps, out_dtype=...)``, both
  reshaped back: ``y`` goes to the sum's other users (the residual stream), ``normed`` to the
  norm's. A sum that no RMSNorm reads becomes ``aa::guide_add(x.reshape(T, d), g,
  word_offsets)``. No ``[T, d]`` gather either way; ``dg`` is a segment sum. The index is proven
  like the masks: ``byte_word[t] == w`` for ``word_offsets[w] <= t < word_offsets[w + 1]``,
  empty words included.

**Which norms fuse.** The norm reads ``y`` through reshapes/views (last dimension kept), ``t[0]``
of a leading 1 and casts that are exact and keep the op's arithmetic (to ``y``'s dtype, or
half -> float32); it is the ``aa::rms_norm`` the ``rms_norm`` pass (earlier in the pipeline)
made, or, when that pass is off, a form it matches with its guard holding. Its eps is a finite
number >= 0 (or the symbolic float of ``dynamic=True``), its weight None or a 1-D float tensor
of width d on ``y``'s device, defined before the sum (an ``eps.item()`` after it is moved up);
``out_dtype`` is the norm's output dtype. Otherwise the unfused op is emitted and the report has
"kept the unfused aa::guide_add: ..." with the reason. The first such norm in graph order fuses;
any other stays ``aa::rms_norm`` of ``y``.

**The guard is a proof by evaluation.** Whether a mask is "the" sliding-window mask cannot be
read off the node that consumes it, so each pass takes the mask's producing subgraph (every
ancestor of the mask, back to the graph inputs), requires that it reads exactly one tensor graph
input, a 1-D integer tensor (the offsets), besides symbolic sizes of the graph's tensor inputs,
and no float input, parameter, module call or random op, copies it into a small GraphModule and
runs it at compile time on probe offsets: random document / word layouts with empty documents,
one-document and one-byte-word extremes. The outputs must equal the op's definition exactly:

- window attention: ``mask[i, j] == same document(i, j) and 0 <= i - j < window`` for some
  ``window`` among the positive integer constants of the subgraph (the smallest that fits; a
  window >= T is full causal attention, for which every such window is the same);
- word pooling: ``word_mask[w, l] == l < len(w)`` and, where the mask is set,
  ``word_bytes[w, l] == word_offsets[w] + l`` (padding indices in range).

**Sizes.** A static graph is probed at its own T, D, W and L. A dynamic-shape graph (dynamo's
automatic dynamic after a batch of another shape, or ``dynamic=True``: T, W, L, D symbolic, the
mask built from SymInt graph inputs) is probed at the example inputs' sizes (dynamo's hints) and
at up to three seeded random assignments of the symbols (each in ``[2, min(hint + 8, 96)]``,
those a layout fits); for a symbolic T, when two window constants both fit every probe (all
probe T <= the smaller), another probe at T = smaller + 1 decides (up to T = 8192, else the
mask is left alone as ambiguous). The guide's row count W and the offsets' length W + 1 come
from different batch tensors, so dynamo has two symbols for them: the guide-add pass installs
their equality as a guard of the compiled graph (dynamo re-checks it per call and recompiles
when it fails); every other size relation the passes rely on is already known to dynamo
(checked without adding guards). The ops' fake kernels take symbolic sizes; the reshapes around
them use -1 for the one symbolic dimension.

Any other mask (non-causal, a window that is a graph input, a float mask, a mask passed in as
an input, data-dependent sizes) is left alone, with the reason in the report. The probes
establish equality on the layouts and sizes tried, not a formal proof; the subgraph being
integer arithmetic of one input, a mismatch would need a mask that agrees on every probe and
differs elsewhere.

**Numerics.** float32: the ops' results equal the SDPA reference to a few ulps (softmax in
float32 in both); gradients likewise (the ops have their own backward). One difference: a word
with no bytes pools to zeros with the op (SDPA with an all-False key mask gives NaN); `ByteBatch`
never has empty words. The fused norm rounds once (the ``aa::rms_norm`` convention): equal to
the unfused ops in float32, within a rounding of the reference in half types.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import random
from collections.abc import Callable

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor, fx
from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw, statically_known_true

from . import match
from .base import GraphPass, PassContext
from .rms_norm import RMSNormMatch, _is_cast, match_rms_norm

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX = (torch.int32, torch.int64)
_DEVICES = ("cpu", "cuda")
_RANDOM = ("rand", "dropout", "bernoulli", "normal", "multinomial", "uniform", "exponential",
           "poisson")
_N_PROBES = 8
#: the largest T a window-disambiguation probe may use (a [T, T] mask is evaluated)
_MAX_PROBE_T = 8192


# -- sizes: static ints or dynamo's symbolic ones ------------------------------------------

def _expr(v):
    """The sympy expression of a SymInt, shape-env replacements applied (None for an int)."""
    if isinstance(v, torch.SymInt):
        node = v.node
        return node.shape_env.replace(node.expr)
    return None


def _same(a, b) -> bool:
    """``a == b`` for ints or SymInts, decided without adding a guard (False when unknown)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001  (not comparable: not the same)
        return False


def _same_or_guard(a, b) -> bool:
    """``a == b`` when `_same`; else, for symbolic sizes equal at dynamo's example inputs,
    installs that equality as a guard of the compiled graph (dynamo re-checks it every call
    and recompiles when it fails) and returns True; else False."""
    if _same(a, b):
        return True
    if isinstance(a, int) and isinstance(b, int):
        return False
    try:
        if guarding_hint_or_throw(a) != guarding_hint_or_throw(b):
            return False
        return bool(a == b)
    except Exception:  # noqa: BLE001  (no hint, or the shape env takes no more guards)
        return False


def _size(v, sizes: dict) -> int:
    """``v`` (an int or a SymInt) at the concrete ``sizes`` (symbol -> value)."""
    if isinstance(v, int):
        return v
    value = _expr(v).xreplace(sizes)
    if not value.is_Integer:
        raise ValueError(f"size {v} does not evaluate to an integer at {sizes}")
    return int(value)


def _shape_arg(shape) -> tuple | None:
    """``shape`` as reshape arguments: its one symbolic dimension (if any) as -1; None when
    more than one dimension is symbolic."""
    dynamic = [i for i, s in enumerate(shape) if not isinstance(s, int)]
    if len(dynamic) > 1:
        return None
    return tuple(-1 if i in dynamic else s for i, s in enumerate(shape))


def _symbols_of(v) -> set:
    if isinstance(v, torch.SymInt):
        return set(_expr(v).free_symbols)
    if isinstance(v, Tensor):
        return set().union(*(_symbols_of(s) for s in v.shape)) if v.dim() else set()
    return set()


def _shape_env(values):
    for v in values:
        for s in (v.shape if isinstance(v, Tensor) else (v,)):
            if isinstance(s, torch.SymInt):
                return s.node.shape_env
    return None


# -- the mask subgraph ----------------------------------------------------------------------

class Subgraph:
    """The ancestors of some output nodes, back to the graph inputs, runnable on probe values
    of its single tensor input (and, in a dynamic-shape graph, on probe sizes: its SymInt
    inputs and every symbolic size are given concrete values)."""

    def __init__(self, gm: fx.GraphModule, outputs: list[fx.Node], leaf: fx.Node,
                 nodes: list[fx.Node], values: list, shape_env) -> None:
        self.leaf, self.nodes, self.outputs = leaf, nodes, outputs
        self.values = list(values)  # every size here is probed
        self.shape_env = shape_env
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        self.inputs: list[fx.Node] = []
        for n in nodes:
            env[n] = graph.node_copy(n, lambda a: env[a])
            if n.op == "placeholder":
                self.inputs.append(n)
        graph.output(tuple(env[o] for o in outputs))
        self.module = fx.GraphModule(gm, graph)

    def include(self, *sizes) -> str | None:
        """Also probe the symbols of ``sizes`` (sizes the caller checks against, such as T,
        that the subgraph itself need not read); a reason if one is data-dependent."""
        for v in sizes:
            for s in _symbols_of(v):
                if self.shape_env is None:
                    self.shape_env = v.node.shape_env
                if s not in self.shape_env.backed_var_to_val:
                    return f"data-dependent size {s}"
            self.values.append(v)
        return None

    @property
    def symbols(self) -> list:
        """The free symbols of every size (recomputed: a guard may have replaced some)."""
        return sorted(set().union(*(_symbols_of(v) for v in self.values)), key=str)

    @property
    def dynamic(self) -> bool:
        return bool(self.symbols)

    def hints(self) -> dict:
        """The sizes of the example inputs dynamo traced with (its "hints")."""
        known = self.shape_env.backed_var_to_val
        return {s: sympy.Integer(int(known[s])) for s in self.symbols}

    def size_probes(self, feasible: Callable[[dict], bool], extra: int = 3) -> list[dict]:
        """Concrete sizes to evaluate at: ``{}`` for a static graph; else the hints first, then
        up to ``extra`` other seeded random assignments that ``feasible`` accepts, each symbol
        in ``[max(2, its lower bound), min(its hint + 8, 96)]`` (small: a probe evaluates the
        whole subgraph; the hints are the one large size)."""
        symbols = self.symbols
        if not symbols:
            return [{}]
        hints = self.hints()
        probes = [hints]
        ranges = getattr(self.shape_env, "var_to_range", {})
        rng = random.Random(0)
        bounds = {}
        for s in symbols:
            vr = ranges.get(s)
            lo = max(2, int(vr.lower)) if vr is not None and vr.lower.is_Integer else 2
            hi = min(int(hints[s]) + 8, 96)
            if vr is not None and vr.upper.is_Integer:
                hi = min(hi, int(vr.upper))
            bounds[s] = (lo, max(lo, hi))
        for _ in range(64):
            if len(probes) > extra:
                break
            cand = {s: sympy.Integer(rng.randint(*bounds[s])) for s in symbols}
            try:
                ok = cand not in probes and feasible(cand)
            except ValueError:  # a size that does not evaluate there
                ok = False
            if ok:
                probes.append(cand)
        return probes

    def __call__(self, value: Tensor, sizes: dict | None = None) -> tuple:
        """The outputs on ``value`` (moved to the input's device) at ``sizes``, on the CPU."""
        like = match.tensor_value(self.leaf)
        args = []
        for p in self.inputs:
            if p is self.leaf:
                args.append(value.to(device=like.device, dtype=like.dtype))
            else:
                args.append(_size(match.value(p), sizes or {}))
        with torch.no_grad():
            out = self.module(*args)
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


def _is_tensor_size(p: fx.Node) -> bool:
    """An int graph input that is static, or a symbolic size of an input tensor (dynamo records
    where each graph input comes from; an int argument that dynamo made symbolic, such as a
    window that changed between calls, is not one)."""
    if isinstance(match.value(p), int):
        return True
    source = getattr(p.meta.get("grapharg"), "source", None)
    return getattr(getattr(source, "prop", None), "name", None) == "SIZE"


def subgraph(gm: fx.GraphModule, outputs: list[fx.Node]) -> Subgraph | str:
    """The producing subgraph of ``outputs`` if it reads exactly one tensor graph input, a 1-D
    integer tensor, and otherwise only symbolic sizes (SymInt inputs of a dynamic-shape graph),
    and is made of deterministic function/method calls; else why not."""
    seen: set[fx.Node] = set()
    stack = list(outputs)
    leaves, sizes = [], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            (sizes if isinstance(match.value(n), (int, torch.SymInt)) else leaves).append(n)
            continue
        if n.op not in ("call_function", "call_method"):
            return f"the mask depends on {n.op} {n.name} (only tensor arithmetic is probed)"
        if any(r in _target_name(n) for r in _RANDOM):
            return f"the mask depends on a random op ({n.name})"
        stack.extend(n.all_input_nodes)
    if len(leaves) != 1:
        names = ", ".join(sorted(p.name for p in leaves)) or "nothing"
        return (f"the mask reads {len(leaves)} tensor graph inputs ({names}); expected only "
                f"the offsets (a window given at run time, a float mask)")
    leaf = leaves[0]
    v = match.tensor_value(leaf)
    if v is None or v.dim() != 1 or v.dtype not in _INDEX:
        return f"the mask's input {leaf.name} is not a 1-D int32/int64 tensor"
    loose = [p.name for p in sizes if not _is_tensor_size(p)]
    if loose:
        return (f"the mask reads integer graph inputs that are not tensor sizes "
                f"({', '.join(sorted(loose))}): a window or size given at run time")
    values = [match.value(n) for n in seen]
    symbols = set().union(*(_symbols_of(x) for x in values))
    env = _shape_env(values)
    if symbols:
        known = env.backed_var_to_val if env is not None else {}
        unbacked = sorted(str(s) for s in symbols if s not in known)
        if unbacked:
            return f"data-dependent sizes in the mask subgraph ({', '.join(unbacked)})"
    if any(isinstance(x, (torch.SymFloat, torch.SymBool)) for x in values):
        return "symbolic floats or booleans in the mask subgraph"
    nodes = [n for n in gm.graph.nodes if n in seen]
    return Subgraph(gm, outputs, leaf, nodes, values, env)


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
                and _same(sv.shape[1] * reps, n_heads) and "output_size" not in k.kwargs):
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
            t, n_docs = _size(n, sizes), _size(length, sizes) - 1
        except ValueError as e:
            return str(e)
        layouts = _doc_layouts(n_docs, t, gen)
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

    for sizes in sub.size_probes(lambda s: _size(length, s) >= 2):
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
        t_expr = _expr(n)
        if rounds == 4 or not isinstance(t_expr, sympy.Symbol) or fits[0] + 1 > _MAX_PROBE_T:
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


def _erase_dead(graph: fx.Graph, nodes) -> None:
    nodes = set(nodes)
    for n in reversed([x for x in graph.nodes if x in nodes]):
        inplace = _target_name(n).endswith("_") and not _target_name(n).startswith("_")
        if n.op in ("call_function", "call_method") and not n.users and not inplace:
            graph.erase_node(n)


class _SdpaRewritePass(GraphPass):
    """The loop both HAT attention passes share: every SDPA node is offered to `rewrite`, which
    returns its replacement and the nodes that may have gone dead with it, or None (left as
    is; a node that matched the pattern but failed a check has its reason reported). Dead
    inputs are erased once at the end."""

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, cache: _Cache,
                ctx: PassContext) -> tuple[fx.Node, list[fx.Node]] | None:
        raise NotImplementedError

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        graph, cache, dead = gm.graph, _Cache(), []
        for node in list(graph.nodes):
            if not match.is_op(node, _SDPA):
                continue
            done = self.rewrite(gm, node, cache, ctx)
            if done is None:
                continue
            out, used = done
            out.meta.update(node.meta)
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            dead += used
            ctx.rewrote(out)
        _erase_dead(graph, _ancestors(dead))
        gm.recompile()


class WindowAttentionPass(_SdpaRewritePass):
    name = "hat_window_attention"
    description = ("SDPA with a proven causal sliding-window document mask "
                   "-> aa::window_attention")

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, cache: _Cache,
                ctx: PassContext) -> tuple[fx.Node, list[fx.Node]] | None:
        graph = gm.graph
        args = _sdpa_args(node)
        mask = args[3] if not isinstance(args, str) else match.arg(node, 3, "attn_mask")
        mv = match.tensor_value(mask)
        if mv is None or mv.dim() != 2:
            return None  # no mask or not a [T, T] one: not this pattern (word pooling is 4-D)
        if isinstance(args, str):
            ctx.skip(node, args)
            return None
        q, k, v, _, scale = args
        why = _tensor_ok(q, k, v)
        if why:
            ctx.skip(node, why)
            return None
        qv, kv, vv = (match.tensor_value(x) for x in (q, k, v))
        n = qv.shape[-2]
        if qv.dim() < 3 or not _same(kv.shape[-2], n) or not _same(vv.shape[-2], n) \
                or mv.dtype != torch.bool or not all(_same(s, n) for s in mv.shape):
            ctx.skip(node, "not self-attention with a [T, T] bool mask")
            return None
        proof = cache.get((mask,), lambda m=mask, n=n: prove_window_mask(gm, m, n))
        if isinstance(proof, str):
            ctx.skip(node, proof)
            return None
        offsets, window = proof
        k2, v2 = _unrepeat(k, qv.shape[-3]), _unrepeat(v, qv.shape[-3])
        if (k2 is k) != (v2 is v):
            k2, v2 = k, v
        with graph.inserting_before(node):
            wa = graph.call_function(torch.ops.aa.window_attention.default,
                                     (q, k2, v2, offsets, window, scale))
            out = graph.call_function(operator.getitem, (wa, 0))
        return out, [k, v, mask]


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

def prove_word_grid(gm: fx.GraphModule, index: fx.Node, mask: fx.Node, n
                    ) -> fx.Node | str:
    """The ``word_offsets`` node if ``index`` ``[W, L]`` and ``mask`` (``[W, 1|H, 1, L]``) are
    the padded word grid of a [W + 1] offsets input over ``n`` bytes, else the reason."""
    sub = subgraph(gm, [index, mask])
    if isinstance(sub, str):
        return sub
    length = match.tensor_value(sub.leaf).shape[0]
    iv, mv = match.tensor_value(index), match.tensor_value(mask)
    if not _same(length, iv.shape[0] + 1):
        return f"the word grid's input {sub.leaf.name} is not [W + 1] offsets"
    why = sub.include(n, *iv.shape, *mv.shape)
    if why:
        return why

    def fits(sizes: dict) -> bool:  # a layout of W words of 1..L bytes covers T bytes
        n_words, width, t = (_size(s, sizes) for s in (iv.shape[0], iv.shape[1], n))
        return n_words >= 1 and n_words <= t <= n_words * width

    gen = torch.Generator().manual_seed(0)
    for sizes in sub.size_probes(fits):
        try:
            n_words, width, t = (_size(s, sizes) for s in (iv.shape[0], iv.shape[1], n))
            mask_shape = tuple(_size(s, sizes) for s in mv.shape)
        except ValueError as e:
            return str(e)
        layouts = [_bounded_layout(n_words, t, 1, width, gen) for _ in range(_N_PROBES)]
        layouts += [_bounded_layout(n_words, t, lo, hi, gen)
                    for lo, hi in ((1, 1), (width, width), (1, max(1, width // 2)))]
        layouts = [x for x in layouts if x is not None]
        if not layouts:
            return "no word layout fits T, W and L (T < W or T > W * L)"
        cols = torch.arange(width)
        for lay in layouts:
            try:
                got_index, got_mask = sub(lay, sizes)
            except Exception as e:  # noqa: BLE001
                return (f"evaluating the word grid on probe offsets failed "
                        f"({type(e).__name__}: {e})")
            want = cols < lay.diff()[:, None]
            if got_mask.dtype != torch.bool or tuple(got_mask.shape) != mask_shape \
                    or tuple(got_index.shape) != (n_words, width) \
                    or not torch.equal(got_mask[:, :, 0, :],
                                       want[:, None, :].expand(-1, got_mask.shape[1], -1)):
                return "the key mask is not the word-length mask of the word offsets"
            starts = (lay[:-1, None] + cols).expand_as(got_index)
            if not torch.equal(got_index[want], starts[want]) or got_index.min() < 0 \
                    or got_index.max() >= t:
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
        if sv is not None and sv.dim() == 4 and _same(sv.shape[0], 1):
            return src
    return q


class WordPoolPass(_SdpaRewritePass):
    name = "hat_word_pool"
    description = ("SDPA of one query per word over the padded gathered bytes with a proven "
                   "word mask -> aa::word_pool")

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, cache: _Cache,
                ctx: PassContext) -> tuple[fx.Node, list[fx.Node]] | None:
        graph = gm.graph
        args = _sdpa_args(node)
        if isinstance(args, str):
            return None  # the window pass reports SDPA options; pooling never sets them
        q, k, v, mask, scale = args
        mv, qv = match.tensor_value(mask), match.tensor_value(q)
        gk, gv = _gathered(k), _gathered(v)
        if mv is None or mv.dim() != 4 or gk is None or gv is None:
            return None  # not the padded pooling pattern
        why = _tensor_ok(q, gk[0], gv[0])
        if why:
            ctx.skip(node, why)
            return None
        (kb, index), (vb, index_v) = gk, gv
        if index_v is not index:
            ctx.skip(node, "keys and values are gathered with different index tensors")
            return None
        kbv, vbv = match.tensor_value(kb), match.tensor_value(vb)
        n_words, width = match.tensor_value(index).shape
        if qv.dim() != 4 or mv.dtype != torch.bool:
            ctx.skip(node, "q is not [W, H, 1, hd] or the mask is not bool")
            return None
        h = qv.shape[1]
        if not (_same(qv.shape[0], n_words) and _same(qv.shape[2], 1)
                and _same(kbv.shape[1], h) and _same(vbv.shape[1], h)
                and _same(kbv.shape[0], vbv.shape[0]) and _same(mv.shape[0], n_words)
                and _same(mv.shape[2], 1) and _same(mv.shape[3], width)
                and (_same(mv.shape[1], 1) or _same(mv.shape[1], h))):
            ctx.skip(node, "shapes are not q [W, H, 1, hd], k/v [W, H, L, hd], mask "
                           "[W, 1, 1, L] bool")
            return None
        proof = cache.get((index, mask), lambda i=index, m=mask, t=kbv.shape[0]:
                          prove_word_grid(gm, i, m, t))
        if isinstance(proof, str):
            ctx.skip(node, proof)
            return None
        src = _query(q)
        with graph.inserting_before(node):
            q3 = graph.call_method("squeeze", (src, 2))
            wp = graph.call_function(torch.ops.aa.word_pool.default,
                                     (q3, kb, vb, proof, scale))
            out = graph.call_method("unsqueeze", (wp, 2))
        return out, [q, k, v, mask]


# -- guide add --------------------------------------------------------------------------------

def prove_byte_words(gm: fx.GraphModule, index: fx.Node, n_words) -> fx.Node | str:
    """The ``word_offsets`` node if ``index`` ``[T]`` is each byte's word under a [W + 1]
    offsets input (empty words allowed), else the reason."""
    sub = subgraph(gm, [index])
    if isinstance(sub, str):
        return sub
    length = match.tensor_value(sub.leaf).shape[0]
    n = match.tensor_value(index).shape[0]
    if not _same_or_guard(length, n_words + 1):
        return f"the byte-to-word index's input {sub.leaf.name} is not [W + 1] offsets"
    why = sub.include(n)
    if why:
        return why
    gen = torch.Generator().manual_seed(0)
    for sizes in sub.size_probes(lambda s: _size(length, s) >= 2):
        try:
            t, w = _size(n, sizes), _size(length, sizes) - 1
        except ValueError as e:
            return str(e)
        layouts = [_bounded_layout(w, t, lo, t, gen) for lo in (1, 1, 1, 0, 0, 0)]
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


_RMS_NORM = torch.ops.aa.rms_norm.default


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
    if uv is None or uv.dim() < 1 or not _same(uv.shape[-1], y.shape[-1]) \
            or not _same(uv.numel(), y.numel()):
        return None
    if match.is_op(user, (torch.reshape, torch.Tensor.reshape, torch.Tensor.view),
                   ("reshape", "view")):
        return "exact"
    if user.op == "call_function" and user.target is operator.getitem \
            and type(user.args[1]) is int and user.args[1] == 0:
        src = match.tensor_value(user.args[0])
        ok = src is not None and src.dim() >= 2 and _same(src.shape[0], 1)
        return "exact" if ok else None
    if _is_cast(user):
        return "exact" if uv.dtype in _exact_dtypes(y.dtype) else "cast"
    return None


def find_norm(y: fx.Node, decomposed: dict) -> NormUse | str | None:
    """The first RMSNorm (graph order) that reads the guided sum ``y`` through reshapes and
    exact casts; a reason when there is one but a guard fails; None when there is none."""
    yv = match.tensor_value(y)
    chain, frontier, why = [], [y], None
    order = {n: i for i, n in enumerate(y.graph.nodes)}
    candidates, recast = [], set()  # recast: reached through an inexact cast
    while frontier:
        c = frontier.pop()
        for u in c.users:
            if u.op == "call_function" and u.target is _RMS_NORM and u.args[0] is c:
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
        if ov is None or ov.dtype not in _FLOAT or ov.dim() != cv.dim() \
                or not all(_same(a, b) for a, b in zip(ov.shape, cv.shape)):
            why = why or "the norm's output is not a float tensor of its input's shape"
        elif weight is not None and (wv is None or wv.dim() != 1 or wv.dtype not in _FLOAT
                                     or not _same(wv.shape[0], yv.shape[-1])
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


def _hoist(value, before: fx.Node) -> bool:
    """Make ``value`` (a node, or not a node) available at ``before``: true when it already
    is, or it was moved there (a call whose inputs all come before ``before``)."""
    if not isinstance(value, fx.Node):
        return True
    order = {n: i for i, n in enumerate(before.graph.nodes)}
    if order[value] < order[before]:
        return True
    if value.op not in ("call_function", "call_method") \
            or any(order[a] >= order[before] for a in value.all_input_nodes):
        return False
    before.prepend(value)
    return True


class GuideAddPass(GraphPass):
    name = "hat_guide_add"
    description = ("x + g[byte_word] with a proven byte-to-word index -> aa::guide_add, or "
                   "aa::guide_add_rms_norm when an RMSNorm reads the sum")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        graph, cache = gm.graph, _Cache()
        decomposed = decomposed_norms(gm)
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
            if ov is None or ov.dtype != xv.dtype or xv.dim() < 2 or not isinstance(d, int) \
                    or d < 1 or not _same(xv.shape[-2], n) or not _same(xv.shape[-1], d) \
                    or not all(_same(s, 1) for s in xv.shape[:-2]) \
                    or len(ov.shape) != len(xv.shape) \
                    or not all(_same(a, b) for a, b in zip(ov.shape, xv.shape)):
                ctx.skip(node, "x is not [(1, ...,) T, d] with T bytes and the guide's width d")
                continue
            out_shape = _shape_arg(xv.shape)
            if out_shape is None:
                ctx.skip(node, "x has more than one symbolic dimension")
                continue
            proof = cache.get((index, str(gv.shape[0])),
                              lambda i=index, w=gv.shape[0]: prove_byte_words(gm, i, w))
            if isinstance(proof, str):
                ctx.skip(node, proof)
                continue
            norm = find_norm(node, decomposed)
            if isinstance(norm, NormUse):
                norm_shape = _shape_arg(match.tensor_value(norm.output).shape)
                if norm_shape is None:
                    norm = "the norm's output has more than one symbolic dimension"
                elif not (_hoist(norm.weight, node) and _hoist(norm.eps, node)):
                    norm = "the norm's weight or eps is computed after the guided sum"
            if isinstance(norm, str):
                ctx.skip(node, f"kept the unfused aa::guide_add: an RMSNorm reads the sum, "
                               f"but {norm}")
            with graph.inserting_before(node):
                x2 = graph.call_method("reshape", (x, -1 if not isinstance(n, int) else n, d))
                if isinstance(norm, NormUse):
                    fused = graph.call_function(
                        torch.ops.aa.guide_add_rms_norm.default,
                        (x2, g, proof, norm.weight, norm.eps), {"out_dtype": norm.out_dtype})
                    y = graph.call_function(operator.getitem, (fused, 0))
                    normed = graph.call_function(operator.getitem, (fused, 1))
                    n_out = graph.call_method("reshape", (normed, norm_shape))
                    n_out.meta.update(norm.output.meta)
                else:
                    y = graph.call_function(torch.ops.aa.guide_add.default, (x2, g, proof))
                out = graph.call_method("reshape", (y, out_shape))
            out.meta.update(node.meta)
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            if isinstance(norm, NormUse):
                norm.output.replace_all_uses_with(n_out)
                _erase_dead(graph, norm.nodes + norm.chain)
                alive = set(graph.nodes)
                decomposed = {k: v for k, v in decomposed.items()
                              if k in alive and v[0] in alive}
            ctx.rewrote(out)
            _erase_dead(graph, _ancestors([gathered]))
        gm.recompile()
