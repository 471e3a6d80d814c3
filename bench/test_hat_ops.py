"""HAT op workloads: word pooling (one latent query per word over the word's bytes) and the
decoder's guide-vector add + first attention norm, forward (inference) and forward + backward.

Variants: ``eager`` (the reference models' padded computation: ``WordPooling``'s SDPA over
``k[word_bytes]`` / ``v[word_bytes]`` ``[W, H, L, hd]`` with the key mask ``word_mask``; the
decoder's ``x + g[byte_word]`` followed by the Llama ``RMSNorm``), ``inductor`` (torch.compile of
it), and the peer ``aa_op`` (``aa::word_pool`` / ``aa::guide_add_rms_norm`` called eagerly on the
CSR ``word_offsets``: no padding). There is no ``aa`` variant yet: the passes that rewrite the
HAT reference into these ops are still to come.

Inputs are shaped like a HAT byte encoder on real text: ``aa_compile.data.text("mixed")`` through
the HAT splitter (words of at most 100 bytes; about 5 bytes per word on average, the longest
word decides ``L``), activations random. The index tensors (``word_bytes``, ``word_mask``,
``byte_word``, ``word_offsets``) come from the `ByteBatch`, built once, as the model gets them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import aa_compile  # noqa: F401  (defines torch.ops.aa.*)
from aa_compile.data import text
from aa_compile.models.hat import HATByteSplitter
from aa_compile.models.transformer import RMSNorm
from bench.harness import (CaseLabels, bench_variant, compile_variant, dtype_name, fresh_copy,
                           inference_step, seed_all, training_step)
from bench.roofline import INDEX_BYTES, Work, itemsize

VARIANTS = ("eager", "inductor")
PEERS = ("aa_op",)


@dataclasses.dataclass(frozen=True)
class HATOpCase(CaseLabels):
    n_bytes: int  # T (cut from the corpus at a word boundary)
    d_enc: int  # byte width (= pooling width here)
    heads: int
    dtype: torch.dtype

    SHAPE = "T{n_bytes} d{d_enc} H{heads}"
    ID = "T{n_bytes}-d{d_enc}-H{heads}-{dtype}"


def hat_op_cases(quick: bool, device: str) -> list[HATOpCase]:
    """Quick: ~4k bytes, d 256, 4 heads, float32. Full: 16k bytes, d 1024, 8 heads (bfloat16 on
    CUDA, float32 on a CPU)."""
    if quick:
        return [HATOpCase(4096, 256, 4, torch.float32)]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return [HATOpCase(4096, 256, 4, torch.float32), HATOpCase(16384, 1024, 8, dtype)]


CASES = hat_op_cases


@pytest.fixture(scope="module")
def base(case, settings):
    """Batch indices from real text, and random activations, built once per case."""
    seed_all(0)
    batch = HATByteSplitter(100).encode(text("mixed", max_bytes=case.n_bytes))
    dev = settings.device
    batch = batch.to(dev)
    t, w = batch.n_bytes, batch.n_words
    hd = case.d_enc // case.heads

    def randn(*shape):
        return torch.randn(*shape, device=dev, dtype=case.dtype)

    norm = RMSNorm(case.d_enc, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
    tensors = {"q": randn(1, case.heads, hd), "k": randn(t, case.heads, hd),
               "v": randn(t, case.heads, hd), "pool_grad": randn(w, case.heads, hd),
               "x": randn(t, case.d_enc), "g": randn(w, case.d_enc),
               "y_grad": randn(t, case.d_enc), "n_grad": randn(t, case.d_enc)}
    return batch, norm.to(device=dev, dtype=case.dtype), tensors


def shape_of(case, batch) -> str:
    width = int(batch.word_mask.shape[1]) if batch.n_words else 0
    return f"{case.shape} W{batch.n_words} L{width}"


# -- word pooling ----------------------------------------------------------------------------

def pool_work(case: HATOpCase, n_bytes: int, n_words: int, backward: bool) -> Work:
    """Bytes one call must move (the FLOPs, ``4 hd`` per byte and head, are negligible):
    the forward reads the shared query, k, v and the word offsets and writes ``[W, H, hd]``;
    the backward reads the gradient, the query, k, v and the offsets and writes dq, dk, dv."""
    e, width = itemsize(dtype_name(case.dtype)), case.d_enc  # H * hd
    kv, q, out = 2 * n_bytes * width * e, width * e, n_words * width * e
    offsets = (n_words + 1) * INDEX_BYTES
    forward = q + kv + offsets + out
    return Work(forward + ((out + q + kv + offsets) + (q + kv) if backward else 0))


def pool_reference(q, k, v, word_bytes, word_mask):
    """`WordPooling`'s attention on padded words: ``[W, H, hd]``."""
    n_words = word_bytes.shape[0]
    qq = q[:, :, None, :].expand(n_words, -1, -1, -1)  # [W, H, 1, hd]
    kk = k[word_bytes].transpose(1, 2)  # [W, H, L, hd]
    vv = v[word_bytes].transpose(1, 2)
    out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=word_mask[:, None, None, :])
    return out[:, :, 0]


def build_pool(batch, variant):
    if variant in VARIANTS:
        fn = compile_variant(pool_reference, variant)
        return lambda q, k, v: fn(q, k, v, batch.word_bytes, batch.word_mask)
    if variant == "aa_op":
        return lambda q, k, v: torch.ops.aa.word_pool(q, k, v, batch.word_offsets)
    raise AssertionError(variant)


@pytest.mark.parametrize("variant", VARIANTS + PEERS)
def test_word_pool_fwd(benchmark, settings, case, base, variant, repeat):
    batch, _, t = base
    bench_variant(benchmark, settings, case, variant, "word_pool_fwd", kind="op",
                  work=pool_work(case, batch.n_bytes, batch.n_words, backward=False),
                  shape=shape_of(case, batch), build=lambda: build_pool(batch, variant),
                  step=lambda run: inference_step(run, t["q"], t["k"], t["v"]))


@pytest.mark.parametrize("variant", VARIANTS + PEERS)
def test_word_pool_fwd_bwd(benchmark, settings, case, base, variant, repeat):
    batch, _, t = base
    q, k, v = (t[n].detach().clone().requires_grad_(True) for n in ("q", "k", "v"))
    bench_variant(benchmark, settings, case, variant, "word_pool_fwd_bwd", kind="op",
                  work=pool_work(case, batch.n_bytes, batch.n_words, backward=True),
                  shape=shape_of(case, batch), build=lambda: build_pool(batch, variant),
                  step=lambda run: training_step(run, q, k, v, grad=t["pool_grad"],
                                                 clear=(q, k, v)))


# -- guide add + first attention norm --------------------------------------------------------

def guide_work(case: HATOpCase, n_bytes: int, n_words: int, backward: bool) -> Work:
    """Bytes one call must move: the forward reads x ``[T, d]``, g ``[W, d]``, the offsets
    and the norm weight and writes y and the normed y; the backward reads both output
    gradients, y, the weight and the offsets and writes dx, dg and dweight."""
    e, d = itemsize(dtype_name(case.dtype)), case.d_enc
    rows, words, offsets = n_bytes * d * e, n_words * d * e, (n_words + 1) * INDEX_BYTES
    forward = rows + words + offsets + d * e + 2 * rows
    return Work(forward + ((3 * rows + d * e + offsets) + (rows + words + d * e)
                           if backward else 0))


def build_guide(batch, norm, variant):
    """``(callable (x, g) -> (y, normed), norm module whose weight it uses)``."""
    m = fresh_copy(norm)
    if variant in VARIANTS:
        def guide_reference(x, g, byte_word):
            y = x + g[byte_word]  # ByteDecoder: x = x + guide(pred)[byte_word]
            return y, m(y)  # the first ByteBlock's attn_norm

        fn = compile_variant(guide_reference, variant)
        return (lambda x, g: fn(x, g, batch.byte_word)), m
    if variant == "aa_op":
        return (lambda x, g: torch.ops.aa.guide_add_rms_norm(x, g, batch.word_offsets,
                                                             m.weight, m.eps)), m
    raise AssertionError(variant)


@pytest.mark.parametrize("variant", VARIANTS + PEERS)
def test_guide_add_fwd(benchmark, settings, case, base, variant, repeat):
    batch, norm, t = base
    bench_variant(benchmark, settings, case, variant, "guide_add_norm_fwd", kind="op",
                  work=guide_work(case, batch.n_bytes, batch.n_words, backward=False),
                  shape=shape_of(case, batch), build=lambda: build_guide(batch, norm, variant),
                  step=lambda built: inference_step(built[0], t["x"], t["g"]))


@pytest.mark.parametrize("variant", VARIANTS + PEERS)
def test_guide_add_fwd_bwd(benchmark, settings, case, base, variant, repeat):
    batch, norm, t = base
    x, g = (t[n].detach().clone().requires_grad_(True) for n in ("x", "g"))
    bench_variant(benchmark, settings, case, variant, "guide_add_norm_fwd_bwd", kind="op",
                  work=guide_work(case, batch.n_bytes, batch.n_words, backward=True),
                  shape=shape_of(case, batch), build=lambda: build_guide(batch, norm, variant),
                  step=lambda built: training_step(built[0], x, g, grad=(t["y_grad"], t["n_grad"]),
                                                   clear=(x, g, built[1])))
