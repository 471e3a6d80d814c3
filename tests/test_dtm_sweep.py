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
