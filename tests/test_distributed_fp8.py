"""FP8 all-gather under FSDP2 (`aa_compile.distributed.fp8_all_gather`) on 2 CPU/gloo processes:
u-μP's static-FP8 weights are cast to E4M3 before the all-gather, so fewer bytes cross the wire
(counted, against a hand count), with the losses, gradients and weights of the run that casts
after the all-gather and of one process compiled with the same FP8 options."""

from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from aa_compile import distributed as aad
from aa_compile.distributed.fp8_all_gather import (
    Float8AllGatherWeight,
    cast_before_all_gather,
    count_all_gather_bytes,
)
from aa_compile.models.transformer import Transformer, TransformerConfig
from aa_compile.models.umup import UmupConfig, UmupTransformer, UnitScaledLinear

STEPS, LR, WORLD = 3, 0.1, 2
VOCAB, D, FFN, LAYERS = 64, 32, 64, 2
FP8 = {"inner_compiler": "eager", "fp8": "static"}
E4M3 = torch.float8_e4m3fn


def build() -> UmupTransformer:
    torch.manual_seed(0)
    return UmupTransformer(UmupConfig(vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=4,
                                      max_seq_len=16, d_ff=FFN))


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(1))


def plain(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a (sharded) parameter or gradient as a plain tensor."""
    t = t.full_tensor() if isinstance(t, DTensor) else t
    return (t.master if isinstance(t, Float8AllGatherWeight) else t).detach().clone()


def train(model, ids, group, counter=None) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses, grads, sent, received = [], {}, [], []
    for step in range(STEPS):
        before = (counter.sent, counter.received) if counter else (0, 0)
        loss = model.loss(ids)
        loss.backward()
        if step == 0:
            grads = {n: plain(p.grad) for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        if counter:
            sent.append(counter.sent - before[0])
            received.append(counter.received - before[1])
        losses.append(aad.sum_over_ranks(loss.detach(), group).item() / aad.world_of(group))
    return {"losses": losses, "grads": grads, "sent": sent, "received": received,
            "weights": {n: plain(p) for n, p in model.named_parameters()}}


def fsdp_run(cast: bool) -> dict:
    group = dist.group.WORLD
    model = build()
    plan = cast_before_all_gather(model, FP8) if cast else None
    aad.shard_blocks(model, compile_options=FP8)
    counter = count_all_gather_bytes(model)
    out = train(model, aad.shard_batch(batch(), group), group, counter)
    out["local_types"] = {n: type(p.to_local()).__name__ for n, p in model.named_parameters()}
    if cast:
        out["cast"] = plan.cast
        out["left"] = plan.left
        block = model.layers[0]
        block.unshard()  # what the compiled block reads: the gathered weight, outside any graph
        out["gathered_q"] = plain(block.attn.q_proj.weight)
        out["gathered_o"] = plain(block.attn.o_proj.weight)
        block.reshard()
        try:
            cast_before_all_gather(model, FP8)
            out["recast"] = ""
        except ValueError as e:
            out["recast"] = str(e)
    return out


def worker() -> dict:
    return {"after": fsdp_run(cast=False), "before": fsdp_run(cast=True),
            "rewrites": aad.rewrites_per_rank(dist.group.WORLD)}


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return aad.run_local(worker, WORLD)


def hand_count_bytes(cast: bool) -> int:
    """All-gather input bytes per rank and step: the root (embedding, head: float32) once, each
    block twice (forward, and again for the backward); q, k, v, gate, up in E4M3 when cast,
    o_proj and down_proj (fp8_keep) always float32; every rank sends 1/WORLD of each."""
    fp8_elems = 3 * D * D + 2 * FFN * D
    kept_elems = D * D + D * FFN
    block = fp8_elems * (1 if cast else 4) + kept_elems * 4
    root = 2 * VOCAB * D * 4
    return (root + 2 * LAYERS * block) // WORLD


def test_fp8_all_gather_sends_one_byte_per_cast_weight_element(results):
    for res in results:
        assert res["before"]["sent"] == [hand_count_bytes(cast=True)] * STEPS
        assert res["after"]["sent"] == [hand_count_bytes(cast=False)] * STEPS
        assert res["before"]["received"] == [WORLD * hand_count_bytes(cast=True)] * STEPS
    assert hand_count_bytes(cast=True) == 47104 and hand_count_bytes(cast=False) == 90112


def test_fp8_all_gather_equals_the_cast_after_gather_and_one_process(results):
    model = build()
    model.compile(backend="aa", options=FP8)
    one = train(model, batch(), None)
    for r, res in enumerate(results):
        before, after = res["before"], res["after"]
        # the same E4M3 cast either side of the gather: bit for bit the same run
        assert before["losses"] == after["losses"], f"rank {r}"
        for name, w in after["weights"].items():
            assert torch.equal(before["weights"][name], w), (r, name)
        for name, g in after["grads"].items():
            assert torch.equal(before["grads"][name], g), (r, name)
        assert before["losses"] == pytest.approx(one["losses"], rel=1e-5), f"rank {r}"
        for name, w in one["weights"].items():
            torch.testing.assert_close(before["weights"][name], w, rtol=1e-4, atol=1e-5)
        for rewrites in res["rewrites"]:  # q, k, v, gate, up of 2 blocks (the second model
            assert rewrites["fp8_linear"] == 10  # reuses the first one's block graphs)


def test_gathered_weight_holds_e4m3_values_of_the_master(results):
    res = results[0]["before"]
    q = res["gathered_q"]
    master = res["weights"]["layers.0.attn.q_proj.weight"]
    assert q.dtype == torch.float32 and q.shape == (D, D)
    assert torch.equal(q, master.to(E4M3).float())  # the master rounded to E4M3, nothing else
    assert not torch.equal(q, master)  # N(0,1) weights are not all on the E4M3 grid
    assert torch.equal(res["gathered_o"], res["weights"]["layers.0.attn.o_proj.weight"])


def test_only_the_weights_the_pass_runs_in_fp8_are_cast(results):
    res = results[0]["before"]
    expected = [f"layers.{i}.{m}.weight" for i in range(LAYERS)
                for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj",
                          "mlp.up_proj")]
    assert res["cast"] == expected
    assert set(res["left"]) == {"layers.0.attn.o_proj", "layers.0.mlp.down_proj",
                                "layers.1.attn.o_proj", "layers.1.mlp.down_proj", "lm_head"}
    assert "fp8_keep" in res["left"]["lm_head"]
    for name, kind in res["local_types"].items():
        assert kind == ("Float8AllGatherWeight" if name in expected else "Tensor"), name
    assert "already sharded" in res["recast"]


def test_cast_before_all_gather_bad_inputs():
    with pytest.raises(TypeError, match="nn.Module"):
        cast_before_all_gather("model", FP8)
    for options in (None, {"fp8": "tensorwise"}, {"fp8": "rowwise"}):
        with pytest.raises(ValueError, match="fp8='static'"):
            cast_before_all_gather(build(), options)
    with pytest.raises(ValueError, match="not valid"):
        cast_before_all_gather(build(), {"fp8": "e4m3"})
    reference = Transformer(TransformerConfig(vocab_size=64, d_model=32, n_layers=1,
                                              n_heads=4))
    with pytest.raises(ValueError, match="no weight the static fp8 pass runs in FP8"):
        cast_before_all_gather(reference, FP8)
    all_kept = {**FP8, "fp8_keep": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj",
                                    "o_proj", "down_proj", "lm_head"]}
    with pytest.raises(ValueError, match="drop fp8_all_gather"):
        cast_before_all_gather(build(), all_kept)
    with pytest.raises(ValueError, match="no FSDP module"):
        count_all_gather_bytes(build())


def test_guards_mirror_the_pass():
    model = torch.nn.ModuleDict({"odd": UnitScaledLinear(24, 32), "ok": UnitScaledLinear(32, 16),
                                 "down_proj": UnitScaledLinear(32, 32),
                                 "wide": UnitScaledLinear(16, 16).double()})
    plan = cast_before_all_gather(model, FP8)
    assert plan.cast == ["ok.weight"]
    assert "multiples of 16" in plan.left["odd"]
    assert "fp8_keep" in plan.left["down_proj"]
    assert "float64" in plan.left["wide"]
    assert isinstance(model["ok"].weight, torch.nn.Parameter)
    assert isinstance(model["ok"].weight.data, Float8AllGatherWeight)
    assert type(model["odd"].weight.data) is torch.Tensor


def test_pre_all_gather_casts_like_the_op_and_pads_an_uneven_shard():
    shard = torch.tensor([[1000.0, -1000.0, 0.3, float("inf")], [1.0, -0.5, 2.0 ** -10, 0.0]])
    w = Float8AllGatherWeight(shard)
    mesh = types.SimpleNamespace(size=lambda: 3)
    # a [7, 4] weight over 3 ranks: shards of 3 rows, this (last) rank has 2, padded to 3
    (inp,), meta = w.fsdp_pre_all_gather(mesh, torch.Size([7, 4]), (4, 1), None, None)
    assert inp.dtype == torch.uint8 and inp.shape == (3, 4) and meta is None
    got = inp.view(E4M3).float()
    # saturate to ±448, 0.3 -> 0.3125 (nearest of 1.125 / 1.25 · 2^-2), inf -> NaN,
    # 2^-10 -> 0 (below half of E4M3's smallest subnormal 2^-9), the pad row zero
    want = torch.tensor([[448.0, -448.0, 0.3125, float("nan")], [1.0, -0.5, 0.0, 0.0],
                         [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)


def test_post_all_gather_widens_and_refills_in_place():
    w = Float8AllGatherWeight(torch.zeros(2, 4))
    values = torch.tensor([[0.5, -1.0, 448.0, 0.0], [2.0, 3.0, -0.125, 1.5]])
    gathered = values.to(E4M3).view(torch.uint8)
    wide, inner = w.fsdp_post_all_gather((gathered,), None, torch.bfloat16)
    assert wide.dtype == torch.bfloat16 and inner == (wide,)
    assert torch.equal(wide.float(), values)
    out = torch.empty(2, 4)
    assert w.fsdp_post_all_gather(((-values).to(E4M3).view(torch.uint8),), None,
                                  torch.float32, out=out) is None
    assert torch.equal(out, -values)


def test_wrapper_keeps_only_through_views_and_copies():
    w = Float8AllGatherWeight(torch.arange(6.0).reshape(2, 3))
    assert isinstance(w.view(-1), Float8AllGatherWeight)
    assert isinstance(w.detach(), Float8AllGatherWeight)
    assert isinstance(w.new_zeros(1, 3), Float8AllGatherWeight)
    s = w * 2  # arithmetic (what the model and the optimiser do) gives plain tensors
    assert type(s) is torch.Tensor and torch.equal(s, torch.arange(6.0).reshape(2, 3) * 2)
    w.add_(1.0)  # in place reaches the master weight
    assert torch.equal(w.master, torch.arange(6.0).reshape(2, 3) + 1)


def test_pre_all_gather_rounds_to_the_mixed_precision_dtype_first():
    # 1.187 is nearest to E4M3's 1.125, but bfloat16 rounds it to 1.1875, the midpoint of
    # 1.125 and 1.25, which rounds to even (1.25): FSDP2 without the cast gathers bfloat16
    w = Float8AllGatherWeight(torch.tensor([[1.187, -1.187]]))
    mesh = types.SimpleNamespace(size=lambda: 1)
    plain_run = types.SimpleNamespace(param_dtype=None)
    bf16_run = types.SimpleNamespace(param_dtype=torch.bfloat16)
    (fp32_bytes,), _ = w.fsdp_pre_all_gather(mesh, torch.Size([1, 2]), (2, 1), None, plain_run)
    (bf16_bytes,), _ = w.fsdp_pre_all_gather(mesh, torch.Size([1, 2]), (2, 1), None, bf16_run)
    assert fp32_bytes.view(E4M3).float().tolist() == [[1.125, -1.125]]
    assert bf16_bytes.view(E4M3).float().tolist() == [[1.25, -1.25]]


def test_saved_as_the_plain_master_weight(tmp_path):
    w = Float8AllGatherWeight(torch.arange(4.0))
    torch.save({"w": w}, tmp_path / "w.pt")
    back = torch.load(tmp_path / "w.pt", weights_only=True)["w"]
    assert type(back) is torch.Tensor and torch.equal(back, torch.arange(4.0))
