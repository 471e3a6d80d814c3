"""HATByteSplitter and ByteBatch: round trips, byte limits, agreement with hat_splitter itself,
special tokens, CSR invariants, the generation word-end rule, bad input."""

import hypothesis.strategies as st
import pytest
import torch
from hat_splitter import HATSplitter
from hypothesis import given

from aa_compile.models.hat import IGNORE, ByteBatch, HATByteSplitter

EOT = "<|eot_id|>"
SPLITTER = HATByteSplitter()
SMALL = HATByteSplitter(max_word_bytes=6)
RAW = HATSplitter()
# mixed scripts, combining marks, emoji (4 bytes), punctuation, whitespace, control chars
ALPHABET = ("abcXYZ äöüßÄ ñé е мир 中文 مرحبا ﷺ 😀👍🏽 \u0301 0129 .,;!?-'\"()_#$€ \n\t\r\x00"
            "\u200b\u00a0")
texts = st.text(alphabet=ALPHABET, max_size=60) | st.text(max_size=30).filter(
    lambda t: not any(0xD800 <= ord(c) < 0xE000 for c in t))
with_specials = st.lists(st.one_of(texts, st.just(EOT)), max_size=5).map("".join)


@given(text=with_specials)
def test_round_trip_and_byte_limit(text):
    for splitter in (SPLITTER, SMALL):
        words = splitter.words(text)
        assert all(isinstance(w, bytes) and 1 <= len(w) <= splitter.max_word_bytes
                   for w in words)
        assert splitter.decode(b"".join(words)) == text
        assert b"".join(words) == text.encode("utf-8").replace(EOT.encode(), b"\xc0")


@given(text=texts)
def test_words_are_hat_splitters_own_output(text):
    for splitter in (SPLITTER, SMALL):
        want = RAW.split_with_limit(text, splitter.max_word_bytes)
        assert splitter.words(text) == want
    # below the limit, the chunking changes nothing: the words are HATSplitter.split's
    plain = [w.encode("utf-8") for w in RAW.split(text)]
    if all(len(w) <= SPLITTER.max_word_bytes for w in plain):
        assert SPLITTER.words(text) == plain


@given(text=with_specials)
def test_special_tokens_are_one_byte_words_and_cut_first(text):
    words = SPLITTER.words(text)
    assert words.count(b"\xc0") == text.count(EOT)
    expected = []
    for i, part in enumerate(text.split(EOT)):
        if i:
            expected.append(b"\xc0")
        expected += RAW.split_with_limit(part, 100) if part else []
    assert words == expected


@given(docs=st.lists(with_specials, max_size=4))
def test_encode_csr_invariants(docs):
    batch = SMALL.encode(docs)
    assert batch.n_docs == len(docs)
    for t in (batch.bytes, batch.word_offsets, batch.doc_offsets, batch.targets):
        assert t.dtype == torch.int64
    assert batch.word_offsets[0] == 0 and batch.word_offsets[-1] == batch.n_bytes
    assert (batch.word_offsets.diff() > 0).all()
    assert batch.doc_offsets[0] == 0 and batch.doc_offsets[-1] == batch.n_words
    assert batch.words() == [w for d in docs for w in SMALL.words(d)]
    starts = batch.doc_byte_offsets()
    for d, text in enumerate(docs):
        assert SMALL.decode(batch.doc_bytes(d)) == text
        a, b = int(starts[d]), int(starts[d + 1])
        assert batch.byte_pos[a:b].tolist() == list(range(b - a))
        assert (batch.byte_doc[a:b] == d).all()
        if b > a:  # the last byte of a document predicts nothing
            assert batch.targets[b - 1] == IGNORE
            assert batch.targets[a:b - 1].tolist() == batch.bytes[a + 1:b].tolist()
    for w in range(batch.n_words):
        a, b = batch.word_offsets[w : w + 2].tolist()
        assert (batch.byte_word[a:b] == w).all()
        row = batch.word_bytes[w][batch.word_mask[w]]
        assert row.tolist() == list(range(a, b))
        d = int(batch.word_doc[w])
        assert batch.word_pos[w] == w - batch.doc_offsets[d]
        assert batch.doc_words[d, batch.word_pos[w]] == w
    assert (batch.doc_word_mask.sum(1) == batch.doc_offsets.diff()).all()


def test_defined_results_for_empty_and_whitespace():
    assert SPLITTER.words("") == []
    batch = SPLITTER.encode("")
    assert batch.n_bytes == 0 and batch.n_words == 0 and batch.doc_offsets.tolist() == [0, 0]
    assert SPLITTER.words("   ") == [b"   "]
    assert b"".join(SPLITTER.words(" \n\t  \n")) == b" \n\t  \n"
    assert SPLITTER.words("Hello, world!") == [b"Hello,", b" world!"]
    mixed = "Hello мир 世界 مرحبا 😀!"
    assert SPLITTER.decode(b"".join(SPLITTER.words(mixed))) == mixed


def test_long_word_is_cut_into_chunks_at_utf8_boundaries():
    word = "Donaudampfschifffahrtsgesellschaftskapitän" * 3 + "😀" * 30
    for limit in (4, 5, 7, 100):
        chunks = HATByteSplitter(max_word_bytes=limit).words(word)
        assert len(chunks) >= len(word.encode()) // limit
        assert all(len(c) <= limit for c in chunks)
        assert "".join(c.decode("utf-8") for c in chunks) == word  # every chunk decodes


def test_decode_defined_behaviour_for_invalid_utf8():
    assert SPLITTER.decode(b"ab\xc0cd") == f"ab{EOT}cd"
    assert SPLITTER.decode(b"\xff\xe4") == "\ufffd\ufffd"
    assert SPLITTER.decode(torch.tensor([72, 105, 192])) == f"Hi{EOT}"
    custom = HATByteSplitter(special_tokens={"<s>": 0xF5, "</s>": 0xF6})
    assert custom.words("<s>hi</s>") == [b"\xf5", b"hi", b"\xf6"]
    assert custom.decode(b"\xf5hi\xf6\xc0") == "<s>hi</s>\ufffd"
    assert HATByteSplitter(special_tokens={}).words(EOT) == [w.encode() for w in RAW.split(EOT)]


@given(text=texts)
def test_append_byte_rebuilds_the_words_of_ascii_and_mostly_any_text(text):
    """Feeding the bytes one at a time through the word-end rule keeps every byte and the byte
    limit, and gives the splitter's own words for ASCII text. (Elsewhere re-splitting only the
    last word can differ from splitting the whole text where UAX #29 looks further back: a
    combining mark or emoji modifier right after a word boundary, e.g. "_\u0301X".)"""
    words: list[bytes] = []
    for byte in text.encode("utf-8"):
        pieces = SPLITTER.append_byte(words[-1] if words else b"", byte)
        words[-1:] = pieces  # on an empty list this appends
    assert b"".join(words) == text.encode("utf-8")
    assert all(len(w) <= SPLITTER.max_word_bytes for w in words)
    if text.isascii():
        assert words == SPLITTER.words(text)


def test_append_byte_rule():
    ab = SPLITTER.append_byte
    assert ab(b"Hello", ord(",")) == [b"Hello,"]
    assert ab(b"Hello", ord(" ")) == [b"Hello", b" "]
    assert ab(b" ", ord("w")) == [b" w"]
    assert ab(b"Hello", 0xC3) == [b"Hello\xc3"]  # unfinished character: the word goes on
    assert ab(b"Hello\xe4\xb8", 0xAD) == [b"Hello", "中".encode()]  # the boundary moves back
    assert ab(b"Hello", 192) == [b"Hello", b"\xc0"]  # EOS / special: a word of its own
    assert ab(b"\xc0", ord("a")) == [b"\xc0", b"a"]
    assert ab(b"", ord("a")) == [b"a"]
    small = HATByteSplitter(max_word_bytes=4)
    assert small.append_byte(b"abcd", ord("e")) == [b"abcd", b"e"]
    assert small.append_byte(b"abc\xf0", 0x9F) == [b"abc", b"\xf0\x9f"]
    with pytest.raises(ValueError, match="byte"):
        ab(b"a", 256)


@pytest.mark.parametrize("bad", [None, b"bytes", 3, ["list"]])
def test_non_str_text_raises_type_error(bad):
    with pytest.raises(TypeError, match="str"):
        SPLITTER.words(bad)
    if not isinstance(bad, list):
        with pytest.raises(TypeError):
            SPLITTER.encode(bad)


def test_bad_text_and_arguments_raise_value_error():
    with pytest.raises(ValueError, match="surrogate"):
        SPLITTER.words("a\ud800b")
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        SPLITTER.encode(["ok", "a\udfffb"])
    with pytest.raises(ValueError, match="max_word_bytes"):
        HATByteSplitter(max_word_bytes=3)
    with pytest.raises(ValueError, match="valid UTF-8"):
        HATByteSplitter(special_tokens={"<a>": 65})
    with pytest.raises(ValueError, match="distinct"):
        HATByteSplitter(special_tokens={"<a>": 0xF5, "<b>": 0xF5})
    with pytest.raises(ValueError, match="non-empty"):
        HATByteSplitter(special_tokens={"": 0xF5})


@pytest.mark.parametrize("args, match", [
    ((torch.tensor([1, 2]), torch.tensor([0, 1])), "end at len"),
    ((torch.tensor([1, 2]), torch.tensor([0, 0, 2])), "strictly increasing"),
    ((torch.tensor([1, 300]), torch.tensor([0, 2])), "0..255"),
    ((torch.tensor([1, 2]), torch.tensor([0, 2]), torch.tensor([0, 2])), "word count"),
    ((torch.tensor([1, 2]), torch.tensor([0, 1, 2]), torch.tensor([0, 2, 1, 2])),
     "non-decreasing"),
    ((torch.tensor([[1, 2]]), torch.tensor([0, 2])), "1-D"),
])
def test_byte_batch_rejects_bad_offsets(args, match):
    with pytest.raises(ValueError, match=match):
        ByteBatch.from_offsets(*args)


def test_splitter_pickles():
    import pickle

    copy = pickle.loads(pickle.dumps(SMALL))
    assert copy.words("Hello, wörld!") == SMALL.words("Hello, wörld!")
    assert copy.max_word_bytes == 6


def test_byte_batch_type_errors():
    with pytest.raises(TypeError, match="integer tensor"):
        ByteBatch.from_offsets(torch.tensor([1.0]), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="list of documents"):
        ByteBatch.from_words(b"abc")
    with pytest.raises(ValueError, match="non-empty bytes"):
        ByteBatch.from_words([[b"a", b""]])
