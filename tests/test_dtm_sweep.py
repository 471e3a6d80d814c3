"""Sensitivity sweep (reuse == from scratch), heat-map, planner."""

from __future__ import annotations

import json

import pytest
import torch

from aa_compile import dtm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(dtm_tiny):
    return dtm_tiny


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



def test_budget_plan_reaches_share_and_measures_applied_plan(setup):
    m, prompts = setup
    steps = (0.25, 0.5, 0.75)
    for share in (0.1, 0.4):
        out = dtm.budget_plan(m, prompts, 8, share, steps=steps, fraction=0.3)
        assert out["share_saved"] >= share
        assert set(out["plan"].values()) <= {f"prune:{s}" for s in steps}
        ref = dtm.generate(m, prompts, 8)
        direct = dtm.dtm(m, dtm.apply(m, out["plan"]), prompts, 8, reference=ref).summary()
        assert out["measured"]["fdt_mean"] == direct["fdt_mean"]
    # fraction 1 moves every component each round: one step everywhere is uniform pruning
    out = dtm.budget_plan(m, prompts, 8, 0.5, steps=(0.5,), fraction=1.0)
    assert out["plan"] == {c: "prune:0.5" for c in dtm.find_components(m)}
    assert out["rounds"] == 1


@pytest.mark.parametrize("rank", ["result", "per_byte"])
def test_budget_plan_first_move_is_the_least_harmful(setup, rank):
    """One move of one component: it must be the one whose pruning alone (measured here from
    scratch, without the planner's resumed passes) keeps the highest mean FDT (``result``) or
    loses the least mean FDT per byte saved (``per_byte``)."""
    m, prompts = setup
    comps = dtm.find_components(m)
    ref = dtm.generate(m, prompts, 8)
    base = dtm.dtm(m, m, prompts, 8, reference=ref).summary()["fdt_mean"]
    keys = {}
    for name, comp in comps.items():
        one = dtm.apply(m, {name: "prune:0.25"})
        fdt_mean = dtm.dtm(m, one, prompts, 8, reference=ref).summary()["fdt_mean"]
        saved = dtm.parse("prune:0.25").bytes_saved(comp)
        keys[name] = -fdt_mean if rank == "result" else (base - fdt_mean) / saved
    smallest = min(c.numel for c in comps.values()) * 4
    total = sum(c.numel for c in comps.values()) * 4
    out = dtm.budget_plan(m, prompts, 8, 0.25 * smallest / total / 2, steps=(0.25,),
                          fraction=1e-9, rank=rank)
    assert len(out["plan"]) == 1
    chosen = next(iter(out["plan"]))
    assert keys[chosen] == pytest.approx(min(keys.values())), (chosen, keys)
    assert len(set(keys.values())) > 1  # the choice was not a tie of everything


def test_budget_plan_bad_inputs(setup):
    m, prompts = setup
    for bad in (0, -0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match="share"):
            dtm.budget_plan(m, prompts, 8, bad)
    with pytest.raises(ValueError, match="top step"):
        dtm.budget_plan(m, prompts, 8, 0.6, steps=(0.25, 0.5))
    for steps in ((), (0.5, 0.25), (0.0, 0.5), (0.5, 1.0)):
        with pytest.raises(ValueError, match="steps"):
            dtm.budget_plan(m, prompts, 8, 0.1, steps=steps)
    with pytest.raises(ValueError, match="statistic"):
        dtm.budget_plan(m, prompts, 8, 0.1, statistic="nope")
    with pytest.raises(ValueError, match="fraction"):
        dtm.budget_plan(m, prompts, 8, 0.1, fraction=0)
    with pytest.raises(ValueError, match="rank"):
        dtm.budget_plan(m, prompts, 8, 0.1, rank="best")
    with pytest.raises(ValueError, match="n_tokens"):
        dtm.budget_plan(m, prompts, 0, 0.1)


def test_equal_reduction_rows(setup):
    m, prompts = setup
    rows = dtm.equal_reduction(m, prompts, 8, shares=(0.5,), steps=(0.25, 0.5, 0.75))
    (row,) = rows
    assert row["share_plan"] >= row["share_uniform"] > 0.49
    ref = dtm.generate(m, prompts, 8)
    uni = dtm.apply(m, {c: "prune:0.5" for c in dtm.find_components(m)})
    assert row["uniform"] == dtm.dtm(m, uni, prompts, 8, reference=ref).summary()
