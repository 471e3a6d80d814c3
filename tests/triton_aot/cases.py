"""The library calls whose Triton launches are compiled ahead of time: every op with a Triton
CUDA kernel, at LLM shapes (hidden 4096, head dim 128, 32 query / 8 key-value heads, T-FREE
m = 10, norms up to d = 16384), in each float dtype the op's Triton path takes.

A case names an op and builds its arguments on the CPU; `launches.record` calls the op's CUDA
kernel with them. Tensors whose values no check reads are ``torch.empty`` (their pages are
never touched, so a 4096 x 16384 table costs nothing); index tensors are real.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
#: every float dtype the Triton paths take (float64 goes to the CPU or reference code)
ALL = (BF16, FP16, FP32)
HIDDEN, HEAD_DIM, HQ, HKV = 4096, 128, 32, 8
TOKENS = 2048
TFREE_M, TFREE_V = 10, 32768


@dataclasses.dataclass(frozen=True)
class Case:
    """``op`` (qualified name) called with ``make()``; ``name`` is the readable test id."""

    name: str
    op: str
    make: Callable[[], tuple[Any, ...]]


def _short(dtype: torch.dtype) -> str:
    return {BF16: "bf16", FP16: "fp16", FP32: "fp32"}[dtype]


def _empty(*shape: int, dtype: torch.dtype = FP32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype)


def _filled(*shape: int, dtype: torch.dtype = FP32) -> torch.Tensor:
    """Values some wrapper computes with (FP8 scales): finite, non-zero."""
    return torch.full(shape, 0.5, dtype=dtype)


def _offsets(lengths: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    out[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return out


def _lengths(n: int, low: int, high: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (n,), generator=g).tolist()


def _norm_cases() -> list[Case]:
    out = []
    for d in (HIDDEN, 16384):
        for dt in ALL:
            tag = f"d{d}-{_short(dt)}"
            out += [
                Case(f"rms_norm-{tag}", "aa::rms_norm",
                     lambda d=d, dt=dt: (_empty(TOKENS, d, dtype=dt), _empty(d, dtype=dt), 1e-6,
                                         None)),
                Case(f"rms_norm_backward-{tag}", "aa::rms_norm_backward",
                     lambda d=d, dt=dt: (_empty(TOKENS, d, dtype=dt), _empty(TOKENS, d, dtype=dt),
                                         _empty(d, dtype=dt), 1e-6)),
            ]
            words = _offsets(_lengths(TOKENS // 6, 1, 10, seed=d))
            t = int(words[-1])
            out += [
                Case(f"guide_add_rms_norm-{tag}", "aa::guide_add_rms_norm",
                     lambda d=d, dt=dt, w=words, t=t: (
                         _empty(t, d, dtype=dt), _empty(w.numel() - 1, d, dtype=dt), w,
                         _empty(d, dtype=dt), 1e-6, None)),
                Case(f"guide_add_rms_norm_backward-{tag}", "aa::guide_add_rms_norm_backward",
                     lambda d=d, dt=dt, w=words, t=t: (
                         _empty(t, d, dtype=dt), _empty(t, d, dtype=dt), _empty(t, d, dtype=dt),
                         _empty(d, dtype=dt), w, 1e-6)),
            ]
    return out


def _guide_add_cases() -> list[Case]:
    words = _offsets(_lengths(TOKENS // 6, 1, 10, seed=1))
    t, n = int(words[-1]), words.numel() - 1
    return [c for dt in ALL for c in (
        Case(f"guide_add-d{HIDDEN}-{_short(dt)}", "aa::guide_add",
             lambda dt=dt: (_empty(t, HIDDEN, dtype=dt), _empty(n, HIDDEN, dtype=dt), words)),
        Case(f"guide_add_backward-d{HIDDEN}-{_short(dt)}", "aa::guide_add_backward",
             lambda dt=dt: (_empty(t, HIDDEN, dtype=dt), words)),
    )]


def _bag(n_words: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A T-FREE batch as a bag per word: ``m`` slots for each of its trigrams."""
    offsets = _offsets([TFREE_M * n for n in _lengths(n_words, 2, 9, seed)])
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TFREE_V, (int(offsets[-1]),), generator=g), offsets


def _trigram_bag_cases() -> list[Case]:
    words = 1024
    idx, offs = _bag(words, seed=2)
    out = []
    for dt in ALL:
        s = _short(dt)

        def table(dt=dt):
            return _empty(TFREE_V, HIDDEN, dtype=dt)

        def psw(dt=dt):
            return _empty(idx.numel(), dtype=dt)

        out += [
            Case(f"trigram_bag-h{HIDDEN}-{s}", "aa::trigram_bag",
                 lambda table=table: (table(), idx, offs, None, True)),
            Case(f"trigram_bag-psw-h{HIDDEN}-{s}", "aa::trigram_bag",
                 lambda table=table, psw=psw: (table(), idx, offs, psw(), True)),
            Case(f"trigram_bag_backward-h{HIDDEN}-{s}", "aa::trigram_bag_backward",
                 lambda table=table, psw=psw, dt=dt: (
                     _empty(words, HIDDEN, dtype=dt), table(), idx, offs, psw(), True, True,
                     True)),
            Case(f"trigram_bag_backward-atomic-h{HIDDEN}-{s}", "aa::trigram_bag_backward",
                 lambda table=table, dt=dt: (
                     _empty(words, HIDDEN, dtype=dt), table(), idx, offs, None, True, False,
                     False)),
        ]
    return out


def _hashed_cases() -> list[Case]:
    words = 1024
    offsets = _offsets(_lengths(words, 2, 9, seed=3))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1 << 24, (int(offsets[-1]),), generator=g)
    out = []
    for dt in ALL:
        s = _short(dt)
        out += [
            Case(f"hashed_trigram_bag-m{TFREE_M}-{s}", "aa::hashed_trigram_bag",
                 lambda dt=dt: (_empty(TFREE_V, HIDDEN, dtype=dt), ids, offsets, TFREE_M, 2,
                                None, True)),
            Case(f"hashed_trigram_bag_backward-m{TFREE_M}-{s}", "aa::hashed_trigram_bag_backward",
                 lambda dt=dt: (_empty(words, HIDDEN, dtype=dt), _empty(TFREE_V, HIDDEN, dtype=dt),
                                ids, offsets, TFREE_M, 2, None, True)),
        ]
    return out


def _dictionary_cases() -> list[Case]:
    n_words = 16384
    trigrams = torch.tensor(_lengths(n_words, 1, 8, seed=4))
    offsets = _offsets((trigrams * TFREE_M).tolist())
    g = torch.Generator().manual_seed(4)
    slots = torch.randint(0, TFREE_V, (int(offsets[-1]),), generator=g)
    weights = torch.ones(slots.numel())
    return [Case(f"dictionary_score-v{TFREE_V}-{_short(dt)}", "aa::dictionary_score",
                 lambda dt=dt: (_empty(8, TFREE_V, dtype=dt), offsets, slots, weights, trigrams,
                                TFREE_M, 5))
            for dt in ALL]


def _word_pool_cases() -> list[Case]:
    words = _offsets(_lengths(TOKENS // 6, 1, 10, seed=5))
    t, n = int(words[-1]), words.numel() - 1
    out = []
    for dt in ALL:
        s = _short(dt)

        def qkv(dt=dt):
            return (_empty(1, HQ, HEAD_DIM, dtype=dt), _empty(t, HKV, HEAD_DIM, dtype=dt),
                    _empty(t, HKV, HEAD_DIM, dtype=dt))

        out += [
            Case(f"word_pool-h{HQ}x{HEAD_DIM}-{s}", "aa::word_pool",
                 lambda qkv=qkv: (*qkv(), words, None)),
            Case(f"word_pool_backward-h{HQ}x{HEAD_DIM}-{s}", "aa::word_pool_backward",
                 lambda qkv=qkv, dt=dt: (_empty(n, HQ, HEAD_DIM, dtype=dt), *qkv(), words, None)),
        ]
    return out


def _window_cases() -> list[Case]:
    t, window = 1024, 256
    docs = _offsets([300, 500, 224])
    out = []
    for dt in ALL:
        s = _short(dt)

        def qkv(dt=dt):
            return (_empty(HQ, t, HEAD_DIM, dtype=dt), _empty(HKV, t, HEAD_DIM, dtype=dt),
                    _empty(HKV, t, HEAD_DIM, dtype=dt))

        out += [
            Case(f"window_attention-w{window}-{s}", "aa::window_attention",
                 lambda qkv=qkv: (*qkv(), docs, window, None)),
            Case(f"window_attention_backward-w{window}-{s}", "aa::window_attention_backward",
                 lambda qkv=qkv, dt=dt: (
                     _empty(HQ, t, HEAD_DIM, dtype=dt), None, *qkv(),
                     _empty(HQ, t, HEAD_DIM, dtype=dt), _empty(HQ, t), docs, window, None)),
        ]
    return out


def _atman_cases() -> list[Case]:
    batch, s_len = 8, 512
    idx = torch.tensor([[i, -1] for i in range(batch)])
    fac = torch.full((batch, 2), 0.1)
    out = []
    for dt in ALL:
        for mode in ("multiplicative", "log_additive"):
            out.append(Case(
                f"atman_attention-{mode}-s{s_len}-{_short(dt)}", "aa::atman_attention",
                lambda dt=dt, mode=mode: (
                    _empty(batch, HQ, s_len, HEAD_DIM, dtype=dt),
                    _empty(batch, HKV, s_len, HEAD_DIM, dtype=dt),
                    _empty(batch, HKV, s_len, HEAD_DIM, dtype=dt), idx, fac, mode, True, 0, None,
                    None, None)))
    return out


def _int8_cases() -> list[Case]:
    w = torch.empty(HIDDEN, HIDDEN, dtype=torch.int8)
    out = []
    for dt in ALL:
        for m in (1, TOKENS):
            out.append(Case(
                f"int8_linear-m{m}-{_short(dt)}", "aa::int8_linear",
                lambda dt=dt, m=m: (_empty(m, HIDDEN, dtype=dt), w, _filled(HIDDEN),
                                    _empty(HIDDEN, dtype=dt))))
    return out


def _fp8_cases() -> list[Case]:
    out = []
    for dt in ALL:
        s = _short(dt)
        out += [
            Case(f"fp8_linear-static-m{TOKENS}-{s}", "aa::fp8_linear",
                 lambda dt=dt: (_filled(TOKENS, HIDDEN, dtype=dt),
                                _filled(HIDDEN, HIDDEN, dtype=dt), _filled(HIDDEN, dtype=dt),
                                "static", 1.0, 1.0, 1.0, 1.0, None, None)),
            Case(f"fp8_linear-rowwise-m16-{s}", "aa::fp8_linear",
                 lambda dt=dt: (_filled(16, HIDDEN, dtype=dt), _filled(HIDDEN, HIDDEN, dtype=dt),
                                None, "rowwise", 1.0, 1.0, 1.0, 1.0, None, None)),
        ]
    out.append(Case(
        f"fp8_linear_backward-tensorwise-m{TOKENS}-bf16", "aa::fp8_linear_backward",
        lambda: (_filled(TOKENS, HIDDEN, dtype=BF16), _filled(TOKENS, HIDDEN, dtype=BF16),
                 _filled(HIDDEN, HIDDEN, dtype=BF16), "tensorwise", 1.0, 1.0, 1.0, 1.0, 1.0,
                 True, True, True)))
    return out


def _sae_cases() -> list[Case]:
    """Sparse SAE decode and the sparse backward of encode (both on the trigram-bag kernels) at
    16x latents of the hidden size, k 32, 1024 tokens."""
    n, k, latents = 1024, 32, 16 * HIDDEN
    idx = torch.randint(0, latents, (n, k), generator=torch.Generator().manual_seed(9))
    out = []
    for dt in ALL:
        s = _short(dt)
        out += [
            Case(f"sae_decode-k{k}-{s}", "aa::sae_decode",
                 lambda dt=dt: (_empty(latents, HIDDEN, dtype=dt), idx, _empty(n, k, dtype=dt))),
            Case(f"sae_decode_backward-k{k}-{s}", "aa::sae_decode_backward",
                 lambda dt=dt: (_empty(n, HIDDEN, dtype=dt), _empty(latents, HIDDEN, dtype=dt),
                                idx, _empty(n, k, dtype=dt), True, True)),
            Case(f"sae_encode_backward-k{k}-{s}", "aa::sae_encode_backward",
                 lambda dt=dt: (_empty(n, k, dtype=dt), _empty(n, HIDDEN, dtype=dt),
                                _empty(latents, HIDDEN, dtype=dt), _empty(HIDDEN, dtype=dt),
                                _filled(n, k, dtype=dt), idx, True)),
        ]
    return out + _sae_encode_cases(latents)


def _sae_encode_cases(latents: int) -> list[Case]:
    """The fused encoder forward at 16x latents: k 32 and 128 (the largest fused k), at 2048
    tokens (several latent splits and the merge kernel) and at 1 token (decode-time
    generation: many splits, one token)."""
    out = []
    for dt in ALL:
        for k in (32, 128):
            for n in (TOKENS, 1):
                out.append(Case(
                    f"sae_encode-k{k}-n{n}-{_short(dt)}", "aa::sae_encode",
                    lambda dt=dt, k=k, n=n: (_empty(n, HIDDEN, dtype=dt),
                                             _empty(latents, HIDDEN, dtype=dt),
                                             _empty(latents, dtype=dt), _empty(HIDDEN, dtype=dt),
                                             k, k == 128)))
    return out


def cases() -> list[Case]:
    """Every case, in a stable order (names unique)."""
    out = (_norm_cases() + _guide_add_cases() + _trigram_bag_cases() + _hashed_cases()
           + _dictionary_cases() + _word_pool_cases() + _window_cases() + _atman_cases()
           + _int8_cases() + _fp8_cases() + _sae_cases())
    names = [c.name for c in out]
    assert len(set(names)) == len(names), "case names must be unique"
    return out


#: the architectures compiled for: Hopper (H100/H200), Ada (L4/L40S/RTX 4090), Ampere (A100)
ARCHS = (90, 89, 80)
