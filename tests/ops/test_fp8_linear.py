"""`aa::fp8_linear` (+ backward): its kernels parametrized (the CPU ``torch._scaled_mm`` GEMM and
the Triton GEMM: the interpreter on CPU without a GPU, where it runs its exact emulated FP8 cast)
composed into the op's forward and backward, against the float64 quantise-dequantise reference
(to float32 rounding) and the unquantised product (SQNR: forward >= 25 dB, gradients >= 20 dB on
unit-scaled inputs) over odd shapes, empty inputs and every dtype; saturation, non-finite input
and static scales; the op (autograd, grad multipliers, saturation stats, CHECK_FINITE, bad input,
devices, compiling, and a profiler count showing what static scaling saves).
(opcheck: tests/test_ops.py.)"""

from __future__ import annotations

import importlib.util

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from aa_compile.kernels.fp8_linear import compose, cpu
from aa_compile.kernels.fp8_linear import reference as R
from aa_compile.ops import fp8_linear as mod

from ..conftest import DEVICES

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    import triton
    import triton.language as tl

    from aa_compile.kernels.fp8_linear import triton_kernel as T

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FWD_DB, GRAD_DB = 25.0, 20.0
KERNELS = ["cpu", "triton"]
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8_GPU = TRITON_DEVICE == "cpu" or torch.cuda.get_device_capability() >= (8, 9)
op = torch.ops.aa.fp8_linear


def kernel(name: str):
    """``(gemm_nt, device)`` of kernel ``name`` (skips where Triton is missing or the GPU has
    no FP8)."""
    if name == "cpu":
        return cpu.gemm_nt, "cpu"
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if not FP8_GPU:
        pytest.skip("FP8 needs a GPU with sm_89+")
    return T.gemm_nt, TRITON_DEVICE


def forward(name, x, w, b, scaling, x_scale, w_scale, out_scale):
    """The op's forward with kernel ``name`` (on its device; the result on CPU)."""
    gemm, device = kernel(name)
    x, w, b = (None if t is None else t.to(device) for t in (x, w, b))
    return compose.forward(gemm, x, w, b, scaling, x_scale, w_scale, out_scale).cpu()


def backward(name, grad, x, w, *args):
    """The op's backward with kernel ``name`` (on its device; the results on CPU)."""
    gemm, device = kernel(name)
    out = compose.backward(gemm, grad.to(device), x.to(device), w.to(device), *args)
    return tuple(t.cpu() for t in out)


@st.composite
def problems(draw):
    lead = draw(st.sampled_from([(0,), (1,), (7,), (2, 3), (33,), (2, 0, 3)]))
    k = draw(st.sampled_from([16, 32, 64, 144]))
    n = draw(st.sampled_from([16, 48, 80]))
    dtype = draw(st.sampled_from(DTYPES))
    scaling = draw(st.sampled_from(R.SCALINGS))
    has_bias = draw(st.booleans())
    transposed = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return lead, k, n, dtype, scaling, has_bias, transposed, seed


def make(lead, k, n, dtype, has_bias, seed, scale=1.0, transposed=False):
    """``x, w, bias, grad``; ``transposed``: x and w as column-major views (read in place
    through their strides)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, k, generator=g) * scale).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if has_bias else None
    grad = torch.randn(*lead, n, generator=g).to(dtype)
    if transposed:
        x, w = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (x, w))
    return x, w, b, grad


#: ulps of the final rounding into the output dtype: round to nearest (half an ulp), but the
#: Triton interpreter truncates float32 -> bfloat16 / float16 stores (up to one ulp)
ROUNDING = {"cpu": 0.5, "triton": 1.0 if TRITON_DEVICE == "cpu" else 0.5}


def qdq_bound(want64, mag64, dtype, ulps=0.5):
    """Error bound of float32 accumulation followed by one rounding into ``dtype``: the sum is
    off by ``acc <= 16 eps32 * mag64`` (``mag64`` = the same GEMM on absolute values), and
    rounding that sum adds ``u * (|want| + acc)`` with ``u = ulps * eps`` (round to nearest:
    half an ulp), or up to ``u * smallest_normal`` below the normal range of ``dtype``."""
    u = torch.finfo(dtype).eps * ulps
    acc = 16 * torch.finfo(torch.float32).eps * mag64
    return acc + u * (want64.abs() + acc) + u * torch.finfo(dtype).smallest_normal


def assert_matches_qdq(got, want64, mag64, dtype, name="cpu"):
    """``got`` (from kernel ``name``) equals the quantise-dequantise reference within
    `qdq_bound`."""
    assert got.dtype == dtype and got.shape == want64.shape
    if got.numel() == 0:
        return
    assert torch.isfinite(got).all()
    err = (got.double() - want64).abs()
    bound = qdq_bound(want64, mag64, dtype, ROUNDING[name])
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


def sqnr_ok(got, want, floor):
    """The SQNR floor, on products of at least 64 elements (over fewer it is not a property of
    the format: a single 16-element row of unit-scale values has measured 24.7 dB)."""
    if want.numel() < 64:
        return
    db = R.sqnr_db(got, want)
    assert db >= floor, f"SQNR {db:.1f} dB < {floor} dB"


# --- the kernels in the op's forward and backward ------------------------------------------


@pytest.mark.parametrize("name", KERNELS)
@settings(max_examples=15, deadline=None)
@given(p=problems())
def test_forward_matches_reference(name, p):
    lead, k, n, dtype, scaling, has_bias, transposed, seed = p
    x, w, b, _ = make(lead, k, n, dtype, has_bias, seed, transposed=transposed)
    mult = k**-0.5
    y = forward(name, x, w, b, scaling, 1.0, 1.0, mult)
    want = R.fp8_linear(x, w, b, scaling, 1.0, 1.0, mult)
    mag = R.fp8_linear(x.abs(), w.abs(), None if b is None else b.abs(), scaling, 1.0, 1.0, mult)
    assert_matches_qdq(y, want, mag, dtype, name)
    sqnr_ok(y, R.fp8_linear_unquantised(x, w, None if b is None else b.to(dtype), mult), FWD_DB)


@pytest.mark.parametrize("name", KERNELS)
@settings(max_examples=15, deadline=None)
@given(p=problems())
def test_backward_matches_reference(name, p):
    """Gradient-like (E5M2 x E4M3) GEMMs on transposed operand views, as the backward runs
    them."""
    lead, k, n, dtype, scaling, _, transposed, seed = p
    x, w, _, grad = make(lead, k, n, dtype, False, seed, transposed=transposed)
    mx, mw = 0.5, k**-0.5
    dx, dw, db = backward(name, grad, x, w, scaling, 1.0, 1.0, 1.0, mx, mw, True, True, True)
    rdx, rdw, rdb = R.fp8_linear_backward(grad, x, w, scaling, 1.0, 1.0, 1.0, mx, mw)
    mdx, mdw, _ = R.fp8_linear_backward(grad.abs(), x.abs(), w.abs(), scaling, 1.0, 1.0, 1.0,
                                        mx, mw)
    assert_matches_qdq(dx, rdx, mdx, dtype, name)
    assert_matches_qdq(dw, rdw, mdw, dtype, name)
    torch.testing.assert_close(db.double(), rdb, atol=1e-4, rtol=1e-5)
    g64, x64, w64 = grad.double(), x.double(), w.double()
    sqnr_ok(dx, mx * g64 @ w64, GRAD_DB)
    sqnr_ok(dw, mw * g64.reshape(-1, n).t() @ x64.reshape(-1, k), GRAD_DB)


@pytest.mark.parametrize("name", KERNELS)
def test_float16_subnormal_gradient_is_within_the_bound(name):
    """A single-row float16 weight gradient lands below float16's normal range, where one
    rounding costs up to half a subnormal step (this case broke a purely relative bound)."""
    x, w, _, grad = make((1,), 144, 80, torch.float16, False, 399)
    mx, mw = 0.5, 144**-0.5
    _, dw, _ = backward(name, grad, x, w, "rowwise", 1.0, 1.0, 1.0, mx, mw, True, True, True)
    _, rdw, _ = R.fp8_linear_backward(grad, x, w, "rowwise", 1.0, 1.0, 1.0, mx, mw)
    _, mdw, _ = R.fp8_linear_backward(grad.abs(), x.abs(), w.abs(), "rowwise", 1.0, 1.0, 1.0,
                                      mx, mw)
    assert (rdw.abs() < torch.finfo(torch.float16).smallest_normal).any()
    assert_matches_qdq(dw, rdw, mdw, torch.float16, name)


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("scaling", R.SCALINGS)
def test_dynamic_scaling_keeps_sqnr_off_unit_scale(name, scaling):
    """Inputs 1000x (or 1/1000x) off unit scale: dynamic scaling keeps the SQNR, static
    scaling at 1.0 does not (saturation / underflow), which is why dynamic modes exist."""
    for off in (1e3, 1e-3):
        x, w, _, _ = make((64,), 64, 32, torch.float32, False, 1, scale=off)
        y = forward(name, x, w, None, scaling, 1.0, 1.0, 1.0)
        db = R.sqnr_db(y, R.fp8_linear_unquantised(x, w, None))
        if scaling == "static":
            assert db < 15, db
        else:
            assert db >= FWD_DB, db


@pytest.mark.parametrize("name", KERNELS)
def test_static_scale_is_applied_and_undone(name):
    """x_scale = 2^-4 brings a 16x-too-large x back into range; the result is unscaled."""
    x, w, _, _ = make((32,), 32, 16, torch.float32, False, 2, scale=400.0)
    y = forward(name, x, w, None, "static", 2.0**-4, 1.0, 1.0)
    assert R.sqnr_db(y, R.fp8_linear_unquantised(x, w, None)) >= FWD_DB
    assert_matches_qdq(y, R.fp8_linear(x, w, None, "static", 2.0**-4),
                       R.fp8_linear(x.abs(), w.abs(), None, "static", 2.0**-4), torch.float32,
                       name)


@pytest.mark.parametrize("name", KERNELS)
def test_static_scales_saturation_and_non_finite_match_reference(name):
    """Static scales (x 2^-3, w 2, unit scale 0.5) are applied and undone; 1e6 and -1e30
    saturate; inf and NaN give NaN rows: the same as the reference, element by element."""
    a = torch.randn(20, 32)
    a[0, 0], a[1, 1], a[2, 2], a[3, 3] = 1e6, float("inf"), float("nan"), -1e30
    bt = torch.randn(16, 32)
    gemm, device = kernel(name)
    got = compose.gemm(gemm, a.to(device), bt.to(device), R.E4M3, R.E4M3, "static", 0.125, 2.0,
                       0.5, None, torch.float32).cpu()
    want = R.gemm_nt(a, bt, R.E4M3, R.E4M3, "static", 0.125, 2.0, 0.5)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got.double()[fin], want[fin], rtol=1e-5, atol=1e-3)
    assert torch.isnan(got[1]).all() and torch.isnan(got[2]).all()
    assert torch.isfinite(got[[0, 3]]).all() and torch.isfinite(got[4:]).all()


@pytest.mark.parametrize("name", KERNELS)
def test_saturation_clamps_to_format_max(name):
    """Static scaling saturates: 1000 and 1e30 act as 448 (E4M3), -1e6 as -448."""
    x = torch.zeros(16, 16)
    x[0, 0], x[1, 0], x[2, 0] = 1000.0, 1e30, -1e6
    w = torch.zeros(16, 16)
    w[0, 0] = 1.0
    y = forward(name, x, w, None, "static", 1.0, 1.0, 1.0)
    assert y[0, 0].item() == 448.0 and y[1, 0].item() == 448.0 and y[2, 0].item() == -448.0
    g = torch.zeros(16, 16)
    g[0, 0] = 1e6  # E5M2 saturates at 57344
    dx, _, _ = backward(name, g, x, w, "static", 1.0, 1.0, 1.0, 1.0, 1.0, True, False, False)
    assert dx[0, 0].item() == 57344.0


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("scaling", R.SCALINGS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_give_nan_not_garbage(name, scaling, bad):
    x = torch.randn(8, 32)
    w = torch.randn(16, 32)
    x[3, 5] = bad
    y = forward(name, x, w, None, scaling, 1.0, 1.0, 1.0)
    assert torch.isnan(y[3]).all()  # every output that reads the bad element
    if scaling != "tensorwise":
        others = torch.cat([y[:3], y[4:]])
        assert torch.isfinite(others).all()
    w[2, 7] = bad
    y = forward(name, torch.randn(8, 32), w, None, scaling, 1.0, 1.0, 1.0)
    assert torch.isnan(y[:, 2]).all()


@pytest.mark.parametrize("name", KERNELS)
def test_zero_rows_and_all_zero_operand(name):
    x = torch.zeros(0, 32)
    w = torch.randn(16, 32)
    b = torch.randn(16)
    for scaling in R.SCALINGS:
        assert forward(name, x, w, b, scaling, 1.0, 1.0, 1.0).shape == (0, 16)
        dx, dw, db = backward(name, torch.zeros(0, 16), x, w, scaling, 1.0, 1.0, 1.0, 1.0, 1.0,
                              True, True, True)
        assert dx.shape == (0, 32) and torch.equal(dw, torch.zeros(16, 32))
        assert torch.equal(db, torch.zeros(16))
        # an all-zero x: amax 0 must not make the scale inf / the output NaN
        y = forward(name, torch.zeros(4, 32), w, b, scaling, 1.0, 1.0, 1.0)
        torch.testing.assert_close(y, b.expand(4, 16))


# --- the reference and the Triton kernel's pieces ------------------------------------------


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


if HAS_TRITON:
    @triton.jit
    def _round_kernel(x_ptr, y_ptr, n, MANT: tl.constexpr, EMIN: tl.constexpr,
                      BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = o < n
        tl.store(y_ptr + o, T._round_to_fp8(tl.load(x_ptr + o, mask=m), MANT, EMIN), mask=m)


@pytest.mark.parametrize("fmt", [R.E4M3, R.E5M2])
def test_triton_emulated_cast_equals_torch_cast(fmt):
    """The interpreter's stand-in for the FP8 cast (``EMULATE_FP8``) against torch's own casts:
    every FP8 value, every midpoint (ties to even), subnormals and random values."""
    _, device = kernel("triton")
    _, mant, emin, fmax = T._FMT[fmt]
    grid = torch.arange(256, dtype=torch.uint8).view(fmt).float()
    grid = grid[torch.isfinite(grid)].unique()
    g = torch.Generator().manual_seed(0)
    rnd = torch.randn(8192, generator=g) * torch.exp2(torch.randint(-24, 17, (8192,),
                                                                     generator=g).float())
    v = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, rnd]).clamp(-fmax, fmax).to(device)
    out = torch.empty_like(v)
    _round_kernel[(triton.cdiv(v.numel(), 1024),)](v, out, v.numel(), MANT=mant, EMIN=emin,
                                                    BLOCK=1024)
    want = v.to(fmt).float()
    assert torch.equal(out, want), (out != want).sum().item()


def test_triton_rejects_unsupported_device_and_dtype(monkeypatch):
    kernel("triton")
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


# --- the op --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=12, deadline=None)
@given(
    lead=st.sampled_from([(0,), (3,), (4, 5), (64,)]),
    k=st.sampled_from([16, 64, 128]),
    n=st.sampled_from([16, 32, 96]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    scaling=st.sampled_from(R.SCALINGS),
    has_bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_op_forward_backward_sqnr(device, lead, k, n, dtype, scaling, has_bias, seed):
    """u-μP-style unit-scaled inputs, out_scale = 1/sqrt(K): output >= 25 dB, dx and dw
    >= 20 dB against the unquantised float64 product and its gradients."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g).to(device, dtype).requires_grad_()
    w = torch.randn(n, k, generator=g).to(device, dtype).requires_grad_()
    b = torch.randn(n, generator=g).to(device).requires_grad_() if has_bias else None
    s = k**-0.5
    y = op(x, w, b, scaling, out_scale=s)
    assert y.shape == (*lead, n) and y.dtype == dtype
    grad = torch.randn(y.shape, generator=g).to(device, dtype)
    y.backward(grad)
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    if x.numel() == 0:
        assert torch.equal(w.grad, torch.zeros_like(w))
        return
    x64, w64, g64 = x.detach().cpu().double(), w.detach().cpu().double(), grad.cpu().double()
    b_cpu = None if b is None else b.detach().cpu()
    y = y.detach().cpu()
    want = R.fp8_linear_unquantised(x64, w64, None if b is None else b_cpu.to(dtype), s)
    assert R.sqnr_db(y, want) >= 25.0
    assert R.sqnr_db(x.grad.cpu(), s * g64 @ w64) >= 20.0
    assert R.sqnr_db(w.grad.cpu(), s * g64.reshape(-1, n).t() @ x64.reshape(-1, k)) >= 20.0
    if b is not None:
        torch.testing.assert_close(b.grad.cpu().double(), g64.reshape(-1, n).sum(0), rtol=1e-5,
                                   atol=1e-4)
    # exact agreement with the quantise-dequantise reference (float32 rounding)
    ref = R.fp8_linear(x64.to(dtype), w64.to(dtype), b_cpu, scaling, 1.0, 1.0, s)
    tol = 16 * 2**-23 * R.fp8_linear(x64.abs(), w64.abs(), None, scaling, 1.0, 1.0, s).max()
    tol = tol + torch.finfo(dtype).eps * ref.abs().max() + (0 if b is None else 2**-7)
    assert (y.double() - ref).abs().max() <= tol


@pytest.mark.parametrize("device", DEVICES)
def test_op_grad_mults_override_the_true_gradient(device):
    x = torch.randn(8, 32, device=device, requires_grad=True)
    w = torch.randn(16, 32, device=device, requires_grad=True)
    op(x, w, out_scale=0.5).sum().backward()
    dx, dw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    op(x, w, out_scale=0.5, grad_x_mult=1.0, grad_w_mult=0.25).sum().backward()
    torch.testing.assert_close(x.grad, 2 * dx)
    torch.testing.assert_close(w.grad, 0.5 * dw)


@pytest.mark.parametrize("device", DEVICES)
def test_op_saturation_stats_count_per_operand(device):
    x = torch.randn(8, 32)
    x[0, :5] = 1000.0
    w = torch.randn(16, 32)
    w[3, 3] = -600.0
    x, w = x.to(device), w.to(device)
    xr = x.clone().requires_grad_()
    with mod.saturation_stats() as stats:
        y = op(xr, w)
        g = torch.zeros_like(y)
        g[0, :2] = 1e5  # beyond E5M2
        y.backward(g)
    assert stats.counts == {"x": 5, "w": 1, "grad": 2} and stats.calls == 1
    with mod.saturation_stats() as stats:  # dynamic scales: nothing saturates
        op(x, w, None, "tensorwise")
    assert stats.counts["x"] == 0 and stats.counts["w"] == 0
    op(x, w)  # outside the context: not counted
    assert stats.calls == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_op_non_finite_propagates_as_nan_or_raises_when_checked(bad, monkeypatch):
    x = torch.randn(4, 16)
    x[1, 2] = bad
    w = torch.randn(16, 16)
    y = op(x, w)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2, 3]]).all()
    monkeypatch.setattr(mod, "CHECK_FINITE", True)
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        op(x, w)


def _f(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((_f(4, 20), _f(16, 20)), {}, r"K = 20: .*multiple of 16; pad it to 32"),
        ((_f(4, 16), _f(24, 16)), {}, r"N = 24: .*out_features.*pad it to 32"),
        ((_f(4, 16), _f(16, 32)), {}, r"x must have shape \[..., K\] with K = w.shape\[1\]"),
        ((_f(4, 16, dtype=torch.float64), _f(16, 16)), {}, "x must be float32.*float64"),
        ((_f(4, 16), _f(16, 16).to(torch.int32)), {}, "w must be float32"),
        ((_f(4, 16), _f(16, 16), _f(8)), {}, r"bias must have shape \(16,\)"),
        ((_f(4, 16), _f(16, 16), None, "blockwise"), {}, "scaling must be one of"),
        ((_f(4, 16), _f(16, 16), None, "tensorwise"), {"x_scale": 2.0},
         "only used with scaling='static'"),
        ((_f(4, 16), _f(16, 16)), {"w_scale": 0.0}, "w_scale must be a finite number > 0"),
        ((_f(4, 16), _f(16, 16)), {"out_scale": float("inf")}, "out_scale must be finite"),
        ((_f(4, 16), _f(2, 16, 16)), {}, r"w must be 2-D"),
    ],
)
def test_op_bad_inputs_raise_naming_the_argument(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        op(*args, **kwargs)


def test_op_device_without_fp8_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 6))
    with pytest.raises(ValueError, match=r"compute capability >= 8.9.*sm_86"):
        mod.check_device("aa::fp8_linear", torch.device("cuda", 0))
    with pytest.raises(ValueError, match="no FP8 kernel for device mps"):
        mod.check_device("aa::fp8_linear", torch.device("mps"))


def test_op_compiles_with_aa_backend():
    x = torch.randn(2, 8, 32, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)

    def f(x, w):
        return torch.ops.aa.fp8_linear(x, w, None, "rowwise", out_scale=32**-0.5).relu()

    eager = f(x, w)
    compiled = torch.compile(f, backend="aa", fullgraph=True,
                             options={"inner_compiler": "aot_eager"})(x, w)
    torch.testing.assert_close(compiled, eager)
    compiled.sum().backward()
    assert w.grad is not None and x.grad.shape == x.shape


def _profile(fn):
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not
           e.cpu_parent.name.startswith("aten::")]
    allocated = sum(e.cpu_memory_usage for e in events if e.cpu_memory_usage > 0)
    return len(top), allocated


def test_op_static_scaling_launches_fewer_ops_than_tensorwise():
    """Measured, not timed: torch.profiler counts the top-level aten ops (kernel launches on
    a device) and the bytes they allocate per call. Static scaling has no amax reductions and
    no scale arithmetic, so it must run fewer ops than tensorwise, forward and backward."""
    x = torch.randn(64, 128, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(64, 128, dtype=torch.bfloat16, requires_grad=True)

    def fwd(scaling):
        return lambda: op(x.detach(), w.detach(), None, scaling)

    def fwd_bwd(scaling):
        def run():
            op(x, w, None, scaling).sum().backward()
            x.grad = w.grad = None
        return run

    for make_run in (fwd, fwd_bwd):
        static_ops, static_bytes = _profile(make_run("static"))
        tensorwise_ops, tensorwise_bytes = _profile(make_run("tensorwise"))
        assert 0 < static_ops < tensorwise_ops, (make_run.__name__, static_ops, tensorwise_ops)
        assert static_bytes <= tensorwise_bytes
