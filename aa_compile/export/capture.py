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
import inspect
import re
from collections.abc import Mapping, Sequence
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch import nn

from aa_compile.config import Config
from aa_compile.passes.base import PassResult
from aa_compile.passes.pipeline import run_passes


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
    bounds: dict[str, int] = dataclasses.field(default_factory=dict)  # see `model_bounds`


def mark_dims(dynamic_shapes: Sequence[Mapping[int, Any] | None] | None,
              inputs: Sequence[torch.Tensor]) -> list[dict[int, Any]]:
    """The dynamic dimensions per input, checked: ``{dim: torch.export.Dim or name}`` (a Dim
    may carry ``min``/``max`` bounds, or be derived, e.g. ``words + 1``)."""
    if dynamic_shapes is None:
        return [{} for _ in inputs]
    if not isinstance(dynamic_shapes, (tuple, list)) or len(dynamic_shapes) != len(inputs):
        raise ExportError(
            f"dynamic_shapes must be a tuple with one entry per example input ({len(inputs)}): "
            "a dict {dim: torch.export.Dim or name} or None each, e.g. ({0: 'batch', 1: 'seq'},)")
    dims = []
    for i, (spec, t) in enumerate(zip(dynamic_shapes, inputs)):
        spec = dict(spec or {})
        for d, v in spec.items():
            if not isinstance(d, int) or not -t.dim() <= d < t.dim():
                raise ExportError(f"dynamic_shapes[{i}]: dimension {d!r} does not exist in an "
                                  f"input of shape {tuple(t.shape)}")
            if not isinstance(v, str) and not hasattr(v, "__name__"):
                raise ExportError(f"dynamic_shapes[{i}][{d}]: {v!r} is neither a name nor a "
                                  "torch.export.Dim")
            if t.shape[d] < 2:
                raise ExportError(
                    f"dynamic_shapes[{i}]: dimension {d} has size {t.shape[d]} in the example; "
                    "torch specializes sizes 0 and 1, so give an example of size >= 2 there")
            low, high = getattr(v, "min", None), getattr(v, "max", None)
            if (low is not None and t.shape[d] < low) or (high is not None and t.shape[d] > high):
                raise ExportError(f"dynamic_shapes[{i}][{d}]: the example's size {t.shape[d]} is "
                                  f"outside {v.__name__}'s bounds [{low}, {high}]")
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
        raise ExportError(dynamic_error(e, model, len(inputs))) from e
    except Unsupported as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ExportError(
            f"dynamo could not capture the model's forward in one graph ({first}); the export "
            "needs a single graph: remove the graph break (see TORCH_LOGS=graph_breaks) or "
            "export a submodule") from e
    except Exception as e:  # the model's own errors pass through unchanged
        if "Constraints violated" in str(e):
            raise ExportError(dynamic_error(e, model, len(inputs))) from e
        raise
    gm = seen["gm"]
    bounds = model_bounds(model, seen["inputs"], dims)
    feeds, constants = _feeds(model, gm, seen["inputs"], examples)
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        name = aa_op_name(n.target) if n.op == "call_function" else None
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    return Capture(RewrittenModel(model, gm, feeds, constants), seen["passes"], counts, bounds)


def model_bounds(model: nn.Module, example_inputs: list,
                 dims: list[dict[int, Any]]) -> dict[str, int]:
    """The upper bounds the model puts on dimensions marked dynamic while it is captured (a
    check such as ``seq <= max_seq_len``: a guard of the compiled graph, which the exported
    file would not keep). A dimension marked by name takes the model's bound (returned: name ->
    largest size); one marked with a ``torch.export.Dim`` whose range the model narrows raises
    `ExportError` naming it and the bounds to give."""
    symbols = [s for s in example_inputs if isinstance(s, torch.SymInt)]
    symbols += [d for t in example_inputs if isinstance(t, torch.Tensor) for d in t.shape
                if isinstance(d, torch.SymInt)]
    if not symbols:
        return {}
    shape_env = symbols[0].node.shape_env
    sources = _input_sources(model, len(dims))
    bounds: dict[str, int] = {}
    problems = []
    for symbol, places in shape_env.var_to_sources.items():
        for source in places:
            match = re.fullmatch(r"(.+)\.size\(\)\[(\d+)\]", source.name)
            if not match or match.group(1) not in sources:
                continue
            i, d = sources[match.group(1)], int(match.group(2))
            if d not in dims[i]:
                continue
            spec = dims[i][d]
            got = shape_env.bound_sympy(shape_env.replace(symbol))
            high = int(got.upper) if isinstance(got.upper, sympy.Integer) else None
            if high is None:
                continue
            if isinstance(spec, str):
                bounds[spec] = min(high, bounds.get(spec, high))
            elif getattr(spec, "max", None) is None or spec.max > high:
                low = int(got.lower) if isinstance(got.lower, sympy.Integer) else 2
                problems.append(f"example_inputs[{i}].shape[{d}] ({spec.__name__}): the model "
                                f"works only up to size {high} (a check in its forward); give "
                                f"it that bound: torch.export.Dim({spec.__name__!r}, "
                                f"min={low}, max={high})")
    if problems:
        raise ExportError("dimensions marked dynamic that the model bounds (the ONNX file "
                          "would not check them):\n  " + "\n  ".join(sorted(set(problems))))
    return bounds


def aa_op_name(target: Any) -> str | None:
    """``"aa::<op>"`` when ``target`` is an `aa::` op (overload or packet), else None."""
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target._qualified_op_name
    else:
        return None
    return name if name.startswith("aa::") else None


def dynamic_error(e: Exception, model: nn.Module, count: int) -> str:
    """The message of a dimension marked dynamic that the model fixes or bounds: torch's
    report with each ``L['x'].size()[d]`` named as ``example_inputs[i].shape[d]``, and the
    ways out."""
    text = str(e).strip()
    for source, index in sorted(_input_sources(model, count).items(), key=lambda kv: -len(kv[0])):
        text = re.sub(re.escape(source) + r"\.size\(\)\[(\d+)\]",
                      lambda m, i=index: f"example_inputs[{i}].shape[{m.group(1)}]", text)
    named = sorted(set(re.findall(r"example_inputs\[\d+\]\.shape\[\d+\]", text)))
    which = ", ".join(named) if named else "a dimension marked dynamic"
    return (f"{which}: marked dynamic, but the model fixes it (specializes it to the example's "
            "size) or limits its range. Ways out: make it static (drop it from "
            "dynamic_shapes); if the model only bounds it, give it those bounds "
            "(torch.export.Dim(name, min=..., max=...)); or remove the code that fixes it. "
            f"torch says: {text[:800]}")


def _input_sources(model: nn.Module, count: int) -> dict[str, int]:
    """Dynamo's source name of each positional input (``L['ids']``, ``L['fields'][3]``) ->
    its index, from ``model.forward``'s signature."""
    names: dict[str, int] = {}
    params = list(inspect.signature(model.forward).parameters.values())
    index = 0
    for p in params:
        if index >= count:
            break
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names[f"L['{p.name}']"] = index
            index += 1
        elif p.kind == p.VAR_POSITIONAL:
            for j in range(count - index):
                names[f"L['{p.name}'][{j}]"] = index + j
            break
    return names


def _size_source(node: fx.Node, fake_shapes: dict[int, Any],
                 sources: dict[str, int]) -> tuple[int, int] | None:
    """``(input index, dim)`` whose size a size placeholder of the dynamo graph is: a dimension
    of an input tensor with the same symbol, or else (an input used only for its shape) the
    ``<input>.size()[d]`` that dynamo's shape environment records as the symbol's source."""
    symbol = str(node.meta["example_value"])
    for i, shape in fake_shapes.items():
        for d, size in enumerate(shape):
            if isinstance(size, torch.SymInt) and str(size) == symbol:
                return i, d
    size = node.meta["example_value"]
    shape_env = getattr(getattr(size, "node", None), "shape_env", None)
    for source in (shape_env.var_to_sources.get(size.node.expr, []) if shape_env else []):
        match = re.fullmatch(r"(.+)\.size\(\)\[(\d+)\]", source.name)
        if match and match.group(1) in sources:
            return sources[match.group(1)], int(match.group(2))
    return None


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
    sources = _input_sources(model, len(examples))
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
            where = _size_source(n, fake_shapes, sources)
            if where is None:
                raise ExportError(f"graph input {n.name} ({n.meta['example_value']}) is a size "
                                  "that no input dimension carries; export with static shapes")
            feeds.append(Feed("size", index=where[0], dim=where[1]))
    return feeds, constants
