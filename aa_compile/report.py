"""Compile reports: which passes ran on which graph, what they rewrote, and what they left and why.

The backend records a `GraphReport` for every graph dynamo hands it (`record`). `last_report()`
returns the graphs of the compiles so far in this process; inside ``with collecting() as rep``
they are collected into ``rep`` as well, which is how `aa_compile.report(fn, *args)`
(`aa_compile.backend.report`) reports one fresh compile. This module sits below the backend: it
imports no compiler.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Any

from aa_compile.passes.base import PassResult


@dataclasses.dataclass
class GraphReport:
    """The passes' results on one dynamo graph."""

    index: int
    nodes_before: int
    nodes_after: int
    inner_compiler: str
    passes: list[PassResult]


@dataclasses.dataclass
class CompileReport:
    """Everything the ``aa`` backend did during one compile (one or more graphs)."""

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


_active: contextvars.ContextVar[CompileReport | None] = contextvars.ContextVar(
    "aa_compile_report", default=None
)
_last = CompileReport()


def record(graph: GraphReport) -> None:
    """Called by the backend for every graph it compiles."""
    _last.graphs.append(graph)
    active = _active.get()
    if active is not None:
        active.graphs.append(graph)


def next_graph_index() -> int:
    return len(_last.graphs)


def last_report() -> CompileReport:
    """Graphs compiled by the ``aa`` backend so far in this process (all compiles)."""
    return CompileReport(list(_last.graphs))


@contextlib.contextmanager
def collecting() -> Iterator[CompileReport]:
    """Collect the graphs the backend records inside the block into a fresh `CompileReport`
    (as well as into `last_report`); nested blocks collect into the innermost one only."""
    collected = CompileReport()
    token = _active.set(collected)
    try:
        yield collected
    finally:
        _active.reset(token)
