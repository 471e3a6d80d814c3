"""Per-position key ranges of the sliding-window document mask, shared by the fast paths.

Query i attends exactly the keys ``[key_lo[i], i]``: ``key_lo[i] = max(doc_start(i), i -
window + 1)``. Key j is read by exactly the queries ``[j, query_hi[j])``: ``query_hi[j] =
min(doc_end(j), j + window)``. Both are non-decreasing in the position, so a block of
consecutive queries needs the keys ``[key_lo[first], last]`` and a block of keys the queries
``[first, query_hi[last])``: the kernels skip everything outside without a [T, T] mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import doc_ids


def bounds(doc_offsets: Tensor | None, t: int, window: int, device: torch.device
           ) -> tuple[Tensor, Tensor]:
    """``(key_lo [T], query_hi [T])`` int64 (see module doc)."""
    pos = torch.arange(t, device=device)
    if doc_offsets is None:
        start = torch.zeros_like(pos)
        end = torch.full_like(pos, t)
    else:
        offs = doc_offsets.to(torch.int64)
        doc = doc_ids(offs, t, device)
        start, end = offs[doc], offs[doc + 1]
    key_lo = torch.maximum(start, pos - (window - 1))
    query_hi = torch.minimum(end, pos + window)
    return key_lo, query_hi
