"""aa::int8_linear: against the float64 dequantised reference, opcheck, autograd, bad input."""

from __future__ import annotations

import pytest
import torch
from aa_compile.kernels.int8_linear import reference as R
from hypothesis import given, settings
from hypothesis import strategies as st

import aa_compile.ops  # noqa: F401
from aa_compile.ops import OPS


def _case(lead, k, n, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    q, s = R.quantize_absmax(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, q, s, b


@settings(max_examples=20)
@given(lead=st.lists(st.integers(0, 5), min_size=1, max_size=2), k=st.integers(1, 70),
       n=st.integers(0, 40), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_float64_reference(lead, k, n, bias, seed):
    x, q, s, b = _case(lead, k, n, bias=bias, seed=seed)
    out = torch.ops.aa.int8_linear(x, q, s, b)
    ref = R.int8_linear(x.double(), q, s, b)
    eager = torch.nn.functional.linear(x, R.dequantize(q, s, torch.float32), b)
    assert out.shape == (*lead, n) and out.dtype == x.dtype
    tol = (eager.double() - ref).abs().max().item() if ref.numel() else 0.0
    assert (out.double() - ref).abs().max().item() <= 4 * tol + 1e-5 if ref.numel() else True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes(dtype):
    x, q, s, b = _case((3,), 33, 9, dtype=dtype)
    out = torch.ops.aa.int8_linear(x, q, s, b)
    ref = R.int8_linear(x.double(), q, s, b)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=2e-2 if dtype == torch.bfloat16 else 1e-12,
                               atol=5e-2 if dtype == torch.bfloat16 else 1e-12)


def test_opcheck():
    entry = OPS["aa::int8_linear"]
    for args, kwargs in entry.samples("cpu"):
        torch.library.opcheck(entry.op, args, kwargs)


def test_grad_x_and_bias():
    x, q, s, b = _case((2, 5), 16, 7, dtype=torch.float64)
    x.requires_grad_(True)
    b.requires_grad_(True)
    torch.ops.aa.int8_linear(x, q, s, b).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    b2 = b.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, R.dequantize(q, s), b2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


def test_quantize_absmax_roundtrip_and_zero_rows():
    w = torch.randn(6, 10)
    w[2] = 0
    q, s = R.quantize_absmax(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and s[2] == 1
    err = (R.dequantize(q, s, torch.float32) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("bad, match", [
    (lambda x, q, s, b: (x.long(), q, s, b), "x must be a float"),
    (lambda x, q, s, b: (x, q.float(), s, b), "w_int8 must be a 2-D int8"),
    (lambda x, q, s, b: (x[..., :-1], q, s, b), "last dimension"),
    (lambda x, q, s, b: (x, q, s[:-1], b), "scales must be"),
    (lambda x, q, s, b: (x, q, s, b[:-1]), "bias must be"),
])
def test_bad_inputs(bad, match):
    with pytest.raises(ValueError, match=match):
        torch.ops.aa.int8_linear(*bad(*_case((2,), 8, 4)))
