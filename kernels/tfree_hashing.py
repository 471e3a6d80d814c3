"""The T-FREE slot hash shared by the model (`aa_compile.models.tfree.hashing`) and the
`aa::hashed_trigram_bag` kernels: the trigram id range, lowercase sharing and the ``"fast"``
hash mode, in numpy (stdlib and numpy only, so it loads without torch).

It lives in the kernels layer because both sides need the same constants and rule, and kernels
may not import models; the model re-exports it.

**Lowercase sharing** with ``k_lower`` (k): if a trigram is a case variant of a pattern over
``[a-z ]^3`` (its ASCII-lowercased bytes are in that set and differ from it, e.g. ``"Hel"`` of
``"hel"``), its last k sorted slots are replaced by the pattern's last k sorted slots. After the
replacement a variant may hold one slot twice (the reference does the same; the embedding then
counts it twice). Non-ASCII letters are never shared.

**Fast mode**, cheap enough to recompute inside a GPU kernel from the trigram id, with 64-bit
unsigned integer operations only (all mod 2**64)::

    key(i, k, j) = i + (k << 24) + (j << 40)        # i < 2**24, k < 2**16, j < 2**24
    z = key + 0x9E3779B97F4A7C15                    # SplitMix64's output function
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    candidate(i, k, j) = (z >> 32) % v              # the high 32 bits, mod v

Slot k of trigram i is ``candidate(i, k, j)`` for the smallest j >= 0 not among slots 0..k-1,
then the m slots are sorted ascending and the lowercase sharing is applied. The key packing is
injective for m <= 2**16, and needing j >= 2**24 would take a run of 2**24 collisions (for
m = v = 2**16, probability about e**-256). `fast_slots` evaluates this vectorized for many ids.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np

#: Number of distinct byte trigrams; trigram ids lie in ``[0, TRIGRAM_COUNT)``.
TRIGRAM_COUNT = 1 << 24
#: Largest m the fast mode's key packing admits.
FAST_MAX_M = 1 << 16
#: SplitMix64's constants (unsigned 64-bit): the increment and the two multipliers.
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB

_U = np.uint64


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


def share_lowercase(base_fn: Callable[[np.ndarray], np.ndarray], ids: np.ndarray, m: int,
                    k_lower: int) -> np.ndarray:
    """``base_fn(unique ids) -> [u, m]`` sorted base slots (of either hash mode), then the
    lowercase sharing: ``[n, m]`` int64."""
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


def check_ids(ids) -> np.ndarray:
    """``ids`` as a 1-D int64 array of trigram ids (``ValueError`` outside ``[0, 2**24)``)."""
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


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output for state ``x`` (uint64 array), arithmetic mod 2**64."""
    z = np.asarray(x, dtype=np.uint64) + _U(GOLDEN)
    z = (z ^ (z >> _U(30))) * _U(MIX1)
    z = (z ^ (z >> _U(27))) * _U(MIX2)
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
    ids = check_ids(ids)
    return share_lowercase(lambda u: fast_base_slots(u, vocab_size, m), ids, m, k_lower)
