"""`aa::rms_norm`: the op (argument checks, also in the fake impl), its CPU kernel (eager and the
inductor route) and its Triton kernel (the interpreter on CPU without a GPU), each against the
float64 reference over odd shapes, empty inputs and every dtype it claims."""

from __future__ import annotations

import importlib.util

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from aa_compile.kernels.rms_norm import cpu, reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
if HAS_TRITON:
    from aa_compile.kernels.rms_norm import triton_kernel
    # Lengths just past MAX_BLOCK_N take the chunked loop (two and three chunks).
    CHUNKED_NS = [triton_kernel.MAX_BLOCK_N + 809, 2 * triton_kernel.MAX_BLOCK_N + 1]
else:
    CHUNKED_NS = [1833, 2049]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# --- the op: argument checks ---------------------------------------------------------------

@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.arange(6).view(2, 3), None, 1e-6), "x must be float16/bfloat16/float32/float64"),
        ((torch.randn(2, 3), torch.randn(4), 1e-6), r"weight must have shape \(3,\)"),
        ((torch.randn(2, 3), torch.randn(3, 1), 1e-6), r"weight must have shape \(3,\)"),
        ((torch.randn(2, 3), torch.ones(3, dtype=torch.int32), 1e-6), "weight must be a float"),
        ((torch.randn(2, 0), None, 1e-6), "non-empty last dimension"),
        ((torch.tensor(1.0), None, 1e-6), "non-empty last dimension"),
        ((torch.randn(2, 3), None, 1e-6, torch.int32), "out_dtype must be a float dtype"),
        ((torch.randn(2, 3), None, 1e-6, torch.bool), "out_dtype must be a float dtype"),
        ((torch.randn(2, 3), None, -1e-6), "eps must be a finite float >= 0, got -1e-06"),
        ((torch.randn(2, 3), None, float("nan")), "eps must be a finite float >= 0, got nan"),
        ((torch.randn(2, 3), None, float("inf")), "eps must be a finite float >= 0, got inf"),
    ],
)
def test_rms_norm_bad_inputs(args, message):
    with pytest.raises(ValueError, match=message):
        torch.ops.aa.rms_norm(*args)
    with pytest.raises(ValueError, match=message):  # the fake impl (compiled graphs) too
        torch.ops.aa.rms_norm(*(a.to("meta") if isinstance(a, torch.Tensor) else a
                                for a in args))


@pytest.mark.parametrize("eps", [-1e-6, float("nan")])
def test_rms_norm_backward_rejects_bad_eps(eps):
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="aa::rms_norm_backward: eps must be a finite float"):
        torch.ops.aa.rms_norm_backward(torch.randn(2, 3), x, None, eps)


def test_rms_norm_backward_checks_grad_shape():
    with pytest.raises(ValueError, match="grad shape"):
        torch.ops.aa.rms_norm_backward(torch.randn(2, 4), torch.randn(2, 3), None, 1e-6)


# --- the CPU kernel ------------------------------------------------------------------------
CPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LOW_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@st.composite
def cpu_problems(draw):
    lead = draw(st.sampled_from([(0,), (1,), (3,), (127,), (2, 5), (4, 1, 3)]))
    n = draw(st.sampled_from([1, 3, 16, 127, 1000]))
    dtype = draw(st.sampled_from(CPU_DTYPES))
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


@given(cpu_problems())
def test_cpu_forward_matches_float64_reference(p):
    lead, n, dtype, has_weight, eps, scale, seed = p
    x, w = make(lead, n, dtype, has_weight, scale, seed)
    want = reference.rms_norm(x.double(), None if w is None else w.double(), eps)
    eager = reference.rms_norm(x, w, eps)
    assert_close_to_reference(cpu.rms_norm_fwd(x, w, eps), want, eager, dtype)


@given(cpu_problems())
def test_cpu_backward_matches_float64_reference(p):
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


def test_cpu_backward_does_not_modify_grad():
    x, w = torch.randn(3, 8), None
    grad = torch.randn(3, 8)
    before = grad.clone()
    cpu.rms_norm_bwd(grad, x, w, 1e-6)
    assert torch.equal(grad, before)


def test_cpu_out_dtype_rounds_once():
    x = torch.randn(5, 33, dtype=torch.bfloat16)
    w = torch.randn(33, dtype=torch.bfloat16)
    got = cpu.rms_norm_fwd(x, w, 1e-6, torch.float32)
    assert got.dtype == torch.float32
    want = reference.rms_norm(x.double(), w.double(), 1e-6)
    assert (got.double() - want).abs().max().item() < 1e-5 * want.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_route_matches_reference(dtype):
    """The decomposition inductor compiles (aa backend on CPU) computes the same function."""
    from aa_compile.ops import install_inductor_decompositions

    install_inductor_decompositions()  # what the aa backend does before its first compile

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


# --- the Triton kernel ---------------------------------------------------------------------
TRITON_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def shapes(draw):
    """``x`` shapes ``lead + (N,)``: 0, 1 and odd row counts, odd / non-power-of-two ``N``."""
    if draw(st.integers(0, 9)) == 0:
        lead = draw(st.sampled_from([(1,), (3,), (1, 2)]))
        return lead + (draw(st.sampled_from(CHUNKED_NS)),)
    lead = draw(
        st.one_of(
            st.integers(0, 67).map(lambda m: (m,)),
            st.sampled_from([(2, 3), (3, 1, 5), (0, 4)]),
        )
    )
    return lead + (draw(st.sampled_from([1, 2, 3, 7, 64, 127, 1000, 1025])),)


def _randn(shape, dtype, scale, gen, noncontig=False):
    """Random normal ``* scale`` (never all zeros); optionally a non-contiguous view."""
    if noncontig:
        t = torch.randn(shape[-1], *shape[:-1], generator=gen, dtype=torch.float64)
        t = t.movedim(0, -1)
    else:
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (t * scale).to(dtype).to(DEVICE)


def _double(t):
    return None if t is None else t.double()


def _check(out, ref64, eager, dtype, shape, scale):
    """``out`` matches the float64 reference ``ref64``.

    float32: at most a small multiple of the error of ``eager`` (the reference run in the input
    dtypes), plus 1e-6 of ``scale``. float16/bfloat16: within one rounding step of the output
    dtype per element (the kernel rounds once), plus 1e-5 of ``scale`` for float32 error.
    """
    assert out.dtype == dtype
    assert out.shape == shape
    assert not out.isnan().any()
    err = (out.double() - ref64).abs()
    if err.numel() == 0:
        return
    if dtype == torch.float32:
        eager_err = (eager.double() - ref64).abs().max().item()
        assert err.max().item() <= 4 * eager_err + 1e-6 * scale
    else:
        bound = torch.finfo(dtype).eps * ref64.abs() + 1e-5 * scale
        assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


def _scale(t):
    return max(t.abs().max().item(), 1.0) if t.numel() else 1.0


def _check_backward(grad, x, w, eps):
    dx, dw = triton_kernel.rms_norm_bwd(grad, x, w, eps)

    dx64, dw64 = reference.rms_norm_backward(grad.double(), x.double(), _double(w), eps)
    dx_eager, dw_eager = reference.rms_norm_backward(grad, x, w, eps)
    # dx and dw are differences / sums of terms, so scale by the terms, not by the result.
    rstd = torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps)
    w64 = w.double() if w is not None else 1.0
    dx_scale = _scale(rstd * grad.double().abs() * w64)
    _check(dx, dx64, dx_eager, x.dtype, x.shape, dx_scale)
    if w is None:
        assert dw is None
    else:
        terms = (grad.double() * x.double() * rstd).abs().reshape(-1, x.shape[-1]).sum(0)
        _check(dw, dw64, dw_eager, w.dtype, w.shape, _scale(terms))


@needs_triton
@settings(max_examples=80, deadline=None)
@given(
    shape=shapes(),
    x_dtype=st.sampled_from(TRITON_DTYPES),
    w_dtype=st.sampled_from([None, *TRITON_DTYPES]),
    out_dtype=st.sampled_from([None, *TRITON_DTYPES]),
    eps=st.sampled_from([1e-6, 1e-5, 1e-3, 0.5]),
    x_scale=st.sampled_from([1e-2, 1.0, 37.0]),
    noncontig=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_triton_forward_matches_reference(
    shape, x_dtype, w_dtype, out_dtype, eps, x_scale, noncontig, seed
):
    gen = torch.Generator().manual_seed(seed)
    x = _randn(shape, x_dtype, x_scale, gen, noncontig)
    w = None if w_dtype is None else _randn(shape[-1:], w_dtype, 1.0, gen)

    y = triton_kernel.rms_norm_fwd(x, w, eps, out_dtype)

    ref64 = reference.rms_norm(x.double(), _double(w), eps)
    eager = reference.rms_norm(x, w, eps, out_dtype)
    _check(y, ref64, eager, out_dtype or x_dtype, x.shape, _scale(ref64))


@needs_triton
@settings(max_examples=80, deadline=None)
@given(
    shape=shapes(),
    x_dtype=st.sampled_from(TRITON_DTYPES),
    grad_dtype=st.sampled_from(TRITON_DTYPES),
    w_dtype=st.sampled_from([None, *TRITON_DTYPES]),
    eps=st.sampled_from([1e-6, 1e-5, 1e-3, 0.5]),
    x_scale=st.sampled_from([1e-2, 1.0, 37.0]),
    noncontig=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_triton_backward_matches_reference(
    shape, x_dtype, grad_dtype, w_dtype, eps, x_scale, noncontig, seed
):
    gen = torch.Generator().manual_seed(seed)
    x = _randn(shape, x_dtype, x_scale, gen, noncontig)
    grad = _randn(shape, grad_dtype, 1.0, gen, noncontig)
    w = None if w_dtype is None else _randn(shape[-1:], w_dtype, 1.0, gen)

    _check_backward(grad, x, w, eps)


def _rows_for_several_per_program():
    """Hypothesis rows can all land one per program (always on a GPU): this gives >= 2 each."""
    return 2 * triton_kernel._num_row_programs(2**31, torch.device(DEVICE)) + 3


@needs_triton
@pytest.mark.parametrize("w_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [127, CHUNKED_NS[0]])
def test_triton_backward_several_rows_per_program(n, w_dtype):
    rows = _rows_for_several_per_program()
    gen = torch.Generator().manual_seed(n)
    x = _randn((rows, n), torch.float32, 2.0, gen)
    grad = _randn((rows, n), torch.float16, 1.0, gen)
    w = None if w_dtype is None else _randn((n,), w_dtype, 1.0, gen)
    _check_backward(grad, x, w, 1e-5)


@needs_triton
@pytest.mark.parametrize("n", [129, CHUNKED_NS[0]])
def test_triton_dweight_is_deterministic(n):
    gen = torch.Generator().manual_seed(0)
    rows = _rows_for_several_per_program()
    x = _randn((rows, n), torch.float16, 3.0, gen)
    grad = _randn((rows, n), torch.float16, 1.0, gen)
    w = _randn((n,), torch.float32, 1.0, gen)
    dx1, dw1 = triton_kernel.rms_norm_bwd(grad, x, w, 1e-6)
    dx2, dw2 = triton_kernel.rms_norm_bwd(grad, x, w, 1e-6)
    assert torch.equal(dw1, dw2)
    assert torch.equal(dx1, dx2)


def _f(*shape, dtype=torch.float32):
    return torch.randn(shape, device=DEVICE).to(dtype)


@needs_triton
@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: triton_kernel.rms_norm_fwd(_f(2, 4), _f(5), 1e-6), "weight"),
        (lambda: triton_kernel.rms_norm_fwd(_f(2, 4), _f(1, 4), 1e-6), "weight"),
        (lambda: triton_kernel.rms_norm_fwd(_f(2, 4), _f(4).to(torch.int32), 1e-6), "weight"),
        (lambda: triton_kernel.rms_norm_fwd(_f(2, 4), _f(4).double(), 1e-6), "weight"),
        (lambda: triton_kernel.rms_norm_fwd(_f(2, 4).to(torch.int64), None, 1e-6), "x"),
        (lambda: triton_kernel.rms_norm_fwd(_f(2, 0), None, 1e-6), "x"),
        (lambda: triton_kernel.rms_norm_fwd(_f(), None, 1e-6), "x"),
        (lambda: triton_kernel.rms_norm_fwd(_f(2, 4), None, 1e-6, torch.int32), "out_dtype"),
        (lambda: triton_kernel.rms_norm_bwd(_f(2, 5), _f(2, 4), None, 1e-6), "grad"),
        (lambda: triton_kernel.rms_norm_bwd(_f(4, 2), _f(2, 4), None, 1e-6), "grad"),
        (
            lambda: triton_kernel.rms_norm_bwd(_f(2, 4).to(torch.int32), _f(2, 4), None, 1e-6),
            "grad",
        ),
        (lambda: triton_kernel.rms_norm_bwd(_f(2, 4), _f(2, 4), _f(3), 1e-6), "weight"),
        (lambda: triton_kernel.rms_norm_bwd(_f(2, 0), _f(2, 0), None, 1e-6), "x"),
    ],
)
def test_triton_bad_input_raises_naming_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        call()


@needs_triton
@pytest.mark.parametrize("fn", ["fwd", "bwd"])
def test_triton_float64_points_to_cpu_path(fn):
    x = _f(2, 4).double()
    with pytest.raises(ValueError, match=r"^x: float64 .*CPU"):
        if fn == "fwd":
            triton_kernel.rms_norm_fwd(x, None, 1e-6)
        else:
            triton_kernel.rms_norm_bwd(x, x, None, 1e-6)
