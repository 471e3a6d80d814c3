"""The HAT passes (`passes/hat.py`): the reference's masked byte attention becomes
`aa::window_attention`, its padded word pooling `aa::word_pool`, only after the mask is proven
by evaluation; compiled loss and gradients equal eager; other masks are left alone with a reason.

Compiles use ``inner_compiler="eager"`` (fast). Tolerance: float32, loss within 1e-5 relative,
gradients within 1e-4 relative + 1e-6 absolute of eager (measured ~1e-7 apart).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import aa_compile
from aa_compile.models.hat import HATConfig, HATModel, sliding_window_mask
from aa_compile.report import CompileReport
from passes.hat import prove_window_mask, window_definition

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
    start = len(aa_compile.last_report().graphs)
    for window in (5, 6, 9):
        torch.testing.assert_close(compiled(q, k, v, OFFSETS, window),
                                   fn(q, k, v, OFFSETS, window))
    graphs = aa_compile.last_report().graphs[start:]
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
    got = torch.compile(guided, backend="aa", options=OPTIONS)(x, g, offsets)
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
