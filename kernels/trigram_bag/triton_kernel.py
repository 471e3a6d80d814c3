"""Triton trigram embedding bag, forward and backward (numerics:
:mod:`aa_compile.kernels.trigram_bag.reference`). The CUDA path of `aa::trigram_bag`.

Kernels:

- ``_bag_sum_kernel``, one program per (bag, ``BLOCK_H`` columns): walks the bag's entries
  ``BLOCK_N`` at a time (a ``[BLOCK_N, BLOCK_H]`` tile of gathered rows, scaled by the per-sample
  weights), accumulates in float32 and stores its block of the output row once. An empty bag
  stores zeros. It computes the forward, and also the deterministic ``dweight``:
- ``dweight`` (default, deterministic): ``torch.sort(indices, stable=True)`` groups the entries of
  each slot in their original order, which is the *transposed* CSR (``v`` "bags", one per weight
  row, with boundaries ``searchsorted``; each entry gathers ``grad[bag(j)]`` scaled by
  ``psw[j]``). The same kernel then reduces each run of equal index, one program per (weight
  row, column block): every output element is written by exactly one program in a fixed order,
  so the result is bitwise reproducible; rows no entry hits get zeros. No host sync.
- ``dweight`` with ``deterministic=False``: ``_bag_scatter_atomic_kernel``, one program per
  (bag, column block) loads its ``grad`` block once and ``tl.atomic_add``\\ s it (times ``psw``)
  into a float32 ``[v, h]`` buffer for each entry, then one cast to ``weight.dtype``. No sort,
  but float atomics make the summation order, hence the last bits, vary from run to run.
- ``_psw_grad_kernel``, one program per ``BLOCK_N`` entries: ``dpsw[j] = <grad[bag(j)],
  weight[indices[j]]>`` over ``h`` in ``BLOCK_H`` chunks, float32 accumulation.

Indices are widened to int64 before the row offset is computed (``v * h`` may exceed 2**31).
Runs under ``TRITON_INTERPRET=1`` on CPU tensors (the tests do that). float64 is not supported
here; the op sends float64 to the CPU module's ATen path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import cpu, reference

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: widest column block of one program
MAX_BLOCK_H = 256
#: entries gathered per step (rows of a tile)
BLOCK_N = 16


@triton.jit
def _bag_sum_kernel(
    table_ptr,
    idx_ptr,
    offsets_ptr,
    psw_ptr,
    out_ptr,
    H,
    HAS_PSW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``out[b, cols] = sum_{j in [offsets[b], offsets[b+1])} psw[j] * table[idx[j], cols]``."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = cols < H
    start = tl.load(offsets_ptr + b).to(tl.int64)
    end = tl.load(offsets_ptr + b + 1).to(tl.int64)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for s in range(start, end, BLOCK_N):
        ent = s + tl.arange(0, BLOCK_N)
        emask = ent < end
        rows = tl.load(idx_ptr + ent, mask=emask, other=0).to(tl.int64)
        tile = tl.load(
            table_ptr + rows[:, None] * H + cols[None, :],
            mask=emask[:, None] & hmask[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_PSW:
            scale = tl.load(psw_ptr + ent, mask=emask, other=0.0).to(tl.float32)
            tile = tile * scale[:, None]
        acc += tl.sum(tile, axis=0)
    tl.store(out_ptr + b * H + cols, acc.to(out_ptr.dtype.element_ty), mask=hmask)


@triton.jit
def _bag_scatter_atomic_kernel(
    grad_ptr,
    idx_ptr,
    offsets_ptr,
    psw_ptr,
    dw_ptr,
    H,
    HAS_PSW: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``dw[idx[j], cols] += psw[j] * grad[b, cols]`` for the entries ``j`` of bag ``b``."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = cols < H
    start = tl.load(offsets_ptr + b).to(tl.int64)
    end = tl.load(offsets_ptr + b + 1).to(tl.int64)
    g = tl.load(grad_ptr + b * H + cols, mask=hmask, other=0.0).to(tl.float32)
    for j in range(start, end):
        row = tl.load(idx_ptr + j).to(tl.int64)
        val = g
        if HAS_PSW:
            val = g * tl.load(psw_ptr + j).to(tl.float32)
        tl.atomic_add(dw_ptr + row * H + cols, val, mask=hmask)


@triton.jit
def _psw_grad_kernel(
    grad_ptr,
    weight_ptr,
    idx_ptr,
    bag_ptr,
    dpsw_ptr,
    NNZ,
    H,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``dpsw[j] = sum_h grad[bag[j], h] * weight[idx[j], h]`` for ``BLOCK_N`` entries."""
    ent = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    emask = ent < NNZ
    rows = tl.load(idx_ptr + ent, mask=emask, other=0).to(tl.int64)
    bags = tl.load(bag_ptr + ent, mask=emask, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        mask = emask[:, None] & (cols < H)[None, :]
        w = tl.load(weight_ptr + rows[:, None] * H + cols[None, :], mask=mask, other=0.0)
        g = tl.load(grad_ptr + bags[:, None] * H + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(w.to(tl.float32) * g.to(tl.float32), axis=1)
    tl.store(dpsw_ptr + ent, acc.to(dpsw_ptr.dtype.element_ty), mask=emask)


def _check(weight: Tensor, indices: Tensor, offsets: Tensor, psw: Tensor | None, op: str) -> None:
    reference.check_inputs(weight, indices, offsets, psw, check_values=False, op=op)
    if weight.dtype == torch.float64:
        raise ValueError(
            f"{op}: weight: float64 is not supported by the Triton trigram-bag kernel; use the "
            "CPU/reference path (aa_compile.kernels.trigram_bag.reference)"
        )
    if weight.dtype not in _SUPPORTED_DTYPES:  # pragma: no cover - check_inputs catches these
        raise ValueError(f"{op}: weight: dtype {weight.dtype} is not supported")


def column_block(h: int) -> int:
    """Column block: the row width rounded up to a power of two, at least 16 (no degenerate
    1-wide tiles), at most `MAX_BLOCK_H`."""
    return min(max(triton.next_power_of_2(h), 16), MAX_BLOCK_H)


def warps_for(block_h: int) -> int:
    """Warps of a program over ``block_h`` columns."""
    return 4 if block_h >= 128 else 2


def _launch_bag_sum(table: Tensor, idx: Tensor, offsets: Tensor, psw: Tensor | None,
                    out: Tensor) -> Tensor:
    n_rows, h = out.shape
    if n_rows == 0 or h == 0:
        return out
    block_h = column_block(h)
    _bag_sum_kernel[(n_rows, triton.cdiv(h, block_h))](
        table,
        idx,
        offsets,
        psw if psw is not None else table,  # unread when HAS_PSW is False
        out,
        h,
        HAS_PSW=psw is not None,
        BLOCK_N=BLOCK_N,
        BLOCK_H=block_h,
        num_warps=warps_for(block_h),
    )
    return out


def trigram_bag_fwd(
    weight: Tensor, indices: Tensor, offsets: Tensor, per_sample_weights: Tensor | None = None
) -> Tensor:
    """Forward: ``[n_bags, h]`` in ``weight.dtype``. Data (index range, offsets) is not checked
    here: ``aa::trigram_bag`` does that (see its ``CHECK_INDICES``)."""
    _check(weight, indices, offsets, per_sample_weights, "trigram_bag_fwd")
    n_bags, h = offsets.numel() - 1, weight.shape[1]
    out = torch.empty(n_bags, h, dtype=weight.dtype, device=weight.device)
    psw = None if per_sample_weights is None else per_sample_weights.contiguous()
    return _launch_bag_sum(
        weight.contiguous(), indices.contiguous(), offsets.contiguous(), psw, out
    )


def weight_grad(
    grad: Tensor,
    weight: Tensor,
    indices: Tensor,
    offsets: Tensor,
    psw: Tensor | None,
    deterministic: bool = True,
) -> Tensor:
    """``dweight [v, h]`` in ``weight.dtype``; see the module doc for the two variants."""
    v, h = weight.shape
    nnz = indices.numel()
    grad = grad.to(weight.dtype).contiguous()
    if nnz == 0 or h == 0:
        return torch.zeros(v, h, dtype=weight.dtype, device=weight.device)
    if not deterministic:
        dw32 = torch.zeros(v, h, dtype=torch.float32, device=weight.device)
        block_h = column_block(h)
        n_bags = offsets.numel() - 1
        if n_bags:
            _bag_scatter_atomic_kernel[(n_bags, triton.cdiv(h, block_h))](
                grad,
                indices.contiguous(),
                offsets.contiguous(),
                psw.contiguous() if psw is not None else grad,
                dw32,
                h,
                HAS_PSW=psw is not None,
                BLOCK_H=block_h,
                num_warps=warps_for(block_h),
            )
        return dw32.to(weight.dtype)
    sorted_idx, perm = cpu.stable_sort(indices, v)
    rows = reference.bag_ids(offsets, nnz).index_select(0, perm)
    # v fits the key dtype (stable_sort picks it so): int64 [v + 1] boundaries, no host sync
    bounds = torch.arange(v + 1, device=weight.device, dtype=sorted_idx.dtype)
    seg = torch.searchsorted(sorted_idx, bounds)
    psw_sorted = None if psw is None else psw.index_select(0, perm)
    out = torch.empty(v, h, dtype=weight.dtype, device=weight.device)
    return _launch_bag_sum(grad, rows, seg, psw_sorted, out)


def psw_grad(grad: Tensor, weight: Tensor, indices: Tensor, offsets: Tensor) -> Tensor:
    """``dpsw [nnz]`` in ``weight.dtype``."""
    nnz, h = indices.numel(), weight.shape[1]
    out = torch.zeros(nnz, dtype=weight.dtype, device=weight.device)
    if nnz == 0 or h == 0:
        return out
    bags = reference.bag_ids(offsets, nnz)
    block_h = column_block(h)
    _psw_grad_kernel[(triton.cdiv(nnz, BLOCK_N),)](
        grad.to(weight.dtype).contiguous(),
        weight.contiguous(),
        indices.contiguous(),
        bags,
        out,
        nnz,
        h,
        BLOCK_N=BLOCK_N,
        BLOCK_H=block_h,
        # two [BLOCK_N, BLOCK_H] tiles live per step: twice the warps of a one-tile kernel keep
        # them in registers (4 warps spilled in float32 on sm_89)
        num_warps=2 * warps_for(block_h),
    )
    return out


def trigram_bag_bwd(
    grad: Tensor,
    weight: Tensor,
    indices: Tensor,
    offsets: Tensor,
    per_sample_weights: Tensor | None = None,
    need_weight_grad: bool = True,
    need_psw_grad: bool = True,
    deterministic: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """``(dweight [v, h] or None, dpsw [nnz] or None)``, both in ``weight.dtype``.

    ``deterministic=False`` computes ``dweight`` with float atomics (no sort; run-to-run
    differences in the last bits). ``dpsw`` is deterministic either way.
    """
    _check(weight, indices, offsets, per_sample_weights, "trigram_bag_bwd")
    n_bags, h = offsets.numel() - 1, weight.shape[1]
    if tuple(grad.shape) != (n_bags, h):
        raise ValueError(
            f"trigram_bag_bwd: grad must have shape ({n_bags}, {h}), got {tuple(grad.shape)}"
        )
    if grad.device != weight.device:
        raise ValueError(f"trigram_bag_bwd: grad is on {grad.device}, but weight is on "
                         f"{weight.device}")
    dweight = dpsw = None
    if need_weight_grad:
        dweight = weight_grad(grad, weight, indices, offsets, per_sample_weights, deterministic)
    if need_psw_grad and per_sample_weights is not None:
        dpsw = psw_grad(grad, weight, indices, offsets)
    return dweight, dpsw
