"""CPU path of aa::int8_linear (the AVX2 kernel up to SMALL_M rows, blocked dequantise + GEMM
beyond) vs the reference."""

from __future__ import annotations

import pytest
import torch
from aa_compile.kernels.int8_linear import cpu
from aa_compile.kernels.int8_linear import reference as R


@pytest.mark.parametrize("m, k, n", [(1, 64, 48), (3, 5, 7), (17, 127, 33), (1, 1, 1),
                                     (cpu.SMALL_M + 1, 37, 9)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(m, k, n, bias):
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = torch.randn(m, k, generator=g)
    q, s = R.quantize_absmax(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g) if bias else None
    out = cpu.int8_linear(x, q, s, b)
    torch.testing.assert_close(out.double(), R.int8_linear(x.double(), q, s, b),
                               rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs():
    x = torch.randn(8, 8)[:, ::2]
    q = torch.randint(-127, 128, (3, 12), dtype=torch.int8)[:, ::3]
    s = torch.rand(3)
    torch.testing.assert_close(cpu.int8_linear(x, q, s, None).double(),
                               R.int8_linear(x.double(), q, s, None), rtol=1e-5, atol=1e-5)
