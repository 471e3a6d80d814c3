"""T-FREE word splitting: the reference's example, the whitespace rules, and the round trip."""

import hypothesis.strategies as st
import pytest
from hypothesis import assume, given

from aa_compile.models.tfree.wordsplit import (
    CONTROL_WORDS,
    NEWLINE,
    NEWLINE_2,
    NEWLINE_4,
    NO_WS,
    WS,
    WS_2,
    WS_4,
    text_to_words,
    words_to_text,
)

#: letters (ASCII, umlauts, CJK), digits (ASCII and Arabic-Indic), punctuation incl. the
#: characters of special tokens, spaces, newlines, a tab and a no-break space
ALPHABET = "abcXYZwsäöüÄÖÜß中文字" + "0129٣" + ".,:;?!=-+*/'\"\\()<>[]|~^&@%_#$" + "  \n\t\u00a0"


def test_reference_example():
    assert text_to_words("This is a <|test with some numbers 1234.") == [
        "This", "is", "a", "<", "|", NO_WS, "test", "with", "some", "numbers", WS,
        "1", "2", "3", "4", ".",
    ]


@pytest.mark.parametrize("text, words", [
    ("", []),
    ("Hello world", ["Hello", "world"]),
    ("für Straße", ["für", "Straße"]),                       # Unicode word runs stay whole
    ("a_b", ["a", "_", "b"]),                                # "_" is a word, no space around it
    ("a(b)", ["a", NO_WS, "(", "b", ")"]),
    ("x = 1", ["x", WS, "=", WS, "1"]),                      # "=" takes no implicit space
    ("12 34", ["1", "2", WS, "3", "4"]),                     # no space expected before a digit
    ("a1", ["a", "1"]),
    ("1a", ["1", NO_WS, "a"]),
    ("٣a", ["٣", NO_WS, "a"]),                               # a non-ASCII digit is a word too
    ("a\tb", ["a", NO_WS, "\t", NO_WS, "b"]),                # a tab is an ordinary word
    (" a", [WS, "a"]),                                       # no space expected at the ends
    ("a ", ["a", WS]),
    ("a  b", ["a", WS_2, "b"]),                              # 2+ spaces: all explicit
    ("a   b", ["a", WS_2, WS, "b"]),
    ("a" + " " * 11 + "b", ["a", WS_4, WS_4, WS_2, WS, "b"]),
    ("a\nb", ["a", NEWLINE, "b"]),
    ("a\n\n\nb", ["a", NEWLINE_2, NEWLINE, "b"]),
    ("\n" * 9, [NEWLINE_4, NEWLINE_4, NEWLINE]),
    ("a \n b", ["a", WS, NEWLINE, WS, "b"]),
    ("\n \n", [NEWLINE, WS, NEWLINE]),                       # a space splits a newline run
    ("<|endoftext|>Hi", ["<|endoftext|>", "Hi"]),            # no space around special tokens
    ("Hi <|endoftext|> there", ["Hi", WS, "<|endoftext|>", WS, "there"]),
    ("<|a|><|b|>", ["<|a|>", "<|b|>"]),
    ("<|a\nb|>", ["<", "|", NO_WS, "a", NEWLINE, "b", NO_WS, "|", ">"]),  # not special: "\n"
])
def test_split_examples(text, words):
    assert text_to_words(text) == words
    assert words_to_text(words) == text


@given(st.text(alphabet=ALPHABET, max_size=80))
def test_round_trip(text):
    """The documented guarantee: exact round trip for text without literal control words."""
    assume(not any(c in text for c in CONTROL_WORDS))
    words = text_to_words(text)
    assert words_to_text(words) == text
    assert "" not in words


@st.composite
def whitespace_heavy(draw):
    """Words joined by long runs of spaces and newlines (exercises the factorial merging)."""
    parts = draw(st.lists(st.sampled_from(["a", "Zß", "1", ".", "(", "<|eot|>", "中"]),
                          min_size=0, max_size=6))
    seps = draw(st.lists(st.tuples(st.sampled_from(" \n"), st.integers(0, 13)),
                         min_size=len(parts) + 1, max_size=len(parts) + 1))
    text = "".join(c * n for c, n in seps[:1])
    for part, (c, n) in zip(parts, seps[1:]):
        text += part + c * n
    return text


@given(whitespace_heavy())
def test_round_trip_whitespace_runs(text):
    words = text_to_words(text)
    assert words_to_text(words) == text
    # a merged word holds at most 4 and each run is 4s, then at most one 2, then at most one 1
    sizes = {WS: 1, WS_2: 2, WS_4: 4, NEWLINE: 1, NEWLINE_2: 2, NEWLINE_4: 4}
    for i in range(1, len(words)):
        a, b = words[i - 1], words[i]
        if a in sizes and b in sizes and (a in (WS, WS_2, WS_4)) == (b in (WS, WS_2, WS_4)):
            assert sizes[a] > sizes[b] or sizes[a] == sizes[b] == 4, words


def test_literal_control_word_in_text_is_read_as_whitespace():
    """The documented limit of the round trip: control words in the input text."""
    assert text_to_words("a<|ws|>b") == ["a", WS, "b"]
    assert words_to_text(text_to_words("a<|ws|>b")) == "a b"


def test_decode_of_arbitrary_word_lists():
    assert words_to_text(["a", "b", "<|6<-ws->|>", "c"]) == "a b<|6<-ws->|>c"
    assert words_to_text(["a", "", "b"]) == "a b"
    assert words_to_text([NO_WS, WS_4, NEWLINE_2]) == "    \n\n"
    assert words_to_text(()) == ""


def test_bad_input():
    with pytest.raises(TypeError, match="text"):
        text_to_words(b"bytes")
    with pytest.raises(TypeError, match="words"):
        words_to_text("not a list")
    with pytest.raises(TypeError, match=r"words\[1\]"):
        words_to_text(["a", 3])
