"""Compile reports: content, graph breaks, rendering, bad input."""

import json

import pytest
import torch

import aa_compile
from aa_compile.passes.pipeline import PASSES
from aa_compile.models.transformer import RMSNorm
from aa_compile.report import collecting, record

EAGER = {"inner_compiler": "eager"}


def with_graph_break(x, norm):
    y = norm(x)
    torch._dynamo.graph_break()
    return norm(y) + 1


def test_report_counts_rewrites_per_graph_across_graph_breaks():
    norm = RMSNorm(8)
    rep = aa_compile.report(with_graph_break, torch.randn(2, 8), norm, options=EAGER)
    assert len(rep.graphs) == 2
    assert [g.passes[0].rewrites for g in rep.graphs] == [1, 1]
    assert rep.rewrites == {**dict.fromkeys(PASSES, 0), "rms_norm": 2}
    assert rep.passes_run == list(PASSES)
    assert all(g.nodes_after < g.nodes_before for g in rep.graphs)


def test_report_renders_and_serializes():
    rep = aa_compile.report(RMSNorm(8), torch.randn(2, 8), options=EAGER)
    text = str(rep)
    assert "rms_norm" in text and "1 rewrite(s)" in text and "inner compiler eager" in text
    data = json.loads(json.dumps(rep.to_dict()))
    assert data["rewrites"] == {**dict.fromkeys(PASSES, 0), "rms_norm": 1}
    assert data["graphs"][0]["passes"][0]["name"] == "rms_norm"


def test_report_lists_skips_with_reasons():
    def f(x):
        return x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-6)

    rep = aa_compile.report(f, torch.randn(3, 4) + 1, options=EAGER)
    assert rep.rewrites == dict.fromkeys(PASSES, 0)
    assert len(rep.skipped) == 1
    pass_name, node, reason = rep.skipped[0]
    assert pass_name == "rms_norm" and node.startswith("rsqrt") and "last dimension" in reason
    assert "skipped" in str(rep)


class Scaled(torch.nn.Module):
    """An RMSNorm behind a parameter of its own: a model with parameters and one rewrite."""

    def __init__(self):
        super().__init__()
        self.norm = RMSNorm(8)
        self.scale = torch.nn.Parameter(torch.ones(8))

    def forward(self, x):
        return self.norm(x) * self.scale


def test_last_report_is_the_model_compiled_last_and_reports_lists_every_compile():
    aa_compile.clear_reports()
    first = torch.compile(Scaled(), backend="aa", options=EAGER)
    first(torch.randn(2, 8))
    torch.compile(lambda x: torch.sin(x) + 1, backend="aa", options=EAGER)(torch.randn(3))
    last = aa_compile.last_report()
    assert len(last.graphs) == 1 and last.rewrites["rms_norm"] == 0
    assert [r.rewrites["rms_norm"] for r in aa_compile.reports()] == [1, 0]
    first(torch.randn(5, 8))  # recompiles the first model: after another compile, a new one
    assert [len(r.graphs) for r in aa_compile.reports()] == [1, 1, 1]
    assert aa_compile.last_report().rewrites["rms_norm"] == 1
    assert [g.index for g in aa_compile.last_report().graphs] == [1]


def test_graph_breaks_and_recompiles_of_one_function_are_one_compile():
    aa_compile.clear_reports()
    norm = RMSNorm(8)
    compiled = torch.compile(with_graph_break, backend="aa", options=EAGER)
    for rows in (2, 3, 4):
        compiled(torch.randn(rows, 8), norm)
    assert len(aa_compile.reports()) == 1
    graphs = aa_compile.last_report().graphs
    assert len(graphs) >= 3 and [g.index for g in graphs] == list(range(1, len(graphs) + 1))
    assert all(g.passes[0].rewrites == 1 for g in graphs)


def test_a_second_instance_or_other_options_start_a_new_compile():
    aa_compile.clear_reports()
    first, second = Scaled(), Scaled()
    torch.compile(first, backend="aa", options=EAGER)(torch.randn(2, 8))
    torch.compile(second, backend="aa", options=EAGER)(torch.randn(3, 8))  # recompiles
    assert [len(r.graphs) for r in aa_compile.reports()] == [1, 1]
    torch.compile(second, backend="aa", options={**EAGER, "disable": ["rms_norm"]})(
        torch.randn(3, 8))
    assert [r.rewrites.get("rms_norm", 0) for r in aa_compile.reports()] == [1, 1, 0]
    assert [g.index for r in aa_compile.reports() for g in r.graphs] == [1, 1, 1]


def test_report_is_its_own_compile_numbered_from_one_every_time():
    aa_compile.clear_reports()
    torch.compile(Scaled(), backend="aa", options=EAGER)(torch.randn(2, 8))
    # more reports of one model's code than dynamo's recompile limit (8) allows for backends
    texts = [str(aa_compile.report(RMSNorm(8), torch.randn(2, 8), options=EAGER))
             for _ in range(10)]
    for text in texts:
        assert "1 graph(s)" in text and "\n  graph 1: " in text and "graph 0" not in text
    assert len(aa_compile.reports()) == 11
    assert str(aa_compile.last_report()) == texts[-1]
    two = str(aa_compile.report(with_graph_break, torch.randn(2, 8), RMSNorm(8), options=EAGER))
    assert "\n  graph 1: " in two and "\n  graph 2: " in two and "graph 0" not in two


def test_clear_reports_and_collecting():
    torch.compile(Scaled(), backend="aa", options=EAGER)(torch.randn(2, 8))
    aa_compile.clear_reports()
    assert aa_compile.reports() == [] and aa_compile.last_report().graphs == []
    with collecting() as collected:
        torch.compile(Scaled(), backend="aa", options=EAGER)(torch.randn(3, 8))  # recompiles
        aa_compile.report(RMSNorm(8), torch.randn(2, 8), options=EAGER)
    torch.compile(lambda x: x.cos(), backend="aa", options=EAGER)(torch.randn(4, 8))
    assert len(collected.graphs) == 2 and collected.rewrites["rms_norm"] == 2
    assert len(aa_compile.reports()) == 3


def test_record_needs_an_origin_or_a_compile():
    graph = aa_compile.GraphReport(0, 1, 1, "eager", [])
    with pytest.raises(ValueError, match="origin or a compile"):
        record(graph)


def test_report_rejects_non_callables_and_bad_options():
    with pytest.raises(TypeError, match="must be a module or callable"):
        aa_compile.report("model")
    with pytest.raises(ValueError, match="unknown option"):
        aa_compile.report(RMSNorm(4), torch.randn(1, 4), options={"x": 1})
