"""CUDA kernels of `aa::sae_encode` (Triton; the interpreter runs them in the CPU tests).

Forward, fused for ``k <= FUSED_MAX_K``: the dense ``[N, L]`` pre-activation never reaches
global memory. Each program of ``_encode_topk_kernel`` owns ``BLOCK_M`` tokens and one slice of
the latents (a "split"); it computes ``BLOCK_M x BLOCK_L`` tiles of ``(x - pre_bias) @ W^T +
bias`` with float32 accumulation and folds each tile into a running per-token top-K held in
registers: the tile's top-K (``tl.topk``), reversed, is merged with the running list by an
elementwise maximum (a bitonic sequence holding the top K of both) and one bitonic merge.
With one split the program writes the activated values and indices itself; with several, it
writes its K candidates per token and ``_merge_topk_kernel`` picks the final top-k of
``SPLIT x K`` candidates. Candidates are one int64 key per latent, ``(order-preserving bits of
the float32 pre-activation) << 32 | (2^32 - 1 - latent index)``: sorting keys sorts by value,
and equal values by ascending latent index, which is the reference's tie rule (``-0.0`` counts
as ``+0.0``, every NaN as the largest value, as ``torch.sort`` does).

16-bit inputs feed the tensor cores as they are: ``pre = x @ W^T + shift`` with ``shift = bias
- W @ pre_bias`` computed once per call in float32 by ``_shift_kernel`` (the interpreter
upcasts them and rounds the values on the host: its bfloat16 dot is wrong and its bfloat16
cast truncates). float32 subtracts ``pre_bias`` inside the tile and takes an IEEE (not TF32)
dot, as the reference does.

Larger k (and float64) run the ATen path of ``cpu.py`` (``addmm`` + TopK). The sparse
backward runs the trigram-bag Triton kernels through `aa_compile.kernels.sae_decode`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from aa_compile.kernels import triton_target
from aa_compile.kernels.sae_decode import triton_kernel as decode
from torch import Tensor

from . import cpu

#: register spill stores (bytes per thread) each kernel may have in the AOT compile check
AOT_SPILL_BUDGET: dict[str, int] = {}

#: the largest k the fused forward takes; larger k runs addmm + TopK (``cpu.py``)
FUSED_MAX_K = 128
#: the smallest candidate list per token (a power of two, at least k)
MIN_CANDIDATES = 8
#: at most this many candidate keys per token enter the merge kernel (SPLIT x K)
MAX_MERGE = 4096
#: the number of programs the split aims at on a GPU (a few per SM of an H100)
TARGET_PROGRAMS = 512


@triton.jit
def _to_key(v, latent):
    """int64 keys ordering float32 ``v`` descending by value, then ascending by ``latent``."""
    bits = v.to(tl.int32, bitcast=True)
    bits = tl.where(v == 0.0, 0, bits)            # -0.0 == +0.0
    bits = tl.where(v != v, 0x7FC00000, bits)     # every NaN: one NaN, above +inf
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse their order
    return (ordered.to(tl.int64) << 32) | (4294967295 - latent.to(tl.int64))


@triton.jit
def _store_top(best, rm, N, k, vals_ptr, idx_ptr, K: tl.constexpr, SIGMOID: tl.constexpr):
    """Decode the first k of the sorted keys ``best [BLOCK_M, K]`` and store the activated
    values and the latent indices of tokens ``rm``."""
    hi = (best >> 32).to(tl.int32)
    bits = hi ^ ((hi >> 31) & 0x7FFFFFFF)
    pre = bits.to(tl.float32, bitcast=True)
    latent = 4294967295 - (best & 4294967295)
    if SIGMOID:
        val = tl.sigmoid(pre)
    else:
        val = tl.maximum(pre, 0.0)
    cols = tl.arange(0, K)
    mask = (rm[:, None] < N) & (cols[None, :] < k)
    offs = rm[:, None].to(tl.int64) * k + cols[None, :]
    tl.store(vals_ptr + offs, val.to(vals_ptr.dtype.element_ty), mask=mask)
    tl.store(idx_ptr + offs, latent, mask=mask)


@triton.jit
def _encode_topk_kernel(
    x_ptr, w_ptr, pb_ptr, shift_ptr, keys_ptr, vals_ptr, idx_ptr,
    N, L, D, k, per_split,
    sxn, sxd, swl, swd,
    K: tl.constexpr, SPLIT: tl.constexpr, SIGMOID: tl.constexpr, LOW: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    lo = pid_s * per_split
    hi = tl.minimum(lo + per_split, L)
    best = tl.full([BLOCK_M, K], -9223372036854775808, tl.int64)  # "no latent": below all keys
    for l0 in range(lo, hi, BLOCK_L):
        rl = l0 + tl.arange(0, BLOCK_L)
        acc = tl.zeros((BLOCK_M, BLOCK_L), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + rd
            a = tl.load(x_ptr + rm[:, None].to(tl.int64) * sxn + dd[None, :] * sxd,
                        mask=(rm[:, None] < N) & (dd[None, :] < D), other=0.0)
            w = tl.load(w_ptr + rl[None, :].to(tl.int64) * swl + dd[:, None] * swd,
                        mask=(rl[None, :] < hi) & (dd[:, None] < D), other=0.0)
            if UPCAST:  # the interpreter (its bfloat16 dot is wrong); pre_bias: in the shift
                acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            elif LOW:  # 16-bit operands on the tensor cores; pre_bias is in the shift
                acc += tl.dot(a, w)
            else:  # float32: centre in the tile and take an IEEE dot, as the reference
                pb = tl.load(pb_ptr + dd, mask=dd < D, other=0.0)
                a = a - pb[None, :]
                acc += tl.dot(a, w, input_precision="ieee")
        acc += tl.load(shift_ptr + rl, mask=rl < hi, other=0.0).to(tl.float32)[None, :]
        keys = tl.where((rl < hi)[None, :], _to_key(acc, rl), -9223372036854775808)
        cand = tl.topk(keys, K)  # [BLOCK_M, K], descending
        best = tl.bitonic_merge(tl.maximum(best, tl.flip(cand, 1)), descending=True)
    if SPLIT == 1:
        _store_top(best, rm, N, k, vals_ptr, idx_ptr, K, SIGMOID)
    else:
        cols = tl.arange(0, K)
        offs = (rm[:, None].to(tl.int64) * SPLIT + pid_s) * K + cols[None, :]
        tl.store(keys_ptr + offs, best, mask=rm[:, None] < N)


@triton.jit
def _merge_topk_kernel(keys_ptr, vals_ptr, idx_ptr, N, k,
                       K: tl.constexpr, SPLIT: tl.constexpr, SIGMOID: tl.constexpr,
                       BLOCK_M: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = tl.arange(0, SPLIT * K)
    keys = tl.load(keys_ptr + rm[:, None].to(tl.int64) * (SPLIT * K) + rc[None, :],
                   mask=rm[:, None] < N, other=-9223372036854775808)
    _store_top(tl.topk(keys, K), rm, N, k, vals_ptr, idx_ptr, K, SIGMOID)


@triton.jit
def _shift_kernel(w_ptr, pb_ptr, b_ptr, out_ptr, L, D, swl, swd,
                  BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out = bias - W @ pre_bias`` in float32."""
    rl = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    rd = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + rd
        w = tl.load(w_ptr + rl[:, None].to(tl.int64) * swl + dd[None, :] * swd,
                    mask=(rl[:, None] < L) & (dd[None, :] < D), other=0.0).to(tl.float32)
        p = tl.load(pb_ptr + dd, mask=dd < D, other=0.0).to(tl.float32)
        acc += tl.sum(w * p[None, :], axis=1)
    b = tl.load(b_ptr + rl, mask=rl < L, other=0.0).to(tl.float32)
    tl.store(out_ptr + rl, b - acc, mask=rl < L)


def candidates(k: int) -> int:
    """K: the per-token candidate list, the smallest power of two >= k (at least 8)."""
    return max(MIN_CANDIDATES, triton.next_power_of_2(max(k, 1)))


def plan(n: int, n_latents: int, k: int, dtype: torch.dtype, device: torch.device,
         split: int | None = None) -> dict[str, int]:
    """Tiles, warps and the number of latent splits for one fused launch.

    On a GPU: 64-token tiles (16 for at most 16 tokens; 32 for float32 and for K = 128
    before Hopper), 128 latents per tile, 64-deep (float32: 16-deep) reduction steps; enough
    splits for about `TARGET_PROGRAMS` programs, each split a whole number of tiles. In the
    interpreter: small tiles and two splits where there are two tiles, so the tests run both
    launch paths. ``split`` overrides the number of splits (a power of two)."""
    kk = candidates(k)
    if triton_target.is_gpu_launch(device):
        fp32 = dtype == torch.float32  # IEEE dots on the FMA units: operands in registers
        # before Hopper the mma accumulator and K = 128 keys do not fit 64 tokens' registers
        narrow = fp32 or (kk >= 128 and triton_target.capability(device) < (9, 0))
        bm = 16 if n <= 16 else (32 if narrow else 64)
        bl = 128  # >= K: K <= FUSED_MAX_K
        bd = 16 if fp32 else 64
        warps, stages = (4 if fp32 and bm == 16 else 8), 3
        want = triton.cdiv(TARGET_PROGRAMS, triton.cdiv(max(n, 1), bm))
    else:
        bm, bl, bd, warps, stages = 16, max(16, kk), 16, 4, 1
        want = 2
    tiles = triton.cdiv(n_latents, bl)
    if split is None:
        split = 1
        while split * 2 <= min(want, tiles) and split * 2 * kk <= MAX_MERGE:
            split *= 2
    per_split = triton.cdiv(tiles, split) * bl
    return dict(K=kk, BLOCK_M=bm, BLOCK_L=bl, BLOCK_D=bd, num_warps=warps, num_stages=stages,
                split=split, per_split=per_split)


def _shift(weight: Tensor, bias: Tensor, pre_bias: Tensor) -> Tensor:
    """``bias - weight @ pre_bias`` in float32 ``[L]``."""
    n_latents, d = weight.shape
    out = torch.empty(n_latents, dtype=torch.float32, device=weight.device)
    if n_latents:
        _shift_kernel[(triton.cdiv(n_latents, 64),)](
            weight, pre_bias.contiguous(), bias.contiguous(), out, n_latents, d,
            weight.stride(0), weight.stride(1), BLOCK_L=64, BLOCK_D=64, num_warps=4)
    return out


def sae_encode_fused(x: Tensor, weight: Tensor, bias: Tensor, pre_bias: Tensor, k: int,
                     sigmoid: bool = False, split: int | None = None
                     ) -> tuple[Tensor, Tensor]:
    """The fused forward (16/32-bit floats, ``k <= FUSED_MAX_K``; input assumed valid):
    ``(values [N, k] in x.dtype, indices [N, k] int64)``."""
    n, d = x.shape
    n_latents = weight.shape[0]
    gpu = triton_target.is_gpu_launch(x.device)
    # the interpreter truncates float32 -> bfloat16: it stores float32, rounded here
    values = torch.empty(n, k, dtype=x.dtype if gpu else torch.float32, device=x.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=x.device)
    if n == 0 or k == 0:
        return values.to(x.dtype), indices
    p = plan(n, n_latents, k, x.dtype, x.device, split)
    low = x.dtype in (torch.float16, torch.bfloat16)
    shift = _shift(weight, bias, pre_bias) if low else bias.contiguous()
    kk, bm, s = p["K"], p["BLOCK_M"], p["split"]
    keys = (torch.empty(n, s, kk, dtype=torch.int64, device=x.device) if s > 1 else indices)
    _encode_topk_kernel[(triton.cdiv(n, bm), s)](
        x, weight, pre_bias.contiguous(), shift, keys, values, indices,
        n, n_latents, d, k, p["per_split"],
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        K=kk, SPLIT=s, SIGMOID=sigmoid, LOW=low,
        UPCAST=low and not gpu,
        BLOCK_M=bm, BLOCK_L=p["BLOCK_L"], BLOCK_D=p["BLOCK_D"],
        num_warps=p["num_warps"], num_stages=p["num_stages"])
    if s > 1:
        merge_rows = max(1, min(16, MAX_MERGE // (s * kk)))
        _merge_topk_kernel[(triton.cdiv(n, merge_rows),)](
            keys, values, indices, n, k, K=kk, SPLIT=s, SIGMOID=sigmoid,
            BLOCK_M=merge_rows, num_warps=4)
    return values.to(x.dtype), indices


def sae_encode_fwd(x: Tensor, weight: Tensor, bias: Tensor, pre_bias: Tensor, k: int,
                   sigmoid: bool = False) -> tuple[Tensor, Tensor]:
    """The CUDA forward: fused for 16/32-bit floats and ``k <= FUSED_MAX_K``, else
    ``cpu.sae_encode_fwd`` (cuBLAS ``addmm`` + ATen TopK, same tie rule)."""
    if weight.dtype == torch.float64 or k > FUSED_MAX_K:
        return cpu.sae_encode_fwd(x, weight, bias, pre_bias, k, sigmoid)
    return sae_encode_fused(x, weight, bias, pre_bias, k, sigmoid)


def sae_encode_bwd(grad: Tensor, x: Tensor, weight: Tensor, pre_bias: Tensor, values: Tensor,
                   indices: Tensor, sigmoid: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias, dpre_bias)`` (see ``reference.py``), 16/32-bit floats."""
    return cpu.sae_encode_bwd(grad, x, weight, pre_bias, values, indices, sigmoid,
                              bag=decode.sae_decode_fwd, bag_bwd=decode.sae_decode_bwd)
