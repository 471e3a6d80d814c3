"""The model as the `aa` passes rewrite it, as a module ``torch.export`` can trace.

The passes work on the torch-level FX graph dynamo hands a backend (parameters and symbolic
sizes are graph inputs there), not on the ATen graph of ``torch.export``. So the model is
captured once with dynamo (``fullgraph=True``, the dynamic dimensions marked), the passes run
on that graph as under ``backend="aa"``, and `RewrittenModel` calls the rewritten graph with
the user's inputs, the model's own parameters and buffers, and each symbolic size read from the
input it came from. Exporting `RewrittenModel` then keeps every ``aa::`` op as one node.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from aa_compile.backend import run_passes
from aa_compile.config import Config
from aa_compile.passes.base import PassResult


class ExportError(RuntimeError):
    """The model cannot be exported as asked; the message names the cause and the way out."""


@dataclasses.dataclass(frozen=True)
class Feed:
    """Where one graph input comes from: ``kind`` is ``"input"`` (the user's input ``index``),
    ``"size"`` (``inputs[index].shape[dim]``), ``"state"`` (the model's parameter or buffer
    ``name``) or ``"constant"`` (a tensor dynamo lifted that the model does not own)."""

    kind: str
    index: int = -1
    dim: int = -1
    name: str = ""


class RewrittenModel(nn.Module):
    """Calls the rewritten graph with the model's state: ``forward(*inputs)`` returns the
    graph's flat outputs."""

    def __init__(self, model: nn.Module, graph: fx.GraphModule, feeds: list[Feed],
                 constants: list[torch.Tensor]) -> None:
        super().__init__()
        self.model = model  # owns the parameters and buffers the graph reads
        self.graph = graph
        self.feeds = feeds
        self.parameter_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        for i, c in enumerate(constants):
            self.register_buffer(f"constant_{i}", c)

    def forward(self, *inputs: torch.Tensor) -> Any:
        args = []
        for feed in self.feeds:
            if feed.kind == "input":
                args.append(inputs[feed.index])
            elif feed.kind == "size":
                args.append(inputs[feed.index].shape[feed.dim])
            elif feed.kind == "state":
                args.append(self.model.get_parameter(feed.name)
                            if feed.name in self.parameter_names
                            else self.model.get_buffer(feed.name))
            else:
                args.append(getattr(self, f"constant_{feed.index}"))
        return self.graph(*args)


@dataclasses.dataclass
class Capture:
    """The rewritten model and what the passes did to it."""

    module: RewrittenModel
    passes: list[PassResult]
    aa_ops: dict[str, int]  # qualified name -> calls in the graph


def mark_dims(dynamic_shapes: Sequence[Mapping[int, Any] | None] | None,
              inputs: Sequence[torch.Tensor]) -> list[dict[int, Any]]:
    """The dynamic dimensions per input, checked: ``{dim: torch.export.Dim or name}``."""
    if dynamic_shapes is None:
        return [{} for _ in inputs]
    if not isinstance(dynamic_shapes, (tuple, list)) or len(dynamic_shapes) != len(inputs):
        raise ExportError(
            f"dynamic_shapes must be a tuple with one entry per example input ({len(inputs)}): "
            "a dict {dim: torch.export.Dim or name} or None each, e.g. ({0: 'batch', 1: 'seq'},)")
    dims = []
    for i, (spec, t) in enumerate(zip(dynamic_shapes, inputs)):
        spec = dict(spec or {})
        for d in spec:
            if not isinstance(d, int) or not -t.dim() <= d < t.dim():
                raise ExportError(f"dynamic_shapes[{i}]: dimension {d!r} does not exist in an "
                                  f"input of shape {tuple(t.shape)}")
            if t.shape[d] < 2:
                raise ExportError(
                    f"dynamic_shapes[{i}]: dimension {d} has size {t.shape[d]} in the example; "
                    "torch specializes sizes 0 and 1, so give an example of size >= 2 there")
        dims.append({d % t.dim(): v for d, v in spec.items()})
    return dims


def capture(model: nn.Module, inputs: Sequence[torch.Tensor], dims: list[dict[int, Any]],
            config: Config) -> Capture:
    """Dynamo-capture ``model(*inputs)`` in one graph, run the passes ``config`` enables on it,
    and wrap the result as a `RewrittenModel`."""
    examples = [t.detach().clone() for t in inputs]
    for t, spec in zip(examples, dims):
        for d in spec:
            torch._dynamo.mark_dynamic(t, d)
    seen: dict[str, Any] = {}

    def backend(gm: fx.GraphModule, example_inputs: list):
        seen["passes"] = run_passes(gm, example_inputs, config)
        seen["gm"], seen["inputs"] = gm, example_inputs
        return gm.forward

    from torch._dynamo import config as dynamo_config
    from torch._dynamo.exc import Unsupported, UserError

    try:
        with torch.no_grad(), dynamo_config.patch(recompile_limit=2**31 - 1,
                                                  accumulated_recompile_limit=2**31 - 1):
            torch.compile(model, backend=backend, fullgraph=True)(*examples)
    except UserError as e:  # dynamo's constraint violations: a marked dim was specialized
        raise ExportError(_dynamic_error(e)) from e
    except Unsupported as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ExportError(
            f"dynamo could not capture the model's forward in one graph ({first}); the export "
            "needs a single graph: remove the graph break (see TORCH_LOGS=graph_breaks) or "
            "export a submodule") from e
    except Exception as e:  # the model's own errors pass through unchanged
        if "Constraints violated" in str(e):
            raise ExportError(_dynamic_error(e)) from e
        raise
    gm = seen["gm"]
    feeds, constants = _feeds(model, gm, seen["inputs"], examples)
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        name = aa_op_name(n.target) if n.op == "call_function" else None
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    return Capture(RewrittenModel(model, gm, feeds, constants), seen["passes"], counts)


def aa_op_name(target: Any) -> str | None:
    """``"aa::<op>"`` when ``target`` is an `aa::` op (overload or packet), else None."""
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target._qualified_op_name
    else:
        return None
    return name if name.startswith("aa::") else None


def _dynamic_error(e: Exception) -> str:
    return ("a dimension marked dynamic is not dynamic in the model (it was specialized to the "
            "example's size, or constrained); make it static (drop it from dynamic_shapes) or "
            f"remove the code that fixes it. torch says: {str(e).strip()[:600]}")


def _feeds(model: nn.Module, gm: fx.GraphModule, example_inputs: list,
           examples: list[torch.Tensor]) -> tuple[list[Feed], list[torch.Tensor]]:
    """Where each placeholder of ``gm`` comes from (see `Feed`)."""
    state = {id(t): name for name, t in model.named_parameters(remove_duplicate=False)}
    state.update({id(t): name for name, t in model.named_buffers(remove_duplicate=False)})
    user = {id(t): i for i, t in enumerate(examples)}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fake_shapes = {}
    for n, value in zip(placeholders, example_inputs):
        if id(value) in user:
            fake_shapes[user[id(value)]] = n.meta["example_value"].shape
    feeds, constants = [], []
    for n, value in zip(placeholders, example_inputs):
        if id(value) in user:
            feeds.append(Feed("input", index=user[id(value)]))
        elif id(value) in state:
            feeds.append(Feed("state", name=state[id(value)]))
        elif isinstance(value, torch.Tensor):
            feeds.append(Feed("constant", index=len(constants)))
            constants.append(value.detach())
        else:  # a symbolic size: find the input dimension it is
            symbol = n.meta["example_value"]
            where = [(i, d) for i, shape in fake_shapes.items() for d, s in enumerate(shape)
                     if isinstance(s, torch.SymInt) and str(s) == str(symbol)]
            if not where:
                raise ExportError(f"graph input {n.name} ({symbol}) is a size that no input "
                                  "dimension carries; export with static shapes")
            feeds.append(Feed("size", index=where[0][0], dim=where[0][1]))
    return feeds, constants
