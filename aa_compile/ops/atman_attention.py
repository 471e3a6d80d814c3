"""`aa::atman_attention`: attention with AtMan's per-row key suppression (arXiv 2301.08110).

    aa::atman_attention(Tensor q, Tensor k, Tensor v, Tensor suppress_idx,
                        Tensor suppress_factor, str mode, bool is_causal, int q_offset=0,
                        float? scale=None, Tensor? prefix_k=None, Tensor? prefix_v=None)
                        -> Tensor

``q [B, H, Sq, D]``, ``k [B, Hkv, Sk, D]``, ``v [B, Hkv, Sk, Dv]`` (``H % Hkv == 0``: grouped
query attention without repeating keys), ``suppress_idx [B, n]`` int64 key positions (``-1`` =
unused slot), ``suppress_factor [B, n]`` float multipliers in ``[0, 1]`` (``(0, 1]`` for
``log_additive``). ``q_offset`` is the absolute position of query 0 (queries ``q_offset..``
against keys ``0..Sk-1``: the shape of a pass that reuses a cached prefix). Optional
``prefix_k [1 or B, Hkv, P, D]``, ``prefix_v [1 or B, Hkv, P, Dv]``: keys/values standing in front
of every row's ``k``/``v`` (a prefix shared by the batch rows, never copied per row on CPU);
positions (``q_offset``, ``suppress_idx``) then count from the first prefix key. Numerics and
the two modes: ``kernels/atman_attention/reference.py``. Kernels: CPU
``kernels/atman_attention/cpu.py``, CUDA ``kernels/atman_attention/triton_kernel.py`` (the
prefix concatenated in front of each row; float64 runs the reference, as do other devices).

Inference only: the op has no autograd formula (explanations run under ``torch.no_grad``);
calling it on tensors that require grad raises in autograd, as for any custom op without one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from aa_compile.kernels.atman_attention import cpu, reference

from .registry import register_kernels, register_onnx, register_samples, triton_kernel

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON = "aa_compile.kernels.atman_attention.triton_kernel"
MODES = ("log_additive", "multiplicative")


def _check_prefix(q, k, v, prefix_k, prefix_v) -> None:
    name = "aa::atman_attention"
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError(f"{name}: give both prefix_k and prefix_v or neither")
    if prefix_k is None:
        return
    for arg, t, like in (("prefix_k", prefix_k, k), ("prefix_v", prefix_v, v)):
        if t.dim() != 4 or t.dtype != q.dtype:
            raise ValueError(f"{name}: {arg} must be a 4-d {q.dtype} tensor, got "
                             f"{tuple(t.shape)} {t.dtype}")
        if t.shape[0] not in (1, q.shape[0]) or t.shape[1] != like.shape[1] or (
                t.shape[3] != like.shape[3]):
            raise ValueError(
                f"{name}: {arg} {tuple(t.shape)} must be [1 or B={q.shape[0]}, "
                f"{like.shape[1]}, P, {like.shape[3]}] to stand in front of {tuple(like.shape)}"
            )
    if prefix_k.shape[0] != prefix_v.shape[0] or prefix_k.shape[2] != prefix_v.shape[2]:
        raise ValueError(f"{name}: prefix_k {tuple(prefix_k.shape)} and prefix_v "
                         f"{tuple(prefix_v.shape)} must agree in batch and length")


def _check(q, k, v, suppress_idx, suppress_factor, mode, q_offset) -> None:
    name = "aa::atman_attention"
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name}: {arg} must be [B, heads, seq, dim], got {tuple(t.shape)}")
        if t.dtype not in _FLOAT:
            raise ValueError(f"{name}: {arg} must be a float tensor, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{name}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, _, d = q.shape
    if k.shape[0] != b or v.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"{name}: k {tuple(k.shape)} must be [B={b}, Hkv, Sk, D={d}] to match q {tuple(q.shape)}"
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{name}: v {tuple(v.shape)} must match k {tuple(k.shape)} in B, Hkv, Sk")
    if k.shape[1] == 0 or h % k.shape[1]:
        raise ValueError(f"{name}: q heads ({h}) must be a multiple of k/v heads ({k.shape[1]})")
    if suppress_idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: suppress_idx must be int64, got {suppress_idx.dtype}")
    if suppress_factor.dtype not in _FLOAT:
        raise ValueError(f"{name}: suppress_factor must be a float tensor, got {suppress_factor.dtype}")
    if suppress_idx.dim() != 2 or suppress_idx.shape[0] != b or suppress_factor.shape != suppress_idx.shape:
        raise ValueError(
            f"{name}: suppress_idx and suppress_factor must both be [B={b}, n], got "
            f"{tuple(suppress_idx.shape)} and {tuple(suppress_factor.shape)}"
        )
    if mode not in MODES:
        raise ValueError(f"{name}: mode must be one of {MODES}, got {mode!r}")
    if q_offset < 0:
        raise ValueError(f"{name}: q_offset must be >= 0, got {q_offset}")


def _check_values(suppress_idx: Tensor, suppress_factor: Tensor, mode: str, sk: int) -> None:
    """Value checks (they read the tensors, so only on real data, not in the fake impl)."""
    name = "aa::atman_attention"
    if suppress_idx.numel() == 0:
        return
    if bool(((suppress_idx < -1) | (suppress_idx >= sk)).any()):
        raise ValueError(f"{name}: suppress_idx entries must be -1 (unused) or in [0, {sk})")
    used = suppress_idx >= 0
    f = suppress_factor[used]
    low_ok = (f > 0) if mode == "log_additive" else (f >= 0)
    if not bool((low_ok & (f <= 1)).all()) or bool(f.isnan().any()):
        rng = "(0, 1]" if mode == "log_additive" else "[0, 1]"
        raise ValueError(f"{name}: suppress_factor must lie in {rng} for mode {mode!r}")


def check(q, k, v, suppress_idx, suppress_factor, mode, is_causal, q_offset=0, scale=None,
          prefix_k=None, prefix_v=None) -> None:
    """Every argument check, the values of the suppression spec included (it reads them)."""
    _check(q, k, v, suppress_idx, suppress_factor, mode, q_offset)
    _check_prefix(q, k, v, prefix_k, prefix_v)
    n_pre = 0 if prefix_k is None else prefix_k.shape[2]
    _check_values(suppress_idx, suppress_factor, mode, n_pre + k.shape[2])


@torch.library.custom_op("aa::atman_attention", mutates_args=())
def atman_attention(
    q: Tensor, k: Tensor, v: Tensor, suppress_idx: Tensor, suppress_factor: Tensor,
    mode: str, is_causal: bool, q_offset: int = 0, scale: float | None = None,
    prefix_k: Tensor | None = None, prefix_v: Tensor | None = None,
) -> Tensor:
    check(q, k, v, suppress_idx, suppress_factor, mode, is_causal, q_offset, scale, prefix_k,
          prefix_v)
    return reference.atman_attention(q, k, v, suppress_idx, suppress_factor, mode, is_causal,
                                     q_offset, scale, prefix_k, prefix_v)


@atman_attention.register_fake
def _(q, k, v, suppress_idx, suppress_factor, mode, is_causal, q_offset=0, scale=None,
      prefix_k=None, prefix_v=None):
    _check(q, k, v, suppress_idx, suppress_factor, mode, q_offset)
    _check_prefix(q, k, v, prefix_k, prefix_v)
    return q.new_empty(*q.shape[:3], v.shape[3])


_triton = triton_kernel(_TRITON, "atman_attention", fallback=reference.atman_attention)


def _cuda(q, k, v, suppress_idx, suppress_factor, mode, is_causal, q_offset=0, scale=None,
          prefix_k=None, prefix_v=None):
    """Triton on one key sequence per row (the prefix concatenated in front); float64 runs the
    reference."""
    if q.dtype == torch.float64:
        return reference.atman_attention(q, k, v, suppress_idx, suppress_factor, mode,
                                         is_causal, q_offset, scale, prefix_k, prefix_v)
    k, v = reference.with_prefix(k, v, prefix_k, prefix_v)
    return _triton(q, k, v, suppress_idx, suppress_factor, mode, is_causal, q_offset, scale)


register_kernels(atman_attention, check=check, cpu=cpu.atman_attention, cuda=_cuda)


def _samples(device: str):
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)

    idx = torch.tensor([[1, -1], [0, 3], [-1, -1]], device=device)
    fac = torch.tensor([[0.1, 1.0], [0.5, 0.2], [1.0, 1.0]], device=device)
    for mode in MODES:
        yield (randn(3, 4, 5, 8), randn(3, 2, 5, 8), randn(3, 2, 5, 8), idx, fac, mode, True), {}
        yield (randn(3, 2, 2, 8), randn(3, 2, 6, 8), randn(3, 2, 6, 4), idx, fac, mode, True), {
            "q_offset": 4, "scale": 0.3}
        yield (randn(3, 4, 3, 8), randn(3, 2, 3, 8), randn(3, 2, 3, 4),
               torch.tensor([[5, -1], [3, 4], [-1, -1]], device=device), fac, mode, True), {
            "q_offset": 3, "prefix_k": randn(1, 2, 3, 8), "prefix_v": randn(1, 2, 3, 4)}
    yield (randn(3, 2, 4, 8, dtype=torch.bfloat16), randn(3, 2, 4, 8, dtype=torch.bfloat16),
           randn(3, 2, 4, 8, dtype=torch.bfloat16), idx, fac, "log_additive", False), {}


register_samples(atman_attention, _samples)

register_onnx(atman_attention, reason=(
    "explanation-time only: aa_compile.atman.explain routes attention to it while "
    "explaining; export the model itself (plain SDPA)"))
