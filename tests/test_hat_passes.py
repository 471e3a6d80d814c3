"""The HAT passes (`passes/hat/`): the reference's masked byte attention becomes
`aa::window_attention`, its padded word pooling `aa::word_pool`, only after the mask is proven
by evaluation, and the decoder's guide add `aa::guide_add_rms_norm` (fused with the attention
norm that reads it) or `aa::guide_add`; compiled loss and gradients equal eager, also for
dynamic-shape graphs; other masks are left alone with a reason.

Compiles use ``inner_compiler="eager"`` (fast). Tolerance: float32, loss within 1e-5 relative,
gradients within 1e-4 relative + 1e-6 absolute of eager (measured ~1e-7 apart).
"""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import aa_compile
from aa_compile.backend import aa_backend
from aa_compile.config import Config
from aa_compile.models.hat import HATConfig, HATModel, sliding_window_mask
from aa_compile.models.transformer import RMSNorm
from aa_compile.report import CompileReport, collecting
from aa_compile.passes.hat.window_attention import prove_window_mask, window_definition

FUSED, ADD = torch.ops.aa.guide_add_rms_norm.default, torch.ops.aa.guide_add.default
RMS, WINDOW = torch.ops.aa.rms_norm.default, torch.ops.aa.window_attention.default
POOL = torch.ops.aa.word_pool.default
SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}

torch.set_num_threads(1)

OPTIONS = {"inner_compiler": "eager"}
TEXTS = ["Hello world, this is a test of the HAT passes.", "", "Zweites Dokument: Grüße!",
         "x", "A third document with a somewhat_longer_word_here and more words."]


@pytest.fixture(scope="module")
def hat():
    torch.manual_seed(0)
    m = HATModel(HATConfig.tiny(sliding_window=7))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return m, m.splitter.encode(TEXTS)


def test_passes_fire_on_the_reference(hat):
    m, b = hat
    rep = aa_compile.report(m.loss, b, options=OPTIONS)
    cfg = m.config
    assert rep.rewrites["hat_window_attention"] == cfg.encoder.n_layers + cfg.decoder.n_layers
    assert rep.rewrites["hat_word_pool"] == 1
    assert rep.rewrites["hat_guide_add"] == 1  # guide_every_layer=False: first decoder layer
    assert not rep.errors
    assert not [s for s in rep.skipped if s[0].startswith("hat_")]


def test_loss_and_gradients_equal_eager(hat):
    m, b = hat
    m.zero_grad(set_to_none=True)
    want = m.loss(b)
    want.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    got = torch.compile(m.loss, backend="aa", options=OPTIONS)(b)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)
    m.zero_grad(set_to_none=True)


# -- what the passes emit --------------------------------------------------------------------

@dataclasses.dataclass
class Graph:
    ops: Counter  # call_function targets after the passes
    dynamic: bool  # the graph had symbolic sizes


def capturing(options=None, **kwargs):
    """A backend that runs ``aa`` (inner compiler eager) and keeps what each graph called."""
    config = Config.from_options({**OPTIONS, **(options or {})})
    graphs: list[Graph] = []

    def backend(gm, example_inputs):
        compiled = aa_backend(gm, example_inputs, options=config)
        dynamic = any(isinstance(p.meta.get("example_value"), torch.SymInt)
                      for p in gm.graph.nodes if p.op == "placeholder")
        graphs.append(Graph(Counter(n.target for n in gm.graph.nodes
                                    if n.op == "call_function"), dynamic))
        return compiled

    return backend, graphs


def _two_layer_hat(every_layer: bool) -> HATModel:
    torch.manual_seed(0)
    cfg = HATConfig.tiny(sliding_window=7, guide_every_layer=every_layer)
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, n_layers=2))
    m = HATModel(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return m


def _loss_and_grads(m, loss_fn, batch):
    m.zero_grad(set_to_none=True)
    loss = loss_fn(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_equal_to_eager(m, compiled, batch):
    want, want_grads = _loss_and_grads(m, m.loss, batch)
    got, got_grads = _loss_and_grads(m, compiled, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for n, g in want_grads.items():
        torch.testing.assert_close(got_grads[n], g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("every_layer", [False, True])
def test_guide_add_fuses_with_the_attention_norm(every_layer):
    """Each guided sum feeds its block's ``attn_norm`` (already ``aa::rms_norm`` when the
    guide-add pass runs): one ``aa::guide_add_rms_norm`` per guide, no unfused op left, and
    the norm it absorbed is gone; loss and gradients equal eager."""
    m = _two_layer_hat(every_layer)
    batch = m.splitter.encode(TEXTS)
    n_guides = len(m.decoder.guides)
    assert n_guides == (2 if every_layer else 1)
    backend, graphs = capturing()
    compiled = torch.compile(m.loss, backend=backend)
    _assert_equal_to_eager(m, compiled, batch)
    (graph,) = graphs
    assert graph.ops[FUSED] == n_guides and graph.ops[ADD] == 0, graph.ops
    rep = aa_compile.report(m.loss, batch, options=OPTIONS)
    assert rep.rewrites["hat_guide_add"] == n_guides
    assert graph.ops[RMS] == rep.rewrites["rms_norm"] - n_guides
    assert not [s for s in rep.skipped if s[0].startswith("hat_")], rep.skipped


def test_guide_add_fuses_the_spelled_out_norm_when_rms_norm_is_off():
    """Without the rms_norm pass the attention norm is still the reference's hand-written
    RMSNorm when the guide-add pass sees it: it fuses all the same; nothing else becomes
    ``aa::rms_norm``."""
    m = _two_layer_hat(False)
    batch = m.splitter.encode(TEXTS)
    backend, graphs = capturing({"disable": ("rms_norm",)})
    _assert_equal_to_eager(m, torch.compile(m.loss, backend=backend), batch)
    assert graphs[-1].ops[FUSED] == 1 and graphs[-1].ops[RMS] == 0, graphs[-1].ops


def _byte_words(word_offsets, n):
    return torch.searchsorted(word_offsets[1:], torch.arange(n), right=True)


def guided_norm(x, g, word_offsets, norm):  # the sum: a norm's input and a residual
    y = x + g[_byte_words(word_offsets, x.shape[1])]
    return y + norm(y)


def guided_float64_norm(x, g, word_offsets):  # the norm computes in float64: not the op's
    y = x + g[_byte_words(word_offsets, x.shape[1])]
    yd = y.double()
    return y, yd * torch.rsqrt(yd.pow(2).mean(-1, keepdim=True) + 1e-6)


def _guide_inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(4)
    offsets = torch.tensor([0, 2, 2, 7, 8, 12])
    x = torch.randn(1, 12, 6, generator=gen).to(dtype).requires_grad_()
    g = torch.randn(5, 6, generator=gen).to(dtype).requires_grad_()
    return x, g, offsets


@pytest.mark.parametrize("dtype, weight_dtype, tol", [
    (torch.float32, torch.float32, {"rtol": 1e-5, "atol": 1e-6}),
    # mixed precision: float32 weight over bfloat16 activations, the norm returns float32;
    # the reference rounds to bfloat16 before the weight, the op once at the end
    (torch.bfloat16, torch.float32, {"rtol": 2 * 2**-8, "atol": 2e-2}),
])
def test_fused_sum_keeps_its_other_users_and_matches_eager(dtype, weight_dtype, tol):
    x, g, offsets = _guide_inputs(dtype)
    norm = RMSNorm(6, eps=1e-5).to(weight_dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    backend, graphs = capturing()
    got = torch.compile(guided_norm, backend=backend)(x, g, offsets, norm)
    assert graphs[-1].ops[FUSED] == 1 and not graphs[-1].ops[ADD] and not graphs[-1].ops[RMS]
    want = guided_norm(x, g, offsets, norm)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, **tol)
    grad = torch.randn_like(want)
    params = (x, g, norm.weight)
    for a, e in zip(torch.autograd.grad(got, params, grad), torch.autograd.grad(want, params, grad)):
        torch.testing.assert_close(a, e, **tol)


def test_norm_in_another_precision_keeps_the_unfused_guide_add():
    x, g, offsets = _guide_inputs()
    rep = aa_compile.report(guided_float64_norm, x, g, offsets, options=OPTIONS)
    assert rep.rewrites["hat_guide_add"] == 1 and rep.rewrites["rms_norm"] == 1
    assert any(s[0] == "hat_guide_add" and "kept the unfused aa::guide_add" in s[2]
               and "float64" in s[2] for s in rep.skipped), rep.skipped
    backend, graphs = capturing()
    got = torch.compile(guided_float64_norm, backend=backend)(x, g, offsets)
    assert graphs[-1].ops[ADD] == 1 and graphs[-1].ops[RMS] == 1 and not graphs[-1].ops[FUSED]
    for a, e in zip(got, guided_float64_norm(x, g, offsets)):
        torch.testing.assert_close(a, e)


# -- dynamic shapes -----------------------------------------------------------------------------

BATCHES = [TEXTS, ["Another batch, of other sizes entirely.", "yes"],
           ["A third one with a considerably_longer_word_than_before in it", "and", "more", "!"]]


@pytest.mark.parametrize("dynamic", [None, True])
def test_batches_of_other_shapes_keep_the_hat_ops(dynamic):
    """Batches with other T, W, D and L: under ``dynamic=None`` the second batch makes dynamo
    recompile with symbolic sizes, under ``dynamic=True`` every graph is symbolic; either way
    every graph gets all the HAT ops and equals eager."""
    m = _two_layer_hat(True)
    backend, graphs = capturing()
    compiled = torch.compile(m.loss, backend=backend, dynamic=dynamic)
    with collecting() as rep:
        for texts in BATCHES:
            _assert_equal_to_eager(m, compiled, m.splitter.encode(texts))
    assert any(g.dynamic for g in graphs), "no dynamic-shape graph was compiled"
    cfg = m.config
    for graph in graphs:
        assert graph.ops[WINDOW] == cfg.encoder.n_layers + cfg.decoder.n_layers, graph
        assert graph.ops[POOL] == 1 and graph.ops[FUSED] == 2 and not graph.ops[ADD], graph
        assert sum(graph.ops[s] for s in SDPA) == cfg.backbone.n_layers, graph  # causal
    skipped = rep.skipped
    assert not [s for s in skipped if s[0].startswith("hat_")], skipped


def test_dynamic_window_is_decided_by_a_larger_probe():
    """``distance < 32 | distance < 16`` is the window-32 mask; at T = 6 (and at the random
    probe sizes, T <= 6 + 8) windows 16 and 32 both fit (any window >= T is full causal). With
    T symbolic the pass must probe T = 17 and pick 32, which the same compiled graph then gets
    right at T = 40."""
    def fn(q, k, v, offsets):
        doc, pos = _doc_positions(offsets, q.shape[2])
        d = pos[:, None] - pos[None, :]
        mask = (doc[:, None] == doc[None, :]) & (d >= 0) & ((d < 32) | (d < 16))
        return _attention(q, k, v, mask)

    torch._dynamo.reset()
    backend, graphs = capturing()
    compiled = torch.compile(fn, backend=backend, dynamic=True)
    # (3 offsets in both calls: a size of 2 would equal k's heads, and dynamo's duck sizing
    # would then recompile for the second call)
    for t, offsets in ((6, torch.tensor([0, 4, 6])), (40, torch.tensor([0, 37, 40]))):
        q, k, v = _qkv(t=t)
        torch.testing.assert_close(compiled(q, k, v, offsets), fn(q, k, v, offsets),
                                   rtol=1e-5, atol=1e-6)
    assert len(graphs) == 1 and graphs[0].dynamic and graphs[0].ops[WINDOW] == 1, graphs


# -- small graphs: the guard ------------------------------------------------------------------

def _qkv(t=23, heads=4, kv_heads=2, d=8):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1, h, t, d, generator=g) for h in (heads, kv_heads, kv_heads)]


def _doc_positions(offsets, t):
    pos = torch.arange(t)
    doc = torch.searchsorted(offsets[1:], pos, right=True)
    return doc, pos - offsets[doc]


def _attention(q, k, v, mask):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def windowed(q, k, v, offsets):
    return _attention(q, k, v, sliding_window_mask(*_doc_positions(offsets, q.shape[2]), 5))


def bidirectional(q, k, v, offsets):  # same documents, |distance| < window: not causal
    doc, pos = _doc_positions(offsets, q.shape[2])
    same = doc[:, None] == doc[None, :]
    return _attention(q, k, v, same & ((pos[:, None] - pos[None, :]).abs() < 5))


def runtime_window(q, k, v, offsets, window):  # the window is a tensor input
    return _attention(q, k, v, sliding_window_mask(*_doc_positions(offsets, q.shape[2]), window))


def given_mask(q, k, v, mask):
    return _attention(q, k, v, mask)


OFFSETS = torch.tensor([0, 9, 9, 20, 23])


def test_small_graph_fires_with_gqa_and_matches_eager():
    q, k, v = (x.requires_grad_() for x in _qkv())
    rep = aa_compile.report(windowed, q, k, v, OFFSETS, options=OPTIONS)
    assert rep.rewrites["hat_window_attention"] == 1
    got = torch.compile(windowed, backend="aa", options=OPTIONS)(q, k, v, OFFSETS)
    want = windowed(q, k, v, OFFSETS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(want)
    g_got = torch.autograd.grad(got, (q, k, v), grad)
    g_want = torch.autograd.grad(want, (q, k, v), grad)
    for a, e in zip(g_got, g_want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn, extra, reason", [
    (bidirectional, (OFFSETS,), "not the causal sliding-window document mask"),
    (runtime_window, (OFFSETS, torch.tensor(5)), "graph inputs"),
    (given_mask, (sliding_window_mask(*_doc_positions(OFFSETS, 23), 5),), "1-D int"),
])
def test_other_masks_are_skipped_with_a_reason(fn, extra, reason):
    q, k, v = _qkv()
    rep = aa_compile.report(fn, q, k, v, *extra, options=OPTIONS)
    assert rep.rewrites["hat_window_attention"] == 0
    reasons = [s[2] for s in rep.skipped if s[0] == "hat_window_attention"]
    assert reasons and all(reason in r for r in reasons), reasons
    torch.testing.assert_close(torch.compile(fn, backend="aa", options=OPTIONS)(q, k, v, *extra),
                               fn(q, k, v, *extra))


def test_window_changed_at_run_time_is_not_rewritten():
    """A second window makes dynamo pass it as an input (automatic dynamic): left alone."""
    q, k, v = _qkv()
    torch._dynamo.reset()

    def fn(q, k, v, offsets, window):
        return _attention(q, k, v,
                          sliding_window_mask(*_doc_positions(offsets, q.shape[2]), window))

    compiled = torch.compile(fn, backend="aa", options=OPTIONS)
    with collecting() as rep:
        for window in (5, 6, 9):
            torch.testing.assert_close(compiled(q, k, v, OFFSETS, window),
                                       fn(q, k, v, OFFSETS, window))
    graphs = rep.graphs
    rewrites = [sum(p.rewrites for p in g.passes if p.name == "hat_window_attention")
                for g in graphs]
    assert rewrites[0] == 1 and rewrites[-1] == 0, rewrites
    last = CompileReport(graphs[-1:])
    assert any(s[0] == "hat_window_attention" and "graph inputs" in s[2] for s in last.skipped)


def test_word_grid_with_a_wrong_mask_is_skipped():
    def pool(h, q, word_offsets, width, strict):
        cols = torch.arange(width)
        lengths = word_offsets.diff()[:, None]
        mask = cols < lengths if strict else cols <= lengths  # off by one
        index = torch.where(mask, word_offsets[:-1, None] + cols, 0).clamp(max=h.shape[0] - 1)
        k = h[index]
        out = F.scaled_dot_product_attention(q.expand(index.shape[0], -1, -1, -1),
                                             k.transpose(1, 2), k.transpose(1, 2),
                                             attn_mask=mask[:, None, None, :])
        return out

    g = torch.Generator().manual_seed(2)
    offsets = torch.tensor([0, 3, 4, 9, 11])
    h, q = torch.randn(11, 2, 4, generator=g), torch.randn(1, 2, 1, 4, generator=g)
    good = aa_compile.report(pool, h, q, offsets, 5, True, options=OPTIONS)
    assert good.rewrites["hat_word_pool"] == 1
    torch.testing.assert_close(
        torch.compile(pool, backend="aa", options=OPTIONS)(h, q, offsets, 5, True),
        pool(h, q, offsets, 5, True), rtol=1e-5, atol=1e-6)
    bad = aa_compile.report(pool, h, q, offsets, 5, False, options=OPTIONS)
    assert bad.rewrites["hat_word_pool"] == 0
    assert any(s[0] == "hat_word_pool" and "word-length mask" in s[2] for s in bad.skipped)


def test_guide_add_fires_only_for_the_byte_to_word_index():
    def guided(x, g, word_offsets):
        index = torch.searchsorted(word_offsets[1:], torch.arange(x.shape[1]), right=True)
        return x + g[index]

    def shifted(x, g, word_offsets):  # the next word's guide: not the guide add
        index = torch.searchsorted(word_offsets[1:], torch.arange(x.shape[1]), right=True)
        return x + g[(index + 1).clamp(max=g.shape[0] - 1)]

    gen = torch.Generator().manual_seed(3)
    offsets = torch.tensor([0, 2, 2, 7, 8, 12])
    x = torch.randn(1, 12, 6, generator=gen, requires_grad=True)
    g = torch.randn(5, 6, generator=gen, requires_grad=True)
    rep = aa_compile.report(guided, x, g, offsets, options=OPTIONS)
    assert rep.rewrites["hat_guide_add"] == 1
    backend, graphs = capturing()
    got = torch.compile(guided, backend=backend)(x, g, offsets)
    assert graphs[-1].ops[ADD] == 1 and not graphs[-1].ops[FUSED]  # no norm reads the sum
    want = guided(x, g, offsets)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    for a, e in zip(torch.autograd.grad(got, (x, g), grad), torch.autograd.grad(want, (x, g), grad)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    bad = aa_compile.report(shifted, x, g, offsets, options=OPTIONS)
    assert bad.rewrites["hat_guide_add"] == 0
    assert any(s[0] == "hat_guide_add" and "word of each byte" in s[2] for s in bad.skipped)


def test_probe_definition_matches_the_reference_mask():
    offsets = torch.tensor([0, 4, 4, 13, 20])
    doc, pos = _doc_positions(offsets, 20)
    for window in (1, 3, 20):
        assert torch.equal(window_definition(offsets, 20, window),
                           sliding_window_mask(doc, pos, window))
    assert callable(prove_window_mask)


def test_pass_modules_import_alone_and_look_up_ops_when_run():
    """A HAT pass module imports on its own in a fresh interpreter, and no module of the package
    holds an ``aa::`` op overload looked up at import (they are resolved when a pass runs)."""
    code = "\n".join([
        "import importlib, torch",
        "import aa_compile.passes.hat.guide_add",
        "for name in ('shapes', 'proof', 'rewrite', 'window_attention', 'word_pool',",
        "             'guide_add'):",
        "    mod = importlib.import_module('aa_compile.passes.hat.' + name)",
        "    held = [k for k, v in vars(mod).items()",
        "            if isinstance(v, torch._ops.OpOverload) and v.namespace == 'aa']",
        "    assert not held, (name, held)",
    ])
    root = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# -- the released models' RoPE (pool_rope, Llama-3 backbone scaling) -----------------------------

def test_passes_fire_on_a_pool_rope_model_and_match_eager():
    """With the released pooling RoPE the query stays one shared vector (the keys are turned
    by byte minus word position before the gather), so ``hat_word_pool`` still fires; the
    Llama-3 scaled backbone changes no pass. Compiled loss and gradients equal eager."""
    from aa_compile.models.hat.rope import Llama3RopeScaling

    torch.manual_seed(1)
    m = HATModel(HATConfig.tiny(sliding_window=7, pool_rope=True,
                                backbone_rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 16)))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    b = m.splitter.encode(TEXTS)
    rep = aa_compile.report(m.loss, b, options=OPTIONS)
    cfg = m.config
    assert rep.rewrites["hat_window_attention"] == cfg.encoder.n_layers + cfg.decoder.n_layers
    assert rep.rewrites["hat_word_pool"] == 1
    assert rep.rewrites["hat_guide_add"] == 1
    assert not rep.errors
    assert not [s for s in rep.skipped if s[0].startswith("hat_")]
    _assert_equal_to_eager(m, torch.compile(m.loss, backend="aa", options=OPTIONS), b)
