"""TopK SAE encode / decode workloads: a batch of tokens through a concept SAE's encoder (linear,
TopK, sigmoid) or its decoder (k rows per token weighted by the latent values), forward
(inference) and forward + backward.

Variants (peers of the ops, no compiler involved):

- ``dense``: what sae-lens' TopK SAE does: decode scatters the k values into dense
  ``[tokens, latents]`` latents and multiplies by the decoder (``[tokens, latents] @ [latents,
  d]``), encode is ``addmm`` + ``topk`` + sigmoid + scatter into dense latents (its backward is
  the dense one: a ``[tokens, latents]`` gradient);
- ``embedding_bag``: decode as ``F.embedding_bag(mode="sum", per_sample_weights=values)`` (the
  sparsify / SAELens#428 approach);
- ``aa_op``: ``torch.ops.aa.sae_decode`` / ``torch.ops.aa.sae_encode`` (sparse backward);
- ``sae_lens``: sae-lens' own ``TopKSAE`` (``encode``: ``addmm``, TopK, ReLU into dense latents;
  ``decode``: dense latents ``@ W_dec + b_dec``) holding this case's weights; decode's timed call
  scatters the k values into the dense latents its ``decode`` takes. Skipped where sae-lens is
  not installed (it is an optional peer). Its ReLU in place of our sigmoid costs the same.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import aa_compile  # noqa: F401  (defines torch.ops.aa.*)
from bench.harness import (CaseLabels, bench_variant, dtype_name, inference_step, seed_all,
                           skip_unless_aa_op, training_step)
from bench.roofline import INDEX_BYTES, Work, itemsize

DECODE_VARIANTS = ("dense", "embedding_bag", "aa_op", "sae_lens")
ENCODE_VARIANTS = ("dense", "aa_op", "sae_lens")


@dataclasses.dataclass(frozen=True)
class SAECase(CaseLabels):
    d: int          # width of the activations
    latents: int    # L
    k: int          # TopK
    tokens: int
    dtype: torch.dtype

    SHAPE = "d{d} L{latents} k{k} T{tokens}"
    ID = "d{d}-L{latents}-k{k}-T{tokens}-{dtype}"


def sae_cases(quick: bool, device: str) -> list[SAECase]:
    """Quick: d=512, 32x latents, k=32 (0.2% active), 512 tokens, float32. Full: d=4096 with
    16x and 32x latents and k in {32, 128, 2048}: CUDA 4096 tokens in bfloat16, CPU 256 tokens
    in float32 (the decoder alone is 1-2 GiB there)."""
    if quick:
        return [SAECase(512, 16384, 32, 512, torch.float32)]
    tokens, dtype = (4096, torch.bfloat16) if device == "cuda" else (256, torch.float32)
    return [SAECase(4096, factor * 4096, k, tokens, dtype)
            for factor in (16, 32) for k in (32, 128, 2048)]


#: the shapes of this workload file, per --quick / --device (see bench/conftest.py)
CASES = sae_cases


def decode_work(case: SAECase, backward: bool) -> Work:
    """Bytes one decode must move: the touched decoder rows, indices and values, the output;
    the backward reads the gradient and writes the dense decoder gradient and dvalues."""
    e, t, k, d = itemsize(dtype_name(case.dtype)), case.tokens, case.k, case.d
    rows = min(t * k, case.latents) * d * e
    forward = rows + t * k * (INDEX_BYTES + e) + t * d * e
    return Work(forward + ((t * d + case.latents * d + t * k) * e + rows if backward else 0))


def encode_work(case: SAECase, backward: bool) -> Work:
    """Bytes one encode must move: x, the encoder and biases, the values and indices; the
    backward reads the gradient and x and writes dx and the dense encoder gradient."""
    e, t, k, d, lat = itemsize(dtype_name(case.dtype)), case.tokens, case.k, case.d, case.latents
    forward = (t * d + lat * d + lat + d) * e + t * k * (INDEX_BYTES + e)
    return Work(forward + ((t * k + 2 * t * d + lat * d + lat + d) * e if backward else 0))


@pytest.fixture(scope="module")
def base(case, settings):
    """Decoder rows, encoder, biases, an input batch and its TopK, built once per case."""
    seed_all(0)
    dev, dt = settings.device, case.dtype
    w_dec = (torch.randn(case.latents, case.d, device=dev) / case.d ** 0.5).to(dt)
    w_enc = (torch.randn(case.latents, case.d, device=dev) / case.d ** 0.5).to(dt)
    bias = torch.zeros(case.latents, device=dev, dtype=dt)
    pre_bias = torch.zeros(case.d, device=dev, dtype=dt)
    x = torch.randn(case.tokens, case.d, device=dev, dtype=dt)
    values, indices = torch.ops.aa.sae_encode(x, w_enc, bias, pre_bias, case.k, True)
    return dict(w_dec=w_dec, w_enc=w_enc, bias=bias, pre_bias=pre_bias, x=x, values=values,
                indices=indices)


def sae_lens_topk(case: SAECase, base: dict) -> torch.nn.Module:
    """sae-lens' ``TopKSAE`` with the case's encoder, decoder and biases (skips the test where
    sae-lens is not installed)."""
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (optional peer: "
                                   "pip install sae-lens)")
    w_enc = base["w_enc"]
    cfg = sae_lens.TopKSAEConfig(d_in=case.d, d_sae=case.latents, k=case.k,
                                 dtype=dtype_name(case.dtype), device=str(w_enc.device))
    sae = sae_lens.TopKSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(w_enc.t())
        sae.b_enc.copy_(base["bias"])
        sae.b_dec.copy_(base["pre_bias"])
        sae.W_dec.copy_(base["w_dec"])
    return sae


class SAELensDecode(torch.nn.Module):
    """``(w, idx, v) -> TopKSAE.decode(dense latents)``: its own ``W_dec`` (a copy of ``w``)
    and ``b_dec``; the k values are scattered into the dense latents its API takes."""

    def __init__(self, sae: torch.nn.Module, latents: int) -> None:
        super().__init__()
        self.sae, self.latents = sae, latents

    def forward(self, w, idx, v):
        z = torch.zeros(v.shape[0], self.latents, device=v.device, dtype=v.dtype)
        return self.sae.decode(z.scatter(1, idx, v))


class SAELensEncode(torch.nn.Module):
    """``(x, w, b, pb) -> TopKSAE.encode(x)``: dense latents from its own weights (copies of
    ``w``, ``b``, ``pb``)."""

    def __init__(self, sae: torch.nn.Module) -> None:
        super().__init__()
        self.sae = sae

    def forward(self, x, w, b, pb):
        return self.sae.encode(x)


def peer_modules(fn) -> tuple:
    """What else holds gradients to clear: the sae-lens peer's own parameters."""
    return (fn,) if isinstance(fn, torch.nn.Module) else ()


def decode_fn(variant: str, latents: int, case: SAECase, base: dict):
    if variant == "sae_lens":
        peer = SAELensDecode(sae_lens_topk(case, base), latents)
        want = F.embedding_bag(base["indices"], base["w_dec"], per_sample_weights=base["values"],
                               mode="sum") + base["pre_bias"]
        with torch.no_grad():
            got = peer(base["w_dec"], base["indices"], base["values"])
        tol = 1e-4 if case.dtype == torch.float32 else 5e-2
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        return peer
    if variant == "dense":
        def dense(w, idx, v):
            z = torch.zeros(v.shape[0], latents, device=v.device, dtype=v.dtype)
            return z.scatter(1, idx, v) @ w
        return dense
    if variant == "embedding_bag":
        return lambda w, idx, v: F.embedding_bag(idx, w, per_sample_weights=v, mode="sum")
    skip_unless_aa_op("sae_decode")
    return torch.ops.aa.sae_decode


def encode_fn(variant: str, k: int, case: SAECase, base: dict):
    if variant == "sae_lens":
        peer = SAELensEncode(sae_lens_topk(case, base))
        with torch.no_grad():
            dense = peer(base["x"], base["w_enc"], base["bias"], base["pre_bias"])
        if case.dtype == torch.float32:  # (bfloat16 ties may pick other latents)
            kept = dense.ne(0).nonzero()[:, 1].view(case.tokens, -1).sort(-1).values
            assert torch.equal(kept, base["indices"].sort(-1).values), \
                "sae-lens keeps other latents than aa::sae_encode"
        return peer
    if variant == "dense":
        def dense(x, w, b, pb):
            pre = torch.addmm(b, x - pb, w.t())
            top, idx = pre.topk(k, dim=-1)
            return torch.zeros_like(pre).scatter(1, idx, torch.sigmoid(top))
        return dense
    skip_unless_aa_op("sae_encode")
    return lambda x, w, b, pb: torch.ops.aa.sae_encode(x, w, b, pb, k, True)[0]


@pytest.mark.parametrize("variant", DECODE_VARIANTS)
def test_sae_decode_fwd(benchmark, settings, case, base, variant, repeat):
    bench_variant(benchmark, settings, case, variant, "sae_decode_fwd", kind="op",
                  work=decode_work(case, backward=False),
                  build=lambda: decode_fn(variant, case.latents, case, base),
                  step=lambda fn: inference_step(fn, base["w_dec"], base["indices"],
                                                 base["values"]))


@pytest.mark.parametrize("variant", DECODE_VARIANTS)
def test_sae_decode_fwd_bwd(benchmark, settings, case, base, variant, repeat):
    w = base["w_dec"].clone().requires_grad_(True)
    v = base["values"].clone().requires_grad_(True)
    grad = torch.randn(case.tokens, case.d, device=settings.device, dtype=case.dtype)
    bench_variant(benchmark, settings, case, variant, "sae_decode_fwd_bwd", kind="op",
                  work=decode_work(case, backward=True),
                  build=lambda: decode_fn(variant, case.latents, case, base),
                  step=lambda fn: training_step(fn, w, base["indices"], v, grad=grad,
                                                clear=(w, v, *peer_modules(fn))))


@pytest.mark.parametrize("variant", ENCODE_VARIANTS)
def test_sae_encode_fwd(benchmark, settings, case, base, variant, repeat):
    bench_variant(benchmark, settings, case, variant, "sae_encode_fwd", kind="op",
                  work=encode_work(case, backward=False),
                  build=lambda: encode_fn(variant, case.k, case, base),
                  step=lambda fn: inference_step(fn, base["x"], base["w_enc"], base["bias"],
                                                 base["pre_bias"]))


@pytest.mark.parametrize("variant", ENCODE_VARIANTS)
def test_sae_encode_fwd_bwd(benchmark, settings, case, base, variant, repeat):
    leaves = [base[n].clone().requires_grad_(True) for n in ("x", "w_enc", "bias", "pre_bias")]
    bench_variant(benchmark, settings, case, variant, "sae_encode_fwd_bwd", kind="op",
                  work=encode_work(case, backward=True),
                  build=lambda: encode_fn(variant, case.k, case, base),
                  step=lambda fn: training_step(fn, *leaves, grad=lambda out: torch.ones_like(out),
                                                clear=(*leaves, *peer_modules(fn))))
