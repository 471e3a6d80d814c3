"""The T-FREE embedding rewrite: the reference gather -> sum/mean over m -> zeros + index_add by
word becomes aa::trigram_bag (word ids converted to CSR offsets in the graph).

Tolerances: float32 forward and weight gradient within 1e-5 (abs and rel) of eager; the op
sums a word's rows in another order than the reference (one float32 accumulation instead of a
rounding per trigram and per index_add step), so results agree to a few ulps, not bitwise.
float64 (the property test): 1e-12.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import aa_compile
from aa_compile.models.tfree import TFreeEmbedding
from aa_compile.report import collecting

EAGER = {"inner_compiler": "eager", "strict": True}
NAME = "tfree_embedding"
TOL = {"atol": 1e-5, "rtol": 1e-5}


def layout(kind: str, n_words: int = 6, v: int = 40, m: int = 4, seed: int = 0):
    """``(slots [n, m], word_of_trigram [n], n_words)``: ``sorted`` word ids (words 1..3
    trigrams), ``unsorted`` (the same shuffled), ``gaps`` (unsorted, words 1 and 3 without
    trigrams, and n_words two larger than the largest id + 1)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 4, (n_words,), generator=g)
    if kind == "gaps":
        counts[1] = counts[3] = 0
    word = torch.repeat_interleave(torch.arange(n_words), counts)
    if kind != "sorted":
        word = word[torch.randperm(word.numel(), generator=g)]
    slots = torch.randint(0, v, (word.numel(), m), generator=g)
    return slots, word, n_words + (2 if kind == "gaps" else 0)


def check_against_eager(model, args, options, wrt=None):
    """Compiled (aa) forward and gradients equal eager within `TOL`."""
    wrt = wrt or [model.weight]
    torch._dynamo.reset()
    got = torch.compile(model, backend="aa", options=options)(*args)
    want = model(*args)
    torch.testing.assert_close(got, want, **TOL)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, wrt, g), torch.autograd.grad(want, wrt, g)):
        torch.testing.assert_close(a, b, **TOL)
    return got


@pytest.mark.parametrize("kind", ["sorted", "unsorted", "gaps"])
@pytest.mark.parametrize("agg", ["sum", "mean"])
def test_rewrite_fires_and_matches_eager(agg, kind):
    torch.manual_seed(0)
    model = TFreeEmbedding(40, 8, agg)
    args = layout(kind)
    rep = aa_compile.report(model, *args, options=EAGER)
    assert rep.rewrites[NAME] == 1, rep.skipped
    got = check_against_eager(model, args, EAGER)
    if kind == "gaps":  # words without trigrams are zero rows, and so are the extra words
        for w in (1, 3, 6, 7):
            assert torch.equal(got[w], torch.zeros_like(got[w]))


class SumAndMean(nn.Module):
    """Both aggregations in one graph (one inductor compile for both)."""

    def __init__(self, v: int = 40, h: int = 16):
        super().__init__()
        self.sum = TFreeEmbedding(v, h, "sum")
        self.mean = TFreeEmbedding(v, h, "mean")

    def forward(self, slots, word, n_words: int):
        return torch.cat([self.sum(slots, word, n_words), self.mean(slots, word, n_words)], 1)


def test_inductor_forward_and_weight_gradient():
    torch.manual_seed(1)
    model = SumAndMean()
    args = layout("gaps", n_words=9, seed=3)
    options = {"inner_compiler": "inductor", "strict": True}
    with collecting() as rep:
        check_against_eager(model, args, options, wrt=[model.sum.weight, model.mean.weight])
    assert rep.rewrites[NAME] == 2, rep.skipped


def test_dynamic_shapes_n_words_symbolic():
    torch.manual_seed(2)
    model = TFreeEmbedding(40, 8, "mean")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aa", options=EAGER, dynamic=True)
    for n_words, seed in ((6, 0), (9, 1), (13, 2)):
        slots, word, n = layout("unsorted", n_words=n_words, seed=seed)
        torch.testing.assert_close(compiled(slots, word, n), model(slots, word, n), **TOL)
    graphs = aa_compile.last_report().graphs
    assert graphs and all(
        p.rewrites == 1 for g in graphs for p in g.passes if p.name == NAME
    )


class Spelled(nn.Module):
    """The reference in other spellings dynamo records differently."""

    def __init__(self, form: str, v: int = 40, h: int = 8):
        super().__init__()
        self.form = form
        self.weight = nn.Parameter(torch.randn(v, h))

    def forward(self, slots, word, n_words: int):
        h = self.weight.shape[1]
        if self.form == "functional":  # F.embedding, torch.sum(dim=1), torch.index_add
            per = torch.sum(F.embedding(slots, self.weight), dim=1)
            return torch.index_add(torch.zeros(n_words, h), 0, word, per)
        if self.form == "method_out_of_place":  # .mean(dim=-2), new_zeros((n, h)), .index_add
            per = self.weight[slots].mean(dim=-2)
            return per.new_zeros((n_words, h)).index_add(0, word, per, alpha=1)
        if self.form == "inplace_returns_accumulator":  # out.index_add_(...); return out
            out = torch.zeros(n_words, h)
            out.index_add_(0, word, self.weight[slots].sum(1))
            return out * 2
        raise AssertionError(self.form)


@pytest.mark.parametrize("form", ["functional", "method_out_of_place",
                                  "inplace_returns_accumulator"])
def test_other_spellings_are_rewritten(form):
    torch.manual_seed(3)
    model = Spelled(form)
    args = layout("unsorted")
    rep = aa_compile.report(model, *args, options=EAGER)
    assert rep.rewrites[NAME] == 1, rep.skipped
    check_against_eager(model, args, EAGER)


def test_int32_ids_and_bfloat16_weight():
    torch.manual_seed(4)
    model = TFreeEmbedding(40, 8, "sum", dtype=torch.bfloat16)
    slots, word, n = layout("unsorted")
    args = (slots.int(), word.int(), n)
    rep = aa_compile.report(model, *args, options=EAGER)
    assert rep.rewrites[NAME] == 1, rep.skipped
    got = torch.compile(model, backend="aa", options=EAGER)(*args)
    # float64 truth: the op rounds once, the bf16 reference at every step, so the op is closer
    exact = TFreeEmbedding(40, 8, "sum", dtype=torch.float64)
    exact.weight.data.copy_(model.weight.data.double())
    want = exact(slots, word, n)
    err_op = (got.double() - want).abs().max()
    err_ref = (model(*args).double() - want).abs().max()
    assert err_op <= err_ref + 1e-12


class Variant(nn.Module):
    """The reference with one thing changed that the pass must not rewrite."""

    def __init__(self, change: str, v: int = 40, h: int = 8):
        super().__init__()
        self.change = change
        self.weight = nn.Parameter(torch.randn(v, h))

    def forward(self, slots, word, n_words: int):
        c, h = self.change, self.weight.shape[1]
        if c == "padding_idx":
            per = F.embedding(slots, self.weight, padding_idx=0).sum(-2)
        else:
            per = self.weight[slots].sum(-2)
        if c == "alpha":
            return per.new_zeros(n_words, h).index_add_(0, word, per, alpha=2.0)
        if c == "dim1":  # index_add over columns: ids pick columns of a [n, k] accumulator
            cols = torch.arange(h) % 3
            return torch.zeros(per.shape[0], 3).index_add_(1, cols, per)
        if c == "zeros_used_before":
            out = torch.zeros(n_words, h)
            seen = out + 1
            return out.index_add_(0, word, per), seen
        if c == "per_trigram_used":
            return per.new_zeros(n_words, h).index_add_(0, word, per), per
        if c == "ones_accumulator":
            return torch.ones(n_words, h).index_add_(0, word, per)
        return per.new_zeros(n_words, h).index_add_(0, word, per)


@pytest.mark.parametrize(
    "change, reason",
    [
        ("alpha", "alpha=2.0"),
        ("dim1", "index_add over dim 1"),
        ("zeros_used_before", "zeros accumulator is used elsewhere"),
        ("per_trigram_used", "per-trigram vectors are used outside"),
        ("padding_idx", "padding_idx"),
        ("ones_accumulator", "fresh zeros tensor"),
    ],
)
def test_guards_leave_the_pattern_and_say_why(change, reason):
    torch.manual_seed(5)
    model = Variant(change)
    args = layout("unsorted")
    rep = aa_compile.report(model, *args, options=EAGER)
    assert rep.rewrites[NAME] == 0
    assert any(reason in r for p, _, r in rep.skipped if p == NAME), rep.skipped
    torch._dynamo.reset()
    got = torch.compile(model, backend="aa", options=EAGER)(*args)
    torch.testing.assert_close(got, model(*args))


@pytest.mark.parametrize("bad", [-1, 6])
def test_bad_word_id_raises(bad):
    """The reference raises in index_add_; the rewrite raises ValueError naming the argument."""
    model = TFreeEmbedding(40, 8)
    slots, word, n = layout("unsorted")
    word = word.clone()
    word[2] = bad
    compiled = torch.compile(model, backend="aa", options=EAGER)
    with pytest.raises((IndexError, RuntimeError)):
        model(slots, word, n)
    with pytest.raises(ValueError, match=r"word_of_trigram must lie in \[0, n_words\)"):
        compiled(slots, word, n)


def test_bad_slot_raises_value_error_in_eager_inner_compiler():
    model = TFreeEmbedding(40, 8)
    slots, word, n = layout("unsorted")
    slots = slots.clone()
    slots[1, 2] = 40
    compiled = torch.compile(model, backend="aa", options=EAGER)
    with pytest.raises(ValueError, match="indices must lie in"):
        compiled(slots, word, n)


@settings(max_examples=12, deadline=None)
@given(
    n_words=st.integers(1, 9),
    extra_words=st.integers(0, 3),
    m=st.integers(1, 5),
    agg=st.sampled_from(["sum", "mean"]),
    data=st.data(),
)
def test_property_random_layouts_float64(n_words, extra_words, m, agg, data):
    """Any word/trigram layout (ids in any order, empty words, unused trailing words, repeated
    slots): compiled forward and weight gradient equal eager in float64."""
    words = data.draw(st.lists(st.integers(0, n_words - 1), min_size=1, max_size=25))
    v = data.draw(st.integers(1, 12))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    word = torch.tensor(words)
    slots = torch.randint(0, v, (len(words), m), generator=g)
    model = TFreeEmbedding(v, 5, agg, dtype=torch.float64)
    n = n_words + extra_words
    torch._dynamo.reset()
    rep = aa_compile.report(model, slots, word, n, options=EAGER)
    assert rep.rewrites[NAME] == 1, rep.skipped
    torch._dynamo.reset()
    got = torch.compile(model, backend="aa", options=EAGER)(slots, word, n)
    want = model(slots, word, n)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    grad = torch.randn(want.shape, generator=g, dtype=torch.float64)
    dw_got = torch.autograd.grad(got, model.weight, grad)[0]
    dw_want = torch.autograd.grad(want, model.weight, grad)[0]
    torch.testing.assert_close(dw_got, dw_want, atol=1e-12, rtol=1e-12)


@settings(max_examples=20, deadline=None)
@given(
    n_words=st.integers(0, 8),
    m=st.integers(1, 4),
    words=st.lists(st.integers(0, 7), max_size=20),
    idx_dtype=st.sampled_from([torch.int32, torch.int64]),
)
def test_words_to_csr_op_equals_its_reference(n_words, m, words, idx_dtype):
    from aa_compile.kernels.trigram_bag import reference

    words = [w for w in words if w < n_words]
    word = torch.tensor(words, dtype=idx_dtype)
    slots = torch.randint(0, 50, (len(words), m), dtype=idx_dtype)
    got = torch.ops.aa.tfree_words_to_csr(slots, word, n_words)
    want = reference.words_to_csr(slots, word, n_words)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)
