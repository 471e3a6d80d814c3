"""T-FREE word splitting: text <-> words, with whitespace made implicit.

T-FREE embeds *words*, not subword tokens, so the splitter decides what a word is. It follows
the public T-FREE reference (section 1.1 of ``shared/research/tfree_hat.md``):

1. Special tokens (matches of ``<\\|.*?\\|>``, e.g. ``<|endoftext|>``) are kept whole. ``.``
   does not match a newline, so a special token never spans one.
2. The rest is cut as ``re.split(r"(\\d|\\W|\\_)", ...)`` would cut it: every digit, every
   non-word character (punctuation, symbols, spaces, newlines, tabs) and ``_`` is a word of its
   own; maximal runs of the remaining Unicode word characters are words ("für" is one word).
   ``\\d`` is Unicode-aware, so "٣" is a digit word as well.
3. Spaces become implicit. Between two neighbouring non-space items L and R a single space is
   *expected* unless L is a special token, R is a special token, ``L[-1]`` is in
   `NO_WHITESPACE_AFTER`, ``R[0]`` is in `NO_WHITESPACE_BEFORE`, or the gap is at the start or
   end of the text. Per gap holding ``s`` spaces:

   - space expected, ``s == 1``: nothing is emitted (the common case between words);
   - space expected, ``s == 0``: `NO_WS` (``<|no_ws|>``);
   - otherwise (``s >= 2``, or no space expected): ``s`` times `WS` (``<|ws|>``).

   A newline becomes `NEWLINE` (``<|\\n|>``). Other whitespace (tab, ``\\r``, no-break space,
   ideographic space) is an ordinary one-character word.
4. Runs of `WS` (one gap) and runs of adjacent `NEWLINE` words are merged into "factorial"
   words: as many ``<|4<-ws->|>`` as fit, then ``<|2<-ws->|>`` if 2 or 3 remain, then a single
   ``<|ws|>`` if one remains (newlines alike: ``<|4<-\\n->|>``, ``<|2<-\\n->|>``, ``<|\\n|>``).
   So 7 spaces are ``[<|4<-ws->|>, <|2<-ws->|>, <|ws|>]``.

`words_to_text` inverts this: it expands the factorial words, puts one space between two
neighbouring words where a space is expected (same rule; ``<|...|>`` words count as special)
and maps `WS` to a space, `NO_WS` to nothing and `NEWLINE` to ``"\\n"``.

Choices where the notes are silent, and the guarantee:

- Leading and trailing spaces are representable (no space is expected at the text's ends, so
  they become explicit `WS` words); nothing is stripped.
- ``words_to_text(text_to_words(t)) == t`` holds for every ``str`` ``t`` that contains none of
  `CONTROL_WORDS` as a substring. A text that does contain one (e.g. the literal characters
  ``<|ws|>``) is split into that control word, which then decodes as the whitespace it stands
  for, so such a text does not round-trip. (The newline control words contain a newline, so a
  text can never produce them as special tokens.)
- `words_to_text` accepts any list of strings (e.g. words a model generated): only the exact
  control words listed in `CONTROL_WORDS` are interpreted; any other ``<|...|>`` word, e.g.
  ``<|6<-ws->|>``, is copied verbatim, and an empty word adds nothing.
- Merging: spaces merge only within one gap (between two non-space items), newlines merge when
  adjacent; ``"\\n \\n"`` stays ``[<|\\n|>, <|ws|>, <|\\n|>]``.
"""

from __future__ import annotations

import re
import string

NO_WHITESPACE_AFTER = "#$=-+*/'\"\\(<[]~^&@%_\n "
NO_WHITESPACE_BEFORE = ".,:;?!=-+*/'\"\\)>]~^&@%_\n " + string.digits

WS = "<|ws|>"
NO_WS = "<|no_ws|>"
NEWLINE = "<|\n|>"
WS_2 = "<|2<-ws->|>"
WS_4 = "<|4<-ws->|>"
NEWLINE_2 = "<|2<-\n->|>"
NEWLINE_4 = "<|4<-\n->|>"

#: The words the splitter emits for whitespace; `words_to_text` interprets exactly these.
CONTROL_WORDS = (WS, NO_WS, NEWLINE, WS_2, WS_4, NEWLINE_2, NEWLINE_4)

_SPECIAL = re.compile(r"(<\|.*?\|>)")
# Equivalent to re.split(r"(\d|\W|\_)") with empty strings dropped: a run of word characters
# that are neither digits nor "_", or any other single character (DOTALL: newlines too).
_PIECE = re.compile(r"[^\W\d_]+|.", re.DOTALL)
# word -> (unit word, count) for the merged whitespace words
_EXPAND = {
    WS: (WS, 1), WS_2: (WS, 2), WS_4: (WS, 4),
    NEWLINE: (NEWLINE, 1), NEWLINE_2: (NEWLINE, 2), NEWLINE_4: (NEWLINE, 4),
}
_MERGED = {WS: (WS_4, WS_2), NEWLINE: (NEWLINE_4, NEWLINE_2)}
_DECODED = {WS: " ", NO_WS: "", NEWLINE: "\n"}


def is_special(word: str) -> bool:
    """Whether ``word`` has special-token form ``<|...|>`` (no implicit space next to it)."""
    return len(word) >= 4 and word.startswith("<|") and word.endswith("|>")


def space_expected(left: str, right: str) -> bool:
    """Whether one space between the neighbouring items ``left`` and ``right`` is implicit.

    The same rule serves both directions: on text items (where a newline is ``"\\n"``, which
    is in both exception sets) and on words (where it is the special word `NEWLINE`).
    """
    return not (
        is_special(left)
        or is_special(right)
        or left[-1] in NO_WHITESPACE_AFTER
        or right[0] in NO_WHITESPACE_BEFORE
    )


def merge_run(unit: str, count: int) -> list[str]:
    """``count`` repetitions of ``unit`` (`WS` or `NEWLINE`) as factorial words."""
    four, two = _MERGED[unit]
    out = [four] * (count // 4)
    if count % 4 >= 2:
        out.append(two)
    if count % 2:
        out.append(unit)
    return out


_AFTER = frozenset(NO_WHITESPACE_AFTER)
_BEFORE = frozenset(NO_WHITESPACE_BEFORE)


def _emit_gap(out: list[str], expected: bool, spaces: int) -> None:
    if expected and spaces == 1:
        return
    if expected and spaces == 0:
        out.append(NO_WS)
    elif spaces:
        out.extend(merge_run(WS, spaces))


def text_to_words(text: str) -> list[str]:
    """Split ``text`` into T-FREE words (see the module docstring for the rules).

    ``"This is a <|test with some numbers 1234."`` gives ``[This, is, a, <, |, <|no_ws|>,
    test, with, some, numbers, <|ws|>, 1, 2, 3, 4, .]``; an empty text gives ``[]``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    words: list[str] = []
    # `space_expected` inlined (this loop is most of the encoding time): ``after_ok`` says
    # whether the previous non-space item admits an implicit space after it; False at the
    # start of the text and after a special token.
    after_ok = False
    spaces = 0
    for n, part in enumerate(_SPECIAL.split(text)):
        if n % 2:  # odd positions hold the special tokens (the capturing group)
            _emit_gap(words, False, spaces)
            words.append(part)
            after_ok, spaces = False, 0
            continue
        for item in _PIECE.findall(part):
            if item == " ":
                spaces += 1
                continue
            first = item[0]
            if spaces == 1 and after_ok and first not in _BEFORE:
                pass  # the common case: one implicit space between two words
            else:
                _emit_gap(words, after_ok and first not in _BEFORE, spaces)
            words.append(NEWLINE if item == "\n" else item)
            after_ok, spaces = item[-1] not in _AFTER, 0
    _emit_gap(words, False, spaces)
    return _merge_newlines(words)


def _merge_newlines(words: list[str]) -> list[str]:
    if NEWLINE not in words:
        return words
    out: list[str] = []
    run = 0
    for word in words:
        if word == NEWLINE:
            run += 1
            continue
        if run:
            out.extend(merge_run(NEWLINE, run))
            run = 0
        out.append(word)
    if run:
        out.extend(merge_run(NEWLINE, run))
    return out


def words_to_text(words: list[str]) -> str:
    """The text ``words`` stands for: the inverse of `text_to_words` (see its guarantee)."""
    if isinstance(words, str) or not hasattr(words, "__iter__"):
        raise TypeError(f"words must be a list of str, got {type(words).__name__}")
    out: list[str] = []
    prev: str | None = None
    for i, word in enumerate(words):
        if not isinstance(word, str):
            raise TypeError(f"words[{i}] must be a str, got {type(word).__name__}")
        if not word:
            continue  # the splitter never emits "", and it stands for no text
        unit, count = _EXPAND.get(word, (word, 1))
        for _ in range(count):
            # control words are special, so no implicit space is put next to them
            if prev is not None and space_expected(prev, unit):
                out.append(" ")
            out.append(_DECODED.get(unit, unit))
            prev = unit
    return "".join(out)
