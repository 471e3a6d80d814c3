"""`aa::sae_encode`: forward and sparse backward equal the float64 reference (hypothesis, odd
shapes, no tokens), the fused Triton forward (every dtype, both launch paths, empty rows, the
tie rule, strided weights, the addmm fallback for large k), the op equals the reference SAE's
TopK, fullgraph compile, bad input."""

from __future__ import annotations

import importlib.util

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import aa_compile.ops  # noqa: F401  (registers aa::sae_encode)
from aa_compile.kernels.sae_encode import cpu, reference
from aa_compile.models.sae import SAEConfig, SparseAutoencoder

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if HAS_TRITON:
    from aa_compile.kernels.sae_encode import triton_kernel

BACKWARDS = ["cpu"] + (["triton"] if HAS_TRITON else [])


def _dense_autograd_float64(x, weight, bias, pre_bias, k, sigmoid, grad):
    """Independent restatement: dense pre-activations, TopK, activation, then autograd."""
    leaves = [t.double().cpu().requires_grad_() for t in (x, weight, bias, pre_bias)]
    xx, w, b, pb = leaves
    pre = (xx - pb) @ w.t() + b
    top, idx = pre.topk(k, dim=-1, sorted=True)
    values = top.sigmoid() if sigmoid else top.relu()
    grads = torch.autograd.grad(values, leaves, grad.double().cpu(), allow_unused=True)
    return values.detach(), idx, [g if g is not None else torch.zeros_like(l)
                                  for g, l in zip(grads, leaves)]


@st.composite
def cases(draw):
    latents = draw(st.integers(1, 40))
    d = draw(st.integers(1, 33))
    n = draw(st.integers(0, 7))
    k = draw(st.integers(0, latents))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x, weight = torch.randn(n, d, generator=g), torch.randn(latents, d, generator=g)
    bias, pre_bias = torch.randn(latents, generator=g), torch.randn(d, generator=g)
    grad = torch.randn(n, k, generator=g)
    return x, weight, bias, pre_bias, k, draw(st.booleans()), grad


@pytest.mark.parametrize("name", BACKWARDS)
@given(case=cases())
def test_forward_and_sparse_backward_equal_float64(name, case):
    x, weight, bias, pre_bias, k, sigmoid, grad = case
    x, weight, bias, pre_bias, grad = (t.to(DEVICE) for t in (x, weight, bias, pre_bias, grad))
    values, indices = cpu.sae_encode_fwd(x, weight, bias, pre_bias, k, sigmoid)
    ref_values, ref_idx, ref_grads = _dense_autograd_float64(x, weight, bias, pre_bias, k,
                                                             sigmoid, grad)
    torch.testing.assert_close(values.double().cpu(), ref_values, atol=1e-5, rtol=1e-5)
    assert torch.equal(indices.cpu(), ref_idx)  # random floats: no ties
    bwd = cpu.sae_encode_bwd if name == "cpu" else triton_kernel.sae_encode_bwd
    got = bwd(grad, x, weight, pre_bias, values, indices, sigmoid)
    for a, b in zip(got, ref_grads):
        torch.testing.assert_close(a.double().cpu(), b, atol=1e-4, rtol=1e-4)


# -- the tie rule and the fused forward ------------------------------------------------------

def _tied_inputs(dtype=torch.float32):
    """Small integers everywhere: every product and sum is exact in every dtype, so equal
    pre-activations are exactly equal on every path (and rows 0-1 are all-zero rows)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-1, 2, (6, 8), generator=g).float()
    x[:2] = 0
    w = torch.randint(-2, 3, (50, 8), generator=g).float()
    bias = torch.randint(-1, 2, (50,), generator=g).float()
    return [t.to(dtype) for t in (x, w, bias, torch.zeros(8))]


def test_reference_ranks_ties_by_ascending_latent_index():
    pre = torch.tensor([[1.0, 3.0, 3.0, -0.0, 0.0, 3.0],
                        [float("nan"), 2.0, float("nan"), 2.0, 2.0, 1.0]])
    top, idx = reference.ordered_topk(pre, 4)
    assert idx.tolist() == [[1, 2, 5, 0], [0, 2, 1, 3]]
    _, idx = reference.ordered_topk(pre[:1], 5)
    assert idx.tolist() == [[1, 2, 5, 0, 3]]  # -0.0 ties with +0.0: lower index first


@pytest.mark.parametrize("sigmoid", [False, True])
def test_cpu_forward_keeps_the_tie_rule(sigmoid):
    x, w, b, pb = _tied_inputs()
    values, idx = cpu.sae_encode_fwd(x, w, b, pb, 7, sigmoid)
    want_v, want_i = reference.sae_encode(x.double(), w.double(), b.double(), pb.double(), 7,
                                          sigmoid)
    assert torch.equal(idx, want_i)
    torch.testing.assert_close(values.double(), want_v)
    pre = torch.tensor([[float("nan"), 1.0, float("nan"), 5.0]])
    assert cpu.tie_ordered_topk(pre, 3)[1].tolist() == [[0, 2, 3]]
    boundary = torch.tensor([[2.0, 3.0, 2.0, 1.0, 2.0]] * 40)  # the 2nd value occurs thrice
    top, idx = cpu.tie_ordered_topk(boundary, 2)
    assert idx.tolist() == [[1, 0]] * 40 and idx.is_contiguous() and top.is_contiguous()


def _pre64(x, w, b, pb):
    return (x.double() - pb.double()) @ w.double().t() + b.double()


def _assert_valid_topk(values, indices, x, w, b, pb, k, sigmoid, tol):
    """``indices`` is a top-k of the float64 pre-activations up to ``tol`` (near-ties may go
    either way after rounding), distinct per token, and ``values`` are their activations in
    descending order."""
    pre = _pre64(x, w, b, pb)
    want_v, _ = reference.sae_encode(x.double(), w.double(), b.double(), pb.double(), k,
                                     sigmoid)
    assert values.shape == indices.shape == (x.shape[0], k) and indices.dtype == torch.int64
    if k == 0 or x.shape[0] == 0:
        return
    scale = 1 + pre.abs().amax(-1, keepdim=True)
    assert all(len(set(row)) == k for row in indices.tolist())
    kth = pre.topk(k, -1).values[:, -1:]
    assert (pre.gather(1, indices) >= kth - tol * scale).all()
    torch.testing.assert_close(values.double(), want_v, atol=tol * float(scale.max()),
                               rtol=tol)


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@st.composite
def fused_cases(draw):
    latents = draw(st.integers(1, 48))
    d = draw(st.integers(1, 24))
    n = draw(st.integers(0, 9))
    k = draw(st.integers(0, min(latents, 16)))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x, w = torch.randn(n, d, generator=g), torch.randn(latents, d, generator=g)
    b, pb = torch.randn(latents, generator=g), torch.randn(d, generator=g)
    if n and draw(st.booleans()):
        x[draw(st.integers(0, n - 1))] = pb  # an empty row: pre-activations = bias
    split = draw(st.sampled_from([None, 1, 2, 4]))
    return [t.to(dtype) for t in (x, w, b, pb)], k, draw(st.booleans()), split


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@settings(max_examples=12)
@given(case=fused_cases())
def test_fused_forward_equals_float64(case):
    (x, w, b, pb), k, sigmoid, split = case
    values, indices = triton_kernel.sae_encode_fused(*(t.to(DEVICE) for t in (x, w, b, pb)),
                                                     k, sigmoid, split)
    assert values.dtype == x.dtype
    _assert_valid_topk(values.cpu(), indices.cpu(), x, w, b, pb, k, sigmoid, TOL[x.dtype])


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("split", [1, 2])
def test_fused_forward_keeps_the_tie_rule(dtype, split):
    x, w, b, pb = _tied_inputs(dtype)
    values, idx = triton_kernel.sae_encode_fused(*(t.to(DEVICE) for t in (x, w, b, pb)), 7,
                                                 True, split)
    want_v, want_i = reference.sae_encode(x.double(), w.double(), b.double(), pb.double(), 7,
                                          True)
    assert torch.equal(idx.cpu(), want_i)
    torch.testing.assert_close(values.double().cpu(), want_v, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_fused_forward_reads_a_transposed_weight():
    """sae-lens keeps the encoder as ``W_enc [d, L]``; the kernel reads ``W_enc.T`` in place."""
    g = torch.Generator().manual_seed(6)
    x, w_enc = torch.randn(5, 12, generator=g), torch.randn(12, 40, generator=g)
    b, pb = torch.randn(40, generator=g), torch.randn(12, generator=g)
    got = triton_kernel.sae_encode_fused(x, w_enc.t(), b, pb, 6)
    want = triton_kernel.sae_encode_fused(x, w_enc.t().contiguous(), b, pb, 6)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_large_k_and_float64_fall_back_to_addmm_topk(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the fused kernel must not run here")

    monkeypatch.setattr(triton_kernel, "sae_encode_fused", refuse)
    g = torch.Generator().manual_seed(7)
    k = triton_kernel.FUSED_MAX_K + 1
    x, w = torch.randn(3, 4, generator=g), torch.randn(k + 10, 4, generator=g)
    b, pb = torch.randn(k + 10, generator=g), torch.randn(4, generator=g)
    for args in ((x, w, b, pb), tuple(t.double() for t in (x, w, b, pb))):
        values, idx = triton_kernel.sae_encode_fwd(*args, k if args[0].dtype == x.dtype else 3)
        _assert_valid_topk(values, idx, *args, values.shape[1], False, 1e-5)


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_plan_fits_the_merge_and_covers_every_latent():
    cuda = torch.device("cuda")
    from aa_compile.kernels import triton_target

    with triton_target.assume((9, 0)):
        for n, latents, k in ((2048, 65536, 32), (1, 65536, 128), (4, 300, 5)):
            p = triton_kernel.plan(n, latents, k, torch.bfloat16, cuda)
            assert p["K"] >= k and p["split"] * p["K"] <= triton_kernel.MAX_MERGE
            assert p["split"] * p["per_split"] >= latents and p["per_split"] % p["BLOCK_L"] == 0


def test_reference_backward_equals_dense_autograd():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(5, 6, generator=g), torch.randn(10, 6, generator=g)
    b, pb = torch.randn(10, generator=g), torch.randn(6, generator=g)
    grad = torch.randn(5, 4, generator=g)
    for sigmoid in (False, True):
        values, idx = reference.sae_encode(x.double(), w.double(), b.double(), pb.double(), 4,
                                           sigmoid)
        got = reference.sae_encode_backward(grad.double(), x.double(), w.double(), pb.double(),
                                            values, idx, sigmoid)
        _, _, want = _dense_autograd_float64(x, w, b, pb, 4, sigmoid, grad)
        for a, c in zip(got, want):
            torch.testing.assert_close(a, c)


@pytest.mark.parametrize("activation", ["topk", "topk-sigmoid"])
def test_op_equals_the_reference_sae_latents(activation):
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(12, 48, k=5, activation=activation))
    x = torch.randn(7, 12)
    out = sae(x)
    values, indices = torch.ops.aa.sae_encode(out.input_n, sae.encoder.weight, sae.latent_bias,
                                              sae.pre_bias, 5, activation == "topk-sigmoid")
    dense = torch.zeros(7, 48).scatter(1, indices, values)
    torch.testing.assert_close(dense, out.latents, atol=1e-5, rtol=1e-5)


def test_op_autograd_and_fullgraph_compile():
    g = torch.Generator().manual_seed(4)
    leaves = [torch.randn(*s, generator=g, requires_grad=True) for s in ((6, 8), (20, 8), (20,),
                                                                        (8,))]

    def fn(x, w, b, pb):
        values, _ = torch.ops.aa.sae_encode(x, w, b, pb, 4, True)
        return values.square().sum()

    got = torch.autograd.grad(torch.compile(fn, backend="aot_eager", fullgraph=True)(*leaves),
                              leaves)
    values, _ = torch.ops.aa.sae_encode(*leaves, 4, True)
    _, _, want = _dense_autograd_float64(*(t.detach() for t in leaves), 4, True,
                                         2 * values.detach())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(k=21), "k must be in \\[0, n_latents=20\\]"),
    (dict(x=torch.randn(3, 7)), "SAE width mismatch"),
    (dict(bias=torch.randn(19)), "bias must be \\[n_latents=20\\]"),
    (dict(pre_bias=torch.randn(8, dtype=torch.float64)), "pre_bias must have weight's dtype"),
    (dict(weight=torch.randn(20)), "weight must be a 2-D"),
])
def test_bad_input(change, message):
    args = dict(x=torch.randn(3, 8), weight=torch.randn(20, 8), bias=torch.randn(20),
                pre_bias=torch.randn(8), k=4)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        torch.ops.aa.sae_encode(args["x"], args["weight"], args["bias"], args["pre_bias"],
                                args["k"])
