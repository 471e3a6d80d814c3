"""Tensor parallelism of the reference transformer with ``backend="aa"`` on 2 CPU/gloo processes
equals one process; DTensors reaching ``aa::rms_norm`` shard by its rule; any other ``aa::`` op
refuses DTensors with an error naming the op and the fix."""

from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

from aa_compile.report import collecting
from aa_compile import distributed as aad
from aa_compile.models.transformer import RMSNorm, Transformer, TransformerConfig
from aa_compile.ops import OPS

STEPS, LR, WORLD = 3, 0.1, 2
OPTIONS = {"inner_compiler": "eager"}


def build(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
               d_ff=64)
    return Transformer(TransformerConfig(**{**cfg, **kw}))


def batch() -> torch.Tensor:
    return torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(1))


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def train(model, forward) -> tuple[list[float], dict, dict]:
    ids = batch()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses, grads = [], {}
    for step in range(STEPS):
        logits = forward(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        if step == 0:
            grads = {n: full(p.grad) for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, grads, {n: full(p) for n, p in model.named_parameters()}


def sequence_parallel_norm(mesh) -> dict:
    """A norm whose input and output stay sequence-sharded DTensors, compiled with aa."""
    torch.manual_seed(2)
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(3))
    parallelize_module(norm, mesh, SequenceParallel(use_local_output=False))
    local = x.chunk(WORLD, dim=1)[dist.get_rank()].requires_grad_()
    with collecting() as rep:
        out = torch.compile(norm, backend="aa", options=OPTIONS)(local)
    out.full_tensor().pow(2).sum().backward()
    return {"out": out.full_tensor().detach(), "placements": str(out.placements),
            "wgrad": full(norm.weight.grad), "rewrites": rep.rewrites.get("rms_norm", 0)}


def refusal(mesh) -> dict[str, str]:
    """Every aa:: op without a rule, called on replicated DTensors of its first sample."""
    msgs = {}
    for name, entry in OPS.items():
        if name in ("aa::rms_norm", "aa::rms_norm_backward"):
            continue
        args, kwargs = next(iter(entry.samples("cpu")))
        dargs = [distribute_tensor(a.detach(), mesh, [Replicate()])
                 if isinstance(a, torch.Tensor) else a for a in args]
        try:
            entry.op(*dargs, **kwargs)
            msgs[name] = ""
        except aad.MissingShardingRule as e:
            msgs[name] = str(e)
    return msgs


def tp_worker() -> dict:
    mesh = init_device_mesh("cpu", (WORLD,))
    model = aad.parallelize_transformer(build(), mesh)
    with collecting() as rep:
        losses, grads, weights = train(model, torch.compile(model, backend="aa",
                                                            options=OPTIONS))
    sharded = {n: str(p.placements) for n, p in model.named_parameters()
               if isinstance(p, DTensor)}
    return {"losses": losses, "grads": grads, "weights": weights, "sharded": sharded,
            "rewrites": rep.rewrites.get("rms_norm", 0), "norm": sequence_parallel_norm(mesh),
            "refusals": refusal(mesh)}


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return aad.run_local(tp_worker, WORLD)


def test_tp_two_ranks_equal_one_process(results):
    model = build()
    losses1, grads1, weights1 = train(model, model)  # one process, eager
    for r, res in enumerate(results):
        assert res["losses"] == pytest.approx(losses1, rel=1e-5), f"rank {r}"
        for name, g in grads1.items():
            torch.testing.assert_close(res["grads"][name], g, rtol=1e-4, atol=1e-5)
        for name, w in weights1.items():
            torch.testing.assert_close(res["weights"][name], w, rtol=1e-4, atol=1e-5)
        # q/k/v/gate/up split by rows, o/down by columns: 7 sharded weights per block
        assert len(res["sharded"]) == 14
        assert res["sharded"]["layers.0.attn.o_proj.weight"] == str((Shard(1),))
        assert res["sharded"]["layers.0.mlp.up_proj.weight"] == str((Shard(0),))
        assert res["rewrites"] == 2 * 2 + 1  # every RMSNorm became aa::rms_norm, per rank


def test_rms_norm_sharding_rule_keeps_sequence_sharding(results):
    torch.manual_seed(2)
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(3)).double()
    ref = norm.weight.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    w = norm.weight.detach().double().requires_grad_()
    (w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)).pow(2).sum().backward()
    for res in results:
        got = res["norm"]
        assert got["rewrites"] == 1
        assert got["placements"] == str((Shard(1),))  # stayed sharded: the rule applied
        torch.testing.assert_close(got["out"].double(), ref, rtol=1e-5, atol=1e-6)
        # the weight gradient is a partial sum over the two sequence halves
        torch.testing.assert_close(got["wgrad"].double(), w.grad, rtol=1e-5, atol=1e-5)


def test_ops_without_rule_name_themselves_and_the_fix(results):
    refusals = results[0]["refusals"]
    assert set(refusals) == set(OPS) - {"aa::rms_norm", "aa::rms_norm_backward"}
    for name, msg in refusals.items():
        assert msg.startswith(f"{name} has no DTensor sharding rule"), (name, msg)
        assert "use_local_output=True" in msg and "register_sharding" in msg


def test_parallelize_transformer_bad_inputs():
    mesh2 = types.SimpleNamespace(ndim=1, size=lambda: 2)
    with pytest.raises(TypeError, match="reference Transformer"):
        aad.parallelize_transformer(torch.nn.Linear(2, 2), mesh2)
    with pytest.raises(ValueError, match="1-D DeviceMesh"):
        aad.parallelize_transformer(build(), types.SimpleNamespace(ndim=2, size=lambda: 4))
    with pytest.raises(ValueError, match="kv_heads=1 to be a multiple of 2"):
        aad.parallelize_transformer(build(n_kv_heads=1), mesh2)
