"""Property tests of the CPU path of aa::rms_norm (eager route and inductor route) vs float64."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from aa_compile.kernels.rms_norm import cpu, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LOW_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@st.composite
def problems(draw):
    lead = draw(st.sampled_from([(0,), (1,), (3,), (127,), (2, 5), (4, 1, 3)]))
    n = draw(st.sampled_from([1, 3, 16, 127, 1000]))
    dtype = draw(st.sampled_from(DTYPES))
    has_weight = draw(st.booleans())
    eps = draw(st.sampled_from([1e-6, 1e-5, 0.1]))
    scale = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return lead, n, dtype, has_weight, eps, scale, seed


def make(lead, n, dtype, has_weight, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, n, generator=g, dtype=torch.float64) * scale).to(dtype)
    w = (torch.randn(n, generator=g, dtype=torch.float64) + 1).to(dtype) if has_weight else None
    return x, w


def assert_close_to_reference(got, want64, eager, dtype):
    """float32/float64: at least as close to the float64 answer as eager PyTorch (plus slack);
    half types: within one or two rounding steps of the output scale."""
    assert got.dtype == eager.dtype and got.shape == want64.shape
    assert not torch.isnan(got).any()
    if got.numel() == 0:
        return
    err = (got.double() - want64).abs().max().item()
    if dtype in LOW_TOL:
        bound = LOW_TOL[dtype] * max(1.0, want64.abs().max().item())
    else:
        eager_err = (eager.double() - want64).abs().max().item()
        bound = 4 * eager_err + 16 * torch.finfo(dtype).eps * max(1.0, want64.abs().max().item())
    assert err <= bound, (err, bound)


@given(problems())
def test_forward_matches_float64_reference(p):
    lead, n, dtype, has_weight, eps, scale, seed = p
    x, w = make(lead, n, dtype, has_weight, scale, seed)
    want = reference.rms_norm(x.double(), None if w is None else w.double(), eps)
    eager = reference.rms_norm(x, w, eps)
    assert_close_to_reference(cpu.rms_norm_fwd(x, w, eps), want, eager, dtype)


@given(problems())
def test_backward_matches_float64_reference(p):
    lead, n, dtype, has_weight, eps, scale, seed = p
    x, w = make(lead, n, dtype, has_weight, scale, seed)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    w64 = None if w is None else w.double()
    dx64, dw64 = reference.rms_norm_backward(grad.double(), x.double(), w64, eps)
    dx_e, dw_e = reference.rms_norm_backward(grad, x, w, eps)
    dx, dw = cpu.rms_norm_bwd(grad, x, w, eps)
    assert_close_to_reference(dx, dx64, dx_e, dtype)
    if w is None:
        assert dw is None
    elif x.numel() == 0:
        assert torch.equal(dw, torch.zeros_like(w))
    else:
        # dweight sums over rows: scale the half-type bound by the row count
        rows = x.numel() // n
        assert dw.dtype == w.dtype
        err = (dw.double() - dw64).abs().max().item()
        scale_ = max(1.0, dw64.abs().max().item())
        tol = LOW_TOL.get(dtype, 1e-5) * scale_ * (1 if dtype not in LOW_TOL else 1 + rows ** 0.5)
        assert err <= tol, (err, tol)


def test_backward_does_not_modify_grad():
    x, w = torch.randn(3, 8), None
    grad = torch.randn(3, 8)
    before = grad.clone()
    cpu.rms_norm_bwd(grad, x, w, 1e-6)
    assert torch.equal(grad, before)


def test_out_dtype_rounds_once():
    x = torch.randn(5, 33, dtype=torch.bfloat16)
    w = torch.randn(33, dtype=torch.bfloat16)
    got = cpu.rms_norm_fwd(x, w, 1e-6, torch.float32)
    assert got.dtype == torch.float32
    want = reference.rms_norm(x.double(), w.double(), 1e-6)
    assert (got.double() - want).abs().max().item() < 1e-5 * want.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_route_matches_reference(dtype):
    """The decomposition inductor compiles (aa backend on CPU) computes the same function."""
    import aa_compile  # noqa: F401  (installs the decompositions)

    x = torch.randn(7, 45, dtype=dtype, requires_grad=True)
    w = torch.randn(45, dtype=dtype, requires_grad=True)
    fn = torch.compile(lambda a, b: torch.ops.aa.rms_norm(a, b, 1e-6))
    y = fn(x, w)
    g = torch.randn_like(y)
    y.backward(g)
    want = reference.rms_norm(x.double(), w.double(), 1e-6)
    dx64, dw64 = reference.rms_norm_backward(g.double(), x.double(), w.double(), 1e-6)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), want, atol=tol * 4, rtol=tol)
    torch.testing.assert_close(x.grad.double(), dx64, atol=tol * 4, rtol=tol)
    torch.testing.assert_close(w.grad.double(), dw64, atol=tol * 40, rtol=tol * 4)
