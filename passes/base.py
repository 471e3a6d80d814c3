"""What every aa pass is: a guarded FX rewrite that counts what it did and why it left nodes.

A pass subclasses `GraphPass` and implements `run(gm, ctx)`. For each candidate it either calls
``ctx.rewrote(node)`` after replacing the node with an ``aa::`` op, or ``ctx.skip(node, reason)``
when a guard (shape, dtype, device, form) does not hold. The counts and reasons end up in the
compile report, so tests can assert that a pass fired and users can see why it did not.

`GraphPass.as_inductor_pass()` wraps a pass as an inductor `CustomGraphPass` (made on first use:
importing ``torch._inductor`` at import time would load dynamo and Triton), with a ``uuid()``
derived from the pass's source, so a pass installed as a post-grad hook keeps the FX graph cache.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
from typing import ClassVar

import torch.fx as fx


@dataclasses.dataclass
class Skip:
    """A candidate node a pass left alone, and the guard that failed."""

    node: str
    reason: str


@dataclasses.dataclass
class PassResult:
    """What one pass did to one graph."""

    name: str
    rewrites: int = 0
    skipped: list[Skip] = dataclasses.field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


class PassContext:
    """Handed to `GraphPass.run`: the example inputs, the options, and the result being filled."""

    def __init__(self, result: PassResult, example_inputs: list, config) -> None:
        self.result = result
        self.example_inputs = example_inputs
        self.config = config

    def rewrote(self, node: fx.Node | str, count: int = 1) -> None:
        self.result.rewrites += count

    def skip(self, node: fx.Node | str, reason: str) -> None:
        name = node.name if isinstance(node, fx.Node) else str(node)
        self.result.skipped.append(Skip(name, reason))


class GraphPass:
    """Base class of the passes in `aa_compile.passes.pipeline.PIPELINE`."""

    name: ClassVar[str]
    description: ClassVar[str]
    default_enabled: ClassVar[bool] = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        raise NotImplementedError

    def __call__(self, graph: fx.Graph) -> None:
        """Run on a bare graph, as an inductor hook does (see `as_inductor_pass`)."""
        gm = graph.owning_module
        if gm is None:
            raise ValueError(f"aa pass {self.name}: the graph has no owning GraphModule")
        self.run(gm, PassContext(PassResult(self.name), [], None))

    def uuid(self) -> bytes:
        """Stable across processes: changes only when the pass's source code changes."""
        module_source = inspect.getsource(inspect.getmodule(type(self))).encode()
        return hashlib.sha256(self.name.encode() + b"\0" + module_source).digest()

    def as_inductor_pass(self):
        """This pass as an inductor ``CustomGraphPass``, e.g. for
        ``torch._inductor.config.post_grad_custom_post_pass``."""
        return _inductor_pass_class()(self)


@functools.cache
def _inductor_pass_class() -> type:
    from torch._inductor.custom_graph_pass import CustomGraphPass  # lazy: loads dynamo, Triton

    class InductorPass(CustomGraphPass):
        """A `GraphPass` behind inductor's ``CustomGraphPass`` interface."""

        def __init__(self, graph_pass: GraphPass) -> None:
            self.graph_pass = graph_pass

        def __call__(self, graph: fx.Graph) -> None:
            self.graph_pass(graph)

        def uuid(self) -> bytes:
            return self.graph_pass.uuid()

    return InductorPass
