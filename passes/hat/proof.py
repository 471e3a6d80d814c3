"""The probe-and-proof engine of the HAT passes: cut out the subgraph that builds a mask or index
from an offsets input, run it at compile time on probe layouts (and probe sizes, in a
dynamic-shape graph), so each pass can compare the result with its op's definition.

Why a proof by evaluation, and what the probes cover: ``docs/hat.md``, "How the HAT passes
prove their guards".
"""

from __future__ import annotations

import random
from collections.abc import Callable

import sympy
import torch
from torch import Tensor, fx

from aa_compile.passes import match
from aa_compile.passes.hat.shapes import shape_env_of, size_at, symbols_of

#: the dtypes an offsets input or an index may have
INDEX_DTYPES = (torch.int32, torch.int64)
#: random layouts per probe size (besides the extremes)
N_PROBES = 8
#: name fragments of random ops: a subgraph calling one is not a function of its offsets
_RANDOM = ("rand", "dropout", "bernoulli", "normal", "multinomial", "uniform", "exponential",
           "poisson")


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
            for s in symbols_of(v):
                if self.shape_env is None:
                    self.shape_env = v.node.shape_env
                if s not in self.shape_env.backed_var_to_val:
                    return f"data-dependent size {s}"
            self.values.append(v)
        return None

    @property
    def symbols(self) -> list:
        """The free symbols of every size (recomputed: a guard may have replaced some)."""
        return sorted(set().union(*(symbols_of(v) for v in self.values)), key=str)

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
                args.append(size_at(match.value(p), sizes or {}))
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


def target_name(node: fx.Node) -> str:
    """The lower-case name of what ``node`` calls."""
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
        if any(r in target_name(n) for r in _RANDOM):
            return f"the mask depends on a random op ({n.name})"
        stack.extend(n.all_input_nodes)
    if len(leaves) != 1:
        names = ", ".join(sorted(p.name for p in leaves)) or "nothing"
        return (f"the mask reads {len(leaves)} tensor graph inputs ({names}); expected only "
                f"the offsets (a window given at run time, a float mask)")
    leaf = leaves[0]
    v = match.tensor_value(leaf)
    if v is None or v.dim() != 1 or v.dtype not in INDEX_DTYPES:
        return f"the mask's input {leaf.name} is not a 1-D int32/int64 tensor"
    loose = [p.name for p in sizes if not _is_tensor_size(p)]
    if loose:
        return (f"the mask reads integer graph inputs that are not tensor sizes "
                f"({', '.join(sorted(loose))}): a window or size given at run time")
    values = [match.value(n) for n in seen]
    symbols = set().union(*(symbols_of(x) for x in values))
    env = shape_env_of(values)
    if symbols:
        known = env.backed_var_to_val if env is not None else {}
        unbacked = sorted(str(s) for s in symbols if s not in known)
        if unbacked:
            return f"data-dependent sizes in the mask subgraph ({', '.join(unbacked)})"
    if any(isinstance(x, (torch.SymFloat, torch.SymBool)) for x in values):
        return "symbolic floats or booleans in the mask subgraph"
    nodes = [n for n in gm.graph.nodes if n in seen]
    return Subgraph(gm, outputs, leaf, nodes, values, env)


class ProofCache:
    """Per graph and pass: what a proof returned (a proven offsets node, or the reason it is
    not one), by the nodes (and sizes) it was asked about, so a mask shared by several layers
    is evaluated once."""

    def __init__(self) -> None:
        self.results: dict[tuple, object] = {}

    def get(self, key: tuple, compute: Callable[[], object]):
        if key not in self.results:
            self.results[key] = compute()
        return self.results[key]


# -- probe layouts ----------------------------------------------------------------------------

def bounded_layout(n_parts: int, total: int, low: int, high: int, gen: torch.Generator
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


def doc_layouts(n_docs: int, total: int, gen: torch.Generator) -> list[Tensor]:
    """Document offsets (empty documents allowed): both extremes and random cuts."""
    layouts = []
    if n_docs >= 1:
        layouts.append(torch.tensor([0] + [total] * n_docs))      # everything in document 0
        layouts.append(torch.tensor([0] * n_docs + [total]))      # everything in the last one
        for _ in range(N_PROBES):
            cuts = torch.randint(0, total + 1, (n_docs - 1,), generator=gen).sort().values
            layouts.append(torch.cat([torch.zeros(1, dtype=torch.int64), cuts,
                                      torch.tensor([total])]))
        if total >= n_docs:
            layouts.append(bounded_layout(n_docs, total, 1, total, gen))
    return [x for x in layouts if x is not None]
