"""Padded segment attention: the numerics spec every `aa::word_pool` kernel is tested against,
and the definition of valid input (`check_inputs`).

Semantics, for ``q [Wq, H, D]`` (``Wq == W``: one query per word, or ``Wq == 1``: one query
shared by every word, HAT's latent query), ``k``/``v [T, Hkv, D]`` (``H % Hkv == 0``: query head
``h`` reads key/value head ``h // (H // Hkv)``, as ``repeat_interleave`` of the heads does) and
CSR word boundaries ``word_offsets [W + 1]`` over T (``0 = o_0 <= o_1 <= ... <= o_W = T``)::

    s[t, h]   = scale * q[w, h] . k[t, h // G]        for the bytes t in [o_w, o_{w+1})
    out[w, h] = sum_t softmax_t(s[., h])[t] * v[t, h // G]

non-causal, one query per word over its own bytes (HAT's pooling: flash-attn varlen with
``cu_seqlens_q = arange(W + 1)``, ``cu_seqlens_k = word_offsets``). An **empty word** (no bytes)
gets a zero row (and no gradient flows through it). ``scale`` defaults to ``1 / sqrt(D)``. The
scores, softmax and weighted sum are computed in float32 (float64 for float64 input); ``out`` is
rounded once to q's dtype.

This module pads every word to the longest one (``[W, L]``) and masks, the way the reference
model does: for tests only.
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


def default_scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def check_offsets(word_offsets, n_bytes: int, device, *, check_values: bool, op: str,
                  name: str = "word_offsets") -> None:
    """``word_offsets`` is a 1-D int32/int64 CSR ``[W + 1]`` over ``n_bytes`` on ``device``;
    ``check_values`` also reads it (a device sync off the CPU)."""
    if not isinstance(word_offsets, Tensor) or word_offsets.dtype not in _INDEX:
        raise ValueError(f"{op}: {name} must be an int64 (or int32) tensor, got "
                         f"{getattr(word_offsets, 'dtype', type(word_offsets).__name__)}")
    if word_offsets.dim() != 1 or word_offsets.numel() == 0:
        raise ValueError(f"{op}: {name} must be 1-D [W + 1] (CSR: 0, ..., T), got shape "
                         f"{tuple(word_offsets.shape)}")
    if word_offsets.device != torch.device(device):
        raise ValueError(f"{op}: {name} is on {word_offsets.device}, but the data is on "
                         f"{device}")
    if not check_values:
        return
    if word_offsets.device.type == "cpu":
        o = word_offsets.detach().numpy()
        first, last, decreasing = int(o[0]), int(o[-1]), bool((o[1:] < o[:-1]).any())
    else:
        stats = torch.stack([word_offsets[0].long(), word_offsets[-1].long(),
                             (word_offsets.diff() < 0).any().long()]).tolist()
        first, last, decreasing = stats[0], stats[1], bool(stats[2])
    if first != 0 or last != n_bytes:
        raise ValueError(f"{op}: {name} must start at 0 and end at T={n_bytes} (the byte "
                         f"count), got {first} ... {last}")
    if decreasing:
        raise ValueError(f"{op}: {name} must be non-decreasing (a word's bytes are "
                         f"[{name}[w], {name}[w + 1]))")


def check_inputs(q: Tensor, k: Tensor, v: Tensor, word_offsets: Tensor, scale: float | None, *,
                 check_values: bool = True, op: str = "aa::word_pool") -> None:
    """Raise ``ValueError`` naming the argument when the input is not valid (see module doc).

    Metadata is always checked; ``check_values`` also reads ``word_offsets`` (a device sync off
    the CPU): starts at 0, non-decreasing, ends at T.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dtype not in _FLOAT:
            raise ValueError(f"{op}: {name} must be a float16/bfloat16/float32/float64 tensor, "
                             f"got {getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() != 3:
            want = "[W or 1, H, D]" if name == "q" else "[T, Hkv, D]"
            raise ValueError(f"{op}: {name} must be 3-D {want}, got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{op}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device}, but q is on {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if q.shape[-1] == 0:
        raise ValueError(f"{op}: q must have a non-empty head dimension D, got "
                         f"{tuple(q.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{op}: k's head dimension {k.shape[-1]} must equal q's "
                         f"{q.shape[-1]}")
    h, hkv = q.shape[1], k.shape[1]
    if h == 0 or hkv == 0 or h % hkv:
        raise ValueError(f"{op}: q's head count {h} must be a positive multiple of k's head "
                         f"count {hkv} (grouped-query attention)")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite float or None, got {scale!r}")
    check_offsets(word_offsets, k.shape[0], q.device, check_values=check_values, op=op)
    n_words = word_offsets.shape[0] - 1
    if q.shape[0] not in (1, n_words):
        raise ValueError(f"{op}: q must have one query per word ({n_words} = "
                         f"word_offsets.numel() - 1) or a single shared query (1), got "
                         f"{q.shape[0]}")


def grid(word_offsets: Tensor) -> tuple[Tensor, Tensor]:
    """``(index [W, L], mask [W, L])``: each word's byte indices padded with 0 to the longest
    word ``L`` (a host sync), True where real (`ByteBatch.word_bytes` / ``word_mask``)."""
    offsets = word_offsets.long()
    lengths = offsets.diff()
    width = int(lengths.max()) if lengths.numel() else 0
    cols = torch.arange(width, device=offsets.device)
    mask = cols < lengths[:, None]
    return torch.where(mask, offsets[:-1, None] + cols, 0), mask


def word_pool(q: Tensor, k: Tensor, v: Tensor, word_offsets: Tensor,
              scale: float | None = None) -> Tensor:
    """Forward ``[W, H, D]`` in q's dtype, through padded ``[W, H, L]`` scores."""
    acc = compute_dtype(q.dtype)
    n_words = word_offsets.numel() - 1
    h, d = q.shape[1], q.shape[2]
    group = h // k.shape[1]
    index, mask = grid(word_offsets)
    qf = q.to(acc).expand(n_words, h, d)
    kf = k.to(acc).repeat_interleave(group, dim=1)[index]  # [W, L, H, D]
    vf = v.to(acc).repeat_interleave(group, dim=1)[index]
    s = torch.einsum("whd,wlhd->whl", qf, kf) * default_scale(scale, d)
    s = s.masked_fill(~mask[:, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # empty words: all -inf -> NaN -> 0
    out = torch.einsum("whl,wlhd->whd", p, vf)
    return out.to(q.dtype)


def word_pool_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, word_offsets: Tensor,
                       scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of `word_pool` by autograd through the padded computation (in the
    compute dtype, rounded once to the inputs' dtype)."""
    acc = compute_dtype(q.dtype)
    with torch.enable_grad():
        qf, kf, vf = (t.detach().to(acc).requires_grad_(True) for t in (q, k, v))
        out = word_pool(qf, kf, vf, word_offsets, scale)
        dq, dk, dv = torch.autograd.grad(out, (qf, kf, vf), grad.to(acc), allow_unused=True)
    dq = torch.zeros_like(qf) if dq is None else dq
    dk = torch.zeros_like(kf) if dk is None else dk
    dv = torch.zeros_like(vf) if dv is None else dv
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
