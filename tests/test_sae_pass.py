"""The SAE rewrite: TopK SAE encoders -> aa::sae_encode, their dense-latent decoders ->
aa::sae_decode. It fires on the steered graphs of ``aa_compile.sae.attach`` and on a
sae-lens-style TopK SAE written here, compiled equals eager, and it leaves look-alikes alone
with a reason."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import aa_compile
from aa_compile.models.sae import SAEConfig, SparseAutoencoder
from aa_compile.models.transformer import Transformer, TransformerConfig
from aa_compile.passes.base import PassContext, PassResult
from aa_compile.passes.sae import SAEPass, latent_columns
from aa_compile.sae import attach

EAGER = {"inner_compiler": "eager"}
TOL = dict(atol=1e-5, rtol=1e-5)


def _steered(mode: str, activation: str):
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                                          max_seq_len=32)).eval()
    sae = SparseAutoencoder(SAEConfig(n_inputs=32, n_latents=96, k=6, activation=activation,
                                      n_concepts=2))
    with torch.no_grad():  # non-zero biases, so dropping one would show
        sae.latent_bias.normal_()
        sae.pre_bias.normal_()
    return attach(model, sae, site="block.0", mode=mode, concept=1, alpha=3.0)


@pytest.mark.parametrize("mode, rewrites", [("scar", 2), ("delta", 1), ("gsae", 0)])
@pytest.mark.parametrize("activation", ["topk", "topk-sigmoid"])
def test_attached_sae_is_rewritten_and_matches_eager(mode, rewrites, activation):
    """scar: encode + decode; delta: encode only (it decodes one column by hand); gsae runs
    only the concept rows of the encoder, no TopK, so nothing to rewrite."""
    steered = _steered(mode, activation)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    rep = aa_compile.report(steered, ids, options=EAGER)
    assert rep.rewrites["sae"] == rewrites
    assert not [s for s in rep.skipped if s[0] == "sae"]
    torch._dynamo.reset()
    compiled = torch.compile(steered, backend="aa", options=EAGER, fullgraph=True)
    with torch.no_grad():
        got, want = compiled(ids), steered(ids)
    torch.testing.assert_close(got.logits, want.logits, **TOL)
    torch.testing.assert_close(got.concept_scores, want.concept_scores, **TOL)


def test_attached_sae_under_inductor():
    steered = _steered("scar", "topk-sigmoid")
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    compiled = torch.compile(steered, backend="aa", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, steered(ids).logits, **TOL)
    assert aa_compile.last_report().rewrites["sae"] == 2


class SaeLensStyleTopK(nn.Module):
    """A TopK SAE as sae-lens writes one, independently of our reference: ``W_enc [d, L]``,
    ``W_dec [L, d]``, ``b_dec`` subtracted from the input, TopK then ReLU scattered in place
    into zeros, a dense matmul decode."""

    def __init__(self, d: int = 24, latents: int = 80, k: int = 5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.W_enc = nn.Parameter(torch.randn(d, latents, generator=g) / d ** 0.5)
        self.b_enc = nn.Parameter(torch.randn(latents, generator=g) * 0.1)
        self.W_dec = nn.Parameter(torch.randn(latents, d, generator=g) / latents ** 0.5)
        self.b_dec = nn.Parameter(torch.randn(d, generator=g) * 0.1)
        self.k = k

    def encode(self, x):
        hidden_pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        topk = torch.topk(hidden_pre, self.k, dim=-1)
        acts = topk.values.relu()
        feats = torch.zeros_like(hidden_pre)
        feats.scatter_(-1, topk.indices, acts)
        return feats

    def forward(self, x):
        feats = self.encode(x)
        return feats @ self.W_dec + self.b_dec, feats[..., 3]


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_sae_lens_style_topk_sae_fwd_and_bwd(inner):
    m = SaeLensStyleTopK()
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(4), requires_grad=True)
    rep = aa_compile.report(m, x, options={"inner_compiler": inner})
    assert rep.rewrites["sae"] == 2, rep.skipped
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aa", options={"inner_compiler": inner}, fullgraph=True)
    got, want = compiled(x), m(x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    g = torch.randn_like(want[0])
    params = [x, *m.parameters()]
    grads = torch.autograd.grad(got[0], params, g)
    grads_e = torch.autograd.grad(want[0], params, g)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_the_pass_can_be_disabled():
    rep = aa_compile.report(SaeLensStyleTopK(), torch.randn(4, 24),
                            options={**EAGER, "disable": ["sae"]})
    assert "sae" not in rep.rewrites or rep.rewrites["sae"] == 0


# -- look-alikes: left alone, with the reason --------------------------------------------------

class Router(nn.Module):
    """A mixture-of-experts router: TopK of a linear, softmax over the kept logits."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        values, indices = self.gate(x).topk(2, dim=-1)
        return values.softmax(-1), indices


class Modified(nn.Module):
    """The SAE pattern with one thing changed (``change``)."""

    def __init__(self, change: str):
        super().__init__()
        self.change = change
        self.enc = nn.Linear(16, 40)
        self.dec = nn.Linear(40, 16)

    def forward(self, x, idx=None):
        pre = self.enc(x)
        if self.change == "dim0":
            return pre.topk(3, dim=0).values.relu()
        if self.change == "smallest":
            return pre.topk(3, dim=-1, largest=False).values.relu()
        values, indices = pre.topk(3, dim=-1)
        values = values.relu()
        if self.change == "pre_read":
            return values, pre.sum()
        if self.change == "relu_first":  # relu before TopK: not matched (no rewrite)
            values, indices = pre.relu().topk(3, dim=-1)
        if self.change == "foreign_indices":
            indices = idx
        dense = torch.zeros_like(pre).scatter(-1, indices, values)
        return self.dec(dense)


LOOKALIKES = [
    (Router(), "not passed through relu or sigmoid"),
    (Modified("dim0"), "not over the last (latent) dimension"),
    (Modified("smallest"), "largest=False"),
    (Modified("pre_read"), "pre-activation is read by"),
]


@pytest.mark.parametrize("module, reason", LOOKALIKES,
                         ids=["router", "dim0", "smallest", "pre_read"])
def test_lookalikes_are_skipped_with_a_reason(module, reason):
    rep = aa_compile.report(module, torch.randn(5, 16), options=EAGER)
    assert rep.rewrites["sae"] == 0
    reasons = [r for p, _, r in rep.skipped if p == "sae"]
    assert reasons and all(reason in r for r in reasons), reasons


def test_scatter_of_indices_not_from_a_topk_is_not_decoded():
    """A dense decode of arbitrary indices: duplicates would be summed by the op, not
    overwritten as scatter does. The encoder (whose own indices are unused) is still
    rewritten."""
    m = Modified("foreign_indices")
    idx = torch.randint(0, 40, (5, 3))
    rep = aa_compile.report(m, torch.randn(5, 16), idx, options=EAGER)
    reasons = [r for p, _, r in rep.skipped if p == "sae"]
    assert reasons == ["the scattered indices do not come from a TopK (duplicates would "
                       "differ)"]


def test_relu_before_topk_is_not_an_encoder_match():
    rep = aa_compile.report(Modified("relu_first"), torch.randn(5, 16), options=EAGER)
    assert rep.rewrites["sae"] == 1  # only the decode of the ATen TopK's dense latent
    torch._dynamo.reset()
    x = torch.randn(5, 16)
    m = Modified("relu_first")
    torch.testing.assert_close(torch.compile(m, backend="aa", options=EAGER)(x), m(x), **TOL)


def _traced_with_values(fn, *args) -> fx.GraphModule:
    """``fn`` traced by torch.fx with every node's value in ``meta["example_value"]`` (as far
    as eager execution gets)."""
    gm = fx.symbolic_trace(fn)

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            n.meta["example_value"] = out
            return out

    try:
        Recorder(gm).run(*args)
    except RuntimeError:
        pass  # the TopK that cannot run
    return gm


def test_k_beyond_the_latents_is_skipped():
    def fn(x, w, b):
        values, indices = torch.topk(F.linear(x, w) + b, 12, dim=-1)
        return values.relu(), indices

    gm = _traced_with_values(fn, torch.randn(3, 4), torch.randn(8, 4), torch.randn(8))
    result = PassResult("sae")
    SAEPass().run(gm, PassContext(result, [], None))
    assert result.rewrites == 0
    assert [s.reason for s in result.skipped] == ["k=12 is not in [0, 8 latents]"]


def test_latent_columns_reads_the_scattered_latent():
    g = torch.Generator().manual_seed(5)
    values, indices = torch.randn(2, 3, 4, generator=g), torch.randperm(10, generator=g)[:4]
    indices = indices.expand(2, 3, 4).contiguous()
    dense = torch.zeros(2, 3, 10).scatter(-1, indices, values)
    for cols in (slice(2, 7), 5, slice(None, None, 3), torch.tensor([9, 0, 4])):
        assert torch.equal(latent_columns(values, indices, cols, 10), dense[..., cols])
    assert operator.getitem  # the pass reads column selections as getitem nodes
