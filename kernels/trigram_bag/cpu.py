"""CPU kernels of `aa::trigram_bag` (numerics: :mod:`aa_compile.kernels.trigram_bag.reference`):
the forward bag sums, the weight and per-sample-weight gradients, the lean forward of
``aa::trigram_bag_cpu`` and the CSR conversion behind ``aa::tfree_words_to_csr``.

Forward: float32 by `cpu_avx2`'s native kernel where available (same bits as ATen's, faster),
other dtypes by ATen's inference embedding bag (each bag summed in order by one thread, float32
accumulation for the half types: deterministic). ``dweight`` is the same bag sum over the
transposed CSR (`segments`: a stable sort of the indices), so it is bitwise reproducible without
atomics; ``dpsw`` is ATen's per-sample-weights backward. Outputs above `CHUNK_BYTES` are written
in chunks into a huge-page advised buffer (fewer page faults, same bits). Only ATen ops touch
tensors off the CPU, so these also serve float64 on CUDA and CUDA without Triton. Design:
``docs/tfree.md``; measurements: ``docs/performance.md`` (T-FREE section).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import cpu_avx2, reference
from .huge_pages import advise_huge_pages

#: Outputs larger than this are written in row chunks of about this many bytes into a buffer
#: allocated (and huge-page advised) here; smaller ones are one kernel call (``docs/tfree.md``,
#: "Large outputs"). 16 MiB: under glibc's largest mmap threshold (32 MiB), so a freed chunk's
#: memory is reused by the next chunk without page faults, and it fits the L3 cache.
CHUNK_BYTES: int = 16 << 20


def aten_bag(weight: Tensor, indices: Tensor, offsets: Tensor, psw: Tensor | None) -> Tensor:
    """ATen's inference embedding bag (sum, ``include_last_offset``): ``[len(offsets) - 1, h]``.
    Its 1-D inputs are made contiguous: this internal op reads ``offsets`` and ``psw`` as if
    they were and rejects non-contiguous ``indices`` (``F.embedding_bag`` takes any)."""
    if psw is not None:
        psw = psw.contiguous()
    return torch.ops.aten._embedding_bag_forward_only(
        weight, indices.contiguous(), offsets.contiguous(), False, 0, False, psw, True
    )[0]


def native(weight: Tensor) -> bool:
    """Whether float32 CPU bag sums of ``weight`` run the AVX2 kernel (`cpu_avx2`)."""
    return weight.dtype == torch.float32 and weight.device.type == "cpu" and \
        cpu_avx2.available()


def bag_sum(weight: Tensor, indices: Tensor, offsets: Tensor, psw: Tensor | None,
            chunk_bytes: int | None = None) -> Tensor:
    """``[len(offsets) - 1, h]`` bag sums (valid CSR input, contiguous ``weight``): float32
    on CPU with the AVX2 kernel where `native` (same bits as ATen's), else ATen's kernel. For
    ATen's, an output larger than ``chunk_bytes`` (default `CHUNK_BYTES`) is filled in
    chunks of bags, each one kernel call, copied into an output allocated here with huge pages
    advised (``docs/tfree.md``, "Large outputs"); the sums and their order are the same either
    way."""
    if native(weight):  # writes its (huge-page advised) output directly: no chunks needed
        return cpu_avx2.bag_sum(weight, indices, offsets, psw)
    n, h = offsets.numel() - 1, weight.shape[1]
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    row_bytes = h * weight.element_size()
    if n * row_bytes <= chunk_bytes or weight.device.type != "cpu":
        return aten_bag(weight, indices, offsets, psw)
    out = torch.empty(n, h, dtype=weight.dtype)
    advise_huge_pages(out)
    step = max(1, chunk_bytes // max(1, row_bytes))
    o = offsets.numpy()
    for b0 in range(0, n, step):
        b1 = min(n, b0 + step)
        s0, s1 = int(o[b0]), int(o[b1])
        if s0 == s1:
            out[b0:b1].zero_()
            continue
        part_offsets = torch.from_numpy(o[b0:b1 + 1] - o[b0])
        part_psw = None if psw is None else psw[s0:s1]
        out[b0:b1].copy_(aten_bag(weight, indices[s0:s1], part_offsets, part_psw))
    return out


def trigram_bag_fwd(
    weight: Tensor, indices: Tensor, offsets: Tensor, per_sample_weights: Tensor | None = None,
    chunk_bytes: int | None = None,
) -> Tensor:
    """Forward: ``[n_bags, h]`` in ``weight.dtype`` (input assumed valid, see ``check_inputs``).
    ``chunk_bytes``: see `bag_sum`."""
    n_bags, h = offsets.numel() - 1, weight.shape[1]
    if n_bags == 0 or indices.numel() == 0 or h == 0:
        return torch.zeros(n_bags, h, dtype=weight.dtype, device=weight.device)
    return bag_sum(weight.contiguous(), indices, offsets, per_sample_weights, chunk_bytes)


def words_to_csr(slots: Tensor, word_of_trigram: Tensor, n_words: int, presorted: bool = False
                 ) -> tuple[Tensor, Tensor]:
    """The T-FREE reference embedding's input (``slots [n, m]``, ``word_of_trigram [n]`` in any
    order, ``n_words``) as the op's CSR bags: ``(indices [n * m] in slots' dtype, offsets
    [n_words + 1] int64)``. A stable sort of the word ids orders the trigram rows word by word,
    each word's trigrams in their original order (``presorted=True``, word ids known to be
    non-decreasing as a tokenizer emits them: no sort and no gather, ``indices`` is a plain copy
    of ``slots``); ``offsets = m * [0, cumsum(trigrams per word)]``, the counts by ``index_add_``
    (bounds-checked on every device, unlike ``bincount``), or for presorted CPU input
    ``offsets[k] = m * #(word ids < k)`` by numpy's binary search. Word ids are assumed to lie
    in ``[0, n_words)`` (the op checks them). ATen ops (numpy for presorted CPU tensors), so it
    serves every device."""
    n, m = slots.shape
    if presorted and slots.device.type == "cpu":
        # numpy only (no ATen op, no OpenMP region): a copy of the slots (a custom op's outputs
        # may not alias its inputs) and offsets[k] = m * #(word ids < k) by binary search
        indices = torch.empty(n * m, dtype=slots.dtype)
        np.copyto(indices.numpy(), slots.numpy().reshape(-1))
        starts = np.searchsorted(word_of_trigram.numpy(), np.arange(n_words + 1))
        offsets = torch.from_numpy(starts.astype(np.int64, copy=False))
        return indices, offsets.mul_(m)
    if presorted:
        indices = slots.reshape(-1).clone()
    else:
        perm = torch.sort(word_of_trigram, stable=True).indices
        indices = slots.index_select(0, perm).reshape(-1)
    counts = torch.zeros(n_words, dtype=torch.int64, device=slots.device)
    counts.index_add_(0, word_of_trigram, torch.ones(n, dtype=torch.int64, device=slots.device))
    offsets = torch.zeros(n_words + 1, dtype=torch.int64, device=slots.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return indices, offsets.mul_(m)


def _check_offsets(offsets: Tensor, nnz: int, op: str) -> None:
    """``RuntimeError`` unless ``offsets`` start at 0, do not decrease and end at ``nnz``."""
    o = offsets.numpy()
    if o.shape[0] == 0 or o[0] != 0 or o[-1] != nnz or bool((o[1:] < o[:-1]).any()):
        raise RuntimeError(f"{op}: {cpu_avx2.OFFSETS_MESSAGE}")


def trigram_bag_cpu(weight: Tensor, indices: Tensor, offsets: Tensor,
                    per_sample_weights: Tensor | None = None) -> Tensor:
    """The kernel of ``aa::trigram_bag_cpu``, the CPU forward that compiled graphs call (see
    ``aa_compile.ops.trigram_bag``), with no validation beyond the values: the AVX2 kernel
    checks the offsets and every index itself (``RuntimeError`` with `aa::trigram_bag`'s
    messages); without it the offsets are checked here and ATen's kernel checks the indices."""
    op = "aa::trigram_bag"
    if native(weight):
        return cpu_avx2.bag_sum(weight, indices, offsets, per_sample_weights, op=op)
    _check_offsets(offsets, indices.shape[0], op)
    return trigram_bag_fwd(weight, indices, offsets, per_sample_weights)


def stable_sort(indices: Tensor, v: int) -> tuple[Tensor, Tensor]:
    """``(sorted keys, perm)`` of a stable sort of ``indices`` (values in ``[0, v)``), sorting
    the narrowest integer type that holds ``v``: int16 / int32 keys sort about 2x / 1.5x
    faster than int64 (fewer radix passes). The keys keep that narrow dtype."""
    if v <= torch.iinfo(torch.int16).max:
        key_dtype = torch.int16
    elif v <= torch.iinfo(torch.int32).max:
        key_dtype = torch.int32
    else:  # pragma: no cover - tables of 2**31 rows
        key_dtype = torch.int64
    return torch.sort(indices.to(key_dtype), stable=True)


def segments(indices: Tensor, offsets: Tensor, v: int) -> tuple[Tensor, Tensor, Tensor]:
    """The transposed CSR of the bags: ``(perm, rows, seg)``, all int64 on ``indices``' device.
    ``perm`` is the stable sort of ``indices`` (the entries of slot 0 in their order, then slot
    1's, ...), ``rows[k] = bag(perm[k])``, and ``seg [v + 1]`` the start of each slot's run
    (``seg[i + 1] - seg[i]`` entries hit slot ``i``). On CPU with ``v <= 65536``:
    `segments_numpy`, else `segments_torch` (the same three tensors)."""
    if indices.device.type == "cpu" and v <= 1 << 16:
        return segments_numpy(indices, offsets, v)
    return segments_torch(indices, offsets, v)


def segments_numpy(indices: Tensor, offsets: Tensor, v: int) -> tuple[Tensor, Tensor, Tensor]:
    """`segments` for CPU tensors and ``v <= 65536``, in numpy: single-threaded (no OpenMP
    region, which a loaded machine can stall for a scheduler time slice each) and about as fast
    as torch's on one core: ``argsort(kind="stable")`` of 16-bit keys is a radix sort."""
    idx = indices.numpy()
    perm = np.argsort(idx.astype(np.uint16), kind="stable")
    o = offsets.numpy()
    rows = np.repeat(np.arange(o.shape[0] - 1, dtype=np.int64), np.diff(o))[perm]
    seg = np.zeros(v + 1, dtype=np.int64)
    np.cumsum(np.bincount(idx, minlength=v), out=seg[1:])
    return torch.from_numpy(perm.astype(np.int64, copy=False)), torch.from_numpy(rows), \
        torch.from_numpy(seg)


def segments_torch(indices: Tensor, offsets: Tensor, v: int) -> tuple[Tensor, Tensor, Tensor]:
    """`segments` with ATen ops (any device, any ``v``): `stable_sort`, ``bincount``."""
    perm = stable_sort(indices, v)[1]
    rows = reference.bag_ids(offsets, indices.numel()).index_select(0, perm)
    seg = torch.zeros(v + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(torch.bincount(indices, minlength=v), 0, out=seg[1:])
    return perm, rows, seg


def weight_grad(
    grad: Tensor, weight: Tensor, indices: Tensor, offsets: Tensor, psw: Tensor | None,
    chunk_bytes: int | None = None,
) -> Tensor:
    """``dweight [v, h]`` in ``weight.dtype``: sorted segment sums (see module doc).
    ``chunk_bytes``: see `bag_sum`."""
    v, h = weight.shape
    nnz = indices.numel()
    if nnz == 0 or h == 0:
        return torch.zeros(v, h, dtype=weight.dtype, device=weight.device)
    perm, rows, seg = segments(indices, offsets, v)
    psw_sorted = None if psw is None else psw.index_select(0, perm)
    return bag_sum(grad.to(weight.dtype).contiguous(), rows, seg, psw_sorted, chunk_bytes)


def psw_grad(grad: Tensor, weight: Tensor, indices: Tensor, offsets: Tensor) -> Tensor:
    """``dpsw [nnz]`` in ``weight.dtype``: one row-wise dot product per entry (ATen's
    ``_embedding_bag_per_sample_weights_backward``, float32 accumulation for the half types,
    no ``[nnz, h]`` temporaries)."""
    nnz = indices.numel()
    if nnz == 0 or weight.shape[1] == 0:
        return torch.zeros(nnz, dtype=weight.dtype, device=weight.device)
    bags = reference.bag_ids(offsets, nnz).to(indices.dtype)
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad.to(weight.dtype).contiguous(), weight.contiguous(), indices.contiguous(),
        offsets[:-1].to(indices.dtype).contiguous(), bags, 0, -1,
    )


def trigram_bag_bwd(
    grad: Tensor,
    weight: Tensor,
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None = None,
    need_weight_grad: bool = True,
    need_psw_grad: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """``(dweight [v, h] or None, dpsw [nnz] or None)``, both in ``weight.dtype``.

    ``dpsw`` is None without ``per_sample_weights``; either is None when not asked for.
    """
    dweight = dpsw = None
    if need_weight_grad:
        dweight = weight_grad(grad, weight, indices, offsets, per_sample_weights)
    if need_psw_grad and per_sample_weights is not None:
        dpsw = psw_grad(grad, weight, indices, offsets)
    return dweight, dpsw
