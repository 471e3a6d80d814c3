"""`TrigramTokenizer`: T-FREE text -> words -> byte trigrams -> hashed slots, batched as CSR.

A T-FREE model has no token vocabulary: each word is embedded as the sum of ``m`` embedding
rows ("slots") per trigram of the word (section 1.3 of ``shared/research/tfree_hat.md``), and
the head's target for a word is the set of those slots (section 1.4). This module turns text
into exactly those index lists. Splitting is `wordsplit`, trigrams and hashing `hashing`.

`TrigramTokenizer.encode` returns a `TrigramBatch` in the CSR layout an embedding bag takes:
``indices[offsets[w]:offsets[w + 1]]`` are the slots of word w, the concatenation over its
trigrams of each trigram's m slots (duplicates kept: the embedding counts a slot hit by two
trigrams twice). Every trigram contributes exactly m slots, so ``offsets == m *
trigram_offsets``. ``trigram_ids`` (with ``trigram_offsets``) carries the trigram ids instead,
for kernels that recompute the fast mode's slots from the id; a word hashed whole is one entry
``WHOLE_WORD_BASE + r`` there, whose m slots are row r of ``whole_word_slots`` (words listed in
``whole_words``, one row per distinct word of the batch).

Defined results: an empty text has zero words; ``word_slots("")`` and ``target_pattern("")``
are empty (the padded ``"  "`` is too short for a trigram, so the word is a zero vector, also
with ``entire_words``). Bad input: a non-``str`` text or word raises TypeError; a text that
is not encodable as UTF-8 (a lone surrogate) raises ValueError naming it.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import torch

from . import hashing
from .wordsplit import text_to_words, words_to_text

#: ``trigram_ids`` entries at or above this mark words hashed whole (row = id - base).
WHOLE_WORD_BASE = hashing.TRIGRAM_COUNT
#: Largest vocab_size: slots must fit int32 for the kernels.
MAX_VOCAB_SIZE = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class TrigramBatch:
    """Encoded texts in CSR form (all tensors int64 on the CPU); see the module docstring."""

    words: list[str]
    #: ``[n_texts + 1]``: text t's words are ``words[word_offsets[t]:word_offsets[t + 1]]``
    word_offsets: torch.Tensor
    #: ``[n_slots]``: the slots of all words, concatenated
    indices: torch.Tensor
    #: ``[n_words + 1]``: starts at 0, non-decreasing, ends at ``n_slots``
    offsets: torch.Tensor
    #: ``[n_trigrams]``: trigram ids (or ``WHOLE_WORD_BASE + row`` for whole-hashed words)
    trigram_ids: torch.Tensor
    #: ``[n_words + 1]``: CSR offsets into ``trigram_ids``
    trigram_offsets: torch.Tensor
    #: the distinct words hashed whole, and their ``[len(whole_words), m]`` slots
    whole_words: list[str]
    whole_word_slots: torch.Tensor

    @property
    def n_words(self) -> int:
        return len(self.words)

    @property
    def n_texts(self) -> int:
        return self.word_offsets.numel() - 1

    def text_words(self, t: int) -> list[str]:
        """The words of text ``t``."""
        return self.words[int(self.word_offsets[t]) : int(self.word_offsets[t + 1])]


class TrigramTokenizer:
    """T-FREE tokenizer. Defaults are the released 7B config (v=32000, m=10, k_lower=2).

    Args:
        vocab_size: number of embedding rows v (1 .. 2**31-1).
        m: slots per trigram (1 .. vocab_size; at most 2**16 in the fast mode).
        k_lower: slots a case variant shares with its lowercase trigram (0 .. m).
        hash_mode: ``"fast"`` (SplitMix64, recomputable in a kernel) or ``"reference"`` (the
            public code's md5 scheme, reproducing its checkpoints' slots). See `hashing`.
        entire_words: hash every word whole instead of by trigrams.
        lowercase: lowercase texts (and words given to `word_slots`) first; `decode` cannot
            restore the case.
    """

    def __init__(self, vocab_size: int = 32000, m: int = 10, k_lower: int = 2,
                 hash_mode: str = "fast", entire_words: bool = False, lowercase: bool = False):
        _check_int("vocab_size", vocab_size, 1, MAX_VOCAB_SIZE)
        _check_int("m", m, 1, vocab_size, hint="it cannot exceed vocab_size")
        _check_int("k_lower", k_lower, 0, m, hint="it cannot exceed m")
        if hash_mode not in hashing.HASH_MODES:
            raise ValueError(f"hash_mode must be one of {hashing.HASH_MODES}, got {hash_mode!r}")
        if hash_mode == "fast" and m > hashing.FAST_MAX_M:
            raise ValueError(f"m must be <= {hashing.FAST_MAX_M} with hash_mode='fast', got {m}; "
                             "use hash_mode='reference' for larger m")
        for name, flag in (("entire_words", entire_words), ("lowercase", lowercase)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        self.vocab_size = vocab_size
        self.m = m
        self.k_lower = k_lower
        self.hash_mode = hash_mode
        self.entire_words = entire_words
        self.lowercase = lowercase

    def __repr__(self) -> str:
        return (f"TrigramTokenizer(vocab_size={self.vocab_size}, m={self.m}, "
                f"k_lower={self.k_lower}, hash_mode={self.hash_mode!r}, "
                f"entire_words={self.entire_words}, lowercase={self.lowercase})")

    # -- words ------------------------------------------------------------------------------

    def words(self, text: str) -> list[str]:
        """The words of ``text`` (`wordsplit.text_to_words`, lowercased first if configured)."""
        _check_text(text, "text")
        return text_to_words(text.lower() if self.lowercase else text)

    def decode(self, words: list[str] | TrigramBatch) -> str | list[str]:
        """The text of ``words`` (`wordsplit.words_to_text`).

        ``words`` may also be what `encode` returns: a `TrigramBatch` of one text decodes to
        that text, one of several texts to the list of their texts. The text is rebuilt from
        the words (``decode(encode(s)) == s``, lowercased if configured, for every ``s`` free of
        the literal control words; see `wordsplit`).
        """
        if isinstance(words, TrigramBatch):
            texts = [words_to_text(words.text_words(t)) for t in range(words.n_texts)]
            return texts[0] if len(texts) == 1 else texts
        return words_to_text(words)

    def hashed_whole(self, word: str) -> bool:
        """Whether ``word`` is hashed whole (contains ``<|``, or ``entire_words``)."""
        return self.entire_words or "<|" in word

    # -- slots ------------------------------------------------------------------------------

    def trigram_slots(self, ids):
        """``[n, m]`` slots of trigram ids (numpy array in, numpy out; tensor in, tensor out)."""
        if isinstance(ids, torch.Tensor) and self.hash_mode == "reference":
            out = hashing.reference_slots(ids.detach().cpu().numpy(), self.vocab_size, self.m,
                                          self.k_lower)
            return torch.from_numpy(out).to(ids.device)
        return hashing.trigram_slots(ids, self.vocab_size, self.m, self.k_lower, self.hash_mode)

    def word_slots(self, word: str) -> torch.Tensor:
        """int64 slots of ``word``: each trigram's m slots, concatenated (duplicates kept)."""
        _check_text(word, "word")
        if self.lowercase:
            word = word.lower()
        if not word:
            return torch.zeros(0, dtype=torch.int64)
        if self.hashed_whole(word):
            slots = hashing.whole_word_slots(word, self.vocab_size, self.m, self.k_lower)
            return torch.tensor(slots, dtype=torch.int64)
        ids = np.array(hashing.trigram_ids(word), dtype=np.int64)
        return torch.from_numpy(self.trigram_slots(ids).reshape(-1))

    def target_pattern(self, word: str) -> torch.Tensor:
        """The sorted distinct slots of ``word``: its multi-hot target as the head sees it."""
        return torch.unique(self.word_slots(word))

    # -- batches ----------------------------------------------------------------------------

    def encode(self, texts: str | list[str]) -> TrigramBatch:
        """Split and hash one text or a list of texts into a `TrigramBatch`."""
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        words: list[str] = []
        word_offsets = [0]
        for t, text in enumerate(texts):
            _check_text(text, f"texts[{t}]")
            words.extend(text_to_words(text.lower() if self.lowercase else text))
            word_offsets.append(len(words))
        return self._encode(words, word_offsets)

    def encode_words(self, words: list[str]) -> TrigramBatch:
        """Hash already split ``words`` as given (no splitting; one text holding them all).

        For callers that pick words themselves, e.g. a decoder feeding back a generated word.
        Words are lowercased first if configured.
        """
        if not isinstance(words, (list, tuple)):
            raise TypeError(f"words must be a list of str, got {type(words).__name__}")
        for i, w in enumerate(words):
            _check_text(w, f"words[{i}]")
        words = [w.lower() for w in words] if self.lowercase else list(words)
        return self._encode(words, [0, len(words)])

    def _encode(self, words: list[str], word_offsets: list[int]) -> TrigramBatch:
        whole: dict[str, int] = {}
        if self.entire_words:
            per_word = [(WHOLE_WORD_BASE + whole.setdefault(w, len(whole)),) if w else ()
                        for w in words]
        else:
            ids_of = hashing.trigram_ids
            per_word = [(WHOLE_WORD_BASE + whole.setdefault(w, len(whole)),) if "<|" in w
                        else ids_of(w) for w in words]
        counts = np.fromiter(map(len, per_word), dtype=np.int64, count=len(per_word))
        trigram_offsets = np.zeros(len(words) + 1, dtype=np.int64)
        np.cumsum(counts, out=trigram_offsets[1:])
        n_trigrams = int(trigram_offsets[-1])
        ids = np.fromiter(itertools.chain.from_iterable(per_word), dtype=np.int64,
                          count=n_trigrams)

        whole_words = list(whole)
        whole_slots = np.array(
            [hashing.whole_word_slots(w, self.vocab_size, self.m, self.k_lower)
             for w in whole_words], dtype=np.int64).reshape(len(whole_words), self.m)
        slots = np.empty((n_trigrams, self.m), dtype=np.int64)
        is_trigram = ids < WHOLE_WORD_BASE
        slots[is_trigram] = self.trigram_slots(ids[is_trigram])
        if whole_words:
            slots[~is_trigram] = whole_slots[ids[~is_trigram] - WHOLE_WORD_BASE]

        return TrigramBatch(
            words=words,
            word_offsets=torch.tensor(word_offsets, dtype=torch.int64),
            indices=torch.from_numpy(slots.reshape(-1)),
            offsets=torch.from_numpy(trigram_offsets * self.m),
            trigram_ids=torch.from_numpy(ids),
            trigram_offsets=torch.from_numpy(trigram_offsets),
            whole_words=whole_words,
            whole_word_slots=torch.from_numpy(whole_slots),
        )


def _check_int(name: str, value, lo: int, hi: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        extra = f" ({hint})" if hint else ""
        raise ValueError(f"{name} must be in [{lo}, {hi}]{extra}, got {value}")


def _check_text(text, name: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{name} is not encodable as UTF-8: lone surrogate {text[err.start]!r} at index "
            f"{err.start}; T-FREE trigrams are UTF-8 bytes, so fix or drop it "
            "(e.g. text.encode('utf-8', 'replace').decode())"
        ) from None
