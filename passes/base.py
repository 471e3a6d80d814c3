"""What every aa pass is: a guarded FX rewrite that counts what it did and why it left nodes.

A pass subclasses `GraphPass` and implements `run(gm, ctx)`. For each candidate it either calls
``ctx.rewrote(node)`` after replacing the node with an ``aa::`` op, or ``ctx.skip(node, reason)``
when a guard (shape, dtype, device, form) does not hold. The counts and reasons end up in the
compile report, so tests can assert that a pass fired and users can see why it did not.

`GraphPass` is also an inductor `CustomGraphPass` with a ``uuid()`` derived from the pass's
source file, so a pass installed as an inductor post-grad hook keeps the FX graph cache usable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from typing import ClassVar

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass


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


class GraphPass(CustomGraphPass):
    """Base class of the passes in `aa_compile.passes.pipeline.PIPELINE`."""

    name: ClassVar[str]
    description: ClassVar[str]
    default_enabled: ClassVar[bool] = True

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        raise NotImplementedError

    def __call__(self, graph: fx.Graph) -> None:
        """`CustomGraphPass` entry point, for installing the pass as an inductor hook."""
        gm = graph.owning_module
        if gm is None:
            raise ValueError(f"aa pass {self.name}: the graph has no owning GraphModule")
        self.run(gm, PassContext(PassResult(self.name), [], None))

    def uuid(self) -> bytes:
        """Stable across processes: changes only when the pass's source code changes."""
        module_source = inspect.getsource(inspect.getmodule(type(self))).encode()
        return hashlib.sha256(self.name.encode() + b"\0" + module_source).digest()
