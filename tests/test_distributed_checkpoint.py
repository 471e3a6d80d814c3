"""Distributed checkpoints (``aa_compile.distributed.checkpoint``, DCP): a training run saved
on two FSDP2 ranks resumes on one process and one saved on one process resumes on two, with
the losses and weights of an uninterrupted one-process run; an FDTM-compressed model comes
back from a two-rank checkpoint bit for bit; bad inputs fail with errors naming the cause."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from aa_compile import distributed as aad
from aa_compile import dtm
from aa_compile.models.transformer import Transformer, TransformerConfig

CONFIG = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16,
                           d_ff=64)
STEPS, SAVE_AT, BATCH = 5, 2, 4
PLAN = {"layers.0.attn.q_proj": "int8", "layers.1.mlp.down_proj": "prune:0.5",
        "layers.1.attn.o_proj": "int8"}


def build(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(CONFIG)


def batch(step: int) -> torch.Tensor:
    """The global batch of a step: the same on every rank, whatever the world size."""
    return torch.randint(0, CONFIG.vocab_size, (BATCH, 9),
                         generator=torch.Generator().manual_seed(100 + step))


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train(model, opt, start: int, stop: int, group) -> list[float]:
    """AdamW steps ``start..stop-1``; the mean loss over the ranks of each."""
    losses = []
    for step in range(start, stop):
        loss = model.loss(aad.shard_batch(batch(step), group))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(aad.sum_over_ranks(loss.detach(), group).item() / aad.world_of(group))
    return losses


#: AdamW divides each update by the root of the second moment, which turns float32 rounding
#: differences of tiny gradients (another reduction order over two ranks) into weight
#: differences of a few 1e-5 after a few steps; a resume that lost the optimizer state or a
#: step is off by about the learning rate (1e-2)
WEIGHT_TOL = {"rtol": 1e-4, "atol": 1e-4}


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()}


def sharded(model: torch.nn.Module, compile: bool = False) -> torch.nn.Module:
    """FSDP2 per block (compiled with the aa backend on request: the checkpoint's names are
    those of the plain module either way)."""
    return aad.shard_blocks(model, compile_options={"inner_compiler": "eager"}, compile=compile)


def two_rank_jobs(saved_on_one: str, save_to: str, applied_to: str, odd_batch: str) -> dict:
    """Everything the tests need from two ranks, in one pair of processes."""
    group = dist.group.WORLD
    out = {}
    # saved on two: steps 0..SAVE_AT-1, then saved
    model = sharded(build(), compile=True)
    opt = optimizer(model)
    out["losses_before"] = train(model, opt, 0, SAVE_AT, group)
    aad.save_checkpoint(save_to, model, opt, SAVE_AT, global_batch=BATCH)
    # saved on one: loaded into a freshly sharded model (other initial weights), then trained on
    model = sharded(build(seed=7))
    opt = optimizer(model)
    out["resumed_at"] = aad.load_checkpoint(saved_on_one, model, opt)
    out["losses_after"] = train(model, opt, out["resumed_at"], STEPS, group)
    out["weights_after"] = weights(model)
    # an FDTM-compressed model, sharded over the two ranks
    small = sharded(dtm.apply(build(), PLAN))
    aad.save_checkpoint(applied_to, small, plan=PLAN)
    # a global batch of 3 rows does not divide over two ranks
    try:
        aad.load_checkpoint(odd_batch, build())
    except ValueError as e:
        out["odd_batch_error"] = str(e)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted one-process run (saved at SAVE_AT on the way), the two-rank jobs, and
    the one-process resume of the two-rank checkpoint."""
    tmp = tmp_path_factory.mktemp("dcp")
    model = build()
    opt = optimizer(model)
    first = train(model, opt, 0, SAVE_AT, None)
    aad.save_checkpoint(tmp / "one", model, opt, SAVE_AT, global_batch=BATCH)
    rest = train(model, opt, SAVE_AT, STEPS, None)
    uninterrupted = {"losses": first + rest, "weights": weights(model)}
    aad.save_checkpoint(tmp / "odd", build(), step=0, global_batch=3)
    two = aad.run_local(two_rank_jobs, 2, str(tmp / "one"), str(tmp / "two"),
                        str(tmp / "applied"), str(tmp / "odd"))
    model = build(seed=7)
    opt = optimizer(model)
    resumed_at = aad.load_checkpoint(tmp / "two", model, opt)
    one = {"resumed_at": resumed_at, "losses": train(model, opt, resumed_at, STEPS, None),
           "weights": weights(model)}
    return {"tmp": tmp, "uninterrupted": uninterrupted, "two": two, "one": one}


def test_saved_on_two_ranks_resumes_on_one(runs):
    reference = runs["uninterrupted"]
    for rank in runs["two"]:  # the two ranks trained the first steps like one process
        assert rank["losses_before"] == pytest.approx(reference["losses"][:SAVE_AT], rel=1e-5)
    one = runs["one"]
    assert one["resumed_at"] == SAVE_AT
    assert one["losses"] == pytest.approx(reference["losses"][SAVE_AT:], rel=1e-5)
    for name, w in reference["weights"].items():
        torch.testing.assert_close(one["weights"][name], w, **WEIGHT_TOL)


def test_saved_on_one_resumes_on_two_ranks(runs):
    reference = runs["uninterrupted"]
    for rank in runs["two"]:
        assert rank["resumed_at"] == SAVE_AT
        assert rank["losses_after"] == pytest.approx(reference["losses"][SAVE_AT:], rel=1e-5)
        for name, w in reference["weights"].items():
            torch.testing.assert_close(rank["weights_after"][name], w, **WEIGHT_TOL)


def test_header_records_the_run(runs):
    header = aad.read_checkpoint(runs["tmp"] / "two")
    assert (header["step"], header["world_size"], header["global_batch"]) == (SAVE_AT, 2, BATCH)
    assert header["model"]["class"] == "Transformer" and header["optimizer"] == "AdamW"
    assert header["model"]["config"]["d_model"] == CONFIG.d_model
    assert "dtm" not in header


def test_fdtm_plan_comes_back_from_two_ranks(runs):
    """The compressed model saved by two FSDP2 ranks: rebuilt from the header's config and
    plan on one process, it equals the compressed model built directly."""
    path = runs["tmp"] / "applied"
    header = aad.read_checkpoint(path)
    assert header["dtm"]["plan"] == PLAN and header["world_size"] == 2
    torch.manual_seed(3)  # other initial weights: what the load must overwrite
    model = dtm.apply(aad.model_from_checkpoint(path), header["dtm"]["plan"], inplace=True)
    assert aad.load_checkpoint(path, model) == 0
    expected = dtm.apply(build(), PLAN)
    got, want = model.state_dict(), expected.state_dict()
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name
    assert got["layers.0.attn.q_proj.weight_int8"].dtype == torch.int8
    ids = batch(0)[:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected(ids), rtol=0, atol=0)


def test_world_size_must_divide_the_global_batch(runs):
    for rank in runs["two"]:
        message = rank["odd_batch_error"]
        assert "global batch of 3 rows" in message and "2 ranks" in message
        assert "(1, 3)" in message


# --- bad inputs (one process) ---------------------------------------------------------------

def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        aad.load_checkpoint(tmp_path / "nope", build())
    with pytest.raises(FileNotFoundError, match="no such directory"):
        aad.read_checkpoint(tmp_path / "nope")


def test_directory_without_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no aa_checkpoint.json"):
        aad.load_checkpoint(tmp_path, build())
    (tmp_path / "aa_checkpoint.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        aad.read_checkpoint(tmp_path)
    (tmp_path / "aa_checkpoint.json").write_text(json.dumps({"format": "aa-compile-dcp",
                                                             "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        aad.read_checkpoint(tmp_path)


def test_another_model_config_names_the_field(tmp_path):
    aad.save_checkpoint(tmp_path, build(), step=1)
    torch.manual_seed(0)
    wider = Transformer(TransformerConfig(vocab_size=64, d_model=48, n_layers=2, n_heads=4,
                                          max_seq_len=16, d_ff=64))
    with pytest.raises(ValueError, match="d_model: checkpoint 32 vs model 48"):
        aad.load_checkpoint(tmp_path, wider)
    with pytest.raises(ValueError, match="it holds a Transformer"):
        aad.load_checkpoint(tmp_path, torch.nn.Linear(2, 2))


def test_other_shapes_and_names_are_named(tmp_path):
    """Modules without a registered config: the parameter names and shapes are compared."""
    aad.save_checkpoint(tmp_path / "a", torch.nn.Sequential(torch.nn.Linear(4, 3)))
    with pytest.raises(ValueError, match=r"0\.weight: checkpoint \(3, 4\) vs model \(5, 4\)"):
        aad.load_checkpoint(tmp_path / "a", torch.nn.Sequential(torch.nn.Linear(4, 5)))
    two = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"missing from the checkpoint: 1\.bias, 1\.weight"):
        aad.load_checkpoint(tmp_path / "a", two)
    aad.save_checkpoint(tmp_path / "b", two)
    with pytest.raises(ValueError, match=r"not in the model: 1\.bias, 1\.weight"):
        aad.load_checkpoint(tmp_path / "b", torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_optimizer_must_match(tmp_path):
    model = build()
    aad.save_checkpoint(tmp_path / "sgd", model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="into the AdamW optimizer: the checkpoint holds SGD state"):
        aad.load_checkpoint(tmp_path / "sgd", model, optimizer(model))
    aad.save_checkpoint(tmp_path / "bare", model)
    with pytest.raises(ValueError, match="saved without one"):
        aad.load_checkpoint(tmp_path / "bare", model, optimizer(model))


def test_model_from_checkpoint_needs_a_registered_kind(tmp_path):
    aad.save_checkpoint(tmp_path, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="Linear is not a registered kind"):
        aad.model_from_checkpoint(tmp_path)


def test_save_bad_arguments(tmp_path):
    model = build()
    with pytest.raises(TypeError, match="nn.Module"):
        aad.save_checkpoint(tmp_path / "x", "model")
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        aad.save_checkpoint(tmp_path / "x", model, step=-1)
    with pytest.raises(ValueError, match="global_batch must be a positive int"):
        aad.save_checkpoint(tmp_path / "x", model, global_batch=0)
    with pytest.raises(TypeError, match="plan must map component names"):
        aad.save_checkpoint(tmp_path / "x", model, plan={"layers.0.attn.q_proj": 8})
    with pytest.raises(TypeError, match="extra must be JSON-able"):
        aad.save_checkpoint(tmp_path / "x", model, extra={"t": torch.zeros(1)})
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no aa_checkpoint.json"):
        aad.save_checkpoint(tmp_path / "busy", model)
    with pytest.raises(ValueError, match="it is a file"):
        aad.save_checkpoint(tmp_path / "busy" / "notes.txt", model)
    with pytest.raises(TypeError, match="ProcessGroup"):
        aad.save_checkpoint(tmp_path / "x", model, group="world")


def test_save_replaces_an_earlier_checkpoint_and_keeps_extra(tmp_path):
    model = build()
    aad.save_checkpoint(tmp_path, model, step=1, extra={"epoch": 0})
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    aad.save_checkpoint(tmp_path, model, step=2, extra={"epoch": 1})
    assert aad.read_checkpoint(tmp_path)["extra"] == {"epoch": 1}
    fresh = build(seed=5)
    assert aad.load_checkpoint(tmp_path, fresh) == 2
    assert torch.equal(fresh.embed.weight, model.embed.weight)
