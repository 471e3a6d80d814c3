"""The task APIs split their work over a process group (2 CPU/gloo processes) and return what
one process returns: `aa_compile.dtm.sweep` (components) and `aa_compile.atman.explain`
(perturbation batches); ranks that disagree on inputs or models get a clear error."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from aa_compile import distributed as aad
from aa_compile import dtm
from aa_compile.atman import explain
from aa_compile.models.transformer import Transformer, TransformerConfig

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2
LEVELS = ("prune:0.5", "2:4", "int8")
PROMPT = torch.tensor([5, 17, 3, 40, 22, 9, 31, 12, 8, 60])
TARGET = torch.tensor([7, 19, 2, 44])
EXPLAIN = dict(max_batch_size=2, progress=False)


def dtm_model() -> tuple[Transformer, torch.Tensor]:
    torch.manual_seed(1)
    m = Transformer(TransformerConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, d_ff=64,
                                      max_seq_len=64)).eval()
    m.reset_parameters(0.3)
    return m, torch.randint(0, 64, (6, 4))


def atman_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                                      n_kv_heads=2, max_seq_len=64))
    m.reset_parameters(0.3)
    return m.eval()


def errors_of(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return ""


def tasks_worker() -> dict:
    group = dist.group.WORLD
    rank = dist.get_rank()
    model, prompts = dtm_model()
    swept = dtm.sweep(model, prompts, 8, LEVELS, batch_size=4, progress=False, group=group)
    exp = explain(atman_model(), PROMPT, TARGET, group=group, **EXPLAIN)
    levels = LEVELS if rank == 0 else LEVELS[:2]
    bad_sweep = errors_of(lambda: dtm.sweep(model, prompts, 8, levels, batch_size=4,
                                            progress=False, group=group))
    bad_model = errors_of(lambda: explain(atman_model(seed=rank), PROMPT, TARGET, group=group,
                                          **EXPLAIN))
    bad_batch = errors_of(lambda: aad.shard_batch(torch.zeros(3, 4), group))
    return {"sweep": swept, "scores": exp.scores, "stats": exp.stats, "bad_sweep": bad_sweep,
            "bad_model": bad_model, "bad_batch": bad_batch, "writer": aad.is_writer(group),
            "shard": aad.shard_batch(["a", "b", "c", "d"], group)}


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return aad.run_local(tasks_worker, WORLD)


def test_sweep_over_two_ranks_equals_one_process(results):
    model, prompts = dtm_model()
    one = dtm.sweep(model, prompts, 8, LEVELS, batch_size=4, progress=False)
    for res in results:
        got = res["sweep"]
        assert list(got["results"]) == list(one["results"])  # component order kept
        for name, per_level in one["results"].items():
            for lv, entry in per_level.items():
                assert got["results"][name][lv]["fdt"] == entry["fdt"], (name, lv)
                assert got["results"][name][lv]["nll_delta"] == pytest.approx(
                    entry["nll_delta"], abs=1e-6)
        assert got["base_nll"] == pytest.approx(one["base_nll"], abs=1e-6)
        rest = ("results", "base_nll")
        assert ({k: v for k, v in got.items() if k not in rest}
                == {k: v for k, v in one.items() if k not in rest})


def test_explain_over_two_ranks_equals_one_process(results):
    one = explain(atman_model(), PROMPT, TARGET, **EXPLAIN)
    assert one.stats["batches"] >= 4  # enough batches for both ranks to have work
    for res in results:
        torch.testing.assert_close(res["scores"], one.scores, rtol=1e-6, atol=1e-6)
        assert res["stats"] == one.stats


def test_ranks_that_disagree_get_a_clear_error(results):
    for res in results:
        assert "sweep settings, prompts or models differ across ranks (ranks [1]" in \
            res["bad_sweep"]
        assert "baseline cross-entropies differ across ranks" in res["bad_model"]
    assert [r["writer"] for r in results] == [True, False]
    assert all("global batch of 3 rows does not divide over 2 ranks" in r["bad_batch"]
               for r in results)


def test_shard_batch_gives_each_rank_its_contiguous_part(results):
    assert [r["shard"] for r in results] == [["a", "b"], ["c", "d"]]


def test_group_without_torch_distributed_is_refused():
    model, prompts = dtm_model()
    with pytest.raises(TypeError, match="ProcessGroup or None"):
        dtm.sweep(model, prompts, 8, LEVELS, progress=False, group="world")
    with pytest.raises(TypeError, match="ProcessGroup or None"):
        explain(atman_model(), PROMPT, TARGET, group=3, **EXPLAIN)
    group = dist.ProcessGroup(dist.HashStore(), 0, 1)  # a group, but no initialised job
    with pytest.raises(RuntimeError, match="init_process_group"):
        dtm.sweep(model, prompts, 8, LEVELS, progress=False, group=group)


def test_work_split_helpers_without_a_group():
    assert aad.owned(5, None) == [0, 1, 2, 3, 4]
    assert aad.merge_owned({1: "b", 0: "a"}, 2, None) == ["a", "b"]
    with pytest.raises(RuntimeError, match=r"items \[2\] were computed on no rank"):
        aad.merge_owned({0: "a", 1: "b"}, 3, None)
    with pytest.raises(ValueError, match="n_items"):
        aad.owned(-1, None)
    assert aad.fingerprint([1, torch.ones(2)]) != aad.fingerprint([1, torch.zeros(2)])
