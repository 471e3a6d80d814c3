"""T-FREE reference layers: embedding, head loss, multi-hot targets, dictionary scores.

Expectations are computed independently, in float64 loops straight from the definitions in
``shared/research/tfree_hat.md`` (sections 1.3-1.5), never by the code under test.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aa_compile.models.tfree import (
    TFreeDictionary,
    TFreeEmbedding,
    TFreeHead,
    TrigramTokenizer,
    multi_hot,
    trigramify,
    word_of_trigram,
)


@st.composite
def layouts(draw):
    """Random (n_words, word of each trigram (unsorted), m, v, h)."""
    n_words = draw(st.integers(1, 7))
    n_trig = draw(st.integers(0, 12))
    words = draw(st.lists(st.integers(0, n_words - 1), min_size=n_trig, max_size=n_trig))
    return n_words, words, draw(st.integers(1, 4)), draw(st.integers(1, 9)), draw(
        st.integers(1, 5))


@given(layouts(), st.sampled_from(["sum", "mean"]))
def test_embedding_matches_loop(layout, aggregation):
    n_words, words, m, v, h = layout
    g = torch.Generator().manual_seed(len(words) * 31 + m)
    emb = TFreeEmbedding(v, h, aggregation=aggregation).double()
    slots = torch.randint(0, v, (len(words), m), generator=g)
    where = torch.tensor(words, dtype=torch.int64)
    got = emb(slots, where, n_words)
    want = torch.zeros(n_words, h, dtype=torch.float64)
    for t, w in enumerate(words):
        rows = [emb.weight[s] for s in slots[t].tolist()]
        agg = sum(rows) if aggregation == "sum" else sum(rows) / m
        want[w] += agg
    torch.testing.assert_close(got, want)
    for w in set(range(n_words)) - set(words):  # words without trigrams are zero vectors
        assert torch.equal(got[w], torch.zeros(h, dtype=torch.float64))


def test_embedding_counts_a_repeated_slot_twice_and_init_std():
    emb = TFreeEmbedding(4, 3)
    got = emb(torch.tensor([[2, 2]]), torch.tensor([0]), 1)
    torch.testing.assert_close(got[0], 2 * emb.weight[2])
    big = TFreeEmbedding(2000, 500)
    assert abs(big.weight.std().item() - math.sqrt(2 / (5 * 500))) < 2e-3


def test_embedding_bad_arguments():
    with pytest.raises(ValueError, match="aggregation"):
        TFreeEmbedding(4, 3, aggregation="max")
    with pytest.raises(ValueError, match="vocab_size"):
        TFreeEmbedding(0, 3)


def test_word_of_trigram_and_multi_hot():
    offsets = torch.tensor([0, 2, 2, 5])
    assert word_of_trigram(offsets).tolist() == [0, 0, 2, 2, 2]
    indices = torch.tensor([3, 3, 0, 4, 0])
    got = multi_hot(indices, offsets, 6)
    want = torch.zeros(3, 6)
    want[0, 3] = 1
    want[2, 0] = want[2, 4] = 1
    assert torch.equal(got, want)


def test_head_loss_is_the_weighted_bce_formula():
    torch.manual_seed(0)
    head = TFreeHead(5, 7, pos_weight=3.0, loss_scale=10.0).double()
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    logits = head(x)
    targets = (torch.rand(2, 3, 7) < 0.3).double()
    weights = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    got = head.loss(logits, targets, weights)
    total = 0.0
    for idx in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(7)).tolist():
        b, s, j = idx
        z, y = logits[b, s, j].item(), targets[b, s, j].item()
        sig = 1 / (1 + math.exp(-z))
        total += weights[b, s].item() * -(3.0 * y * math.log(sig) + (1 - y) * math.log(1 - sig))
    want = total / (2 * 3 * 7) * 10.0
    assert abs(got.item() - want) < 1e-6 * max(1.0, abs(want))
    assert head.proj.bias is None
    with pytest.raises(ValueError, match="shape"):
        head.loss(logits, targets[:, :2])


def _pattern(tok, word):
    """Independent inner/edge slot sets of ``word``: trigrams from ``trigramify`` (byte
    strings), a trigram is an edge one iff it starts or ends with the padding space."""
    inner, edge = set(), set()
    tris = trigramify(word)
    for tri in tris:
        tid = tri[0] | (tri[1] << 8) | (tri[2] << 16)
        slots = tok.trigram_slots(torch.tensor([tid])).reshape(-1).tolist()
        (edge if tri[:1] == b" " or tri[-1:] == b" " else inner).update(slots)
    return inner, edge, len(tris)


@pytest.mark.parametrize("edge_weight", [1.0, 0.5])
def test_dictionary_scores_match_the_reference_formula(edge_weight):
    tok = TrigramTokenizer(vocab_size=97, m=3, k_lower=1)
    words = ["Hello", "world", "Straße", "x", "the", "THE"]
    d = TFreeDictionary(tok, words, edge_weight=edge_weight)
    torch.manual_seed(1)
    probs = torch.rand(2, 97, dtype=torch.float64)
    got = d.scores(probs)
    assert got.shape == (2, len(words))
    for b in range(2):
        p = probs[b].tolist()
        for i, w in enumerate(words):
            inner, edge, n = _pattern(tok, w)
            s = sum(p[j] for j in inner) + edge_weight * sum(p[j] for j in edge)
            on = 3 * n
            want = s / on + (s - sum(p)) / max(97 - on, 1)
            assert abs(got[b, i].item() - want) < 1e-5, (w, got[b, i].item(), want)


def test_dictionary_picks_the_word_whose_pattern_is_active():
    tok = TrigramTokenizer(vocab_size=4096, m=10)
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    d = TFreeDictionary(tok, words + [""])
    for w in words:
        p = torch.zeros(4096)
        p[tok.target_pattern(w)] = 1
        logits = torch.logit(p.clamp(0.01, 0.99))
        assert d.greedy(logits) == [w]
        assert d.topk(p, 2)[1].tolist()[0] == words.index(w)
        others = d.greedy(logits, exclude=[w])
        assert others[0] != w and others[0] in words
    assert d.scores(torch.rand(4096))[-1] == float("-inf")  # the empty word


def test_dictionary_whole_words_and_duplicates():
    tok = TrigramTokenizer(vocab_size=512, m=4)
    d = TFreeDictionary(tok, ["<|endoftext|>", "a", "a"])
    assert d.words == ["<|endoftext|>", "a"]
    assert d.n_trigrams.tolist() == [1, 1]  # whole word = one "trigram"; "a" -> " a "


def test_dictionary_bad_input():
    tok = TrigramTokenizer(vocab_size=64, m=2)
    d = TFreeDictionary(tok, ["ab", "cd"])
    with pytest.raises(ValueError, match="64 slots"):
        d.scores(torch.rand(3, 63))
    with pytest.raises(ValueError, match="k must be"):
        d.topk(torch.rand(64), 3)
    with pytest.raises(TypeError, match="str"):
        TFreeDictionary(tok, ["ok", 3])
