"""The dictionary rewrite: TFreeDictionary scores / topk / argmax -> aa::dictionary_score; and
the reference module's vectorised constructor (the pattern buffers the pass relies on)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import aa_compile
from aa_compile.models.tfree import TFreeDictionary, TFreeEmbedding, TrigramTokenizer
from aa_compile.models.tfree.modules import _word_pattern

EAGER = {"inner_compiler": "eager"}
WORDS = ["the", "cat", "sat", "on", "mat", "<|endoftext|>", "", "über", "a", "Hello",
         "hello", "catalogue", " spaced", "x" * 25, "dog", "dig", "tab"]


def dictionary(edge_weight=0.6, **tok):
    tokenizer = TrigramTokenizer(**{"vocab_size": 256, "m": 4, **tok})
    return TFreeDictionary(tokenizer, WORDS, edge_weight=edge_weight)


class Decoder(nn.Module):
    def __init__(self, mode: str, d: TFreeDictionary | None = None, k: int = 3):
        super().__init__()
        self.d = d if d is not None else dictionary()
        self.head = nn.Linear(16, self.d.vocab_size, bias=False)
        self.mode, self.k = mode, k

    def forward(self, x):
        probs = torch.sigmoid(self.head(x))
        if self.mode == "topk":
            return self.d.topk(probs, self.k)
        if self.mode == "argmax":  # greedy without the host-side word lookup
            return self.d.scores(probs).argmax(-1)
        return self.d(probs).softmax(-1)


@pytest.mark.parametrize("mode", ["scores", "topk", "argmax"])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 3)])
def test_rewrite_fires_and_matches_eager(mode, lead):
    torch.manual_seed(0)
    m = Decoder(mode)
    x = torch.randn(*lead, 16)
    rep = aa_compile.report(m, x, options=EAGER)
    assert rep.rewrites["dictionary_score"] == 1, rep.skipped
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(m, backend="aa", options=EAGER)(x)
        want = m(x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_topk_with_grad_enabled(inner):
    """The head's weight requires grad, so aot_autograd traces a training graph: the op's
    outputs are non-differentiable, which keeps that compiling."""
    torch.manual_seed(1)
    m = Decoder("topk", k=5)
    x = torch.randn(4, 16)
    got = torch.compile(m, backend="aa", options={"inner_compiler": inner})(x)
    assert aa_compile.last_report().rewrites["dictionary_score"] == 1
    torch.testing.assert_close(got, m(x), atol=1e-6, rtol=1e-5)


def test_unsorted_word_ids_are_skipped_with_a_reason():
    d = dictionary()
    perm = torch.randperm(d.word_ids.numel(), generator=torch.Generator().manual_seed(0))
    for name in ("word_ids", "slots", "slot_weights"):
        setattr(d, name, getattr(d, name)[perm])
    m = Decoder("topk", d)
    x = torch.randn(2, 16)
    rep = aa_compile.report(m, x, options=EAGER)
    assert rep.rewrites["dictionary_score"] == 0
    assert any("not non-decreasing" in r for p, _, r in rep.skipped if p == "dictionary_score")
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m, backend="aa", options=EAGER)(x), m(x))


class NoMask(TFreeDictionary):
    """The score without the -inf fill of empty words: not the op's semantics."""

    def scores(self, probs):
        p = probs.reshape(-1, self.vocab_size).float()
        raw = p.new_zeros(p.shape[0], len(self.words))
        raw.index_add_(1, self.word_ids, p[:, self.slots] * self.slot_weights)
        on = (self.m * self.n_trigrams).float()
        off = (self.vocab_size - on).clamp(min=1)
        return raw / on + (raw - p.sum(-1, keepdim=True)) / off


def test_pattern_without_the_empty_word_mask_is_skipped():
    d = NoMask(TrigramTokenizer(256, 4), WORDS[:5])
    rep = aa_compile.report(Decoder("scores", d), torch.randn(2, 16), options=EAGER)
    assert rep.rewrites["dictionary_score"] == 0
    assert any("no masked_fill" in r for p, _, r in rep.skipped if p == "dictionary_score")


def test_other_index_adds_are_not_candidates():
    emb = TFreeEmbedding(64, 8)
    slots = torch.randint(0, 64, (7, 3))
    rows = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    rep = aa_compile.report(lambda s, r: emb(s, r, 4), slots, rows,
                            options={**EAGER, "passes": ["dictionary_score"]})
    assert rep.rewrites["dictionary_score"] == 0
    assert not [s for s in rep.skipped if s[0] == "dictionary_score"]


@pytest.mark.parametrize("tok", [{"k_lower": 1}, {"lowercase": True}, {"entire_words": True},
                                 {"hash_mode": "reference", "vocab_size": 300, "m": 3}])
def test_vectorised_constructor_equals_the_per_word_pattern(tok):
    d = dictionary(edge_weight=0.3, **tok)
    tokenizer = TrigramTokenizer(**{"vocab_size": 256, "m": 4, **tok})
    ids, slots, weights, n_tri = [], [], [], []
    for i, w in enumerate(d.words):
        inner, edge, n = _word_pattern(tokenizer, w)
        n_tri.append(n)
        for group, wt in ((inner, 1.0), (edge, 0.3)):
            ids += [i] * len(group)
            slots += group
            weights += [wt] * len(group)
    assert d.word_ids.tolist() == ids
    assert d.slots.tolist() == slots
    assert d.slot_weights.tolist() == pytest.approx(weights)
    assert d.n_trigrams.tolist() == n_tri
    assert bool((d.word_ids.diff() >= 0).all())
