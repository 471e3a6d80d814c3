"""Dense masked attention: the numerics spec every `aa::window_attention` kernel is tested
against, and the definition of valid input (`check_inputs`).

Semantics, for ``q [..., Hq, T, D]``, ``k``/``v [..., Hkv, T, D]`` (``Hq % Hkv == 0``: query head
``h`` reads key/value head ``h // (Hq // Hkv)``), CSR document boundaries ``doc_offsets
[n_docs + 1]`` along T (shared by every leading row; None = one document) and ``window >= 1``::

    allowed[i, j] = doc(i) == doc(j) and 0 <= i - j < window
    lse[i] = logsumexp_j(scale * q[i] . k[j] over allowed j)       # float32 (float64 for float64)
    out[i] = sum_j exp(scale * q[i] . k[j] - lse[i]) * v[j]          # q.dtype

``window`` counts the query's own position (Mistral / Hugging Face ``sliding_window``;
flash-attn ``window_size=(window - 1, 0)``), so every query sees at least itself and no row is
empty. ``window >= T`` is causal attention per document. ``scale`` defaults to ``1 / sqrt(D)``.

This module builds the ``[T, T]`` mask and the full score matrix: O(T^2), for tests only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX = (torch.int32, torch.int64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax dtype: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    doc_offsets: Tensor | None,
    window: int,
    scale: float | None,
    *,
    check_values: bool = True,
    op: str = "aa::window_attention",
) -> None:
    """Raise ``ValueError`` naming the argument when the input is not valid (see module doc).

    Metadata is always checked; ``check_values`` also reads ``doc_offsets`` (a device sync off
    the CPU): starts at 0, non-decreasing, ends at T.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dtype not in _FLOAT:
            raise ValueError(f"{op}: {name} must be a float16/bfloat16/float32/float64 tensor, "
                             f"got {getattr(t, 'dtype', type(t))}")
        if t.dim() < 3:
            raise ValueError(f"{op}: {name} must be [..., H, T, D] (at least 3-D), got shape "
                             f"{tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{op}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device}, but q is on {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[:-3] != q.shape[:-3] or k.shape[-2:] != q.shape[-2:]:
        raise ValueError(f"{op}: k must be [..., Hkv, T, D] with q's leading dims, T and D "
                         f"(q {tuple(q.shape)}), got {tuple(k.shape)}")
    hq, hkv = q.shape[-3], k.shape[-3]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"{op}: q's head count {hq} must be a multiple of k's head count {hkv} "
                         "(grouped-query attention), with at least one key head")
    if q.shape[-1] == 0:
        raise ValueError(f"{op}: q must have a non-empty head dimension D, got {tuple(q.shape)}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{op}: window must be an int >= 1 (keys a query sees, itself "
                         f"included), got {window!r}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite float or None, got {scale!r}")
    if doc_offsets is None:
        return
    if not isinstance(doc_offsets, Tensor) or doc_offsets.dtype not in _INDEX:
        raise ValueError(f"{op}: doc_offsets must be an int64 (or int32) tensor or None, got "
                         f"{getattr(doc_offsets, 'dtype', type(doc_offsets))}")
    if doc_offsets.dim() != 1 or doc_offsets.numel() == 0:
        raise ValueError(f"{op}: doc_offsets must be 1-D [n_docs + 1] (CSR: 0, ..., T), got "
                         f"shape {tuple(doc_offsets.shape)}")
    if doc_offsets.device != q.device:
        raise ValueError(f"{op}: doc_offsets is on {doc_offsets.device}, but q is on {q.device}")
    if check_values:
        t = q.shape[-2]
        first, last = int(doc_offsets[0]), int(doc_offsets[-1])
        if first != 0 or last != t:
            raise ValueError(f"{op}: doc_offsets must start at 0 and end at T={t}, got "
                             f"{first} ... {last}")
        if doc_offsets.numel() > 1 and bool((doc_offsets.diff() < 0).any()):
            raise ValueError(f"{op}: doc_offsets must be non-decreasing")


def doc_ids(doc_offsets: Tensor | None, t: int, device: torch.device) -> Tensor:
    """``[T]`` int64: the document of every position (empty documents own none)."""
    pos = torch.arange(t, device=device)
    if doc_offsets is None:
        return torch.zeros(t, dtype=torch.int64, device=device)
    offsets = doc_offsets.to(torch.int64).contiguous()  # (searchsorted copies a strided one)
    return torch.searchsorted(offsets, pos, right=True) - 1


def mask(doc_offsets: Tensor | None, t: int, window: int, device: torch.device) -> Tensor:
    """``[T, T]`` bool, True where query i may attend key j."""
    doc = doc_ids(doc_offsets, t, device)
    pos = torch.arange(t, device=device)
    dist = pos[:, None] - pos[None, :]
    return (doc[:, None] == doc[None, :]) & (dist >= 0) & (dist < window)


def window_attention(
    q: Tensor, k: Tensor, v: Tensor, doc_offsets: Tensor | None, window: int,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """``(out [..., Hq, T, D] in q.dtype, lse [..., Hq, T] float32/float64)``; differentiable."""
    check_inputs(q, k, v, doc_offsets, window, scale, op="reference")
    cdt = compute_dtype(q.dtype)
    group = q.shape[-3] // k.shape[-3]
    kk = k.to(cdt).repeat_interleave(group, dim=-3)
    vv = v.to(cdt).repeat_interleave(group, dim=-3)
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = (q.to(cdt) @ kk.transpose(-1, -2)) * s
    allowed = mask(doc_offsets, q.shape[-2], window, q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse.unsqueeze(-1)) @ vv
    return out.to(q.dtype), lse
