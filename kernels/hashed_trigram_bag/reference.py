"""Plain-PyTorch `aa::hashed_trigram_bag`: the numerics the kernels are tested against, and the
definition of valid input (`check_inputs`).

Semantics, for ``weight [v, h]``, ``trigram_ids [n_trigrams]``, CSR ``trigram_offsets
[n_words + 1]``, ``m``, ``k_lower`` and optional ``whole_word_slots [n_whole, m]``::

    slots(t) = tfree_hashing.fast_slots([t], v, m, k_lower)[0] if t < WHOLE_WORD_BASE (2**24)
             = whole_word_slots[t - WHOLE_WORD_BASE]           otherwise
    out[w]   = sum_{t in trigram_ids[trigram_offsets[w]:trigram_offsets[w + 1]]}
                   sum_{s in slots(t)} weight[s]                                    # [n_words, h]

i.e. ``aa::trigram_bag(weight, slots.flatten(), m * trigram_offsets)``: exactly what
``TrigramTokenizer(vocab_size=v, m=m, k_lower=k_lower, hash_mode="fast")`` hands over as
``TrigramBatch.indices`` / ``offsets`` (a slot listed twice counts twice; an empty word is a
zero row). Precision as `aa::trigram_bag`: float32 accumulation (float64 for float64 weights),
one rounding to ``weight.dtype``. ``dweight[s] = sum over the occurrences of s in word w's slot
list of grad[w]``; ids, offsets and whole-word slots get no gradient.

This module materializes the slots with the spec's own numpy hash
(`aa_compile.kernels.tfree_hashing.fast_slots`) and runs the `aa::trigram_bag` reference
(gather + ``index_add_``), so it shares no hashing code (only the spec's constants) with the
kernels it checks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from aa_compile.kernels import tfree_hashing
from aa_compile.kernels.trigram_bag import reference as bag_reference

#: ``trigram_ids`` at or above this are rows of ``whole_word_slots``.
WHOLE_WORD_BASE = tfree_hashing.TRIGRAM_COUNT
#: largest ``m`` of the fast hash mode (its key packing)
FAST_MAX_M = tfree_hashing.FAST_MAX_M

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX = (torch.int32, torch.int64)


def check_inputs(
    weight: Tensor,
    trigram_ids: Tensor,
    trigram_offsets: Tensor,
    m: int,
    k_lower: int,
    whole_word_slots: Tensor | None,
    *,
    check_values: bool = True,
    op: str = "aa::hashed_trigram_bag",
) -> None:
    """Raise ``ValueError`` naming the argument when the input is not valid.

    Dtypes, shapes, devices, ``m`` and ``k_lower`` are always checked; ``check_values`` also
    reads the ids (``[0, 2**24)`` or whole-word rows), the offsets (CSR) and the whole-word
    slots (``[0, v)``) -- a device sync off the CPU.
    """
    if not isinstance(weight, Tensor) or weight.dtype not in _FLOAT:
        raise ValueError(f"{op}: weight must be a float16/bfloat16/float32/float64 tensor, "
                         f"got {getattr(weight, 'dtype', type(weight))}")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [v, h], got shape {tuple(weight.shape)}")
    v = weight.shape[0]
    if not 1 <= m <= min(v, FAST_MAX_M):
        why = (f"it cannot exceed v = weight.shape[0] = {v} (a trigram's m slots are distinct)"
               if m > v and m <= FAST_MAX_M else f"the fast hash mode admits m <= {FAST_MAX_M}")
        raise ValueError(f"{op}: m must be in [1, min(v, 2**16)] ({why}), got m = {m}")
    if not 0 <= k_lower <= m:
        raise ValueError(f"{op}: k_lower must be in [0, m] = [0, {m}], got {k_lower}")
    if not isinstance(trigram_ids, Tensor) or trigram_ids.dtype not in _INDEX:
        raise ValueError(f"{op}: trigram_ids must be an int64 or int32 tensor, got "
                         f"{getattr(trigram_ids, 'dtype', type(trigram_ids))}")
    if trigram_ids.dim() != 1:
        raise ValueError(f"{op}: trigram_ids must be 1-D [n_trigrams], got shape "
                         f"{tuple(trigram_ids.shape)}")
    if not isinstance(trigram_offsets, Tensor) or trigram_offsets.dtype not in _INDEX:
        raise ValueError(f"{op}: trigram_offsets must be an int64 or int32 tensor, got "
                         f"{getattr(trigram_offsets, 'dtype', type(trigram_offsets))}")
    if trigram_offsets.dim() != 1 or trigram_offsets.numel() == 0:
        raise ValueError(
            f"{op}: trigram_offsets must be 1-D [n_words + 1] with at least one element (CSR: "
            f"offsets[0] == 0, offsets[-1] == n_trigrams), got shape "
            f"{tuple(trigram_offsets.shape)}")
    named = [("trigram_ids", trigram_ids), ("trigram_offsets", trigram_offsets)]
    n_whole = 0
    if whole_word_slots is not None:
        wws = whole_word_slots
        if not isinstance(wws, Tensor) or wws.dtype not in _INDEX:
            raise ValueError(f"{op}: whole_word_slots must be an int64 or int32 tensor, got "
                             f"{getattr(wws, 'dtype', type(wws))}")
        if wws.dim() != 2 or wws.shape[1] != m:
            raise ValueError(f"{op}: whole_word_slots must be 2-D [n_whole, m] with m = {m} "
                             f"columns, got shape {tuple(wws.shape)}")
        named.append(("whole_word_slots", wws))
        n_whole = wws.shape[0]
    for name, t in named:
        if t.device != weight.device:
            raise ValueError(f"{op}: {name} is on {t.device}, but weight is on {weight.device}")
    if not check_values:
        return
    vals = _value_stats(trigram_ids.detach(), trigram_offsets.detach(),
                        whole_word_slots.detach() if n_whole and m else None)
    first, last, decreasing = vals[:3]
    if trigram_ids.numel():
        lo, hi = vals[3:5]
        limit = WHOLE_WORD_BASE + n_whole
        if lo < 0 or hi >= limit:
            bad = lo if lo < 0 else hi
            whole = (f" or [2**24, 2**24 + {n_whole}) (rows of whole_word_slots)" if n_whole
                     else " (pass whole_word_slots for ids >= 2**24: words hashed whole)")
            raise ValueError(f"{op}: trigram_ids must lie in [0, 2**24) (byte trigrams){whole}, "
                             f"found {bad}")
    if first != 0:
        raise ValueError(f"{op}: trigram_offsets must start at 0, got {first}")
    if decreasing:
        raise ValueError(f"{op}: trigram_offsets must be non-decreasing (CSR word boundaries)")
    if last != trigram_ids.shape[0]:
        raise ValueError(f"{op}: trigram_offsets must end at n_trigrams == trigram_ids.numel() "
                         f"== {trigram_ids.shape[0]}, got {last}")
    if n_whole and m:
        lo, hi = vals[-2:]
        if lo < 0 or hi >= v:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{op}: whole_word_slots must lie in [0, {v}) (weight has {v} "
                             f"rows), found {bad}")


def _value_stats(ids: Tensor, offs: Tensor, wws: Tensor | None) -> list[int]:
    """``[offs[0], offs[-1], any decrease, (min id, max id), (min slot, max slot)]`` in one
    host read (numpy on the CPU: no dispatcher round trips for these small reductions)."""
    if offs.device.type == "cpu":
        o = offs.numpy()
        vals = [int(o[0]), int(o[-1]), int((o[1:] < o[:-1]).any())]
        for t in (ids, wws):
            if t is not None and t.numel():
                a = t.numpy()
                vals += [int(a.min()), int(a.max())]
        return vals
    stats = [offs[0], offs[-1], (offs[1:] < offs[:-1]).any()]
    for t in (ids, wws):
        if t is not None and t.numel():
            stats += list(torch.aminmax(t))
    return torch.stack([s.long() for s in stats]).tolist()  # one device sync


def slots(trigram_ids: Tensor, v: int, m: int, k_lower: int,
          whole_word_slots: Tensor | None = None) -> Tensor:
    """``[n_trigrams, m]`` int64 slots on the CPU, by `tfree_hashing.fast_slots` (numpy)."""
    ids = trigram_ids.detach().cpu().long().numpy()
    out = np.zeros((ids.shape[0], m), dtype=np.int64)
    hashed = ids < WHOLE_WORD_BASE
    if hashed.any():
        out[hashed] = tfree_hashing.fast_slots(ids[hashed], v, m, k_lower)
    if (~hashed).any():
        rows = whole_word_slots.detach().cpu().long().numpy()
        out[~hashed] = rows[ids[~hashed] - WHOLE_WORD_BASE]
    return torch.from_numpy(out)


def hashed_trigram_bag(weight: Tensor, trigram_ids: Tensor, trigram_offsets: Tensor, m: int,
                       k_lower: int, whole_word_slots: Tensor | None = None) -> Tensor:
    """Forward ``[n_words, h]`` in ``weight.dtype`` (see the module doc)."""
    s = slots(trigram_ids, weight.shape[0], m, k_lower, whole_word_slots).to(weight.device)
    return bag_reference.trigram_bag(weight, s.reshape(-1), trigram_offsets.long() * m)


def hashed_trigram_bag_backward(grad: Tensor, weight: Tensor, trigram_ids: Tensor,
                                trigram_offsets: Tensor, m: int, k_lower: int,
                                whole_word_slots: Tensor | None = None) -> Tensor:
    """``dweight [v, h]`` in ``weight.dtype``."""
    s = slots(trigram_ids, weight.shape[0], m, k_lower, whole_word_slots).to(weight.device)
    return bag_reference.trigram_bag_backward(grad, weight, s.reshape(-1),
                                              trigram_offsets.long() * m)[0]
