"""The CPU path of aa::fp8_linear (torch._scaled_mm) against the float64 references:
exact (to float32 rounding) vs the quantise-dequantise spec, and SQNR vs the unquantised
product (forward >= 25 dB, gradients >= 20 dB on unit-scaled inputs)."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from aa_compile.kernels import fp8_linear as K
from aa_compile.kernels.fp8_linear import reference as R
from hypothesis import given, settings

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FWD_DB, GRAD_DB = 25.0, 20.0


@st.composite
def problems(draw):
    lead = draw(st.sampled_from([(0,), (1,), (7,), (2, 3), (33,), (2, 0, 3)]))
    k = draw(st.sampled_from([16, 32, 64, 144]))
    n = draw(st.sampled_from([16, 48, 80]))
    dtype = draw(st.sampled_from(DTYPES))
    scaling = draw(st.sampled_from(R.SCALINGS))
    has_bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return lead, k, n, dtype, scaling, has_bias, seed


def make(lead, k, n, dtype, has_bias, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, k, generator=g) * scale).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if has_bias else None
    grad = torch.randn(*lead, n, generator=g).to(dtype)
    return x, w, b, grad


def qdq_bound(want64, mag64, dtype):
    """Error bound of float32 accumulation followed by one round-to-nearest into ``dtype``:
    the sum is off by ``acc <= 16 eps32 * mag64`` (``mag64`` = the same GEMM on absolute
    values), and rounding that sum adds ``u * (|want| + acc)`` with ``u = eps/2``, or up to
    half a subnormal step (``u * smallest_normal``) below the normal range of ``dtype``."""
    u = torch.finfo(dtype).eps / 2
    acc = 16 * torch.finfo(torch.float32).eps * mag64
    return acc + u * (want64.abs() + acc) + u * torch.finfo(dtype).smallest_normal


def assert_matches_qdq(got, want64, mag64, dtype):
    """``got`` equals the quantise-dequantise reference within `qdq_bound`."""
    assert got.dtype == dtype and got.shape == want64.shape
    if got.numel() == 0:
        return
    assert torch.isfinite(got).all()
    err = (got.double() - want64).abs()
    bound = qdq_bound(want64, mag64, dtype)
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


def sqnr_ok(got, want, floor):
    if want.numel() == 0:
        return
    db = R.sqnr_db(got, want)
    assert db >= floor, f"SQNR {db:.1f} dB < {floor} dB"


@settings(max_examples=15)
@given(problems())
def test_forward_matches_reference(p):
    lead, k, n, dtype, scaling, has_bias, seed = p
    x, w, b, _ = make(lead, k, n, dtype, has_bias, seed)
    mult = k**-0.5
    y = K.forward(x, w, b, scaling, 1.0, 1.0, mult)
    want = R.fp8_linear(x, w, b, scaling, 1.0, 1.0, mult)
    mag = R.fp8_linear(x.abs(), w.abs(), None if b is None else b.abs(), scaling, 1.0, 1.0, mult)
    assert_matches_qdq(y, want, mag, dtype)
    sqnr_ok(y, R.fp8_linear_unquantised(x, w, None if b is None else b.to(dtype), mult), FWD_DB)


@settings(max_examples=15)
@given(problems())
def test_backward_matches_reference(p):
    lead, k, n, dtype, scaling, _, seed = p
    x, w, _, grad = make(lead, k, n, dtype, False, seed)
    mx, mw = 0.5, k**-0.5
    dx, dw, db = K.backward(grad, x, w, scaling, 1.0, 1.0, 1.0, mx, mw, True, True, True)
    rdx, rdw, rdb = R.fp8_linear_backward(grad, x, w, scaling, 1.0, 1.0, 1.0, mx, mw)
    mdx, mdw, _ = R.fp8_linear_backward(grad.abs(), x.abs(), w.abs(), scaling, 1.0, 1.0, 1.0,
                                        mx, mw)
    assert_matches_qdq(dx, rdx, mdx, dtype)
    assert_matches_qdq(dw, rdw, mdw, dtype)
    torch.testing.assert_close(db.double(), rdb, atol=1e-4, rtol=1e-5)
    g64, x64, w64 = grad.double(), x.double(), w.double()
    sqnr_ok(dx, mx * g64 @ w64, GRAD_DB)
    sqnr_ok(dw, mw * g64.reshape(-1, n).t() @ x64.reshape(-1, k), GRAD_DB)


def test_float16_subnormal_gradient_is_within_the_bound():
    """A single-row float16 weight gradient lands below float16's normal range, where one
    rounding costs up to half a subnormal step (this case broke a purely relative bound)."""
    x, w, _, grad = make((1,), 144, 80, torch.float16, False, 399)
    mx, mw = 0.5, 144**-0.5
    _, dw, _ = K.backward(grad, x, w, "rowwise", 1.0, 1.0, 1.0, mx, mw, True, True, True)
    _, rdw, _ = R.fp8_linear_backward(grad, x, w, "rowwise", 1.0, 1.0, 1.0, mx, mw)
    _, mdw, _ = R.fp8_linear_backward(grad.abs(), x.abs(), w.abs(), "rowwise", 1.0, 1.0, 1.0,
                                      mx, mw)
    assert (rdw.abs() < torch.finfo(torch.float16).smallest_normal).any()
    assert_matches_qdq(dw, rdw, mdw, torch.float16)


@pytest.mark.parametrize("scaling", R.SCALINGS)
def test_dynamic_scaling_keeps_sqnr_off_unit_scale(scaling):
    """Inputs 1000x (or 1/1000x) off unit scale: dynamic scaling keeps the SQNR, static
    scaling at 1.0 does not (saturation / underflow), which is why dynamic modes exist."""
    for off in (1e3, 1e-3):
        x, w, _, _ = make((64,), 64, 32, torch.float32, False, 1, scale=off)
        y = K.forward(x, w, None, scaling, 1.0, 1.0, 1.0)
        db = R.sqnr_db(y, R.fp8_linear_unquantised(x, w, None))
        if scaling == "static":
            assert db < 15, db
        else:
            assert db >= FWD_DB, db


def test_static_scale_is_applied_and_undone():
    """x_scale = 2^-4 brings a 16x-too-large x back into range; the result is unscaled."""
    x, w, _, _ = make((32,), 32, 16, torch.float32, False, 2, scale=400.0)
    y = K.forward(x, w, None, "static", 2.0**-4, 1.0, 1.0)
    assert R.sqnr_db(y, R.fp8_linear_unquantised(x, w, None)) >= FWD_DB
    assert_matches_qdq(y, R.fp8_linear(x, w, None, "static", 2.0**-4),
                       R.fp8_linear(x.abs(), w.abs(), None, "static", 2.0**-4), torch.float32)


def test_saturation_clamps_to_format_max():
    """Static scaling saturates: 1000 and 1e30 act as 448 (E4M3), -1e6 as -448."""
    x = torch.zeros(16, 16)
    x[0, 0], x[1, 0], x[2, 0] = 1000.0, 1e30, -1e6
    w = torch.zeros(16, 16)
    w[0, 0] = 1.0
    y = K.forward(x, w, None, "static", 1.0, 1.0, 1.0)
    assert y[0, 0].item() == 448.0 and y[1, 0].item() == 448.0 and y[2, 0].item() == -448.0
    g = torch.zeros(16, 16)
    g[0, 0] = 1e6  # E5M2 saturates at 57344
    dx, _, _ = K.backward(g, x, w, "static", 1.0, 1.0, 1.0, 1.0, 1.0, True, False, False)
    assert dx[0, 0].item() == 57344.0


@pytest.mark.parametrize("scaling", R.SCALINGS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_give_nan_not_garbage(scaling, bad):
    x = torch.randn(8, 32)
    w = torch.randn(16, 32)
    x[3, 5] = bad
    y = K.forward(x, w, None, scaling, 1.0, 1.0, 1.0)
    assert torch.isnan(y[3]).all()  # every output that reads the bad element
    if scaling != "tensorwise":
        others = torch.cat([y[:3], y[4:]])
        assert torch.isfinite(others).all()
    w[2, 7] = bad
    y = K.forward(torch.randn(8, 32), w, None, scaling, 1.0, 1.0, 1.0)
    assert torch.isnan(y[:, 2]).all()


def test_reference_saturated_counts_overflow_only():
    t = torch.tensor([[1.0, 448.0, 460.0, 470.0, -1000.0, float("inf"), float("nan"), 0.0]])
    assert int(R.saturated(t, R.E4M3, 1.0)) == 2  # 470, -1000 (460 rounds to 448 anyway)
    assert int(R.saturated(t, R.E4M3, 0.25)) == 0
    t = torch.tensor([[61439.0, 61440.0, -1e6]])
    assert int(R.saturated(t, R.E5M2, 1.0)) == 2
    # dynamic scales never saturate
    t = torch.randn(64, 64) * 1e4
    assert int(R.saturated(t, R.E4M3, R.quant_scale(t, R.E4M3, "tensorwise", 1.0))) == 0
    assert int(R.saturated(t, R.E4M3, R.quant_scale(t, R.E4M3, "rowwise", 1.0))) == 0


def test_zero_rows_and_all_zero_operand():
    x = torch.zeros(0, 32)
    w = torch.randn(16, 32)
    b = torch.randn(16)
    for scaling in R.SCALINGS:
        assert K.forward(x, w, b, scaling, 1.0, 1.0, 1.0).shape == (0, 16)
        dx, dw, db = K.backward(torch.zeros(0, 16), x, w, scaling, 1.0, 1.0, 1.0, 1.0, 1.0,
                                True, True, True)
        assert dx.shape == (0, 32) and torch.equal(dw, torch.zeros(16, 32))
        assert torch.equal(db, torch.zeros(16))
        # an all-zero x: amax 0 must not make the scale inf / the output NaN
        y = K.forward(torch.zeros(4, 32), w, b, scaling, 1.0, 1.0, 1.0)
        torch.testing.assert_close(y, b.expand(4, 16))
