"""Sensitivity sweep (reuse == from scratch), heat-map, planner."""

from __future__ import annotations

import json

import pytest
import torch

from aa_compile import dtm
from aa_compile.models import Transformer, TransformerConfig


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(1)
    m = Transformer(TransformerConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2,
                                      d_ff=64, max_seq_len=64)).eval()
    m.reset_parameters(0.3)
    prompts = torch.randint(0, 64, (6, 4))
    return m, prompts


LEVELS = ("prune:0.5", "prune:0.9", "2:4", "int8")


def test_sweep_reuse_equals_from_scratch(setup):
    m, prompts = setup
    before = {k: v.clone() for k, v in m.state_dict().items()}
    a = dtm.sweep(m, prompts, 8, LEVELS, reuse=True, progress=False, batch_size=4)
    b = dtm.sweep(m, prompts, 8, LEVELS, reuse=False, progress=False, batch_size=4)
    assert a["reuse"] and not b["reuse"]
    for c in a["results"]:
        for lv in LEVELS:
            assert a["results"][c][lv]["fdt"] == b["results"][c][lv]["fdt"], (c, lv)
            assert a["results"][c][lv]["nll_delta"] == pytest.approx(
                b["results"][c][lv]["nll_delta"], abs=1e-5)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # restored
    fdts = [e["fdt_mean"] for c in a["results"].values() for e in c.values()]
    assert min(fdts) < 8  # the constructed model is sensitive to something
    json.dumps(a)


def test_heatmap_and_plan(setup, tmp_path):
    m, prompts = setup
    s = dtm.sweep(m, prompts, 8, LEVELS, progress=False)
    dtm.heatmap(s, tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000
    out = dtm.plan(m, s, prompts, tau=4)
    assert out["measured"]["fdt_median"] >= 4
    assert out["bytes_saved"] > 0 and 0 < out["share_saved"] <= 1
    assert set(out["baselines"]["uniform"]) == set(LEVELS)
    assert "measured" in out["baselines"]["nll_order"]
    json.dumps(out)
    small = dtm.apply(m, out["plan"])
    r = dtm.dtm(m, small, prompts, 8)
    assert r.summary()["fdt_median"] == out["measured"]["fdt_median"]


def _synthetic_sweep(model, stats: dict, levels=("prune:0.5",), n_tokens=8):
    """A sweep dict with chosen single-component statistics (``stats[name] -> fdt_median``)."""
    comps = dtm.find_components(model)
    results = {}
    for name, comp in comps.items():
        results[name] = {}
        for lv in levels:
            results[name][lv] = {"fdt_median": stats.get(name, 0.0),
                                 "bytes_saved": dtm.parse(lv).bytes_saved(comp)}
    return {"n_tokens": n_tokens, "levels": list(levels), "results": results}


def test_budget_plan_takes_least_sensitive_components_first(setup):
    m, prompts = setup
    comps = dtm.find_components(m)
    names = sorted(comps, key=lambda n: comps[n].numel)
    # every component but the largest is "sensitive" (statistic 0); the largest is robust
    robust = names[-1]
    s = _synthetic_sweep(m, {robust: 8.0})
    total = sum(c.numel for c in comps.values()) * 4
    share = 0.5 * comps[robust].numel * 4 / total  # exactly what pruning it by half saves
    out = dtm.budget_plan(m, s, prompts, share)
    assert out["plan"] == {robust: "prune:0.5"}
    assert out["share_saved"] == pytest.approx(share)
    # the measured statistic is that of the applied plan, measured independently here
    ref = dtm.generate(m, prompts, 8)
    direct = dtm.dtm(m, dtm.apply(m, out["plan"]), prompts, 8, reference=ref).summary()
    assert out["measured"]["fdt_median"] == direct["fdt_median"]


def test_budget_plan_reaches_share_and_upgrades_levels(setup):
    m, prompts = setup
    s = dtm.sweep(m, prompts, 8, ("prune:0.25", "prune:0.5", "prune:0.9"), progress=False)
    for share in (0.1, 0.4, 0.8):
        out = dtm.budget_plan(m, s, prompts, share)
        assert out["share_saved"] >= share - 1e-12
        assert len(set(out["plan"])) == len(out["plan"])  # one level per component


def test_budget_plan_bad_inputs(setup):
    m, prompts = setup
    s = _synthetic_sweep(m, {})
    for bad in (0, -0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match="share"):
            dtm.budget_plan(m, s, prompts, bad)
    with pytest.raises(ValueError, match="save at most"):
        dtm.budget_plan(m, s, prompts, 0.9)  # prune:0.5 everywhere saves only half
    with pytest.raises(ValueError, match="statistic"):
        dtm.budget_plan(m, s, prompts, 0.1, statistic="nope")


def test_equal_reduction_rows(setup):
    m, prompts = setup
    s = dtm.sweep(m, prompts, 8, ("prune:0.5", "prune:0.9", "int8"), progress=False)
    rows = dtm.equal_reduction(m, s, prompts)
    assert [r["level"] for r in rows] == ["prune:0.5", "prune:0.9"]
    for r in rows:
        assert r["share_plan"] >= r["share_uniform"] - 1e-12
        assert set(r["plan_levels"]) <= {"prune:0.5", "prune:0.9"}
    ref = dtm.generate(m, prompts, 8)
    uni = dtm.apply(m, {c: "prune:0.9" for c in dtm.find_components(m)})
    assert rows[1]["fdt_median_uniform"] == dtm.dtm(m, uni, prompts, 8,
                                                    reference=ref).summary()["fdt_median"]
