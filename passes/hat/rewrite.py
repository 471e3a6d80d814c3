"""What the three HAT passes share around their proofs: the base class `HatPass`, the input
checks, dead-node cleanup, and `SdpaRewritePass`, the check-then-rewrite loop over SDPA nodes
that the window-attention and word-pooling passes both run."""

from __future__ import annotations

import hashlib
import pathlib

import torch
import torch.nn.functional as F
from torch import fx

from aa_compile.passes import match
from aa_compile.passes.base import GraphPass, PassContext
from aa_compile.passes.hat.proof import ProofCache, target_name

SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEVICES = ("cpu", "cuda")

class HatPass(GraphPass):
    """A HAT pass. Its guards live in several modules of this package, so its ``uuid()`` (the
    inductor FX-graph cache key of the pass) hashes all of them, not just its own file."""

    def uuid(self) -> bytes:
        digest = hashlib.sha256(self.name.encode() + b"\0")
        for path in sorted(pathlib.Path(__file__).parent.glob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        return digest.digest()


def check_tensors(*nodes) -> str | None:
    """Why the values of ``nodes`` are not float tensors of one dtype on one cpu/cuda device,
    or None."""
    vals = [match.tensor_value(n) for n in nodes]
    if any(v is None for v in vals):
        return "no shape information for q, k or v"
    if any(v.dtype not in FLOAT_DTYPES for v in vals) or len({v.dtype for v in vals}) != 1:
        return "q, k, v are not float tensors of one dtype"
    if any(v.device.type not in DEVICES for v in vals) or len({v.device for v in vals}) != 1:
        return f"q, k, v not on one cpu/cuda device ({vals[0].device})"
    return None


def ancestors(nodes) -> list[fx.Node]:
    """``nodes`` and everything they are computed from."""
    seen, stack = set(), [n for n in nodes if isinstance(n, fx.Node)]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return list(seen)


def erase_dead(graph: fx.Graph, nodes) -> None:
    """Erase the calls among ``nodes`` that nothing uses any more (never an in-place one)."""
    nodes = set(nodes)
    for n in reversed([x for x in graph.nodes if x in nodes]):
        inplace = target_name(n).endswith("_") and not target_name(n).startswith("_")
        if n.op in ("call_function", "call_method") and not n.users and not inplace:
            graph.erase_node(n)


def sdpa_args(node: fx.Node):
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


class SdpaRewritePass(HatPass):
    """The loop both HAT attention passes share: every SDPA node is offered to `check` (the
    pass's guard), which returns what `rewrite` needs, a reason (reported: the node has the
    pass's pattern but a guard fails) or None (not this pass's pattern; nothing reported).
    `rewrite` inserts the replacement before the node and returns it with the nodes that may
    have gone dead; dead inputs are erased once at the end."""

    def check(self, gm: fx.GraphModule, node: fx.Node, cache: ProofCache) -> object | str | None:
        raise NotImplementedError

    def rewrite(self, graph: fx.Graph, node: fx.Node, found) -> tuple[fx.Node, list[fx.Node]]:
        raise NotImplementedError

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        graph, cache, dead = gm.graph, ProofCache(), []
        for node in list(graph.nodes):
            if not match.is_op(node, SDPA):
                continue
            found = self.check(gm, node, cache)
            if found is None:
                continue
            if isinstance(found, str):
                ctx.skip(node, found)
                continue
            with graph.inserting_before(node):
                out, used = self.rewrite(graph, node, found)
            out.meta.update(node.meta)
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            dead += used
            ctx.rewrote(out)
        erase_dead(graph, ancestors(dead))
        gm.recompile()
