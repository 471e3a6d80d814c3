"""CPU path of `aa::hashed_trigram_bag`: the fast-mode slots computed with vectorized torch
integer ops, then the `aa::trigram_bag` CPU kernels on the materialized slots (numerics:
:mod:`aa_compile.kernels.hashed_trigram_bag.reference`).

`fast_slots` is bit-identical to `aa_compile.kernels.tfree_hashing.fast_slots` (property-tested
against it). torch has no unsigned 64-bit shifts or products on CPU, so SplitMix64 runs on
int64 (the same bits mod 2**64; a logical right shift is the arithmetic one masked). All ``m``
first candidates are computed at once and sorted; only rows with a repeat (about ``m**2 / (2 v)``
of them) rerun the defining loop with retries. `materialize_slots` hashes each distinct id once
(text repeats trigrams a lot). Every torch op here exists on every device, so this module also
serves CUDA float64 and CUDA without Triton. Design: ``docs/tfree.md``; measurements:
``docs/performance.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from aa_compile.kernels.tfree_hashing import GOLDEN, MIX1, MIX2, TRIGRAM_COUNT
from aa_compile.kernels.trigram_bag import cpu as bag_cpu

#: ``trigram_ids`` at or above this are rows of ``whole_word_slots`` (== tokenizer.WHOLE_WORD_BASE)
WHOLE_WORD_BASE = TRIGRAM_COUNT


def _signed(x: int) -> int:
    """The int64 with the same 64 bits as the unsigned ``x``."""
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _signed(GOLDEN)
_MIX1 = _signed(MIX1)
_MIX2 = _signed(MIX2)


def _xor_lshr(z: Tensor, s: int) -> Tensor:
    """``z ^ (z >>> s)`` (logical shift) on int64 holding uint64 bits, in place."""
    return z.bitwise_xor_(z.bitwise_right_shift(s).bitwise_and_((1 << (64 - s)) - 1))


def splitmix64(key: Tensor) -> Tensor:
    """SplitMix64's output for int64 ``key`` (uint64 bits); returns a new int64 tensor."""
    z = key + _GOLDEN
    _xor_lshr(z, 30).mul_(_MIX1)
    _xor_lshr(z, 27).mul_(_MIX2)
    return _xor_lshr(z, 31)


def candidates(ids: Tensor, k, j, v: int) -> Tensor:
    """``candidate(i, k, j) = (splitmix64(i | k << 24 | j << 40) >>> 32) % v`` (int64).

    ``ids``, ``k`` and ``j`` broadcast (tensors or ints; ``0 <= k < 2**16``, ``0 <= j < 2**23``).
    """
    key = ids.long() | (k << 24) | (j << 40)
    z = splitmix64(key)
    return z.bitwise_right_shift_(32).bitwise_and_(0xFFFFFFFF).remainder_(v)


def _retry_rows(ids: Tensor, v: int, m: int) -> Tensor:
    """``[r, m]`` distinct base slots of ``ids`` by the defining rule: slot k is candidate
    ``(i, k, j)`` for the smallest j not among slots 0..k-1 (vectorized over the rows; the
    retries loop over the rows that collided). Unsorted."""
    out = torch.empty(ids.shape[0], m, dtype=torch.int64, device=ids.device)
    for k in range(m):
        cand = candidates(ids, k, 0, v)
        rows = torch.nonzero((out[:, :k] == cand[:, None]).any(1)).flatten()
        j = 0
        while rows.numel():
            j += 1
            cand[rows] = candidates(ids[rows], k, j, v)
            rows = rows[(out[rows, :k] == cand[rows, None]).any(1)]
        out[:, k] = cand
    return out


_M64 = (1 << 64) - 1


def _candidate_int(i: int, k: int, j: int, v: int) -> int:
    """``candidate(i, k, j)`` in Python integers (the retry path of a few rows)."""
    z = ((i | k << 24 | j << 40) + GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * MIX1) & _M64
    z = ((z ^ (z >> 27)) * MIX2) & _M64
    return ((z ^ (z >> 31)) >> 32) % v


def _retry_rows_scalar(ids: Tensor, first: Tensor, v: int) -> Tensor:
    """`_retry_rows` for a few rows in Python integers; ``first`` are the rows' ``j = 0``
    candidates ``[r, m]``. Each torch op costs microseconds of dispatch, so for the handful
    of colliding rows of a T-FREE batch a Python loop is several times faster."""
    rows = []
    for i, cands in zip(ids.tolist(), first.tolist()):
        chosen: list[int] = []
        for k, c in enumerate(cands):
            j = 0
            while c in chosen:
                j += 1
                c = _candidate_int(i, k, j, v)
            chosen.append(c)
        rows.append(chosen)
    return torch.tensor(rows, dtype=torch.int64, device=ids.device)


#: default of `materialize_slots`'s ``unique``: hash each distinct id once
UNIQUE = True

#: colliding rows up to this many take the Python-integer retry path
SCALAR_RETRY_ROWS = 256


def fast_base_slots(ids: Tensor, v: int, m: int) -> Tensor:
    """``[n, m]`` distinct sorted fast-mode slots of trigram ids ``ids`` (before sharing)."""
    ids = ids.reshape(-1).long()
    ks = torch.arange(m, dtype=torch.int64, device=ids.device)
    first = candidates(ids[:, None], ks[None, :], 0, v)
    slots = first.sort(dim=1).values
    if m > 1:
        dup = (slots[:, 1:] == slots[:, :-1]).any(1)
        rows = torch.nonzero(dup).flatten()
        if 0 < rows.numel() <= SCALAR_RETRY_ROWS:
            slots[rows] = _retry_rows_scalar(ids[rows], first[rows], v).sort(dim=1).values
        elif rows.numel():
            slots[rows] = _retry_rows(ids[rows], v, m).sort(dim=1).values
    return slots


def lowercase_partner(ids: Tensor) -> Tensor:
    """Per id: its ``[a-z ]^3`` lowercase pattern if it is a case variant of one, else itself
    (`tfree_hashing.lowercase_partner` in torch)."""
    ids = ids.long()
    lowered = torch.zeros_like(ids)
    allowed = torch.ones_like(ids, dtype=torch.bool)
    for shift in (0, 8, 16):
        b = (ids >> shift) & 255
        low = b + 32 * ((b >= 65) & (b <= 90))
        allowed &= ((low >= 97) & (low <= 122)) | (low == 32)
        lowered |= low << shift
    return torch.where(allowed, lowered, ids)


def fast_slots(ids: Tensor, v: int, m: int, k_lower: int) -> Tensor:
    """``[n, m]`` int64 fast-mode slots with lowercase sharing, on ``ids``' device:
    bit-identical to `tfree_hashing.fast_slots` (ids must lie in ``[0, 2**24)``)."""
    ids = ids.reshape(-1).long()
    out = fast_base_slots(ids, v, m)
    if k_lower == 0 or ids.numel() == 0:
        return out
    partner = lowercase_partner(ids)
    variant = torch.nonzero(partner != ids).flatten()
    if variant.numel():
        shared = fast_base_slots(partner.index_select(0, variant), v, m)
        out[variant, m - k_lower:] = shared[:, m - k_lower:]
    return out


def materialize_slots(
    trigram_ids: Tensor, v: int, m: int, k_lower: int, whole_word_slots: Tensor | None,
    unique: bool = UNIQUE,
) -> Tensor:
    """``[n_trigrams, m]`` int64 slots of every entry of ``trigram_ids``: hashed ids below
    ``WHOLE_WORD_BASE``, rows of ``whole_word_slots`` at and above it (input assumed valid).
    ``unique``: hash each distinct id once and gather the rows back."""
    ids = trigram_ids.reshape(-1).long()
    if unique and ids.numel():
        uniq, inv = torch.unique(ids, return_inverse=True)
        rows = materialize_slots(uniq, v, m, k_lower, whole_word_slots, unique=False)
        return rows.index_select(0, inv)
    if whole_word_slots is None or whole_word_slots.shape[0] == 0:
        return fast_slots(ids, v, m, k_lower)
    whole = torch.nonzero(ids >= WHOLE_WORD_BASE).flatten()
    if whole.numel() == 0:
        return fast_slots(ids, v, m, k_lower)
    out = fast_slots(ids.clamp(max=WHOLE_WORD_BASE - 1), v, m, k_lower)
    rows = ids.index_select(0, whole) - WHOLE_WORD_BASE
    out[whole] = whole_word_slots.index_select(0, rows).long()
    return out


def _slot_offsets(trigram_offsets: Tensor, m: int) -> Tensor:
    return trigram_offsets.long() * m


def hashed_trigram_bag_fwd(
    weight: Tensor, trigram_ids: Tensor, trigram_offsets: Tensor, m: int, k_lower: int,
    whole_word_slots: Tensor | None = None,
) -> Tensor:
    """Forward ``[n_words, h]`` in ``weight.dtype`` (input assumed valid)."""
    slots = materialize_slots(trigram_ids, weight.shape[0], m, k_lower, whole_word_slots)
    return bag_cpu.trigram_bag_fwd(weight, slots.reshape(-1),
                                   _slot_offsets(trigram_offsets, m))


def hashed_trigram_bag_bwd(
    grad: Tensor, weight: Tensor, trigram_ids: Tensor, trigram_offsets: Tensor, m: int,
    k_lower: int, whole_word_slots: Tensor | None = None,
) -> Tensor:
    """``dweight [v, h]`` in ``weight.dtype``: the slots are recomputed (not saved by the
    forward) and reduced by the deterministic sorted-segment kernel of `aa::trigram_bag`."""
    slots = materialize_slots(trigram_ids, weight.shape[0], m, k_lower, whole_word_slots)
    return bag_cpu.weight_grad(grad, weight, slots.reshape(-1),
                               _slot_offsets(trigram_offsets, m), None)
