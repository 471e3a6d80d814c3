"""Plain-PyTorch trigram embedding bag: the numerics every `aa::trigram_bag` kernel is tested
against, and the definition of valid input (`check_inputs`).

Semantics (shared by all kernels), for ``weight [v, h]``, ``indices [nnz]``, CSR ``offsets
[n_bags + 1]`` and optional ``per_sample_weights`` (psw) ``[nnz]``::

    out[b] = sum_{j in [offsets[b], offsets[b + 1])} psw[j] * weight[indices[j]]     # [n_bags, h]

An empty bag gives a zero row; a slot listed twice in a bag counts twice. This is
``F.embedding_bag(indices, weight, offsets[:-1], mode="sum", per_sample_weights=psw)`` except for
precision: products and sums are computed in float32 (float64 for float64 weights) and the result
is rounded once to ``weight.dtype``.

Gradients for an upstream ``grad [n_bags, h]`` (``bag(j)`` is the bag holding entry ``j``)::

    dweight[i] = sum_{j : indices[j] == i} psw[j] * grad[bag(j)]                   # [v, h]
    dpsw[j]    = <grad[bag(j)], weight[indices[j]]>                                 # [nnz]

This module gathers the rows and scatters them with ``index_add_``: simple and precise (it is
run on float64 copies as the tests' ground truth), but it materializes ``[nnz, h]`` and is far
slower than the device kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX = (torch.int32, torch.int64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(
    weight: Tensor,
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None,
    *,
    check_values: bool = True,
    check_indices: bool = True,
    op: str = "aa::trigram_bag",
) -> None:
    """Raise ``ValueError`` naming the argument when the input is not valid (see module doc).

    Shapes, dtypes and devices are always checked. ``check_values`` also reads the offsets
    (starting at 0, non-decreasing, ending at ``nnz``) and, unless ``check_indices`` is False,
    the indices (within ``[0, v)``). On a GPU that read is a device synchronization, which is
    why callers may turn it off there.
    """
    if not isinstance(weight, Tensor) or weight.dtype not in _FLOAT:
        raise ValueError(
            f"{op}: weight must be a float16/bfloat16/float32/float64 tensor, "
            f"got {getattr(weight, 'dtype', type(weight))}"
        )
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [v, h], got shape {tuple(weight.shape)}")
    if indices.dtype not in _INDEX:
        raise ValueError(f"{op}: indices must be int64 or int32, got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"{op}: indices must be 1-D [nnz], got shape {tuple(indices.shape)}")
    if offsets.dtype not in _INDEX:
        raise ValueError(f"{op}: offsets must be int64 or int32, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.numel() == 0:
        raise ValueError(
            f"{op}: offsets must be 1-D [n_bags + 1] with at least one element (CSR: "
            f"offsets[0] == 0, offsets[-1] == nnz), got shape {tuple(offsets.shape)}"
        )
    for name, t in (("indices", indices), ("offsets", offsets)):
        if t.device != weight.device:
            raise ValueError(f"{op}: {name} is on {t.device}, but weight is on {weight.device}")
    nnz = indices.shape[0]
    if per_sample_weights is not None:
        psw = per_sample_weights
        if psw.device != weight.device:
            raise ValueError(
                f"{op}: per_sample_weights is on {psw.device}, but weight is on {weight.device}"
            )
        if psw.dtype != weight.dtype:
            raise ValueError(
                f"{op}: per_sample_weights must have weight's dtype {weight.dtype}, got {psw.dtype}"
            )
        if tuple(psw.shape) != (nnz,):
            raise ValueError(
                f"{op}: per_sample_weights must have shape ({nnz},) like indices, "
                f"got {tuple(psw.shape)}"
            )
    if not check_values:
        return
    read_indices = check_indices and nnz > 0  # (no indices: any v is fine, even 0)
    lo, hi, first, last, decreasing = _value_stats(indices, offsets, read_indices)
    v = weight.shape[0]
    if read_indices and (lo < 0 or hi >= v):
        bad = lo if lo < 0 else hi
        raise ValueError(f"{op}: indices must lie in [0, {v}) (weight has {v} rows), found {bad}")
    if first != 0:
        raise ValueError(f"{op}: offsets must start at 0, got offsets[0] == {first}")
    if decreasing:
        raise ValueError(f"{op}: offsets must be non-decreasing (CSR bag boundaries)")
    if last != nnz:
        raise ValueError(
            f"{op}: offsets must end at nnz == indices.numel() == {nnz}, got offsets[-1] == {last}"
        )


def _value_stats(indices: Tensor, offsets: Tensor, with_indices: bool) -> list[int]:
    """``[min index, max index, offsets[0], offsets[-1], any decrease]`` in one host read
    (``[0, 0, ...]`` for the indices when ``with_indices`` is False)."""
    if indices.device.type == "cpu":
        # numpy: no dispatcher round trips or thread-pool wake-ups for these small reductions
        o = offsets.detach().numpy()
        lo = hi = 0
        if with_indices:
            i = indices.detach().numpy()
            lo, hi = int(i.min()), int(i.max())
        return [lo, hi, int(o[0]), int(o[-1]), int((o[1:] < o[:-1]).any())]
    return _value_stats_torch(indices, offsets, with_indices)


def _value_stats_torch(indices: Tensor, offsets: Tensor, with_indices: bool) -> list[int]:
    """`_value_stats` with tensor ops on the tensors' device (one ``tolist`` sync)."""
    parts = [offsets[0].long(), offsets[-1].long(), (offsets[1:] < offsets[:-1]).any().long()]
    if with_indices:
        lo, hi = torch.aminmax(indices)
        parts = [lo.long(), hi.long(), *parts]
    stats = torch.stack(parts).tolist()  # the one device sync
    return stats if with_indices else [0, 0, *stats]


def bag_ids(offsets: Tensor, nnz: int) -> Tensor:
    """``bag(j)`` for every entry ``j``: int64 ``[nnz]`` (no device sync: ``output_size``)."""
    n_bags = offsets.numel() - 1
    counts = offsets.diff().long()
    bags = torch.arange(n_bags, device=offsets.device)
    return torch.repeat_interleave(bags, counts, output_size=nnz)


def trigram_bag(
    weight: Tensor, indices: Tensor, offsets: Tensor, per_sample_weights: Tensor | None = None
) -> Tensor:
    """Forward: ``[n_bags, h]`` in ``weight.dtype`` (see module doc)."""
    acc = compute_dtype(weight.dtype)
    n_bags, h = offsets.numel() - 1, weight.shape[1]
    rows = weight.index_select(0, indices.long()).to(acc)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.to(acc).unsqueeze(1)
    out = torch.zeros(n_bags, h, dtype=acc, device=weight.device)
    out.index_add_(0, bag_ids(offsets, indices.numel()), rows)
    return out.to(weight.dtype)


def trigram_bag_backward(
    grad: Tensor,
    weight: Tensor,
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``(dweight [v, h] in weight.dtype, dpsw [nnz] in weight.dtype or None without psw)``."""
    acc = compute_dtype(weight.dtype)
    idx = indices.long()
    g = grad.to(acc).index_select(0, bag_ids(offsets, idx.numel()))  # grad[bag(j)], [nnz, h]
    contrib = g if per_sample_weights is None else g * per_sample_weights.to(acc).unsqueeze(1)
    dweight = torch.zeros(weight.shape, dtype=acc, device=weight.device).index_add_(0, idx, contrib)
    dpsw = None
    if per_sample_weights is not None:
        dpsw = (g * weight.index_select(0, idx).to(acc)).sum(1).to(per_sample_weights.dtype)
    return dweight.to(weight.dtype), dpsw


def words_to_csr(slots: Tensor, word_of_trigram: Tensor, n_words: int) -> tuple[Tensor, Tensor]:
    """T-FREE reference input -> CSR bags, the plain way (the spec of ``aa::tfree_words_to_csr``):
    ``indices`` are the slot rows of word 0's trigrams, then word 1's, ..., each word's trigrams
    in their original order; ``offsets[w] = m * (number of trigrams of words < w)``."""
    m = slots.shape[1]
    word = word_of_trigram.long()
    rows = [slots[word == w].reshape(-1) for w in range(n_words)]
    indices = torch.cat(rows) if rows else slots.new_empty(0)
    counts = torch.bincount(word, minlength=n_words)[:n_words] if word.numel() else torch.zeros(
        n_words, dtype=torch.int64)
    offsets = torch.zeros(n_words + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts.cpu(), 0) * m
    return indices.to(slots.dtype), offsets.to(slots.device)
