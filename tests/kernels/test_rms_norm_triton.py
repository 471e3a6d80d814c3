"""Property tests: the Triton RMSNorm kernels against the float64 reference.

Without CUDA the kernels run in the Triton interpreter on CPU tensors (TRITON_INTERPRET must be
set before the kernel module is imported), so sizes and example counts are kept small.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from aa_compile.kernels.rms_norm import reference, triton_kernel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Lengths just past MAX_BLOCK_N take the chunked loop (two and three chunks).
CHUNKED_NS = [triton_kernel.MAX_BLOCK_N + 809, 2 * triton_kernel.MAX_BLOCK_N + 1]


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


@settings(max_examples=80, deadline=None)
@given(
    shape=shapes(),
    x_dtype=st.sampled_from(DTYPES),
    w_dtype=st.sampled_from([None, *DTYPES]),
    out_dtype=st.sampled_from([None, *DTYPES]),
    eps=st.sampled_from([1e-6, 1e-5, 1e-3, 0.5]),
    x_scale=st.sampled_from([1e-2, 1.0, 37.0]),
    noncontig=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_forward_matches_reference(
    shape, x_dtype, w_dtype, out_dtype, eps, x_scale, noncontig, seed
):
    gen = torch.Generator().manual_seed(seed)
    x = _randn(shape, x_dtype, x_scale, gen, noncontig)
    w = None if w_dtype is None else _randn(shape[-1:], w_dtype, 1.0, gen)

    y = triton_kernel.rms_norm_fwd(x, w, eps, out_dtype)

    ref64 = reference.rms_norm(x.double(), _double(w), eps)
    eager = reference.rms_norm(x, w, eps, out_dtype)
    _check(y, ref64, eager, out_dtype or x_dtype, x.shape, _scale(ref64))


@settings(max_examples=80, deadline=None)
@given(
    shape=shapes(),
    x_dtype=st.sampled_from(DTYPES),
    grad_dtype=st.sampled_from(DTYPES),
    w_dtype=st.sampled_from([None, *DTYPES]),
    eps=st.sampled_from([1e-6, 1e-5, 1e-3, 0.5]),
    x_scale=st.sampled_from([1e-2, 1.0, 37.0]),
    noncontig=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_backward_matches_reference(
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


@pytest.mark.parametrize("w_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [127, CHUNKED_NS[0]])
def test_backward_several_rows_per_program(n, w_dtype):
    rows = _rows_for_several_per_program()
    gen = torch.Generator().manual_seed(n)
    x = _randn((rows, n), torch.float32, 2.0, gen)
    grad = _randn((rows, n), torch.float16, 1.0, gen)
    w = None if w_dtype is None else _randn((n,), w_dtype, 1.0, gen)
    _check_backward(grad, x, w, 1e-5)


@pytest.mark.parametrize("n", [129, CHUNKED_NS[0]])
def test_dweight_is_deterministic(n):
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
def test_bad_input_raises_naming_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        call()


@pytest.mark.parametrize("fn", ["fwd", "bwd"])
def test_float64_points_to_cpu_path(fn):
    x = _f(2, 4).double()
    with pytest.raises(ValueError, match=r"^x: float64 .*CPU"):
        if fn == "fwd":
            triton_kernel.rms_norm_fwd(x, None, 1e-6)
        else:
            triton_kernel.rms_norm_bwd(x, x, None, 1e-6)
