"""Tensor parallelism with ``backend="aa"`` on 2 CPU/gloo processes equals one process for the
reference transformer, the u-μP transformer in static FP8 and the T-FREE LM; DTensors reaching
``aa::rms_norm`` and ``aa::fp8_linear`` shard by their rules; any other ``aa::`` op refuses
DTensors with an error naming the op and the fix."""

from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

from aa_compile.report import collecting
from aa_compile import distributed as aad
from aa_compile.distributed.sharding import RULES
from aa_compile.models.tfree import TFreeLM, TFreeLMConfig, TrigramTokenizer
from aa_compile.models.tfree.lm import TFreeInputs
from aa_compile.models.transformer import RMSNorm, Transformer, TransformerConfig
from aa_compile.models.umup import UmupConfig, UmupTransformer
from aa_compile.ops import OPS

STEPS, LR, WORLD = 3, 0.1, 2
OPTIONS = {"inner_compiler": "eager"}
FP8 = {**OPTIONS, "fp8": "static"}
WORDS = [["the", "cat", "sat", "on"], ["a", "dog", "ran", "far"]]


def build(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
               d_ff=64)
    return Transformer(TransformerConfig(**{**cfg, **kw}))


def batch() -> torch.Tensor:
    return torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(1))


def build_model(kind: str) -> torch.nn.Module:
    """The u-μP transformer (GQA: 4 query, 2 key/value heads) or the T-FREE LM."""
    torch.manual_seed(0)
    if kind == "umup_fp8":
        return UmupTransformer(UmupConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                                          n_kv_heads=2, max_seq_len=16, d_ff=64))
    return TFreeLM(TFreeLMConfig(vocab_size=256, m=4, d_model=32, n_layers=2, n_heads=4,
                                 max_seq_len=32))


def model_inputs(kind: str):
    if kind == "tfree":
        return TFreeInputs.from_words(TrigramTokenizer(vocab_size=256, m=4, k_lower=1), WORDS)
    return batch()


def train_loss(model, loss_fn, inputs, lr: float) -> tuple[list[float], dict, dict]:
    """SGD steps on ``loss_fn(inputs)``: losses, the first step's gradients, the weights."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses, grads = [], {}
    for step in range(STEPS):
        loss = loss_fn(inputs)
        loss.backward()
        if step == 0:
            grads = {n: full(p.grad) for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, grads, {n: full(p) for n, p in model.named_parameters()}


#: T-FREE's loss is scaled up (loss_scale 100): a smaller step keeps 3 steps within rounding
MODEL_LR = {"umup_fp8": LR, "tfree": LR / 1000}
MODEL_OPTIONS = {"umup_fp8": FP8, "tfree": OPTIONS}


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def train(model, forward) -> tuple[list[float], dict, dict]:
    """`train_loss` with next-token cross-entropy of ``forward``'s logits on `batch`."""
    def loss_fn(ids):
        logits = forward(ids[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    return train_loss(model, loss_fn, batch(), LR)


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
        if name in RULES:
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


def fp8_operands() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return {"x": torch.randn(2, 3, 32, generator=g), "w": torch.randn(32, 32, generator=g),
            "w48": torch.randn(48, 32, generator=g), "grad": torch.randn(2, 3, 32, generator=g)}


def fp8_placements(mesh) -> dict[str, tuple]:
    """``aa::fp8_linear`` and its backward on DTensors split as the TP styles split them:
    (output placements, whole output) per case."""
    t = fp8_operands()
    rep, col, row = [Replicate()], [Shard(0)], [Shard(1)]

    def d(name, placements):
        return distribute_tensor(t[name], mesh, placements)

    def show(out):
        outs = out if isinstance(out, tuple) else (out,)
        return ([str(o.placements) for o in outs], [o.full_tensor() for o in outs])

    fp8 = torch.ops.aa.fp8_linear
    cases = {
        "colwise": show(fp8(d("x", rep), d("w", col), None, "static")),
        "rowwise": show(fp8(distribute_tensor(t["x"], mesh, [Shard(2)]), d("w", row), None,
                            "static")),
        # the same input placements as colwise: the cached static answer must not be reused
        "colwise_tensorwise": show(fp8(d("x", rep), d("w", col), None, "tensorwise")),
        "colwise_n24": show(fp8(d("x", rep), d("w48", col), None, "static")),
        "backward_colwise": show(torch.ops.aa.fp8_linear_backward(
            distribute_tensor(t["grad"], mesh, [Shard(2)]), d("x", rep), d("w", col), "static",
            1.0, 1.0, 1.0, 0.5, 0.25, True, True, False)),
        "backward_rowwise": show(torch.ops.aa.fp8_linear_backward(
            d("grad", rep), distribute_tensor(t["x"], mesh, [Shard(2)]), d("w", row), "static",
            1.0, 1.0, 1.0, 0.5, 0.25, True, True, False)),
    }
    return cases


def model_run(kind: str, mesh) -> dict:
    model = aad.parallelize_transformer(build_model(kind), mesh)
    with collecting() as rep:
        losses, grads, weights = train_loss(
            model, torch.compile(model.loss, backend="aa", options=MODEL_OPTIONS[kind]),
            model_inputs(kind), MODEL_LR[kind])
    sharded = {n: str(p.placements) for n, p in model.named_parameters()
               if isinstance(p, DTensor)}
    return {"losses": losses, "grads": grads, "weights": weights, "sharded": sharded,
            "rewrites": dict(rep.rewrites)}


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
            "refusals": refusal(mesh), "fp8": fp8_placements(mesh),
            "models": {kind: model_run(kind, mesh) for kind in MODEL_LR}}


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


@pytest.mark.parametrize("kind", ["umup_fp8", "tfree"])
def test_tp_models_equal_one_process(results, kind):
    model = build_model(kind)
    loss_fn = model.loss
    if kind == "umup_fp8":  # FP8 changes the numerics: one process compiles with it too
        loss_fn = torch.compile(model.loss, backend="aa", options=FP8)
    losses1, grads1, weights1 = train_loss(model, loss_fn, model_inputs(kind), MODEL_LR[kind])
    for r, res in enumerate(results):
        got = res["models"][kind]
        assert got["losses"] == pytest.approx(losses1, rel=1e-5), f"rank {r}"
        for name, g in grads1.items():
            scale = g.abs().max().item()  # T-FREE's gradients are ~100x (loss_scale)
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6 * scale + 1e-6,
                                       msg=lambda m: f"rank {r} grad {name}: {m}")
        for name, w in weights1.items():
            torch.testing.assert_close(got["weights"][name], w, rtol=1e-4, atol=1e-5)
        # 7 split weights per block, nothing else (embeddings, heads, norms replicated)
        assert len(got["sharded"]) == 14
        assert got["sharded"]["layers.1.attn.k_proj.weight"] == str((Shard(0),))
        assert got["sharded"]["layers.1.mlp.down_proj.weight"] == str((Shard(1),))
        assert got["rewrites"]["rms_norm"] >= 1
    if kind == "umup_fp8":  # q, k, v, gate, up of 2 blocks ran as aa::fp8_linear on DTensors
        assert all(res["models"][kind]["rewrites"]["fp8_linear"] == 10 for res in results)
    else:  # the replicated trigram-bag embedding still became aa::trigram_bag
        assert all(res["models"][kind]["rewrites"]["tfree_embedding"] == 1 for res in results)


def test_fp8_linear_sharding_rule(results):
    t = fp8_operands()
    fp8 = torch.ops.aa.fp8_linear
    for res in results:
        got = res["fp8"]
        assert got["colwise"][0] == [str((Shard(2),))]  # output split like the weight rows
        assert got["rowwise"][0] == [str((Partial(),))]  # a partial sum over K
        # dynamic scales need whole tensors: gathered and run replicated, even after a
        # static call with the same placements (the sharding cache tells them apart)
        assert got["colwise_tensorwise"][0] == [str((Replicate(),))]
        # 48 rows over 2 ranks leave 24, not a multiple of 16: no colwise split
        assert got["colwise_n24"][0] != [str((Shard(2),))]
        assert got["backward_colwise"][0] == [str((Partial(),)), str((Shard(0),)),
                                              str((Replicate(),))]
        assert got["backward_rowwise"][0] == [str((Shard(2),)), str((Shard(1),)),
                                              str((Replicate(),))]
        # the values are the plain op's on whole tensors
        for case, w, scaling in (("colwise", "w", "static"), ("rowwise", "w", "static"),
                                 ("colwise_tensorwise", "w", "tensorwise"),
                                 ("colwise_n24", "w48", "static")):
            torch.testing.assert_close(got[case][1][0], fp8(t["x"], t[w], None, scaling),
                                       rtol=1e-5, atol=1e-5, msg=lambda m: f"{case}: {m}")
        want = torch.ops.aa.fp8_linear_backward(t["grad"], t["x"], t["w"], "static", 1.0, 1.0,
                                                1.0, 0.5, 0.25, True, True, False)
        for case in ("backward_colwise", "backward_rowwise"):
            for i in range(2):
                torch.testing.assert_close(got[case][1][i], want[i], rtol=1e-5, atol=1e-5)


def test_ops_without_rule_name_themselves_and_the_fix(results):
    refusals = results[0]["refusals"]
    assert set(refusals) == set(OPS) - set(RULES)
    assert "aa::int8_linear" in refusals
    for name, msg in refusals.items():
        assert msg.startswith(f"{name} has no DTensor sharding rule"), (name, msg)
        assert "use_local_output=True" in msg and "register_sharding" in msg


def test_parallelize_transformer_bad_inputs():
    mesh2 = types.SimpleNamespace(ndim=1, size=lambda: 2)
    with pytest.raises(TypeError, match="reference Transformer, a TFreeLM or a UmupTransformer"):
        aad.parallelize_transformer(torch.nn.Linear(2, 2), mesh2)
    with pytest.raises(ValueError, match="ffn_dim=25 to be a multiple of 2"):
        aad.parallelize_transformer(UmupTransformer(UmupConfig(d_model=32, n_heads=4,
                                                               d_ff=25)), mesh2)
    with pytest.raises(ValueError, match="n_heads=3 to be a multiple of 2"):
        aad.parallelize_transformer(TFreeLM(TFreeLMConfig(vocab_size=256, m=4, d_model=48,
                                                          n_heads=3)), mesh2)
    with pytest.raises(ValueError, match="1-D DeviceMesh"):
        aad.parallelize_transformer(build(), types.SimpleNamespace(ndim=2, size=lambda: 4))
    with pytest.raises(ValueError, match="kv_heads=1 to be a multiple of 2"):
        aad.parallelize_transformer(build(n_kv_heads=1), mesh2)
