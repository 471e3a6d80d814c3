"""The u-μP reference: per-op scales against explicit float64 formulas, unit RMS at init (and
that standard parametrisation fails the same check), the LR rules, config checks, a short
training run, and backend="aa" == eager.

Expected values are computed here from the notes' formulas (shared/research/atman_dtm_umup.md
§3.2-3.4), not by calling the module's own rule helpers.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import aa_compile
from aa_compile.models import Transformer, TransformerConfig
from aa_compile.models.umup import (
    UmupConfig,
    UmupTransformer,
    UnitScaledLinear,
    attention_output_scale,
    residual_add,
    residual_split,
    residual_taus,
    scaled,
    silu_glu_scale,
    umup_param_groups,
    unit_attention,
    unit_cross_entropy,
    unit_embedding,
    unit_linear,
    unit_silu_glu,
)
from aa_compile.models.umup_train import main, train

f64 = torch.float64


def rms(t: torch.Tensor) -> float:
    return t.detach().double().pow(2).mean().sqrt().item()


# -- the scaled autograd Function and the per-op rules (float64, explicit formulas) -------------


@given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=3),
       fwd=st.floats(0.01, 100), bwd=st.floats(0.01, 100))
def test_scaled_multiplies_forward_and_gradient_separately(shape, fwd, bwd):
    x = torch.randn(shape, dtype=f64, requires_grad=True)
    g = torch.randn(shape, dtype=f64)
    y = scaled(x, fwd, bwd)
    y.backward(g)
    torch.testing.assert_close(y, x.detach() * fwd, rtol=1e-15, atol=0)
    torch.testing.assert_close(x.grad, g * bwd, rtol=1e-15, atol=0)


@given(lead=st.lists(st.integers(1, 5), min_size=1, max_size=2), fan_in=st.integers(1, 40),
       fan_out=st.integers(1, 40), readout=st.booleans())
def test_unit_linear_forward_and_gradients_follow_the_rules(lead, fan_in, fan_out, readout):
    x = torch.randn(*lead, fan_in, dtype=f64, requires_grad=True)
    w = torch.randn(fan_out, fan_in, dtype=f64, requires_grad=True)
    g = torch.randn(*lead, fan_out, dtype=f64)
    y = unit_linear(x, w, readout=readout)
    y.backward(g)
    batch = math.prod(lead)
    # notes §3.2: hidden fwd fan_in^-1/2, grad_input constrained to the same; readout fwd
    # 1/fan_in, grad_input fan_out^-1/2; grad_weight batch^-1/2 for both
    fwd = 1 / fan_in if readout else 1 / math.sqrt(fan_in)
    grad_in = 1 / math.sqrt(fan_out) if readout else 1 / math.sqrt(fan_in)
    grad_w = 1 / math.sqrt(batch)
    xs, gs = x.detach().reshape(-1, fan_in), g.reshape(-1, fan_out)
    torch.testing.assert_close(y.detach().reshape(-1, fan_out), fwd * xs @ w.detach().T)
    torch.testing.assert_close(x.grad.reshape(-1, fan_in), grad_in * gs @ w.detach())
    torch.testing.assert_close(w.grad, grad_w * gs.T @ xs)


def test_unit_scaled_linear_module_matches_functional_and_is_unit():
    torch.manual_seed(0)
    lin = UnitScaledLinear(256, 64)
    assert lin.weight.std().item() == pytest.approx(1.0, abs=0.05)  # N(0,1) init
    x = torch.randn(512, 256, requires_grad=True)
    y = lin(x)
    torch.testing.assert_close(y, unit_linear(x, lin.weight))
    y.backward(torch.randn_like(y))
    assert 0.9 < rms(y) < 1.1 and 0.9 < rms(lin.weight.grad) < 1.1
    # the to_output_scale constraint trades a unit input gradient for fwd == bwd scale:
    # the gradient sums fan_out terms but is scaled by fan_in^-1/2, so RMS √(64/256)
    assert 0.45 < rms(x.grad) < 0.55


def test_unit_embedding_weight_gradient_scale():
    vocab, d = 11, 6
    ids = torch.randint(0, vocab, (3, 9))
    w = torch.randn(vocab, d, dtype=f64, requires_grad=True)
    g = torch.randn(3, 9, d, dtype=f64)
    out = unit_embedding(ids, w)
    out.backward(g)
    torch.testing.assert_close(out.detach(), w.detach()[ids])  # no forward scale
    want = torch.zeros(vocab, d, dtype=f64).index_add_(0, ids.flatten(), g.reshape(-1, d))
    torch.testing.assert_close(w.grad, math.sqrt(vocab / ids.numel()) * want)


@given(tau=st.floats(0.01, 10))
def test_residual_split_add_is_the_tau_weighted_sum_with_its_true_gradient(tau):
    x = torch.randn(4, 5, dtype=f64, requires_grad=True)
    g = torch.randn(4, 5, dtype=f64)
    branch_in, skip = residual_split(x, tau)
    out = residual_add(torch.sin(branch_in), skip, tau)
    out.backward(g)
    b, a = tau / math.sqrt(1 + tau ** 2), 1 / math.sqrt(1 + tau ** 2)
    xd = x.detach()
    torch.testing.assert_close(out.detach(), b * torch.sin(xd) + a * xd)
    # the delayed branch scale (bwd at the split) makes the overall gradient the true one
    torch.testing.assert_close(x.grad, a * g + b * torch.cos(xd) * g)


@given(n_layers=st.integers(1, 12), res_mult=st.floats(0.1, 10), ratio=st.floats(0.1, 10))
def test_residual_taus_split_the_variance_as_app_g_says(n_layers, res_mult, ratio):
    """Propagate the variance shares through the τ-weighted adds: the embedding keeps
    1 / (1 + 2·res_mult²) of the final stream, attention : MLP = ratio² (App. G's aim)."""
    taus = residual_taus(n_layers, res_mult, ratio)
    assert len(taus) == 2 * n_layers
    emb, attn, mlp = 1.0, 0.0, 0.0
    for i, tau in enumerate(taus):
        keep, new = 1 / (1 + tau ** 2), tau ** 2 / (1 + tau ** 2)
        emb, attn, mlp = emb * keep, attn * keep + new * (i % 2 == 0), mlp * keep + new * (i % 2)
    assert emb + attn + mlp == pytest.approx(1.0)
    assert emb == pytest.approx(1 / (1 + 2 * res_mult ** 2))
    assert attn / mlp == pytest.approx(ratio ** 2)


def test_residual_taus_defaults_give_equal_thirds_and_closed_form():
    for n in (1, 2, 5):
        taus = residual_taus(n)
        # α_attn = α_mlp = 1: τ_i = 1 / √(L + i)
        assert taus == pytest.approx([1 / math.sqrt(n + i) for i in range(2 * n)])


@pytest.mark.parametrize("head_dim, seq, mult", [(16, 64, 1.0), (32, 128, 1.0), (64, 32, 1.0),
                                                 (32, 64, 4.0), (8, 16, 0.25)])
def test_attention_output_scale_rule_and_unit_output(head_dim, seq, mult):
    alpha = 1 / (1 + 4 * head_dim / mult ** 2)
    lower = math.sqrt(math.log(seq) / seq)
    assert attention_output_scale(head_dim, seq, mult) == pytest.approx(
        1 / (lower ** (1 - alpha) * 1.0 ** alpha))
    torch.manual_seed(0)
    q, k, v = (torch.randn(8, 4, seq, head_dim, requires_grad=True) for _ in range(3))
    out = unit_attention(q, k, v, mult)
    out.backward(torch.randn_like(out))
    # the fit is for i.i.d. unit q, k, v: output and v-gradient land near 1 (measured 1.03-1.15)
    assert 0.8 < rms(out) < 1.25 and 0.8 < rms(v.grad) < 1.25


def test_unit_attention_is_mu_p_sdpa_times_the_scale_in_both_passes():
    q, k, v = (torch.randn(2, 3, 10, 8, dtype=f64, requires_grad=True) for _ in range(3))
    g = torch.randn(2, 3, 10, 8, dtype=f64)
    s = attention_output_scale(8, 10, 2.0)
    unit_attention(q, k, v, mult=2.0).backward(g)
    got = [t.grad.clone() for t in (q, k, v)]
    # explicit attention with logits q·k·mult/d_head (μP), causal
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    logits = q2 @ k2.transpose(-1, -2) * (2.0 / 8)
    logits = logits.masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), -math.inf)
    ((logits.softmax(-1) @ v2) * s).backward(g)
    for a, b in zip(got, (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mult", [0.25, 1.0, 4.0])
def test_silu_glu_rule(mult):
    alpha = 1 / (1 + 1 / mult ** 2)
    assert silu_glu_scale(mult) == pytest.approx(2 ** (1 - alpha) * math.sqrt(2) ** alpha)
    x, gate = torch.randn(5, 7, dtype=f64), torch.randn(5, 7, dtype=f64)
    torch.testing.assert_close(unit_silu_glu(x, gate, mult),
                               x * F.silu(mult * gate) / mult * silu_glu_scale(mult))
    torch.manual_seed(0)
    out = unit_silu_glu(torch.randn(4096, 64), torch.randn(4096, 64), mult)
    assert 0.9 < rms(out) < 1.1


@pytest.mark.parametrize("mult", [1.0, 0.5])
def test_unit_cross_entropy_value_and_gradient(mult):
    n, vocab = 12, 9
    z = torch.randn(n, vocab, dtype=f64, requires_grad=True)
    t = torch.randint(0, vocab, (n,))
    loss = unit_cross_entropy(z, t, mult)
    loss.backward()
    zd = z.detach()
    torch.testing.assert_close(loss.detach(), F.cross_entropy(mult * zd, t))  # mean nats
    want = (torch.softmax(mult * zd, -1) - F.one_hot(t, vocab)) * vocab / math.sqrt(vocab - 1)
    torch.testing.assert_close(z.grad, want)  # not divided by n


# -- unit RMS of a fresh model ------------------------------------------------------------------

# Bands. UNIT: within 2x of 1. The rules are local and exact only for independent Gaussian
# inputs; 2x leaves room for finite width/batch and the empirical attention/SiLU fits, and a
# standard-parametrised model misses it by 10x or more (embedding 0.02, mean-reduced grads).
# LOOSE (within 4x) for what the notes' rules themselves leave off unit:
# - attention outputs after the first block, and v/o_proj gradients: the rule assumes
#   independent positions, but a causal average makes positions correlated, so a later
#   average shrinks less (with i.i.d. input the same attention gives 1.0-1.1);
# - gate/up_proj gradients: about 1/√(d_ff/d) under the to_output_scale constraint
#   (unit-scaling issue #70).
# q/k_proj gradients are only required to be non-zero and below 1: with mult/d_head logits
# the softmax is near-uniform at init and the one shared q/k/v backward scale is set for v.
UNIT, LOOSE = (0.5, 2.0), (0.25, 4.0)


def unit_scale_violations(model, ids) -> list[str]:
    """Measure activation / activation-gradient / parameter-gradient RMS after ``model.loss``
    and list those outside their band. Works for `Transformer` and `UmupTransformer`."""
    acts, grads, handles = {}, {}, []

    def hook(name):
        def fn(module, inputs, out):
            acts[name] = rms(out)
            out.register_hook(lambda g: grads.__setitem__(name, rms(g)))
        return fn

    watched = ["embed"] + [f"layers.{i}{part}" for i in range(len(model.layers))
                           for part in ("", ".attn", ".mlp")]
    modules = dict(model.named_modules())
    for name in watched:
        handles.append(modules[name].register_forward_hook(hook(name)))
    model.zero_grad(set_to_none=True)
    model.loss(ids).backward()
    for h in handles:
        h.remove()

    bad = []

    def check(kind, name, value, band):
        if not band[0] <= value <= band[1]:
            bad.append(f"{kind} {name} = {value:.3g} not in {band}")

    for name in watched:
        late_attn = name.endswith(".attn") and not name.startswith("layers.0.")
        check("activation", name, acts[name], LOOSE if late_attn else UNIT)
        check("activation grad", name, grads[name], UNIT)
    for name, p in model.named_parameters():
        g = rms(p.grad)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            check("param grad", name, g, (1e-6, 1.0))
        elif name.endswith(("v_proj.weight", "o_proj.weight", "gate_proj.weight",
                            "up_proj.weight")):
            check("param grad", name, g, LOOSE)
        else:
            check("param grad", name, g, UNIT)
    return bad


SHAPE = {"n_layers": 2, "n_heads": 4, "max_seq_len": 64}


@pytest.mark.parametrize("width, kv_heads", [(64, None), (128, 2), (256, None)])
def test_fresh_umup_model_is_unit_scaled(width, kv_heads):
    torch.manual_seed(0)
    model = UmupTransformer(UmupConfig(d_model=width, n_kv_heads=kv_heads, **SHAPE))
    ids = torch.randint(0, 256, (4, 65))
    assert unit_scale_violations(model, ids) == []


def test_standard_parametrisation_fails_the_same_check():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=256, d_model=128, **SHAPE))
    bad = unit_scale_violations(model, torch.randint(0, 256, (4, 65)))
    assert any(b.startswith("activation embed") for b in bad)
    assert any(b.startswith("param grad") for b in bad)


def _stack_rms(layers: list[nn.Module], depth_x: torch.Tensor) -> list[float]:
    """RMS of each layer's output, of the input gradient and of each weight gradient."""
    x = depth_x.clone().requires_grad_()
    h, outs = x, []
    for layer in layers:
        h = layer(h)
        outs.append(rms(h))
    h.backward(torch.randn_like(h))
    return outs + [rms(x.grad)] + [rms(layer.weight.grad) for layer in layers]


def test_unit_scaled_linear_stack_stays_unit_and_nn_linear_stack_does_not():
    torch.manual_seed(0)
    x = torch.randn(512, 128)
    unit = _stack_rms([UnitScaledLinear(128, 128) for _ in range(6)], x)
    standard = _stack_rms([nn.Linear(128, 128, bias=False) for _ in range(6)], x)
    assert all(UNIT[0] <= v <= UNIT[1] for v in unit), unit
    assert not all(UNIT[0] <= v <= UNIT[1] for v in standard), standard


# -- learning-rate rules --------------------------------------------------------------------


def test_param_group_learning_rates_follow_the_rules():
    cfg = UmupConfig(d_model=96, n_layers=3, n_heads=6, n_kv_heads=2, d_ff=160)
    model = UmupTransformer(cfg)
    eta, wd = 0.7, 0.1
    groups = umup_param_groups(model, eta, weight_decay=wd)
    names = {g["name"]: g for g in groups}
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert all(len(g["params"]) == 1 for g in groups)
    depth = 1 / math.sqrt(3)  # every block parameter: × depth^-1/2, depth = n_layers
    for name, g in names.items():
        if name == "embed.weight":
            want = eta / math.sqrt(96)  # embedding: 1/√fan-out (d)
        elif name == "lm_head.weight":
            want = eta  # output: 1
        elif name.endswith("down_proj.weight"):
            want = eta / math.sqrt(160) * depth  # hidden: 1/√fan_in, fan_in = d_ff
        else:
            want = eta / math.sqrt(96) * depth  # q/k/v/o/gate/up: fan_in = d_model
        assert g["lr"] == pytest.approx(want), name
        assert g["lr"] * g["weight_decay"] == pytest.approx(wd), name  # independent wd
    opt = torch.optim.AdamW(groups)
    assert len(opt.param_groups) == len(groups)


def test_param_groups_reject_foreign_parameters_and_bad_lr():
    model = UmupTransformer(UmupConfig(d_model=32, n_layers=1, n_heads=2))
    with pytest.raises(ValueError, match="lr must be"):
        umup_param_groups(model, 0.0)
    model.extra = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="mup_type"):
        umup_param_groups(model, 1.0)


# -- config checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    ({"d_model": 50, "n_heads": 4}, "must be divisible by n_heads"),
    ({"n_heads": 4, "n_kv_heads": 3}, "must be a multiple of n_kv_heads"),
    ({"d_model": 36, "n_heads": 12}, "head_dim=3 must be even"),
    ({"n_layers": 0}, "n_layers must be a positive int"),
    ({"vocab_size": 1}, "vocab_size must be >= 2"),
    ({"d_ff": 0}, "d_ff must be a positive int"),
    ({"norm_eps": 0.0}, "norm_eps must be > 0"),
    ({"attn_mult": 0.0}, "attn_mult must be a finite number > 0"),
    ({"act_mult": -1.0}, "act_mult must be"),
    ({"residual_mult": math.inf}, "residual_mult must be"),
    ({"residual_attn_ratio": math.nan}, "residual_attn_ratio must be"),
    ({"loss_mult": "1"}, "loss_mult must be"),
])
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        UmupConfig(**overrides)


def test_model_rejects_bad_inputs():
    model = UmupTransformer(UmupConfig(d_model=32, n_layers=1, n_heads=2, max_seq_len=8))
    with pytest.raises(TypeError, match="UmupConfig"):
        UmupTransformer(TransformerConfig())
    with pytest.raises(TypeError, match="int64"):
        model(torch.randn(1, 4))
    with pytest.raises(ValueError, match="exceeds max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_is_causal():
    torch.manual_seed(0)
    model = UmupTransformer(UmupConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1))
    ids = torch.randint(0, 256, (2, 12))
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :8], model(changed)[:, :8])


# -- training and the aa backend ----------------------------------------------------------------

TINY = UmupConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=32)


def test_short_training_run_lowers_the_loss():
    res = train(TINY, steps=40, batch=8, seq=32, lr=1.0, eval_batches=1)
    assert len(res.losses) == 40 and all(math.isfinite(v) for v in res.losses)
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / 5
    assert last < first - 1.0, res.losses
    assert res.eval_loss < math.log(256) - 1.0
    assert res.final_loss == pytest.approx(sum(res.losses[-4:]) / 4)


def test_train_rejects_bad_arguments():
    with pytest.raises(ValueError, match="backend must be one of"):
        train(TINY, steps=1, backend="tensorrt")
    with pytest.raises(ValueError, match="vocab_size >= 256"):
        train(UmupConfig(vocab_size=100, d_model=32, n_layers=1, n_heads=2), steps=1)
    with pytest.raises(SystemExit):
        main(["--width", "30", "--heads", "4"])  # 30 not divisible by 4: argparse error


def test_aa_backend_loss_and_grads_equal_eager():
    torch.manual_seed(0)
    model = UmupTransformer(TINY)
    ids = torch.randint(0, 256, (2, 17))

    def loss_and_grads(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(ids)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    compiled = torch.compile(model.loss, backend="aa", options={"inner_compiler": "eager"})
    loss_c, grads_c = loss_and_grads(compiled)
    rewrites = aa_compile.last_report().rewrites["rms_norm"]
    assert rewrites == 2 * TINY.n_layers + 1  # the non-affine norms became aa::rms_norm
    loss_e, grads_e = loss_and_grads(model.loss)
    torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-5, rtol=1e-4,
                                   msg=name)
