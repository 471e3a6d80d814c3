"""The Triton FP8 GEMM of aa::fp8_linear against the float64 quantise-dequantise reference.

Without CUDA the kernel runs in the Triton interpreter on CPU tensors. The interpreter's
float32 -> FP8 conversion truncates and has no E4M3FN subnormals, so there the kernel runs with
``EMULATE_FP8``: the same program (prologue scale / inf->NaN / clamp, tiled dot, epilogue
scales and bias, masks, strides), with the FP8 cast replaced by an exact float32 rounding to
the FP8 grid and a float32 dot. `test_emulated_cast_equals_torch_cast` checks that rounding
against torch's own casts. The hardware cast path (``tl.float8e4nv`` / ``tl.float8e5`` into
``tl.dot``) runs only on a CUDA device (sm_89+).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import triton
import triton.language as tl
from aa_compile.kernels.fp8_linear import reference as R
from aa_compile.kernels.fp8_linear import triton_kernel as T
from hypothesis import given, settings
from hypothesis import strategies as st

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CAN_RUN = DEVICE == "cpu" or torch.cuda.get_device_capability() >= (8, 9)
pytestmark = pytest.mark.skipif(not CAN_RUN, reason="FP8 needs a GPU with sm_89+")


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, MANT: tl.constexpr, EMIN: tl.constexpr,
                  BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    tl.store(y_ptr + o, T._round_to_fp8(tl.load(x_ptr + o, mask=m), MANT, EMIN), mask=m)


@pytest.mark.parametrize("fmt", [R.E4M3, R.E5M2])
def test_emulated_cast_equals_torch_cast(fmt):
    """Every FP8 value, every midpoint (ties to even), subnormals and random values."""
    _, mant, emin, fmax = T._FMT[fmt]
    grid = torch.arange(256, dtype=torch.uint8).view(fmt).float()
    grid = grid[torch.isfinite(grid)].unique()
    g = torch.Generator().manual_seed(0)
    rnd = torch.randn(8192, generator=g) * torch.exp2(torch.randint(-24, 17, (8192,),
                                                                     generator=g).float())
    v = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, rnd]).clamp(-fmax, fmax).to(DEVICE)
    out = torch.empty_like(v)
    _round_kernel[(triton.cdiv(v.numel(), 1024),)](v, out, v.numel(), MANT=mant, EMIN=emin,
                                                    BLOCK=1024)
    want = v.to(fmt).float()
    assert torch.equal(out, want), (out != want).sum().item()


def _check(a, bt, a_fmt, b_fmt, scaling, a_s, b_s, mult, bias, out_dtype):
    got = T.gemm_nt(a, bt, a_fmt, b_fmt, scaling, a_s, b_s, mult, bias, out_dtype)
    b_ref = None if bias is None else bias.to(out_dtype)
    want = R.gemm_nt(a.cpu(), bt.cpu(), a_fmt, b_fmt, scaling, a_s, b_s, mult,
                     None if b_ref is None else b_ref.cpu())
    mag = R.gemm_nt(a.abs().cpu(), bt.abs().cpu(), a_fmt, b_fmt, scaling, a_s, b_s, mult,
                    None if b_ref is None else b_ref.abs().cpu())
    assert got.dtype == out_dtype and got.shape == want.shape
    err = (got.cpu().double() - want).abs()
    bound = 16 * torch.finfo(torch.float32).eps * mag + torch.finfo(out_dtype).eps * want.abs()
    assert (err <= bound + 1e-30).all(), f"max excess {(err - bound).max().item():.3g}"
    return got


@settings(max_examples=12, deadline=None)
@given(
    p=st.sampled_from([1, 5, 16, 33]),
    q=st.sampled_from([16, 48]),
    r=st.sampled_from([16, 48, 64]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    scaling=st.sampled_from(R.SCALINGS),
    has_bias=st.booleans(),
    grad_like=st.booleans(),
    transposed=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_gemm_matches_reference(p, q, r, dtype, scaling, has_bias, grad_like, transposed,
                                seed):
    """Forward-like (E4M3 x E4M3) and gradient-like (E5M2 x E4M3) GEMMs; ``transposed``
    passes column-major operand views (as the backward does), read in place via strides."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(p, r, generator=g)
    bt = torch.randn(q, r, generator=g)
    if transposed:
        a = a.t().contiguous().t()
        bt = bt.t().contiguous().t()
    a, bt = a.to(dtype).to(DEVICE), bt.to(dtype).to(DEVICE)
    bias = torch.randn(q, generator=g).to(DEVICE) if has_bias else None
    a_fmt = R.E5M2 if grad_like else R.E4M3
    _check(a, bt, a_fmt, R.E4M3, scaling, 1.0, 1.0, r**-0.5, bias, dtype)
    if p:
        y = T.gemm_nt(a, bt, a_fmt, R.E4M3, scaling, 1.0, 1.0, r**-0.5, None, torch.float32)
        want = (a.cpu().double() @ bt.cpu().double().t()) * r**-0.5
        assert R.sqnr_db(y.cpu(), want) >= (20.0 if grad_like else 25.0)


def test_static_scales_saturation_and_non_finite():
    """Static scales (x 2^-3) are applied and undone; 1e6 saturates; inf and NaN -> NaN."""
    a = torch.randn(20, 32)
    a[0, 0], a[1, 1], a[2, 2], a[3, 3] = 1e6, float("inf"), float("nan"), -1e30
    bt = torch.randn(16, 32)
    got = _check_nan_aware(a, bt)
    assert torch.isnan(got[1]).all() and torch.isnan(got[2]).all()
    assert torch.isfinite(got[[0, 3]]).all() and torch.isfinite(got[4:]).all()


def _check_nan_aware(a, bt):
    a, bt = a.to(DEVICE), bt.to(DEVICE)
    got = T.gemm_nt(a, bt, R.E4M3, R.E4M3, "static", 0.125, 2.0, 0.5, None, torch.float32)
    want = R.gemm_nt(a.cpu(), bt.cpu(), R.E4M3, R.E4M3, "static", 0.125, 2.0, 0.5)
    assert torch.equal(torch.isnan(got.cpu()), torch.isnan(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got.cpu().double()[fin], want[fin], rtol=1e-5, atol=1e-3)
    return got.cpu()


def test_rejects_unsupported_device_and_dtype(monkeypatch):
    with pytest.raises(ValueError, match="out_dtype"):
        T.gemm_nt(torch.randn(2, 16), torch.randn(16, 16), R.E4M3, R.E4M3, "static", 1.0, 1.0,
                  1.0, None, torch.float64)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "A100")
    with pytest.raises(ValueError, match=r"compute capability >= 8.9.*sm_80"):
        T.check_device(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    T.check_device(torch.device("cuda"))
    with pytest.raises(ValueError, match="CUDA devices"):
        T.check_device(torch.device("meta"))
