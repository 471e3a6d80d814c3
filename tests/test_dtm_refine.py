"""`aa_compile.dtm.refine_plan`: exchanges of pruned weights between components at a fixed
budget, and `equal_reduction(method="refine")` with held-out prompts."""

from __future__ import annotations

import pytest
import torch

from aa_compile import dtm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(dtm_tiny):
    return dtm_tiny


def _pruned(model, plan) -> int:
    comps = dtm.find_components(model)
    return sum(round(dtm.parse(spec).sparsity * comps[c].numel) for c, spec in plan.items())


def _zeros(model) -> int:
    return sum(int((model.get_submodule(c).weight == 0).sum()) for c in dtm.find_components(model))


def test_refine_keeps_budget_and_never_gets_worse(setup):
    m, prompts = setup
    comps = dtm.find_components(m)
    out = dtm.refine_plan(m, prompts, 8, 0.5, rounds=3)
    uniform = sum(round(0.5 * c.numel) for c in comps.values())
    assert out["pruned_weights"] == uniform == _pruned(m, out["plan"])
    applied = dtm.apply(m, out["plan"])
    assert _zeros(applied) == uniform  # the applied model has exactly the budget's zeros
    ref = dtm.generate(m, prompts, 8)
    direct = dtm.dtm(m, applied, prompts, 8, reference=ref).summary()
    start = dtm.dtm(m, dtm.apply(m, {c: "prune:0.5" for c in comps}), prompts, 8,
                    reference=ref).summary()
    # the resumed measurements inside the planner agree with applying the plan from scratch
    assert out["measured"]["fdt_mean"] == pytest.approx(direct["fdt_mean"])
    assert out["start"]["fdt_mean"] == pytest.approx(start["fdt_mean"])
    assert direct["fdt_mean"] >= start["fdt_mean"]
    if out["exchanges"]:
        assert (direct["fdt_mean"], -out["measured"]["nll"]) > (start["fdt_mean"],
                                                                -out["start"]["nll"])
        assert out["plan"] != {c: "prune:0.5" for c in comps}


def test_first_exchange_pairs_the_best_single_moves(setup):
    """One round, one candidate each way: the exchange (if kept) moves a quantum from the
    component whose give-back alone measures best to the one whose extra pruning alone
    measures best, both measured here from scratch."""
    m, prompts = setup
    comps = dtm.find_components(m)
    q = round(0.1 * min(c.numel for c in comps.values()))
    ref = dtm.generate(m, prompts, 8)
    base = {c: round(0.5 * comp.numel) for c, comp in comps.items()}

    def key(counts):  # the planner's ranking statistic (fdt_mean), from scratch
        plan = {c: f"prune:{k / comps[c].numel!r}" for c, k in counts.items()}
        return dtm.dtm(m, dtm.apply(m, plan), prompts, 8, reference=ref).summary()["fdt_mean"]

    take = {c: key({**base, c: base[c] + q}) for c in comps}
    give = {c: key({**base, c: base[c] - q}) for c in comps}
    out = dtm.refine_plan(m, prompts, 8, 0.5, rounds=1, candidates=1)
    changed = {c for c, spec in out["plan"].items()
               if round(dtm.parse(spec).sparsity * comps[c].numel) != base[c]}
    if out["exchanges"] == 0:
        assert changed == set()
        return
    assert len(changed) == 2
    up = next(c for c in changed if round(dtm.parse(out["plan"][c]).sparsity
                                          * comps[c].numel) > base[c])
    down = (changed - {up}).pop()
    assert take[up] == pytest.approx(max(take.values()))
    assert give[down] == pytest.approx(max(give.values()))


def test_refine_from_a_given_start(setup):
    m, prompts = setup
    comps = list(dtm.find_components(m))
    start = {comps[0]: "prune:0.5", comps[-1]: "prune:0.25"}
    out = dtm.refine_plan(m, prompts, 8, start=start, rounds=2)
    assert out["pruned_weights"] == _pruned(m, start) == _pruned(m, out["plan"])


def test_refine_bad_inputs(setup):
    m, prompts = setup
    for bad in (0, -0.1, 0.99, True, "half", None):
        with pytest.raises(ValueError, match="share"):
            dtm.refine_plan(m, prompts, 8, bad)
    for kw, match in (({"step": 0}, "step"), ({"step": 1.0}, "step"),
                      ({"min_step": 0.5, "step": 0.1}, "min_step"),
                      ({"rounds": 0}, "rounds"), ({"candidates": True}, "candidates"),
                      ({"statistic": "nope"}, "statistic"), ({"max_sparsity": 1}, "max_sparsity")):
        with pytest.raises(ValueError, match=match):
            dtm.refine_plan(m, prompts, 8, 0.5, **kw)
    with pytest.raises(ValueError, match="lacks"):
        dtm.refine_plan(m, prompts, 8, start={"layers.9.attn.q_proj": "prune:0.5"})
    with pytest.raises(ValueError, match="unstructured"):
        dtm.refine_plan(m, prompts, 8, start={next(iter(dtm.find_components(m))): "int8"})
    with pytest.raises(TypeError, match="plan dict"):
        dtm.refine_plan(m, prompts, 8, start=["prune:0.5"])
    with pytest.raises(ValueError, match="n_tokens"):
        dtm.refine_plan(m, prompts, 0, 0.5)


def test_equal_reduction_refine_with_held_out_prompts(setup):
    m, prompts = setup
    held = torch.randint(0, 64, (5, 4), generator=torch.Generator().manual_seed(7))
    (row,) = dtm.equal_reduction(m, prompts, 8, shares=(0.5,), method="refine",
                                 eval_prompts=held, rounds=1)
    assert row["method"] == "refine"
    assert row["share_plan"] == pytest.approx(row["share_uniform"])
    ref = dtm.generate(m, held, 8)
    uni = dtm.apply(m, {c: "prune:0.5" for c in dtm.find_components(m)})
    assert row["uniform_eval"] == dtm.dtm(m, uni, held, 8, reference=ref).summary()
    planned = dtm.dtm(m, dtm.apply(m, row["plan_spec"]), held, 8, reference=ref).summary()
    assert row["plan_eval"] == planned
    assert row["plan"]["fdt_mean"] >= row["uniform"]["fdt_mean"]
    with pytest.raises(ValueError, match="method"):
        dtm.equal_reduction(m, prompts, 8, shares=(0.5,), method="best")
