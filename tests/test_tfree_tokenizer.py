"""TrigramTokenizer: argument checks, CSR invariants of encode, defined results, bad input."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from aa_compile.models.tfree import WHOLE_WORD_BASE, TrigramTokenizer
from aa_compile.models.tfree.wordsplit import CONTROL_WORDS

ALPHABET = "abcXYZäöüÄß中文" + "0129" + ".,;!?-'\"()<>|_#" + "   \n\t"
TOKENIZERS = {
    "fast": TrigramTokenizer(),
    "reference": TrigramTokenizer(hash_mode="reference"),
    "fast-small": TrigramTokenizer(vocab_size=50, m=4, k_lower=1),
    "entire": TrigramTokenizer(m=6, k_lower=0, entire_words=True),
}


def n_byte_trigrams(word: str) -> int:
    padded = (" " + word + " ").encode("utf-8")
    return len({padded[p : p + 3] for p in range(len(padded) - 2)})


@pytest.mark.parametrize("kwargs, match", [
    ({"vocab_size": 0}, "vocab_size"),
    ({"vocab_size": 2**31}, "vocab_size"),
    ({"vocab_size": 8, "m": 9}, "m must be in"),
    ({"m": 0}, "m must be in"),
    ({"m": 4, "k_lower": 5}, "k_lower"),
    ({"k_lower": -1}, "k_lower"),
    ({"hash_mode": "md5"}, "hash_mode"),
    ({"vocab_size": 2**20, "m": 2**16 + 1}, "m must be <="),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrigramTokenizer(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"m": 2.0}, "m"), ({"vocab_size": True}, "vocab_size"), ({"lowercase": 1}, "lowercase"),
    ({"entire_words": "yes"}, "entire_words"),
])
def test_wrong_argument_types_raise_type_error(kwargs, match):
    with pytest.raises(TypeError, match=match):
        TrigramTokenizer(**kwargs)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@given(texts=st.lists(st.text(alphabet=ALPHABET, max_size=40), max_size=4))
def test_encode_csr_invariants(name, texts):
    tok = TOKENIZERS[name]
    batch = tok.encode(texts)
    m = tok.m
    for t in (batch.indices, batch.offsets, batch.trigram_ids, batch.trigram_offsets,
              batch.word_offsets, batch.whole_word_slots):
        assert t.dtype == torch.int64
    # texts -> words
    assert batch.n_texts == len(texts) and batch.word_offsets[0] == 0
    assert (batch.word_offsets.diff() >= 0).all()
    for t, text in enumerate(texts):
        assert batch.text_words(t) == tok.words(text)
    # words -> slots
    assert batch.offsets.shape == (batch.n_words + 1,) and batch.offsets[0] == 0
    assert (batch.offsets.diff() >= 0).all() and batch.offsets[-1] == batch.indices.numel()
    assert torch.equal(batch.offsets, m * batch.trigram_offsets)
    assert batch.trigram_offsets[-1] == batch.trigram_ids.numel()
    assert ((batch.indices >= 0) & (batch.indices < tok.vocab_size)).all()
    assert batch.whole_word_slots.shape == (len(batch.whole_words), m)
    lengths = batch.offsets.diff().tolist()
    for w, word in enumerate(batch.words):
        whole = tok.entire_words or "<|" in word
        assert lengths[w] == m * (1 if whole else n_byte_trigrams(word)), word
        got = batch.indices[batch.offsets[w] : batch.offsets[w + 1]]
        assert torch.equal(got, tok.word_slots(word))
        ids = batch.trigram_ids[batch.trigram_offsets[w] : batch.trigram_offsets[w + 1]]
        if whole:
            row = int(ids.item()) - WHOLE_WORD_BASE
            assert batch.whole_words[row] == word
            assert torch.equal(batch.whole_word_slots[row], got)
        else:
            assert (ids < WHOLE_WORD_BASE).all()
            assert torch.equal(tok.trigram_slots(ids).reshape(-1), got)


@given(st.text(alphabet=ALPHABET, max_size=60))
def test_decode_inverts_encode(text):
    if any(c in text for c in CONTROL_WORDS):
        return
    tok = TOKENIZERS["fast"]
    assert tok.decode(tok.encode(text).words) == text


def test_encode_of_a_str_and_of_empty_texts():
    tok = TOKENIZERS["fast"]
    one = tok.encode("Hallo Welt")
    assert one.words == ["Hallo", "Welt"] and one.word_offsets.tolist() == [0, 2]
    empty = tok.encode(["", "x", ""])
    assert empty.words == ["x"] and empty.word_offsets.tolist() == [0, 0, 1, 1]
    none = tok.encode([])
    assert none.n_words == 0 and none.offsets.tolist() == [0] and none.indices.numel() == 0
    assert none.word_offsets.tolist() == [0] and none.trigram_ids.numel() == 0
    assert tok.encode("").n_words == 0


def test_whole_words_in_a_batch_share_a_row():
    tok = TOKENIZERS["reference"]
    batch = tok.encode(["a<|endoftext|>b", "<|endoftext|>  c"])
    assert batch.whole_words == ["<|endoftext|>", "<|2<-ws->|>"]
    assert (batch.trigram_ids >= WHOLE_WORD_BASE).sum() == 3
    assert torch.equal(batch.whole_word_slots[0], tok.word_slots("<|endoftext|>"))


def test_empty_word_and_target_pattern():
    for tok in TOKENIZERS.values():
        assert tok.word_slots("").shape == (0,) and tok.target_pattern("").shape == (0,)
    tok = TrigramTokenizer(vocab_size=8, m=4, k_lower=0)  # small v: trigrams share slots
    slots = tok.word_slots("abcdefgh")
    pattern = tok.target_pattern("abcdefgh")
    assert pattern.tolist() == sorted(set(slots.tolist()))
    assert slots.numel() == 4 * 8 and pattern.numel() < slots.numel()


def test_modes_differ_but_agree_on_shapes():
    fast, ref = TOKENIZERS["fast"], TOKENIZERS["reference"]
    assert fast.word_slots("Hello").shape == ref.word_slots("Hello").shape == (50,)
    assert not torch.equal(fast.word_slots("Hello"), ref.word_slots("Hello"))
    assert torch.equal(fast.word_slots("<|endoftext|>"), ref.word_slots("<|endoftext|>"))


def test_trigram_slots_on_a_tensor():
    for tok in (TOKENIZERS["fast"], TOKENIZERS["reference"]):
        ids = torch.tensor([6637600, 7103816])
        out = tok.trigram_slots(ids)
        assert isinstance(out, torch.Tensor) and out.shape == (2, 10)
        assert out.tolist() == tok.trigram_slots(ids.numpy()).tolist()


def test_lowercase_option():
    tok = TrigramTokenizer(lowercase=True)
    assert tok.words("Hallo WELT") == ["hallo", "welt"]
    assert torch.equal(tok.word_slots("Haus"), TOKENIZERS["fast"].word_slots("haus"))
    assert tok.encode("ÄPFEL").words == ["äpfel"]


def test_bad_input():
    tok = TOKENIZERS["fast"]
    with pytest.raises(TypeError, match="texts"):
        tok.encode(5)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tok.encode(["a", b"b"])
    with pytest.raises(TypeError, match="word"):
        tok.word_slots(3)
    with pytest.raises(TypeError, match="text"):
        tok.words(None)
    with pytest.raises(ValueError, match=r"texts\[0\].*surrogate"):
        tok.encode(["bad \udc80 text"])
    with pytest.raises(ValueError, match="word.*surrogate"):
        tok.word_slots("\ud800")
    with pytest.raises(TypeError, match="words"):
        tok.decode("a string, not words")


# Words and texts written by hand from the splitting rules (`wordsplit`): one space between words
# is implicit; none before punctuation or a digit, so "ist 12" needs an explicit <|ws|>; two
# spaces merge into <|2<-ws->|>; `lowercase` lowercases before splitting.
@pytest.mark.parametrize("kwargs, text, words, decoded", [
    ({}, "The cat sat.", ["The", "cat", "sat", "."], "The cat sat."),
    ({}, "Hello,  world!", ["Hello", ",", "<|2<-ws->|>", "world", "!"], "Hello,  world!"),
    ({}, "Die Straße ist 12 km lang.",
     ["Die", "Straße", "ist", "<|ws|>", "1", "2", "km", "lang", "."],
     "Die Straße ist 12 km lang."),
    ({"lowercase": True}, "Grüße aus Köln!", ["grüße", "aus", "köln", "!"], "grüße aus köln!"),
])
def test_decode_accepts_what_encode_returns(kwargs, text, words, decoded):
    tok = TrigramTokenizer(**kwargs)
    batch = tok.encode(text)
    assert batch.words == words
    assert tok.decode(batch) == decoded


def test_decode_of_a_batch_of_texts_gives_one_text_each():
    tok = TOKENIZERS["fast"]
    assert tok.decode(tok.encode(["Guten Morgen.", "Good night!"])) == [
        "Guten Morgen.", "Good night!"]
    assert tok.decode(tok.encode_words(["Guten", "Tag"])) == "Guten Tag"
