"""The Triton kernel of aa::int8_linear against the float64 reference (interpreter on CPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from aa_compile.kernels.int8_linear import reference as R
from aa_compile.kernels.int8_linear import triton_kernel as T
from aa_compile.ops import OPS
from hypothesis import given, settings
from hypothesis import strategies as st

from ..strategies import check_layout_invariance, op_calls

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("lead, k, n", [((1,), 16, 8), ((3,), 70, 65), ((2, 9), 33, 5),
                                        ((17,), 1, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(lead, k, n, bias):
    g = torch.Generator().manual_seed(k * 7 + n)
    x = torch.randn(*lead, k, generator=g)
    q, s = R.quantize_absmax(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g) if bias else None
    ref = R.int8_linear(x.double(), q, s, b)
    dev = [t.to(DEVICE) if t is not None else None for t in (x, q, s, b)]
    out = T.int8_linear(*dev)
    assert out.shape == (*lead, n)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(DEVICE == "cpu", reason="bf16 tl.dot needs a GPU")
def test_bfloat16():
    x = torch.randn(4, 64, device=DEVICE, dtype=torch.bfloat16)
    q, s = R.quantize_absmax(torch.randn(32, 64))
    out = T.int8_linear(x, q.to(DEVICE), s.to(DEVICE), None)
    torch.testing.assert_close(out.double().cpu(), R.int8_linear(x.double().cpu(), q, s, None),
                               rtol=2e-2, atol=5e-2)


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_any_input_layout(data):
    """Strided / transposed / permuted / expanded x, weight, scales and bias give what
    contiguous ones give."""
    samples = [s for s in OPS["aa::int8_linear"].samples(DEVICE)
               if s[0][0].dtype == torch.float32 or DEVICE != "cpu"]
    call = data.draw(op_calls(samples), label="call")
    check_layout_invariance(T.int8_linear, call, "int8_linear")
