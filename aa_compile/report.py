"""Compile reports: which passes ran on which graph, what they rewrote, and what they left and why.

The backend records a `GraphReport` for every graph dynamo hands it (`record`) and this module
groups the graphs into *compiles*, one `CompileReport` each:

- `last_report()`: the compile that received the most recent graph, i.e. the model or function
  compiled last (all its graphs: the pieces between graph breaks, and its recompiles until
  another model or function is compiled);
- `reports()`: every compile since the process started or since `clear_reports()`;
- `collecting()`: every graph compiled inside a ``with`` block, whatever compile it joins.

A ``torch.compile(fn, backend="aa")`` callable is invisible to a backend: dynamo hands it graphs
and example inputs only. So a graph joins the latest compile when it comes from the same Python
function (the code after a graph break counts as the function it continues) with the same
options and, where both have parameters, shares one with it (the same model, not a second
instance of its class); otherwise it starts a new compile. `aa_compile.report(fn, *args)` compiles
with a backend of its own (`new_compile`), so its compile holds exactly its graphs.

Graphs are numbered from 1 within their compile (`GraphReport.index`). This module sits below
the backend: it imports no compiler.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx

from aa_compile.passes.base import PassResult


@dataclasses.dataclass
class GraphReport:
    """The passes' results on one dynamo graph; ``index`` is its number in its compile (from 1)."""

    index: int
    nodes_before: int
    nodes_after: int
    inner_compiler: str
    passes: list[PassResult]


@dataclasses.dataclass
class CompileReport:
    """Everything the ``aa`` backend did for one compile (one or more graphs)."""

    graphs: list[GraphReport] = dataclasses.field(default_factory=list)

    @property
    def passes_run(self) -> list[str]:
        seen: dict[str, None] = {}
        for g in self.graphs:
            for p in g.passes:
                seen.setdefault(p.name)
        return list(seen)

    @property
    def rewrites(self) -> dict[str, int]:
        """Rewrites per pass, summed over graphs."""
        counts: dict[str, int] = {}
        for g in self.graphs:
            for p in g.passes:
                counts[p.name] = counts.get(p.name, 0) + p.rewrites
        return counts

    @property
    def skipped(self) -> list[tuple[str, str, str]]:
        """``(pass, node, reason)`` for every candidate a pass left alone."""
        return [(p.name, s.node, s.reason) for g in self.graphs for p in g.passes for s in p.skipped]

    @property
    def errors(self) -> list[tuple[str, str]]:
        """``(pass, error)`` for passes that failed (only when ``strict=False``)."""
        return [(p.name, p.error) for g in self.graphs for p in g.passes if p.error]

    def to_dict(self) -> dict[str, Any]:
        return {
            "graphs": [dataclasses.asdict(g) for g in self.graphs],
            "rewrites": self.rewrites,
            "skipped": [dict(zip(("pass", "node", "reason"), s)) for s in self.skipped],
            "errors": [dict(zip(("pass", "error"), e)) for e in self.errors],
        }

    def __str__(self) -> str:
        lines = [f"aa compile report: {len(self.graphs)} graph(s)"]
        for g in self.graphs:
            lines.append(
                f"  graph {g.index}: {g.nodes_before} -> {g.nodes_after} nodes, "
                f"inner compiler {g.inner_compiler}"
            )
            for p in g.passes:
                status = f"error: {p.error}" if p.error else f"{p.rewrites} rewrite(s)"
                lines.append(f"    {p.name:<16} {status} ({p.seconds * 1e3:.1f} ms)")
                for s in p.skipped:
                    lines.append(f"      skipped {s.node}: {s.reason}")
        return "\n".join(lines)


@dataclasses.dataclass
class GraphOrigin:
    """Where a graph comes from, as far as a backend can tell: what groups graphs into compiles.

    ``function`` is ``(file, name)`` of the Python function dynamo compiled (``None`` when the
    graph carries no stack traces), with graph-break continuations named after the function
    they continue; ``options`` the backend options; ``parameters`` the ``nn.Parameter``s the
    graph reads (those of the model it belongs to).
    """

    function: tuple[str, str] | None
    options: Any
    parameters: list[torch.nn.Parameter]


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line \d+, in (?P<name>\S+)')
# dynamo's name for the code after a graph break; should it change, a graph break would start a
# new compile (tests/test_report.py would notice)
_RESUME = re.compile(r"^torch_dynamo_resume_in_(?P<name>.+)_at_\d+$")


def graph_origin(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Any) -> GraphOrigin:
    """The `GraphOrigin` of a dynamo graph, from its nodes' stack traces and its inputs."""
    function = None
    for node in gm.graph.nodes:
        match = _FRAME.search(node.meta.get("stack_trace") or "")
        if match:
            name = match["name"]
            while (resume := _RESUME.match(name)) is not None:
                name = resume["name"]
            function = (match["file"], name)
            break
    parameters = [x for x in example_inputs if isinstance(x, torch.nn.Parameter)]
    parameters += list(gm.parameters())
    return GraphOrigin(function, options, parameters)


class _Grouping:
    """The origin of the latest compile grouped by origin; decides whether a graph joins it."""

    def __init__(self, report: CompileReport, origin: GraphOrigin) -> None:
        self.report = report
        self.function = origin.function
        self.options = origin.options
        self.had_parameters = False
        # by id, held weakly: tensors compare by value, and a freed model must not stay alive
        self.parameters: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.add(origin)

    def admits(self, origin: GraphOrigin) -> bool:
        if origin.function is None or origin.function != self.function:
            return False
        if origin.options != self.options:
            return False
        if origin.parameters and self.had_parameters:
            return any(self.parameters.get(id(p)) is p for p in origin.parameters)
        return True

    def add(self, origin: GraphOrigin) -> None:
        self.had_parameters |= bool(origin.parameters)
        self.parameters.update({id(p): p for p in origin.parameters})


_active: contextvars.ContextVar[list[CompileReport] | None] = contextvars.ContextVar(
    "aa_compile_collecting", default=None
)
_compiles: list[CompileReport] = []
_latest: CompileReport | None = None
_grouping: _Grouping | None = None


def new_compile() -> CompileReport:
    """A compile that takes exactly the graphs recorded ``into`` it (see `record`); it joins
    `reports` with its first graph."""
    return CompileReport()


def record(graph: GraphReport, origin: GraphOrigin | None = None,
           into: CompileReport | None = None) -> None:
    """Called by the backend for every graph it compiles: file ``graph`` under its compile and
    number it there. ``into``: a compile from `new_compile`; otherwise ``origin`` decides
    whether the graph joins the latest compile or starts a new one (module docstring)."""
    global _latest, _grouping
    if into is None:
        if origin is None:
            raise ValueError("aa_compile.report.record: give the graph's origin or a compile")
        if _grouping is not None and _grouping.report is _latest and _grouping.admits(origin):
            _grouping.add(origin)
            into = _grouping.report
        else:
            into = CompileReport()
            _grouping = _Grouping(into, origin)
    if not into.graphs:
        _compiles.append(into)
    graph.index = len(into.graphs) + 1
    into.graphs.append(graph)
    _latest = into
    collected = _active.get()
    if collected is not None:
        collected.append(graph)


def last_report() -> CompileReport:
    """The last compile: every graph of the model or function the ``aa`` backend compiled last
    (its graph breaks, and its recompiles until another compile came between). Empty before
    the first compile."""
    return CompileReport(list(_latest.graphs)) if _latest is not None else CompileReport()


def reports() -> list[CompileReport]:
    """Every compile of the ``aa`` backend since the process started or `clear_reports`, oldest
    first (copies: recording more graphs does not change them)."""
    return [CompileReport(list(r.graphs)) for r in _compiles]


def clear_reports() -> None:
    """Forget the compiles so far: `reports` and `last_report` start empty again."""
    global _latest, _grouping
    _compiles.clear()
    _latest = None
    _grouping = None


@contextlib.contextmanager
def collecting() -> Iterator[CompileReport]:
    """Collect every graph the backend records inside the block into a fresh `CompileReport`,
    whichever compiles they belong to; nested blocks collect into the innermost one only."""
    collected = CompileReport()
    token = _active.set(collected.graphs)
    try:
        yield collected
    finally:
        _active.reset(token)
