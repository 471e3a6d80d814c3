"""aa::fp8_linear as an op: autograd, SQNR over shapes and scalings, saturation stats, bad
input, non-finite input, and a profiler count showing what static scaling saves."""

from __future__ import annotations

import pytest
import torch
from aa_compile.kernels.fp8_linear import reference as R
from hypothesis import given, settings
from hypothesis import strategies as st

import aa_compile  # noqa: F401  (defines torch.ops.aa.*)
from aa_compile.ops import fp8_linear as mod

op = torch.ops.aa.fp8_linear


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
def test_op_forward_backward_sqnr(lead, k, n, dtype, scaling, has_bias, seed):
    """u-μP-style unit-scaled inputs, out_scale = 1/sqrt(K): output >= 25 dB, dx and dw
    >= 20 dB against the unquantised float64 product and its gradients."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g).to(dtype).requires_grad_()
    w = torch.randn(n, k, generator=g).to(dtype).requires_grad_()
    b = torch.randn(n, generator=g).requires_grad_() if has_bias else None
    s = k**-0.5
    y = op(x, w, b, scaling, out_scale=s)
    assert y.shape == (*lead, n) and y.dtype == dtype
    grad = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(grad)
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    if x.numel() == 0:
        assert torch.equal(w.grad, torch.zeros_like(w))
        return
    x64, w64, g64 = x.detach().double(), w.detach().double(), grad.double()
    want = R.fp8_linear_unquantised(x64, w64, None if b is None else b.detach().to(dtype), s)
    assert R.sqnr_db(y.detach(), want) >= 25.0
    assert R.sqnr_db(x.grad, s * g64 @ w64) >= 20.0
    assert R.sqnr_db(w.grad, s * g64.reshape(-1, n).t() @ x64.reshape(-1, k)) >= 20.0
    if b is not None:
        torch.testing.assert_close(b.grad.double(), g64.reshape(-1, n).sum(0), rtol=1e-5,
                                   atol=1e-4)
    # exact agreement with the quantise-dequantise reference (float32 rounding)
    ref = R.fp8_linear(x64.to(dtype), w64.to(dtype), None if b is None else b.detach(),
                       scaling, 1.0, 1.0, s)
    tol = 16 * 2**-23 * R.fp8_linear(x64.abs(), w64.abs(), None, scaling, 1.0, 1.0, s).max()
    tol = tol + torch.finfo(dtype).eps * ref.abs().max() + (0 if b is None else 2**-7)
    assert (y.detach().double() - ref).abs().max() <= tol


def test_grad_mults_override_the_true_gradient():
    x = torch.randn(8, 32, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    op(x, w, out_scale=0.5).sum().backward()
    dx, dw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    op(x, w, out_scale=0.5, grad_x_mult=1.0, grad_w_mult=0.25).sum().backward()
    torch.testing.assert_close(x.grad, 2 * dx)
    torch.testing.assert_close(w.grad, 0.5 * dw)


def test_saturation_stats_count_per_operand():
    x = torch.randn(8, 32)
    x[0, :5] = 1000.0
    w = torch.randn(16, 32)
    w[3, 3] = -600.0
    xr = x.requires_grad_()
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
def test_non_finite_propagates_as_nan_or_raises_when_checked(bad, monkeypatch):
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
def test_bad_inputs_raise_naming_the_argument(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        op(*args, **kwargs)


def test_device_without_fp8_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 6))
    with pytest.raises(ValueError, match=r"compute capability >= 8.9.*sm_86"):
        mod._check_device("aa::fp8_linear", torch.device("cuda", 0))
    with pytest.raises(ValueError, match="no FP8 kernel for device mps"):
        mod._check_device("aa::fp8_linear", torch.device("mps"))


def test_compiles_with_aa_backend():
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


def test_static_scaling_launches_fewer_ops_than_tensorwise():
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

    for make in (fwd, fwd_bwd):
        static_ops, static_bytes = _profile(make("static"))
        tensorwise_ops, tensorwise_bytes = _profile(make("tensorwise"))
        assert 0 < static_ops < tensorwise_ops, (make.__name__, static_ops, tensorwise_ops)
        assert static_bytes <= tensorwise_bytes
