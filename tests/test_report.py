"""Compile reports: content, graph breaks, rendering, bad input."""

import json

import pytest
import torch

import aa_compile
from aa_compile.passes.pipeline import PASSES
from aa_compile.models.transformer import RMSNorm

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


def test_last_report_accumulates():
    before = len(aa_compile.last_report().graphs)
    torch.compile(RMSNorm(4), backend="aa", options=EAGER)(torch.randn(1, 4))
    assert len(aa_compile.last_report().graphs) == before + 1


def test_report_rejects_non_callables_and_bad_options():
    with pytest.raises(TypeError, match="must be a module or callable"):
        aa_compile.report("model")
    with pytest.raises(ValueError, match="unknown option"):
        aa_compile.report(RMSNorm(4), torch.randn(1, 4), options={"x": 1})
