"""`aa::int8_linear`: the op (against the float64 dequantised reference over odd shapes, empty
inputs and every dtype, on every device; autograd; bad input), its kernels parametrized (the CPU
kernel and the Triton kernel, the interpreter on CPU without a GPU), the CPU kernel's two routes
(the AVX2 C kernel for small M, blocked dequantise + GEMM) directly and which one the op takes,
and the absmax quantiser. (opcheck: tests/test_ops.py.)"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aa_compile.kernels.int8_linear import cpu, cpu_avx2
from aa_compile.kernels.int8_linear import reference as R
from aa_compile.ops import OPS

from ..conftest import DEVICES
from ..strategies import check_layout_invariance, op_calls

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    from aa_compile.kernels.int8_linear import triton_kernel

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: the kernels and the device they run on (Triton: the interpreter on CPU tensors without a GPU)
KERNELS = ["cpu", "triton"]
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def kernel(name: str):
    """``(int8_linear, device)`` of kernel ``name`` (skips where Triton is missing)."""
    if name == "cpu":
        return cpu.int8_linear, "cpu"
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    return triton_kernel.int8_linear, TRITON_DEVICE


def _case(lead, k, n, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    q, s = R.quantize_absmax(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, q, s, b


def _to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def _check_close(out, x, q, s, b):
    """``out`` (any float dtype, any device) against the float64 reference: within 4x the error
    of float32 ``F.linear`` on the dequantised weight (+1e-5), plus rounding to ``out.dtype``;
    float64 output to 1e-12 (relative)."""
    out, x, q, s, b = _to("cpu", out, x, q, s, b)
    ref = R.int8_linear(x.double(), q, s, b)
    assert out.shape == ref.shape
    if not ref.numel():
        return
    err = (out.double() - ref).abs()
    if out.dtype == torch.float64:
        assert (err <= 1e-12 * (1 + ref.abs())).all()
        return
    b32 = None if b is None else b.float()
    eager = torch.nn.functional.linear(x.float(), R.dequantize(q, s, torch.float32), b32)
    tol = 4 * (eager.double() - ref).abs().max().item() + 1e-5
    ulp = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[out.dtype]
    assert (err <= tol + ulp * ref.abs()).all(), (err.max().item(), tol)


# --- the op --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None)
@given(lead=st.lists(st.integers(0, 9), min_size=1, max_size=2), k=st.integers(1, 70),
       n=st.integers(0, 40), bias=st.booleans(), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_op_matches_float64_reference(device, lead, k, n, bias, dtype, seed):
    x, q, s, b = _to(device, *_case(lead, k, n, dtype=dtype, bias=bias, seed=seed))
    out = torch.ops.aa.int8_linear(x, q, s, b)
    assert out.shape == (*lead, n) and out.dtype == x.dtype
    _check_close(out, x, q, s, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [((0,), 8, 5), ((2, 0), 8, 5), ((3,), 8, 0), ((3,), 0, 5)])
def test_op_empty(device, dtype, shape):
    lead, k, n = shape
    x, q, s, b = _to(device, *_case(lead, k, n, dtype=dtype))
    out = torch.ops.aa.int8_linear(x, q, s, b)
    assert out.shape == (*lead, n) and out.dtype == dtype
    torch.testing.assert_close(out, b.expand(*lead, n))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_op_other_dtypes(device, dtype):
    x, q, s, b = _case((3,), 33, 9, dtype=dtype)
    out = torch.ops.aa.int8_linear(*_to(device, x, q, s, b))
    ref = R.int8_linear(x.double(), q, s, b)
    assert out.dtype == dtype
    rtol, atol = {torch.float16: (2e-3, 5e-3), torch.bfloat16: (2e-2, 5e-2),
                  torch.float64: (1e-12, 1e-12)}[dtype]
    torch.testing.assert_close(out.cpu().double(), ref, rtol=rtol, atol=atol)


def test_op_grad_x_and_bias():
    x, q, s, b = _case((2, 5), 16, 7, dtype=torch.float64)
    x.requires_grad_(True)
    b.requires_grad_(True)
    torch.ops.aa.int8_linear(x, q, s, b).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    b2 = b.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, R.dequantize(q, s), b2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


@pytest.mark.parametrize("bad, match", [
    (lambda x, q, s, b: (x.long(), q, s, b), "x must be a float"),
    (lambda x, q, s, b: (x, q.float(), s, b), "w_int8 must be a 2-D int8"),
    (lambda x, q, s, b: (x[..., :-1], q, s, b), "last dimension"),
    (lambda x, q, s, b: (x, q, s[:-1], b), "scales must be"),
    (lambda x, q, s, b: (x, q, s, b[:-1]), "bias must be"),
])
def test_op_bad_inputs(bad, match):
    with pytest.raises(ValueError, match=match):
        torch.ops.aa.int8_linear(*bad(*_case((2,), 8, 4)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, cpu.SMALL_M, cpu.SMALL_M + 1])
def test_op_cpu_routes(monkeypatch, dtype, m):
    """On CPU the op takes the native kernel for M <= SMALL_M (half and float32 input), blocked
    dequantise + GEMM otherwise and for float64; and matches the reference either way."""
    calls = []
    for mod, name in ((cpu_avx2, "int8_linear"), (cpu, "blocked_linear")):
        fn = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _fn=fn, _n=name, **kw: calls.append(_n)
                            or _fn(*a, **kw))
    x, q, s, b = _case((m,), 37, 11, dtype=dtype)
    out = torch.ops.aa.int8_linear(x, q, s, b)
    native = m <= cpu.SMALL_M and dtype != torch.float64 and cpu_avx2.available()
    assert calls == ["int8_linear" if native else "blocked_linear"]
    _check_close(out, x, q, s, b)


# --- the kernels ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("lead, k, n", [((1,), 64, 48), ((3,), 5, 7), ((17,), 127, 33),
                                        ((1,), 1, 1), ((cpu.SMALL_M + 1,), 37, 9),
                                        ((1,), 16, 8), ((3,), 70, 65), ((2, 9), 33, 5),
                                        ((17,), 1, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_matches_reference(name, lead, k, n, bias):
    fn, device = kernel(name)
    g = torch.Generator().manual_seed(k * 7 + n + len(lead))
    x = torch.randn(*lead, k, generator=g)
    q, s = R.quantize_absmax(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g) if bias else None
    out = fn(*_to(device, x, q, s, b))
    assert out.shape == (*lead, n)
    torch.testing.assert_close(out.cpu().double(), R.int8_linear(x.double(), q, s, b),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", KERNELS)
def test_kernel_non_contiguous_inputs(name):
    fn, device = kernel(name)
    x = torch.randn(8, 8)[:, ::2]
    q = torch.randint(-127, 128, (3, 12), dtype=torch.int8)[:, ::3]
    s = torch.rand(3)
    out = fn(*_to(device, x, q, s), None)
    torch.testing.assert_close(out.cpu().double(), R.int8_linear(x.double(), q, s, None),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", KERNELS)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_kernel_any_input_layout(name, data):
    """Strided / transposed / permuted / expanded x, weight, scales and bias give what
    contiguous ones give."""
    fn, device = kernel(name)
    samples = [s for s in OPS["aa::int8_linear"].samples(device)
               if name == "cpu" or s[0][0].dtype == torch.float32 or device != "cpu"]
    call = data.draw(op_calls(samples), label="call")
    check_layout_invariance(fn, call, f"int8_linear {name}")


@pytest.mark.skipif(TRITON_DEVICE == "cpu", reason="bf16 tl.dot needs a GPU")
def test_triton_bfloat16():
    fn, device = kernel("triton")
    x = torch.randn(4, 64, device=device, dtype=torch.bfloat16)
    q, s = R.quantize_absmax(torch.randn(32, 64))
    out = fn(x, q.to(device), s.to(device), None)
    torch.testing.assert_close(out.double().cpu(), R.int8_linear(x.double().cpu(), q, s, None),
                               rtol=2e-2, atol=5e-2)


# --- the CPU kernel's two routes -----------------------------------------------------------


def _native():
    if not cpu_avx2.available():
        pytest.skip("the AVX2 CPU kernel is not available on this machine")


@settings(max_examples=40, deadline=None)
@given(m=st.integers(0, 9), k=st.integers(1, 100), n=st.integers(0, 13), bias=st.booleans(),
       dtype=st.sampled_from((torch.float16, torch.bfloat16, torch.float32)),
       x_stride=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_native_kernel_matches_reference(m, k, n, bias, dtype, x_stride, seed):
    """The AVX2 kernel itself: every M block (1-3 rows, 4 at a time), N % 4 tail rows, K tails
    below its 16- and 8-wide steps, and x rows further apart than K (a strided view)."""
    _native()
    x, q, s, b = _case((m,), k, n, dtype=dtype, bias=bias, seed=seed)
    if x_stride:  # the same values, rows x_stride elements further apart
        x = torch.cat([x, torch.randn(m, x_stride).to(dtype)], 1)[:, :k]
    out = cpu_avx2.int8_linear(x, q, s, b)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    _check_close(out, x, q, s, b)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(0, 9), k=st.integers(0, 40), n=st.integers(0, 13), bias=st.booleans(),
       dtype=st.sampled_from(DTYPES), block_rows=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_blocked_matches_reference(m, k, n, bias, dtype, block_rows, seed):
    """The dequantise + GEMM path with blocks smaller than N (and a partial last block)."""
    x, q, s, b = _case((m,), k, n, dtype=dtype, bias=bias, seed=seed)
    out = cpu.blocked_linear(x, q, s, b, block_rows=block_rows)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _check_close(out, x, q, s, b)


def test_native_kernel_builds_on_avx2():
    """Where the CPU has AVX2/FMA and a C compiler exists, the kernel must build and load (else
    the op silently runs the slower fallback)."""
    if not cpu_avx2.supported_cpu() or cpu_avx2.compiler() is None:
        pytest.skip("no AVX2/FMA or no C compiler here")
    assert cpu_avx2.available()


@pytest.mark.parametrize("m", [1, 6])
def test_native_kernel_thread_count_invariant(monkeypatch, m):
    """Each output is summed by one thread in a fixed order: 1, 2 and 3 threads (the caller plus
    pool helpers claiming chunks) agree bitwise, over many calls (the pool is reused)."""
    _native()
    monkeypatch.setattr(cpu_avx2, "PARALLEL_GRAIN", 1)  # the pool for any size
    threads = torch.get_num_threads()
    try:
        for seed, n in enumerate((601, 64 * 4 + 3, 4096)):
            x, q, s, b = _case((m,), 77, n, seed=seed)
            outs = []
            for t in (1, 2, 3, 2):
                torch.set_num_threads(t)
                outs.append(cpu_avx2.int8_linear(x, q, s, b))
            assert all(torch.equal(outs[0], o) for o in outs[1:])
            _check_close(outs[0], x, q, s, b)
    finally:
        torch.set_num_threads(threads)


# --- the quantiser -------------------------------------------------------------------------


def test_quantize_absmax_roundtrip_and_zero_rows():
    w = torch.randn(6, 10)
    w[2] = 0
    q, s = R.quantize_absmax(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and s[2] == 1
    err = (R.dequantize(q, s, torch.float32) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()
