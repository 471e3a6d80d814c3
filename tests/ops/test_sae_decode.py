"""`aa::sae_decode`: every kernel equals the float64 reference (hypothesis, odd shapes, empty
rows), autograd through the op, fullgraph compile, bad input."""

from __future__ import annotations

import importlib.util

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

import aa_compile.ops  # noqa: F401  (registers aa::sae_decode)
from aa_compile.kernels.sae_decode import cpu, reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if HAS_TRITON:
    from aa_compile.kernels.sae_decode import triton_kernel

KERNELS = ["cpu"] + (["triton"] if HAS_TRITON else [])


def _module(name: str):
    return cpu if name == "cpu" else triton_kernel


def _dense_float64(weight, indices, values):
    """Independent restatement: scatter the TopK values into dense latents, one matmul."""
    dense = torch.zeros(indices.shape[0], weight.shape[0], dtype=torch.float64)
    dense.scatter_add_(1, indices.long().cpu(), values.double().cpu())
    return dense @ weight.double().cpu()


@st.composite
def cases(draw):
    latents = draw(st.integers(1, 40))
    d = draw(st.integers(1, 70))
    n = draw(st.integers(0, 9))
    k = draw(st.integers(0, min(latents, 6)))
    seed = draw(st.integers(0, 2**16))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(latents, d, generator=g).to(dtype)
    indices = torch.randint(0, latents, (n, k), generator=g)
    if draw(st.booleans()):
        indices = indices.to(torch.int32)
    values = torch.randn(n, k, generator=g).to(dtype)
    grad = torch.randn(n, d, generator=g).to(dtype)
    return weight, indices, values, grad


def _tol(dtype):
    return dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", KERNELS)
@given(case=cases())
def test_kernels_equal_the_float64_reference(name, case):
    weight, indices, values, grad = (t.to(DEVICE) for t in case)
    mod = _module(name)
    got = mod.sae_decode_fwd(weight, indices, values)
    torch.testing.assert_close(got.double().cpu(), _dense_float64(weight, indices, values),
                               **_tol(weight.dtype))
    dw, dv = mod.sae_decode_bwd(grad, weight, indices, values, True, True)
    w64, v64 = weight.double().cpu(), values.double().cpu()
    ref_dw, ref_dv = reference.sae_decode_backward(grad.double().cpu(), w64, indices.cpu(), v64)
    torch.testing.assert_close(dw.double().cpu(), ref_dw, **_tol(weight.dtype))
    torch.testing.assert_close(dv.double().cpu(), ref_dv, **_tol(weight.dtype))


def test_reference_backward_equals_autograd_of_the_dense_decode():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 5, generator=g, dtype=torch.float64, requires_grad=True)
    values = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([[0, 0, 5], [11, 2, 3], [4, 4, 4], [1, 7, 9]])
    dense = torch.zeros(4, 12, dtype=torch.float64).scatter_add(1, indices, values)
    grad = torch.randn(4, 5, generator=g, dtype=torch.float64)
    (dense @ weight).backward(grad)
    dw, dv = reference.sae_decode_backward(grad, weight.detach(), indices, values.detach())
    torch.testing.assert_close(dw, weight.grad)
    torch.testing.assert_close(dv, values.grad)


def test_op_autograd_matches_the_dense_path():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(30, 9, generator=g, requires_grad=True)
    values = torch.randn(6, 4, generator=g, requires_grad=True)
    indices = torch.randint(0, 30, (6, 4), generator=g)
    out = torch.ops.aa.sae_decode(weight, indices, values)
    out.square().sum().backward()
    w2, v2 = weight.detach().clone().requires_grad_(), values.detach().clone().requires_grad_()
    dense = torch.zeros(6, 30).scatter_add(1, indices, v2)
    (dense @ w2).square().sum().backward()
    torch.testing.assert_close(out, dense.detach() @ weight.detach())
    torch.testing.assert_close(weight.grad, w2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values.grad, v2.grad, atol=1e-5, rtol=1e-5)


def test_op_compiles_fullgraph_with_autograd():
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(16, 8, generator=g, requires_grad=True)
    values = torch.randn(5, 3, generator=g, requires_grad=True)
    indices = torch.randint(0, 16, (5, 3), generator=g)

    def fn(w, i, v):
        return torch.ops.aa.sae_decode(w, i, v).sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(weight, indices, values), (weight, values))
    want = torch.autograd.grad(fn(weight, indices, values), (weight, values))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("args, message", [
    (lambda w, i, v: (w, i.float(), v), "indices must be a 2-D"),
    (lambda w, i, v: (w, i, v[:, :1]), "values must have the shape of indices"),
    (lambda w, i, v: (w, i, v.double()), "values must have weight's dtype"),
    (lambda w, i, v: (w[0], i, v), "weight must be a 2-D"),
    (lambda w, i, v: (w, i + 16, v), "indices must lie in \\[0, n_latents\\) = \\[0, 16\\)"),
    (lambda w, i, v: (w, i - 16, v), "found -"),
])
def test_bad_input(args, message):
    w, i, v = torch.randn(16, 4), torch.randint(0, 16, (3, 2)), torch.randn(3, 2)
    with pytest.raises(ValueError, match=message):
        torch.ops.aa.sae_decode(*args(w, i, v))
