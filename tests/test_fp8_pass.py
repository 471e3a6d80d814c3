"""The FP8 linear rewrite (``options={"fp8": ...}``): where it fires, what it keeps, its numerics.

Tolerances. E4M3 keeps 3 mantissa bits (relative rounding error up to 2^-4 per element), so one
FP8 matmul of unit-scale operands has an SQNR of about 25-30 dB against FP32; through a whole
(tiny) model the logits keep >= 20 dB and the mean cross-entropy agrees within 1% relative.
The static rewrite of a u-μP model must equal, to float32 rounding, the same model written by
hand with ``aa::fp8_linear`` in place of ``F.linear`` (that is what "keeps the scales" means).
"""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aa_compile
from aa_compile import Config
from aa_compile.backend import run_passes
from aa_compile.models.umup import UmupConfig, UmupTransformer, UnitScaledLinear, scaled
from aa_compile.models.umup.functional import linear_scales
from aa_compile.models.umup_train import train

EAGER = {"inner_compiler": "eager"}


pytestmark = pytest.mark.usefixtures("one_thread")


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().double(), out.detach().double()
    return float(10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()))


def tiny_umup(n_layers: int = 1) -> UmupTransformer:
    torch.manual_seed(0)
    return UmupTransformer(UmupConfig(d_model=64, n_layers=n_layers, n_heads=4, max_seq_len=64))


def ids(batch: int = 2, seq: int = 33) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(1))


class MLP(nn.Module):
    def __init__(self, dims=(32, 64, 16), dtype=torch.float32):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, dtype=dtype) for a, b in itertools.pairwise(dims))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.gelu(x)
        return x


def fp8_skips(rep) -> list[tuple[str, str]]:
    return [(node, reason) for name, node, reason in rep.skipped if name == "fp8_linear"]


def rewritten_graph(fn, *args, options):
    """The graph after the passes (captured by a backend that runs them and keeps gm)."""
    config = Config.from_options(options)
    graphs = []

    def backend(gm, example_inputs):
        run_passes(gm, example_inputs, config)
        graphs.append(gm)
        return gm.forward

    torch.compile(fn, backend=backend)(*args)
    return graphs


# -- where it fires --------------------------------------------------------------------------


def test_off_by_default_and_with_fp8_none():
    model, x = MLP(), torch.randn(4, 32)
    for options in (EAGER, {**EAGER, "fp8": None}):
        torch._dynamo.reset()
        rep = aa_compile.report(model, x, options=options)
        assert rep.rewrites["fp8_linear"] == 0
        assert fp8_skips(rep) == []


def test_static_rewrites_unit_scaled_linears_and_keeps_o_proj_down_proj_lm_head():
    model = tiny_umup(n_layers=1)
    rep = aa_compile.report(model.loss, ids(), options={**EAGER, "fp8": "static"})
    # per block q, k, v, gate, up; o_proj, down_proj and the lm_head readout kept
    assert rep.rewrites["fp8_linear"] == 5
    assert sorted(r for _, r in fp8_skips(rep)) == [
        "kept out of FP8 by fp8_keep ('down_proj')", "kept out of FP8 by fp8_keep ('lm_head')",
        "kept out of FP8 by fp8_keep ('o_proj')"]


def test_fp8_keep_is_configurable():
    model = tiny_umup()
    rep = aa_compile.report(model.loss, ids(), options={**EAGER, "fp8": "static", "fp8_keep": []})
    assert rep.rewrites["fp8_linear"] == 8 and fp8_skips(rep) == []
    torch._dynamo.reset()
    rep = aa_compile.report(model.loss, ids(), options={
        **EAGER, "fp8": "static", "fp8_keep": ["lm_head", "layers.0.attn.q_proj"]})
    assert rep.rewrites["fp8_linear"] == 6
    assert {r for _, r in fp8_skips(rep)} == {"kept out of FP8 by fp8_keep ('lm_head')",
                                              "kept out of FP8 by fp8_keep ('layers.0.attn.q_proj')"}


def test_static_replaces_only_the_matmul_between_the_scaled_functions():
    model = tiny_umup()
    (gm,) = rewritten_graph(model.loss, ids(), options={**EAGER, "fp8": "static"})
    afa = torch.ops.higher_order.autograd_function_apply
    nodes = [n for n in gm.graph.nodes if n.target is torch.ops.aa.fp8_linear.default]
    assert len(nodes) == 5
    for n in nodes:
        x, w, bias, scaling, *scales = n.args
        assert bias is None and scaling == "static" and scales == [1.0] * 6
        assert x.args[0].target is afa and w.args[0].target is afa
        assert [u.target for u in n.users] == [afa]
    # the kept linears are still F.linear
    assert sum(n.target is F.linear for n in gm.graph.nodes) == 3


@pytest.mark.parametrize("mode", ["tensorwise", "rowwise"])
def test_dynamic_modes_rewrite_plain_linears(mode):
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(8, 32)
    rep = aa_compile.report(model, x, options={**EAGER, "fp8": mode})
    assert rep.rewrites["fp8_linear"] == 2 and fp8_skips(rep) == []
    torch._dynamo.reset()
    (gm,) = rewritten_graph(model, x, options={**EAGER, "fp8": mode})
    calls = [n for n in gm.graph.nodes if n.target is torch.ops.aa.fp8_linear.default]
    assert [n.args[3] for n in calls] == [mode, mode]
    assert all(n.args[2] is not None for n in calls)  # the bias travels with the op


def test_functional_linear_is_rewritten_too():
    w, b = torch.randn(48, 32), torch.randn(48)
    rep = aa_compile.report(lambda x: F.linear(x, w, b).relu(), torch.randn(3, 5, 32),
                            options={**EAGER, "fp8": "tensorwise"})
    assert rep.rewrites["fp8_linear"] == 1


def test_static_on_a_plain_model_rewrites_nothing_and_says_so(caplog):
    model, x = MLP(), torch.randn(4, 32)
    with caplog.at_level(logging.WARNING, logger="aa_compile"):
        rep = aa_compile.report(model, x, options={**EAGER, "fp8": "static"})
    assert rep.rewrites["fp8_linear"] == 0
    reasons = dict(fp8_skips(rep))
    assert "nothing was rewritten" in reasons["graph"]
    assert sum("not a unit-scaled linear (Linear)" in r for r in reasons.values()) == 2
    assert any("nothing was rewritten" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(torch.compile(model, backend="aa", options={
        **EAGER, "fp8": "static"})(x), model(x))


def test_bad_shapes_dtypes_are_skipped_with_reasons():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.k24 = nn.Linear(24, 32)  # K not a multiple of 16
            self.n20 = nn.Linear(32, 20)  # N not a multiple of 16
            self.ok = nn.Linear(20 + 12, 32)
            self.d64 = nn.Linear(32, 32, dtype=torch.float64)

        def forward(self, x):
            h = self.k24(x)
            return self.n20(h), self.ok(h), self.d64(h.double())

    model, x = Odd(), torch.randn(4, 24)
    rep = aa_compile.report(model, x, options={**EAGER, "fp8": "tensorwise"})
    assert rep.rewrites["fp8_linear"] == 1
    reasons = sorted(r for _, r in fp8_skips(rep))
    assert reasons == sorted([
        "K = 24 (in_features) is not a positive multiple of 16",
        "N = 20 (out_features) is not a positive multiple of 16",
        "input dtype torch.float64 has no FP8 path (float32, bfloat16, float16 only)",
    ])
    out = torch.compile(model, backend="aa", options={**EAGER, "fp8": "tensorwise"})(x)
    for a, b in zip(out, model(x)):
        assert a.shape == b.shape and a.dtype == b.dtype


# -- numerics ---------------------------------------------------------------------------------


def _hand_written_fp8(model: UmupTransformer, keep=("o_proj", "down_proj", "lm_head")):
    """Patch the model's non-kept UnitScaledLinears to call aa::fp8_linear by hand."""

    def forward(self, x):
        fan_out, fan_in = self.weight.shape
        fwd, gi, gw = linear_scales(fan_in, fan_out, x.numel() // fan_in, self.readout)
        y = torch.ops.aa.fp8_linear(scaled(x, 1.0, gi), scaled(self.weight, 1.0, gw))
        return scaled(y, fwd, 1.0)

    for name, mod in model.named_modules():
        if isinstance(mod, UnitScaledLinear) and name.rsplit(".", 1)[-1] not in keep:
            mod.forward = forward.__get__(mod)
    return model


def test_static_equals_the_hand_written_fp8_model_loss_and_grads():
    batch = ids()
    model = tiny_umup()
    compiled = torch.compile(model.loss, backend="aa", options={**EAGER, "fp8": "static"})
    loss = compiled(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_model = _hand_written_fp8(tiny_umup())
    ref = ref_model.loss(batch)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for n, p in ref_model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_static_close_to_fp32_and_gradients_flow():
    batch = ids()
    model = tiny_umup()
    ref_logits = model(batch)
    ref_loss = model.loss(batch)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    opts = {**EAGER, "fp8": "static"}
    logits = torch.compile(model, backend="aa", options=opts)(batch)
    assert sqnr_db(ref_logits, logits) >= 20.0
    torch._dynamo.reset()
    loss = torch.compile(model.loss, backend="aa", options=opts)(batch)
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 0.01
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n
        cos = F.cosine_similarity(p.grad.flatten(), ref_grads[n].flatten(), dim=0)
        assert cos > 0.95, (n, float(cos))


@pytest.mark.parametrize("mode", ["tensorwise", "rowwise"])
def test_dynamic_mlp_close_to_fp32_and_gradients_flow(mode):
    torch.manual_seed(0)
    model, x = MLP(dims=(64, 128, 32)), torch.randn(16, 64, requires_grad=True)
    ref = model(x)
    out = torch.compile(model, backend="aa", options={"inner_compiler": "aot_eager",
                                                       "fp8": mode})(x)
    assert sqnr_db(ref, out) >= 20.0
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_short_training_parity():
    """25 steps of the parity benchmark (bench/umup_fp8_parity.py runs 300, gap <= 2%).

    Early in training the loss still drops fast and one step's noise is large, so the bound
    here is 3% on the mean of the last 2 steps (measured: see the report); the same seed gives the same
    initial weights and batches, so the gap is FP8 rounding alone.
    """
    cfg = UmupConfig(d_model=64, n_layers=1, n_heads=4, max_seq_len=128)
    kw = {"steps": 25, "batch": 4, "seq": 48, "backend": "aa", "eval_batches": 0, "seed": 0}
    fp32 = train(cfg, options=EAGER, **kw)
    torch._dynamo.reset()
    fp8 = train(cfg, options={**EAGER, "fp8": "static"}, **kw)
    assert fp32.losses[0] == pytest.approx(fp8.losses[0], rel=1e-2)
    assert fp8.final_loss < fp8.losses[0] - 1.0  # it learns
    assert abs(fp8.final_loss - fp32.final_loss) / fp32.final_loss < 0.03


# -- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"fp8": "e4m3"}, r"fp8='e4m3' is not valid; choose one of \[None, 'static', 'tensorwise'"),
    ({"fp8": True}, r"fp8=True is not valid"),
    ({"fp8_keep": "o_proj"}, r"fp8_keep must be a list of module names"),
    ({"fp8_keep": ["o_proj", 3]}, r"fp8_keep must be a list of module names"),
    ({"fp8_keep": [""]}, r"fp8_keep must be a list of module names"),
])
def test_bad_fp8_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        Config.from_options(options)
    with pytest.raises(ValueError, match=message):
        aa_compile.compile(MLP(), options=options)
