"""T-FREE trigrams and the two trigram -> slot hash modes.

**Trigrams.** A word is padded to ``" " + word + " "``, UTF-8 encoded, and every byte trigram
is taken, each once (the reference uses a set). `trigramify` returns them in order of first
occurrence: the embedding sums over them, so the order only has to be deterministic. A word of
n bytes gives at most n trigrams; the empty word gives none (``"  "`` is two bytes, too short
for a trigram). Trigram id = ``b0 + 256*b1 + 65536*b2`` (b0 the first byte), so ids lie in
``[0, 2**24)``.

**Slots.** Each trigram id maps to ``m`` of the ``vocab_size`` (v) embedding rows ("slots").
A base rule gives ``m`` distinct slots, stored sorted ascending; then *partial lowercase
sharing* with ``k_lower`` replaces a case variant's last k slots by its lowercase pattern's.

Base rule of hash mode ``"reference"`` (the public T-FREE code, so its checkpoints'
vocabularies are reproduced): for k in 0..m-1, slot = ``int(md5(f"{i}_{k}_{j}").hexdigest(),
16) % v`` (md5 over the UTF-8 bytes of the decimal string, the hex digest read as one unsigned
128-bit integer) for the smallest j = 0, 1, ... whose value is not yet among this trigram's
slots. The reference precomputes this for all 2**24 ids (about 1.7e8 md5 calls); here it is
computed per trigram on demand and kept in an LRU cache (`reference_base_slots`), which is
deterministic across processes (no use of Python's salted ``hash``).

Hash mode ``"fast"`` (the default: SplitMix64, cheap enough to recompute inside a GPU kernel)
and the lowercase sharing rule are defined in `aa_compile.kernels.tfree_hashing`, which the
`aa::hashed_trigram_bag` kernels share; this module re-exports them (`fast_slots`,
`lowercase_partner`, ...).

**Whole words.** Words containing ``<|`` (special tokens, whitespace words) and, with
``entire_words``, every word are hashed whole, in both modes, as the reference does:
``md5(f"{word}_{i}") % v`` for i < m-k, then ``md5(f"{word.lower()}_lower_{i}") % v`` for
i < k (same md5-to-int reading), not de-duplicated and not sorted: `whole_word_slots`.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

from aa_compile.kernels.tfree_hashing import (
    FAST_MAX_M,
    TRIGRAM_COUNT,
    check_ids,
    fast_base_slots,
    fast_candidates,
    fast_slots,
    lowercase_partner,
    share_lowercase,
    splitmix64,
)

HASH_MODES = ("fast", "reference")

__all__ = [
    "FAST_MAX_M", "HASH_MODES", "TRIGRAM_COUNT", "fast_base_slots", "fast_candidates",
    "fast_slots", "id_to_trigram", "lowercase_partner", "md5_int", "reference_base_slots",
    "reference_slots", "splitmix64", "trigram_id", "trigram_ids", "trigram_slots",
    "trigramify", "whole_word_slots",
]


# ---------------------------------------------------------------------------------------------
# trigrams


def trigramify(word: str) -> list[bytes]:
    """The distinct byte trigrams of ``" " + word + " "`` (UTF-8), in order of first occurrence.

    ``"Hello"`` -> ``[b" He", b"Hel", b"ell", b"llo", b"lo "]``; ``""`` -> ``[]``.
    Raises ``UnicodeEncodeError`` (a ValueError) for a lone surrogate.
    """
    padded = f" {word} ".encode()
    return list(dict.fromkeys(padded[i : i + 3] for i in range(len(padded) - 2)))


def trigram_id(trigram: bytes) -> int:
    """``b0 + 256*b1 + 65536*b2`` of a 3-byte trigram."""
    if len(trigram) != 3:
        raise ValueError(f"trigram must be 3 bytes, got {len(trigram)}")
    return trigram[0] | (trigram[1] << 8) | (trigram[2] << 16)


def id_to_trigram(i: int) -> bytes:
    """The trigram of id ``i`` (inverse of `trigram_id`)."""
    if not 0 <= i < TRIGRAM_COUNT:
        raise ValueError(f"trigram id must be in [0, 2**24), got {i}")
    return bytes((i & 255, (i >> 8) & 255, i >> 16))


@functools.lru_cache(maxsize=1 << 18)
def trigram_ids(word: str) -> tuple[int, ...]:
    """The ids of `trigramify` ``(word)``, same order (cached: text repeats words a lot)."""
    padded = f" {word} ".encode()
    ids = (padded[i] | (padded[i + 1] << 8) | (padded[i + 2] << 16)
           for i in range(len(padded) - 2))
    return tuple(dict.fromkeys(ids))


# ---------------------------------------------------------------------------------------------
# reference mode (md5)


def md5_int(text: str) -> int:
    """``int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16)``: an unsigned 128-bit int."""
    return int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16)


@functools.lru_cache(maxsize=1 << 18)
def reference_base_slots(i: int, vocab_size: int, m: int) -> tuple[int, ...]:
    """The reference mode's m distinct sorted slots of trigram id ``i``, before sharing."""
    chosen: list[int] = []
    for k in range(m):
        j = 0
        while (slot := md5_int(f"{i}_{k}_{j}") % vocab_size) in chosen:
            j += 1
        chosen.append(slot)
    return tuple(sorted(chosen))


def reference_slots(ids, vocab_size: int, m: int, k_lower: int) -> np.ndarray:
    """``[n, m]`` int64 reference-mode slots (with lowercase sharing) of trigram ids ``ids``."""
    ids = check_ids(ids)

    def base(uniq: np.ndarray) -> np.ndarray:
        rows = [reference_base_slots(i, vocab_size, m) for i in uniq.tolist()]
        return np.array(rows, dtype=np.int64).reshape(len(rows), m)

    return share_lowercase(base, ids, m, k_lower)


def whole_word_slots(word: str, vocab_size: int, m: int, k_lower: int) -> tuple[int, ...]:
    """The m slots of a word hashed whole (both modes; see the module docstring)."""
    own = [md5_int(f"{word}_{i}") % vocab_size for i in range(m - k_lower)]
    lower = word.lower()
    return tuple(own + [md5_int(f"{lower}_lower_{i}") % vocab_size for i in range(k_lower)])


def trigram_slots(ids, vocab_size: int, m: int, k_lower: int, hash_mode: str) -> np.ndarray:
    """``[n, m]`` slots of trigram ids under ``hash_mode`` (``"fast"`` or ``"reference"``)."""
    if hash_mode == "fast":
        return fast_slots(ids, vocab_size, m, k_lower)
    if hash_mode == "reference":
        return reference_slots(ids, vocab_size, m, k_lower)
    raise ValueError(f"hash_mode must be one of {HASH_MODES}, got {hash_mode!r}")
