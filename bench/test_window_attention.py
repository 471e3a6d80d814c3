"""Sliding-window attention workloads shaped like HAT's byte encoder: causal attention over a
packed byte stream of several documents, each byte seeing the last ``window`` bytes of its own
document; forward (inference) and forward + backward.

Variants: ``eager`` (the HAT reference's dense attention: ``F.scaled_dot_product_attention``
with an explicit boolean ``[T, T]`` mask, as ``aa_compile.models.hat.modules.MaskedAttention``
does; the mask is built once, outside the timed calls, as the model builds it once per batch),
``inductor`` (torch.compile of it), and peers: ``aa_op`` (``aa::window_attention`` called
eagerly on the document offsets: O(T * window) blocks on CPU, Triton flash attention on CUDA)
and ``flex_attention`` (``torch.nn.attention.flex_attention`` compiled by inductor with a block
mask for the same document + window rule, built outside the timed calls; forward only on CPU,
where this torch has no flex-attention backward). There is no ``aa`` variant yet: no pass
rewrites the masked SDPA into the op so far.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from aa_compile.kernels.window_attention import reference

import aa_compile  # noqa: F401  (defines torch.ops.aa.*)
from aa_compile.ops.window_attention import attention
from bench.harness import (CaseLabels, bench_variant, compile_variant, dtype_name, inference_step,
                           seed_all, training_step)
from bench.roofline import Work, itemsize, precision_of

VARIANTS = ("eager", "inductor")
PEERS = ("aa_op", "flex_attention")


@dataclasses.dataclass(frozen=True)
class WindowAttentionCase(CaseLabels):
    tokens: int  # T, bytes in the packed stream
    docs: int  # documents packed into it (random lengths, seed 0)
    heads: int
    kv_heads: int
    head_dim: int
    window: int
    dtype: torch.dtype

    SHAPE = "T{tokens}/{docs}docs H{heads}/{kv_heads} D{head_dim} w{window}"
    ID = "T{tokens}-docs{docs}-H{heads}-{kv_heads}-D{head_dim}-w{window}-{dtype}"


def window_attention_cases(quick: bool, device: str) -> list[WindowAttentionCase]:
    """Quick: 4096 bytes in 8 documents, 4 heads of 64, window 768 (HAT's default), float32.
    Full: plus bfloat16 on CPU; on CUDA 16384 bytes in 16 documents, GQA 8/2, bfloat16."""
    base = WindowAttentionCase(4096, 8, 4, 4, 64, 768, torch.float32)
    if quick:
        return [base]
    if device == "cuda":
        return [base, WindowAttentionCase(16384, 16, 8, 2, 64, 768, torch.bfloat16)]
    return [base, dataclasses.replace(base, dtype=torch.bfloat16)]


CASES = window_attention_cases


def _offsets(case: WindowAttentionCase) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    cuts = torch.randperm(case.tokens - 1, generator=g)[: case.docs - 1].sort().values + 1
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([case.tokens])])


def attended_pairs(doc_lengths: list[int], window: int) -> int:
    """(query, key) pairs the mask allows: query i of a document sees ``min(i + 1, window)``
    keys."""
    total = 0
    for n in doc_lengths:
        full = min(n, window)
        total += full * (full + 1) // 2 + (n - full) * window
    return total


def work(case: WindowAttentionCase, doc_lengths: list[int], backward: bool) -> Work:
    """FLOPs and bytes one call must do: per allowed pair and query head, the forward's two
    products (``QK^T``, ``PV``) are ``4 D`` FLOPs and the backward's five ``10 D``; the
    forward reads q, k, v and writes out and the float32 logsumexp, the backward reads q, k,
    v, out, dout and the logsumexp and writes dq, dk, dv."""
    e, t, d = itemsize(dtype_name(case.dtype)), case.tokens, case.head_dim
    pairs = attended_pairs(doc_lengths, case.window) * case.heads
    q_bytes, kv_bytes, lse = case.heads * t * d * e, case.kv_heads * t * d * e, case.heads * t * 4
    precision = precision_of(dtype_name(case.dtype))
    fwd = Work(2 * q_bytes + 2 * kv_bytes + lse, 4 * d * pairs, precision)
    if not backward:
        return fwd
    return fwd + Work(3 * q_bytes + 2 * kv_bytes + lse + q_bytes + 2 * kv_bytes, 10 * d * pairs,
                      precision)


def dense_window_attention(q, k, v, mask):
    """The reference: dense SDPA over the packed stream with the boolean [T, T] mask."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.fixture(scope="module")
def base(case, settings):
    """q, k, v ``[1, H, T, D]``, upstream gradient, document offsets and the dense mask."""
    seed_all(0)
    dev = settings.device
    q = torch.randn(1, case.heads, case.tokens, case.head_dim, device=dev, dtype=case.dtype)
    k, v = (torch.randn(1, case.kv_heads, case.tokens, case.head_dim, device=dev,
                        dtype=case.dtype) for _ in range(2))
    offsets = _offsets(case).to(dev)
    mask = reference.mask(offsets, case.tokens, case.window, dev)
    return q, k, v, torch.randn_like(q), offsets, mask


def _flex(case, offsets, device):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        pytest.skip("torch.nn.attention.flex_attention is not available in this torch")
    doc = reference.doc_ids(offsets, case.tokens, device)
    window = case.window

    def mask_mod(b, h, qi, kj):
        return (doc[qi] == doc[kj]) & (qi >= kj) & (qi - kj < window)

    block_mask = create_block_mask(mask_mod, None, None, case.tokens, case.tokens, device=device)
    fn = torch.compile(flex_attention)
    gqa = case.heads != case.kv_heads
    return lambda q, k, v: fn(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def build(case, base, variant: str, device: str):
    """A callable ``(q, k, v) -> out`` for ``variant``."""
    _, _, _, _, offsets, mask = base
    if variant in VARIANTS:
        fn = compile_variant(dense_window_attention, variant)
        return lambda q, k, v: fn(q, k, v, mask)
    if variant == "aa_op":
        return lambda q, k, v: attention(q, k, v, offsets, case.window)
    if variant == "flex_attention":
        return _flex(case, offsets, device)
    raise AssertionError(variant)


@pytest.mark.parametrize("variant", VARIANTS + PEERS)
def test_window_attention_fwd(benchmark, settings, case, base, variant, repeat):
    q, k, v = base[:3]
    bench_variant(benchmark, settings, case, variant, "window_attention_fwd", kind="model",
                  work=work(case, base[4].diff().tolist(), backward=False),
                  build=lambda: build(case, base, variant, settings.device),
                  step=lambda run: inference_step(run, q, k, v))


@pytest.mark.parametrize("variant", VARIANTS + PEERS)
def test_window_attention_fwd_bwd(benchmark, settings, case, base, variant, repeat):
    if variant == "flex_attention" and settings.device == "cpu":
        pytest.skip("flex_attention has no backward on CPU in this torch")
    q, k, v, grad = (t.detach().clone() for t in base[:4])
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    bench_variant(benchmark, settings, case, variant, "window_attention_fwd_bwd", kind="model",
                  work=work(case, base[4].diff().tolist(), backward=True),
                  build=lambda: build(case, base, variant, settings.device),
                  step=lambda run: training_step(run, *leaves, grad=grad, clear=leaves))
