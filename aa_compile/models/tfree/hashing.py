"""T-FREE trigrams and the two trigram -> slot hash modes.

**Trigrams.** A word is padded to ``" " + word + " "``, UTF-8 encoded, and every byte trigram
is taken, each once (the reference uses a set). `trigramify` returns them in order of first
occurrence: the embedding sums over them, so the order only has to be deterministic. A word of
n bytes gives at most n trigrams; the empty word gives none (``"  "`` is two bytes, too short
for a trigram). Trigram id = ``b0 + 256*b1 + 65536*b2`` (b0 the first byte), so ids lie in
``[0, 2**24)``.

**Slots.** Each trigram id maps to ``m`` of the ``vocab_size`` (v) embedding rows ("slots").
A base rule gives ``m`` distinct slots, stored sorted ascending; then *partial lowercase
sharing* with ``k_lower`` (k): if a trigram is a case variant of a pattern over ``[a-z ]^3``
(its ASCII-lowercased bytes are in that set and differ from it, e.g. ``"Hel"`` of ``"hel"``),
its last k sorted slots are replaced by the pattern's last k sorted slots. After the
replacement a variant may hold one slot twice (the reference does the same; the embedding then
counts it twice). Non-ASCII letters are never shared.

Base rule of hash mode ``"reference"`` (the public T-FREE code, so its checkpoints'
vocabularies are reproduced): for k in 0..m-1, slot = ``int(md5(f"{i}_{k}_{j}").hexdigest(),
16) % v`` (md5 over the UTF-8 bytes of the decimal string, the hex digest read as one unsigned
128-bit integer) for the smallest j = 0, 1, ... whose value is not yet among this trigram's
slots. The reference precomputes this for all 2**24 ids (about 1.7e8 md5 calls); here it is
computed per trigram on demand and kept in an LRU cache (`reference_base_slots`), which is
deterministic across processes (no use of Python's salted ``hash``).

Base rule of hash mode ``"fast"`` (the default), cheap enough to recompute inside a GPU kernel
from the trigram id, with 64-bit unsigned integer operations only (all mod 2**64)::

    key(i, k, j) = i + (k << 24) + (j << 40)        # i < 2**24, k < 2**16, j < 2**24
    z = key + 0x9E3779B97F4A7C15                    # SplitMix64's output function
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    candidate(i, k, j) = (z >> 32) % v              # the high 32 bits, mod v

Slot k of trigram i is ``candidate(i, k, j)`` for the smallest j >= 0 not among slots 0..k-1,
then the m slots are sorted ascending and the lowercase sharing above is applied (a kernel
computes the pattern's slots too when the id is a case variant). The key packing is injective
for m <= 2**16, and needing j >= 2**24 would take a run of 2**24 collisions (for m = v = 2**16,
probability about e**-256). `fast_slots` evaluates this vectorized in numpy for many ids (and
accepts a torch tensor, returning ``[n, m]`` int64 on its device).

**Whole words.** Words containing ``<|`` (special tokens, whitespace words) and, with
``entire_words``, every word are hashed whole, in both modes, as the reference does:
``md5(f"{word}_{i}") % v`` for i < m-k, then ``md5(f"{word.lower()}_lower_{i}") % v`` for
i < k (same md5-to-int reading), not de-duplicated and not sorted: `whole_word_slots`.
"""

from __future__ import annotations

import functools
import hashlib
import sys

import numpy as np

#: Number of distinct byte trigrams; trigram ids lie in ``[0, TRIGRAM_COUNT)``.
TRIGRAM_COUNT = 1 << 24
HASH_MODES = ("fast", "reference")
#: Largest m the fast mode's key packing admits.
FAST_MAX_M = 1 << 16

_U = np.uint64
_GOLDEN = _U(0x9E3779B97F4A7C15)
_MIX1 = _U(0xBF58476D1CE4E5B9)
_MIX2 = _U(0x94D049BB133111EB)


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
# lowercase sharing


def lowercase_partner(ids: np.ndarray) -> np.ndarray:
    """Per id: the id of its ``[a-z ]^3`` lowercase pattern if it is a case variant of one,
    else the id itself (so ``partner != ids`` marks the variants)."""
    ids = np.asarray(ids, dtype=np.int64)
    lowered = np.zeros_like(ids)
    allowed = np.ones(ids.shape, dtype=bool)
    for shift in (0, 8, 16):
        b = (ids >> shift) & 255
        low = b + 32 * ((b >= 65) & (b <= 90))
        allowed &= ((low >= 97) & (low <= 122)) | (low == 32)
        lowered |= low << shift
    return np.where(allowed, lowered, ids)


def _share_lowercase(base_fn, ids: np.ndarray, m: int, k_lower: int) -> np.ndarray:
    """``base_fn(unique ids) -> [u, m]`` sorted base slots, then the lowercase sharing."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    n = ids.shape[0]
    if k_lower == 0:
        uniq, inv = np.unique(ids, return_inverse=True)
        return base_fn(uniq)[inv.reshape(-1)]
    partner = lowercase_partner(ids)
    variant = partner != ids
    uniq, inv = np.unique(np.concatenate([ids, partner[variant]]), return_inverse=True)
    base = base_fn(uniq)[inv.reshape(-1)]
    out = base[:n]
    out[variant, m - k_lower :] = base[n:, m - k_lower :]
    return out


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
    ids = _check_ids(ids)

    def base(uniq: np.ndarray) -> np.ndarray:
        rows = [reference_base_slots(i, vocab_size, m) for i in uniq.tolist()]
        return np.array(rows, dtype=np.int64).reshape(len(rows), m)

    return _share_lowercase(base, ids, m, k_lower)


def whole_word_slots(word: str, vocab_size: int, m: int, k_lower: int) -> tuple[int, ...]:
    """The m slots of a word hashed whole (both modes; see the module docstring)."""
    own = [md5_int(f"{word}_{i}") % vocab_size for i in range(m - k_lower)]
    lower = word.lower()
    return tuple(own + [md5_int(f"{lower}_lower_{i}") % vocab_size for i in range(k_lower)])


# ---------------------------------------------------------------------------------------------
# fast mode (SplitMix64)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output for state ``x`` (uint64 array), arithmetic mod 2**64."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> _U(30))) * _MIX1
    z = (z ^ (z >> _U(27))) * _MIX2
    return z ^ (z >> _U(31))


def fast_candidates(ids: np.ndarray, k: int, j: np.ndarray, vocab_size: int) -> np.ndarray:
    """``candidate(i, k, j)`` of the fast mode for arrays of ids and j (int64 result)."""
    key = (np.asarray(ids, dtype=np.uint64) | _U(k << 24)
           | (np.asarray(j, dtype=np.uint64) << _U(40)))
    return ((splitmix64(key) >> _U(32)) % _U(vocab_size)).astype(np.int64)


def fast_base_slots(ids: np.ndarray, vocab_size: int, m: int) -> np.ndarray:
    """``[n, m]`` distinct sorted fast-mode slots of ``ids`` before sharing (vectorized over
    ids; the collision retries loop only over the rows that collided)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    out = np.empty((ids.shape[0], m), dtype=np.int64)
    zeros = np.zeros(ids.shape[0], dtype=np.int64)
    for k in range(m):
        cand = fast_candidates(ids, k, zeros, vocab_size)
        rows = np.nonzero((out[:, :k] == cand[:, None]).any(axis=1))[0]
        j = 0
        while rows.size:
            j += 1
            cand[rows] = fast_candidates(ids[rows], k, np.full(rows.size, j), vocab_size)
            rows = rows[(out[rows, :k] == cand[rows, None]).any(axis=1)]
        out[:, k] = cand
    out.sort(axis=1)
    return out


def fast_slots(ids, vocab_size: int, m: int, k_lower: int):
    """``[n, m]`` int64 fast-mode slots (with lowercase sharing) of trigram ids ``ids``.

    ``ids``: a 1-D integer numpy array / sequence (returns numpy) or torch tensor (returns a
    tensor on the same device, computed on the CPU).
    """
    torch = sys.modules.get("torch")  # not imported here: this module needs only numpy
    if torch is not None and isinstance(ids, torch.Tensor):
        device = ids.device
        out = fast_slots(ids.detach().cpu().numpy(), vocab_size, m, k_lower)
        return torch.from_numpy(out).to(device)
    if m > FAST_MAX_M:
        raise ValueError(f"m must be <= {FAST_MAX_M} in the fast hash mode, got {m}")
    ids = _check_ids(ids)
    return _share_lowercase(lambda u: fast_base_slots(u, vocab_size, m), ids, m, k_lower)


def trigram_slots(ids, vocab_size: int, m: int, k_lower: int, hash_mode: str) -> np.ndarray:
    """``[n, m]`` slots of trigram ids under ``hash_mode`` (``"fast"`` or ``"reference"``)."""
    if hash_mode == "fast":
        return fast_slots(ids, vocab_size, m, k_lower)
    if hash_mode == "reference":
        return reference_slots(ids, vocab_size, m, k_lower)
    raise ValueError(f"hash_mode must be one of {HASH_MODES}, got {hash_mode!r}")


def _check_ids(ids) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ids must be a 1-D integer array, got shape {arr.shape} "
                         f"dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.min() < 0 or arr.max() >= TRIGRAM_COUNT:
        raise ValueError("ids must lie in [0, 2**24) (trigram ids)")
    return arr
