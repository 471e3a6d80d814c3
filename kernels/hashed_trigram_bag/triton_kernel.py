"""Triton `aa::hashed_trigram_bag`, the CUDA path (numerics: :mod:`.reference`): the fast-mode
slots are computed inside the kernel from the trigram id, so only the ids (one int per trigram,
not m slots) are read from memory.

In-kernel hash (`_trigram_slots`, one trigram, ``BLOCK_M >= m`` lanes, lane k = slot k):

- SplitMix64 in ``tl.uint64`` (wrapping products, logical shifts) of the key ``i | k << 24 |
  j << 40``, ``candidate = (z >> 32) % v``, all m lanes at once with ``j = 0``;
- if two lanes are equal (rare: about ``m**2 / (2 v)`` of the trigrams), the defining loop
  reruns: for k = 0..m-1, retry ``j = 1, 2, ...`` until the candidate is new among slots 0..k-1
  (a ``while`` with a data-dependent trip count);
- the sort only decides which slots are the "last k_lower" of the lowercase sharing, i.e. the
  k_lower largest. A rank per lane (how many of the trigram's slots are smaller: the slots are
  distinct) replaces it: a case variant of an ``[a-z ]^3`` pattern keeps its own slots of rank
  ``< m - k_lower`` and takes the pattern's slots of rank ``>= m - k_lower`` (the pattern's
  slots are hashed only for variants, behind a scalar branch);
- ids ``>= 2**24`` read row ``id - 2**24`` of ``whole_word_slots`` instead.

Kernels:

- ``_hashed_bag_fwd_kernel``, one program per (word, ``BLOCK_H`` columns): walks the word's
  trigrams, computes each one's slots, gathers the ``[BLOCK_M, BLOCK_H]`` tile(s) of their
  weight rows (the pattern's tile under a mask that is all-false for non-variants: no loads),
  accumulates in float32 and stores its block of the output row once. The hash is recomputed
  per column block (tens of integer ops per slot against ``BLOCK_H`` loaded elements).
- ``_slots_kernel``, one program per trigram: writes its m slots in `tfree_hashing.fast_slots` order
  (sorted base slots, the last k_lower replaced by the pattern's), used by the backward and by
  the tests to check the in-kernel hash bit for bit.

Backward: ``dweight`` materializes the slots with ``_slots_kernel`` (``[n_trigrams, m]`` int64
in memory for the duration of the backward) and reuses `aa::trigram_bag`'s Triton ``dweight``
(deterministic sorted segments, or float atomics with ``deterministic=False``).

``m > MAX_FUSED_M`` (the rank is a ``[BLOCK_M, BLOCK_M]`` comparison) falls back to slots from
the torch hash (:mod:`.cpu`) and the `aa::trigram_bag` Triton forward. float64 is not handled
here (the op sends it to the CPU module's ATen path). Runs under ``TRITON_INTERPRET=1`` on CPU
tensors (the tests do that). Not yet run on a GPU: both kernels were only compiled for sm_90
(``triton.compile`` with Triton's bundled ptxas, also with v, m, k_lower == 1 specialized), and
their results checked in the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from aa_compile.kernels.trigram_bag import triton_kernel as bag_triton
from torch import Tensor

from . import cpu, reference

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: largest m hashed inside the kernels
MAX_FUSED_M = 64
WHOLE_WORD_BASE: tl.constexpr = tl.constexpr(reference.WHOLE_WORD_BASE)


@triton.jit
def _candidate(i, k, j, V):
    """``(splitmix64(i | k << 24 | j << 40) >> 32) % V`` with uint64 ``i, k, j`` (int64)."""
    z = (i | (k << 24) | (j << 40)) + 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    return ((z >> 32) % tl.cast(V, tl.uint64)).to(tl.int64)


@triton.jit
def _base_slots(i, V, M, BLOCK_M: tl.constexpr):
    """The m distinct base slots of trigram id ``i`` (int64 scalar) in lanes 0..m-1 (lane k =
    slot k, unsorted); lanes >= m hold -1."""
    lanes = tl.arange(0, BLOCK_M)
    valid = lanes < M
    iu = i.to(tl.uint64)
    zero = iu * 0
    slots = _candidate(iu, zero + lanes.to(tl.uint64), zero, V)
    slots = tl.where(valid, slots, -1)
    same = (slots[:, None] == slots[None, :]) & (lanes[None, :] < lanes[:, None]) & valid[:, None]
    n_same = tl.sum(tl.sum(same.to(tl.int32), axis=1), axis=0)
    if n_same > 0:  # a collision: the defining loop, with retries
        slots = tl.full([BLOCK_M], -1, tl.int64)
        for k in range(M):
            ku = zero + k
            j = zero
            cand = _candidate(iu, ku, j, V)
            hit = tl.sum((slots == cand).to(tl.int32), axis=0)
            while hit > 0:
                j = j + 1
                cand = _candidate(iu, ku, j, V)
                hit = tl.sum((slots == cand).to(tl.int32), axis=0)
            slots = tl.where(lanes == k, cand, slots)
    return slots


@triton.jit
def _trigram_slots(ids_ptr, t, wws_ptr, V, M, K_LOWER, BLOCK_M: tl.constexpr):
    """Slots of entry ``t`` of ``ids``: ``(own, keep, own_pos, pattern, take, pattern_pos)``.

    The trigram's slots are ``own[keep]`` and ``pattern[take]``; ``*_pos`` are their columns in
    `tfree_hashing.fast_slots` order (lane order for whole-word rows)."""
    lanes = tl.arange(0, BLOCK_M)
    valid = lanes < M
    tid = tl.load(ids_ptr + t).to(tl.int64)
    whole = tid >= WHOLE_WORD_BASE
    hid = tl.where(whole, 0, tid)
    own = _base_slots(hid, V, M, BLOCK_M)
    # rank of a lane: how many valid lanes hold a smaller slot (the slots are distinct)
    own_rank = tl.sum(((own[None, :] < own[:, None]) & valid[None, :]).to(tl.int32), axis=1)
    # the [a-z ]^3 pattern of a case variant (helpers are inlined: each call of a jitted
    # helper costs milliseconds in the interpreter)
    lowered = hid * 0
    allowed = lowered == 0
    for s in tl.static_range(3):
        b = (hid >> (8 * s)) & 255
        low = b + 32 * ((b >= 65) & (b <= 90)).to(tl.int64)
        allowed = allowed & (((low >= 97) & (low <= 122)) | (low == 32))
        lowered = lowered | (low << (8 * s))
    variant = allowed & (lowered != hid) & (K_LOWER > 0)
    pattern = own
    pattern_rank = own_rank
    if variant:
        pattern = _base_slots(lowered, V, M, BLOCK_M)
        pattern_rank = tl.sum(((pattern[None, :] < pattern[:, None]) & valid[None, :])
                              .to(tl.int32), axis=1)
    cut = M - K_LOWER
    # (tl.where, not `valid & scalar`: the interpreter rejects masks broadcast from 0-d)
    keep = tl.where(variant, valid & (own_rank < cut), valid)
    take = tl.where(variant, valid & (pattern_rank >= cut), False)
    row = tl.load(wws_ptr + (tid - WHOLE_WORD_BASE) * M + lanes, mask=tl.where(whole, valid, False),
                  other=0)
    own = tl.where(whole, row.to(tl.int64), own)
    own_pos = tl.where(whole, lanes, own_rank)
    return own, keep, own_pos, pattern, take, pattern_rank


@triton.jit
def _hashed_bag_fwd_kernel(
    weight_ptr,
    ids_ptr,
    toff_ptr,
    wws_ptr,
    out_ptr,
    H,
    V,
    M,
    K_LOWER,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``out[w, cols] = sum over w's trigrams t, over t's slots s of weight[s, cols]``."""
    w = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = cols < H
    start = tl.load(toff_ptr + w).to(tl.int64)
    end = tl.load(toff_ptr + w + 1).to(tl.int64)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for t in range(start, end):
        own, keep, _, pattern, take, _ = _trigram_slots(ids_ptr, t, wws_ptr, V, M, K_LOWER,
                                                        BLOCK_M)
        tile = tl.load(weight_ptr + own[:, None] * H + cols[None, :],
                       mask=keep[:, None] & hmask[None, :], other=0.0)
        acc += tl.sum(tile.to(tl.float32), axis=0)
        tile = tl.load(weight_ptr + pattern[:, None] * H + cols[None, :],
                       mask=take[:, None] & hmask[None, :], other=0.0)
        acc += tl.sum(tile.to(tl.float32), axis=0)
    tl.store(out_ptr + w * H + cols, acc.to(out_ptr.dtype.element_ty), mask=hmask)


@triton.jit
def _slots_kernel(ids_ptr, wws_ptr, out_ptr, V, M, K_LOWER, BLOCK_M: tl.constexpr):
    """``out[t, :m]`` = the slots of entry ``t`` in `tfree_hashing.fast_slots` order."""
    t = tl.program_id(0).to(tl.int64)
    own, keep, own_pos, pattern, take, pattern_pos = _trigram_slots(
        ids_ptr, t, wws_ptr, V, M, K_LOWER, BLOCK_M)
    tl.store(out_ptr + t * M + own_pos, own, mask=keep)
    tl.store(out_ptr + t * M + pattern_pos, pattern, mask=take)


def _check(weight, trigram_ids, trigram_offsets, m, k_lower, wws, op):
    reference.check_inputs(weight, trigram_ids, trigram_offsets, m, k_lower, wws,
                           check_values=False, op=op)
    if weight.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"{op}: weight: {weight.dtype} is not supported by the Triton hashed trigram-bag "
            "kernel; use the CPU module (aa_compile.kernels.hashed_trigram_bag.cpu)")


def _block_m(m: int) -> int:
    return max(triton.next_power_of_2(m), 2)


def trigram_slots(trigram_ids: Tensor, v: int, m: int, k_lower: int,
                  whole_word_slots: Tensor | None = None) -> Tensor:
    """``[n_trigrams, m]`` int64 slots (`tfree_hashing.fast_slots` order; whole-word rows as given),
    computed by ``_slots_kernel`` (input assumed valid)."""
    n = trigram_ids.numel()
    if m > MAX_FUSED_M:
        return cpu.materialize_slots(trigram_ids, v, m, k_lower, whole_word_slots)
    out = torch.empty(n, m, dtype=torch.int64, device=trigram_ids.device)
    if n == 0:
        return out
    ids = trigram_ids.contiguous()
    wws = ids if whole_word_slots is None else whole_word_slots.contiguous()  # unread if None
    _slots_kernel[(n,)](ids, wws, out, v, m, k_lower, BLOCK_M=_block_m(m), num_warps=1)
    return out


def hashed_trigram_bag_fwd(
    weight: Tensor, trigram_ids: Tensor, trigram_offsets: Tensor, m: int, k_lower: int,
    whole_word_slots: Tensor | None = None,
) -> Tensor:
    """Forward ``[n_words, h]`` in ``weight.dtype``. Values (id range, offsets, whole-word
    slots) are not checked here: the op does that."""
    _check(weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots,
           "hashed_trigram_bag_fwd")
    v, h = weight.shape
    n_words = trigram_offsets.numel() - 1
    if m > MAX_FUSED_M:
        slots = cpu.materialize_slots(trigram_ids, v, m, k_lower, whole_word_slots)
        return bag_triton.trigram_bag_fwd(weight, slots.reshape(-1),
                                          trigram_offsets.long() * m)
    out = torch.empty(n_words, h, dtype=weight.dtype, device=weight.device)
    if n_words == 0 or h == 0:
        return out
    ids = trigram_ids.contiguous()
    wws = ids if whole_word_slots is None else whole_word_slots.contiguous()  # unread if None
    block_h = bag_triton.column_block(h)
    _hashed_bag_fwd_kernel[(n_words, triton.cdiv(h, block_h))](
        weight.contiguous(), ids, trigram_offsets.contiguous(), wws, out, h, v, m, k_lower,
        BLOCK_M=_block_m(m), BLOCK_H=block_h, num_warps=bag_triton.warps_for(block_h),
    )
    return out


def hashed_trigram_bag_bwd(
    grad: Tensor, weight: Tensor, trigram_ids: Tensor, trigram_offsets: Tensor, m: int,
    k_lower: int, whole_word_slots: Tensor | None = None, deterministic: bool = True,
) -> Tensor:
    """``dweight [v, h]`` in ``weight.dtype``: slots by ``_slots_kernel``, then
    `aa::trigram_bag`'s Triton ``dweight`` (sorted segments, or atomics when not
    ``deterministic``)."""
    _check(weight, trigram_ids, trigram_offsets, m, k_lower, whole_word_slots,
           "hashed_trigram_bag_bwd")
    n_words, h = trigram_offsets.numel() - 1, weight.shape[1]
    if tuple(grad.shape) != (n_words, h):
        raise ValueError(f"hashed_trigram_bag_bwd: grad must have shape ({n_words}, {h}), got "
                         f"{tuple(grad.shape)}")
    slots = trigram_slots(trigram_ids, weight.shape[0], m, k_lower, whole_word_slots)
    return bag_triton.weight_grad(grad, weight, slots.reshape(-1), trigram_offsets.long() * m,
                                  None, deterministic)
