"""T-FREE trigrams and hash modes. The expected slots are computed here from the written
description (md5 rule, SplitMix64 rule, lowercase sharing), not by calling the module."""

import hashlib
import json
import os
import subprocess
import sys

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given

from aa_compile.models.tfree import hashing
from aa_compile.models.tfree.hashing import fast_slots, reference_slots, trigramify
from aa_compile.models.tfree.tokenizer import TrigramTokenizer

LOWER_PATTERN_BYTES = b"abcdefghijklmnopqrstuvwxyz "
M64 = (1 << 64) - 1


# ---- independent implementations of the description -----------------------------------------


def md5_mod(text: str, v: int) -> int:
    return int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16) % v


def tid(trigram: bytes) -> int:
    return trigram[0] + 256 * trigram[1] + 65536 * trigram[2]


def distinct_sorted(candidate, m):
    chosen = []
    for k in range(m):
        j = 0
        while candidate(k, j) in chosen:
            j += 1
        chosen.append(candidate(k, j))
    return sorted(chosen)


def md5_base(trigram: bytes, v: int, m: int) -> list[int]:
    i = tid(trigram)
    return distinct_sorted(lambda k, j: md5_mod(f"{i}_{k}_{j}", v), m)


def splitmix_base(trigram: bytes, v: int, m: int) -> list[int]:
    i = tid(trigram)

    def candidate(k, j):
        z = (i + (k << 24) + (j << 40) + 0x9E3779B97F4A7C15) & M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        z ^= z >> 31
        return (z >> 32) % v

    return distinct_sorted(candidate, m)


def shared(base, trigram: bytes, v: int, m: int, k: int) -> list[int]:
    own = base(trigram, v, m)
    low = trigram.lower()  # bytes.lower(): ASCII letters only
    if k and low != trigram and all(c in LOWER_PATTERN_BYTES for c in low):
        return own[: m - k] + base(low, v, m)[m - k :]
    return own


def byte_trigrams(word: str) -> list[bytes]:
    padded = (" " + word + " ").encode("utf-8")
    out = []
    for p in range(len(padded) - 2):
        if padded[p : p + 3] not in out:
            out.append(padded[p : p + 3])
    return out


def expected_word_slots(base, word: str, v: int, m: int, k: int) -> list[int]:
    if "<|" in word:
        return ([md5_mod(f"{word}_{i}", v) for i in range(m - k)]
                + [md5_mod(f"{word.lower()}_lower_{i}", v) for i in range(k)])
    return [s for t in byte_trigrams(word) for s in shared(base, t, v, m, k)]


WORDS = ["Hello", "hello", "HELLO", "world", "für", "Straße", "GmbH", "中文", "ÄÖÜ", "aBc",
         "1", ".", "<|endoftext|>", "<|ws|>", "x_Y"]
CONFIGS = [(32000, 10, 2), (32000, 4, 0), (8000, 10, 10), (12, 10, 2), (10, 10, 3)]


# ---- trigrams ---------------------------------------------------------------------------------


def test_trigrams_of_hello():
    assert set(trigramify("Hello")) == {b" He", b"Hel", b"ell", b"llo", b"lo "}
    assert hashing.trigram_ids("Hello")[0] == ord(" ") + 256 * ord("H") + 65536 * ord("e")
    assert hashing.trigram_ids("Hello") == tuple(map(tid, trigramify("Hello")))


def test_trigrams_are_a_set_of_utf8_bytes():
    assert trigramify("aaaa") == [b" aa", b"aaa", b"aa "]  # duplicates once, first-seen order
    assert trigramify("ü") == [b" \xc3\xbc", b"\xc3\xbc "]
    assert trigramify("") == []
    assert hashing.id_to_trigram(hashing.trigram_id(b"\x00\xff\x10")) == b"\x00\xff\x10"
    with pytest.raises(ValueError):  # a lone surrogate has no UTF-8 bytes
        trigramify("a\ud800")


@given(st.text(max_size=20))
def test_trigram_count_at_most_byte_length(word):
    n_bytes = len(word.encode("utf-8"))
    tris = trigramify(word)
    assert len(tris) <= n_bytes and len(set(tris)) == len(tris)
    assert set(tris) == set(byte_trigrams(word))
    assert all(0 <= i < 2**24 for i in hashing.trigram_ids(word))


# ---- slot rules, both modes, against the independent implementations ---------------------------


@pytest.mark.parametrize("v, m, k", CONFIGS)
def test_reference_mode_slots_of_words(v, m, k):
    tok = TrigramTokenizer(vocab_size=v, m=m, k_lower=k, hash_mode="reference")
    for word in WORDS:
        assert tok.word_slots(word).tolist() == expected_word_slots(md5_base, word, v, m, k), word


@pytest.mark.parametrize("v, m, k", CONFIGS)
def test_fast_mode_slots_of_words(v, m, k):
    tok = TrigramTokenizer(vocab_size=v, m=m, k_lower=k, hash_mode="fast")
    for word in WORDS:
        assert tok.word_slots(word).tolist() == expected_word_slots(splitmix_base, word, v, m,
                                                                    k), word


def test_reference_mode_known_value():
    """Pinned: md5("0_0_0") = 6fff48e8...59f4 read as one 128-bit integer, mod 32000, is 1012;
    with j = 0 there is no earlier slot to collide with, so it is a slot of trigram id 0."""
    assert int("6fff48e865c3fb473f40f1d2305559f4", 16) % 32000 == 1012
    assert 1012 in reference_slots(np.array([0]), 32000, 10, 0)[0].tolist()


@pytest.mark.parametrize("mode", ["fast", "reference"])
@pytest.mark.parametrize("variant, lower", [
    (b"Hel", b"hel"), (b"HEL", b"hel"), (b" He", b" he"), (b"lO ", b"lo "), (b"A B", b"a b")])
def test_lowercase_sharing(mode, variant, lower):
    """A case variant shares exactly its last k slots with the lowercase pattern; its other
    slots are the unshared ones."""
    m, k = 10, 2
    ids = np.array([tid(variant), tid(lower)])
    got = hashing.trigram_slots(ids, 32000, m, k, mode)
    unshared = hashing.trigram_slots(ids, 32000, m, 0, mode)
    assert got[0, m - k :].tolist() == got[1, m - k :].tolist()
    assert got[0, : m - k].tolist() == unshared[0, : m - k].tolist()
    assert got[1].tolist() == unshared[1].tolist()  # the pattern itself is unchanged
    assert got[0].tolist() != unshared[0].tolist()


@pytest.mark.parametrize("mode", ["fast", "reference"])
@pytest.mark.parametrize("trigram", [b"hel", b"   ", b"A1b", b"\xc3\x84b", b"_Ab", b"[b]"])
def test_no_sharing_outside_ascii_letter_patterns(mode, trigram):
    ids = np.array([tid(trigram)])
    assert (hashing.trigram_slots(ids, 32000, 10, 3, mode)
            == hashing.trigram_slots(ids, 32000, 10, 0, mode)).all()


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_whole_word_hashing_of_special_token(mode):
    tok = TrigramTokenizer(hash_mode=mode)  # v=32000, m=10, k=2
    want = ([md5_mod(f"<|endoftext|>_{i}", 32000) for i in range(8)]
            + [md5_mod(f"<|endoftext|>_lower_{i}", 32000) for i in range(2)])
    assert tok.word_slots("<|endoftext|>").tolist() == want
    entire = TrigramTokenizer(hash_mode=mode, entire_words=True, k_lower=3)
    want = ([md5_mod(f"Haus_{i}", 32000) for i in range(7)]
            + [md5_mod(f"haus_lower_{i}", 32000) for i in range(3)])
    assert entire.word_slots("Haus").tolist() == want


# ---- properties -------------------------------------------------------------------------------


@given(st.lists(st.integers(0, 2**24 - 1), min_size=1, max_size=200),
       st.sampled_from([(32000, 10), (1000, 7), (16, 16), (40, 39), (2, 1)]))
def test_fast_mode_m_distinct_sorted_slots(ids, vm):
    v, m = vm
    ids = np.array(ids)
    base = fast_slots(ids, v, m, 0)
    assert base.shape == (len(ids), m) and base.dtype == np.int64
    assert ((base >= 0) & (base < v)).all()
    assert (np.diff(base, axis=1) > 0).all()  # sorted, hence distinct
    shared_slots = fast_slots(ids, v, m, min(2, m))
    unaffected = hashing.lowercase_partner(ids) == ids
    assert (shared_slots[unaffected] == base[unaffected]).all()


def test_reference_mode_m_distinct_slots_under_collisions():
    ids = np.array([0, 1, 2**24 - 1, tid(b"ell")])
    for v, m in [(32000, 10), (12, 10), (10, 10)]:
        slots = reference_slots(ids, v, m, 0)
        assert all(len(set(row)) == m for row in slots.tolist())
    assert reference_slots(ids, 10, 10, 0).tolist() == [list(range(10))] * 4


def test_fast_slots_on_a_tensor_and_bad_ids():
    ids = torch.tensor([tid(b" He"), tid(b"Hel")])
    out = fast_slots(ids, 32000, 10, 2)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.int64 and out.shape == (2, 10)
    assert out.tolist() == fast_slots(ids.numpy(), 32000, 10, 2).tolist()
    assert fast_slots(np.zeros(0, dtype=np.int64), 32000, 10, 2).shape == (0, 10)
    with pytest.raises(ValueError, match="ids"):
        fast_slots(np.array([2**24]), 32000, 10, 2)
    with pytest.raises(ValueError, match="ids"):
        reference_slots(np.array([-1]), 32000, 10, 2)
    with pytest.raises(ValueError, match="hash_mode"):
        hashing.trigram_slots(np.array([1]), 32000, 10, 2, "md5")


_CHILD = """
import json
import numpy as np
from aa_compile.models.tfree import hashing
ids = np.array({ids})
print(json.dumps({{
    "fast": hashing.fast_slots(ids, 32000, 10, 2).tolist(),
    "reference": hashing.reference_slots(ids, 32000, 10, 2).tolist(),
    "whole": list(hashing.whole_word_slots("<|endoftext|>", 32000, 10, 2)),
}}))
"""


def test_slots_are_the_same_in_another_process():
    """No dependence on Python's salted hash() or on process state: a child process with a
    different hash seed computes the same slots."""
    ids = [tid(t) for w in ("Hello", "Über", "x") for t in byte_trigrams(w)]
    env = dict(os.environ, PYTHONHASHSEED="12345")
    code = _CHILD.format(ids=ids)
    proc = subprocess.run([sys.executable, "-c", code], env=env, check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    arr = np.array(ids)
    assert child["fast"] == fast_slots(arr, 32000, 10, 2).tolist()
    assert child["reference"] == reference_slots(arr, 32000, 10, 2).tolist()
    assert child["whole"] == list(hashing.whole_word_slots("<|endoftext|>", 32000, 10, 2))
