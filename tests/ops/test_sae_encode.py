"""`aa::sae_encode`: forward and sparse backward equal the float64 reference (hypothesis, odd
shapes, no tokens), the op equals the reference SAE's TopK, fullgraph compile, bad input."""

from __future__ import annotations

import importlib.util

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

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
