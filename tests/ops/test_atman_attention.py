"""`aa::atman_attention`: its kernels parametrized (the CPU kernel, and the Triton kernel: the
interpreter on CPU without a GPU) against the float64 reference over odd shapes, grouped heads,
shared prefixes and both modes; the op (strongest suppression, unchanged prefix, bad inputs,
last-dim strides) on every device. (opcheck: tests/test_ops.py.)"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aa_compile.kernels.atman_attention import cpu, reference

from ..conftest import DEVICES

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    from aa_compile.kernels.atman_attention import triton_kernel

MODES = ["log_additive", "multiplicative"]
KERNELS = ["cpu", "triton"]
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton(q, k, v, idx, fac, mode, causal, off, scale, pk=None, pv=None):
    """The Triton kernel on one key sequence per row (the prefix in front, as the op does),
    with small blocks so that small cases take several blocks."""
    k, v = reference.with_prefix(k, v, pk, pv)
    return triton_kernel.atman_attention(q, k, v, idx, fac, mode, causal, off, scale,
                                         block_m=16, block_n=16)


def kernel(name: str):
    """``(atman_attention, device)`` of kernel ``name`` (skips where Triton is missing)."""
    if name == "cpu":
        return cpu.atman_attention, "cpu"
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    return _triton, TRITON_DEVICE


@pytest.fixture(scope="module")
def small_query_chunks():
    """Query chunks of 2 rows, so that small cases run the CPU kernel's chunked causal path."""
    old, cpu.QUERY_CHUNK = cpu.QUERY_CHUNK, 2
    yield
    cpu.QUERY_CHUNK = old


def _case(draw_shape, seed):
    b, hkv, g, sq, extra, d, n, causal = draw_shape
    gen = torch.Generator().manual_seed(seed)
    sk = sq + extra
    q = torch.randn(b, hkv * g, sq, d, generator=gen)
    k = torch.randn(b, hkv, sk, d, generator=gen)
    v = torch.randn(b, hkv, sk, d, generator=gen)
    idx = torch.randint(-1, sk, (b, n), generator=gen)
    fac = torch.rand(b, n, generator=gen) * 0.95 + 0.05
    return q, k, v, idx, fac, causal, extra


shapes = st.tuples(st.integers(1, 3), st.integers(1, 2), st.integers(1, 3), st.integers(1, 19),
                   st.integers(0, 7), st.sampled_from([1, 3, 8, 16]), st.integers(0, 4),
                   st.booleans())


def _check(name, got, q, k, v, idx, fac, mode, causal, off, pk=None, pv=None):
    """At least as close to the float64 reference as the float32 reference is (+ 1e-6); the
    Triton kernel also within rtol 1e-4, atol 1e-5 of it."""
    d64 = (lambda t: None if t is None else t.double())
    want = reference.atman_attention(q.double(), k.double(), v.double(), idx, fac, mode, causal,
                                     off, None, d64(pk), d64(pv))
    eager = reference.atman_attention(q, k, v, idx, fac, mode, causal, off, None, pk, pv)
    got = got.cpu()
    err, err_eager = (got.double() - want).abs().max(), (eager.double() - want).abs().max()
    assert err <= 4 * err_eager + 1e-6
    if name == "triton":
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", KERNELS)
@settings(max_examples=30)
@given(shape=shapes, seed=st.integers(0, 2**16), mode=st.sampled_from(MODES))
def test_kernel_matches_reference(name, shape, seed, mode):
    fn, device = kernel(name)
    q, k, v, idx, fac, causal, off = _case(shape, seed)
    got = fn(*(t.to(device) for t in (q, k, v, idx, fac)), mode, causal, off, None)
    _check(name, got, q, k, v, idx, fac, mode, causal, off)


prefix_cases = st.tuples(
    st.integers(1, 3), st.integers(1, 2), st.integers(1, 3), st.integers(1, 19),
    st.integers(0, 9),  # prefix length
    st.integers(0, 5),  # own keys beyond the queries
    st.sampled_from([1, 3, 8]),
    st.sampled_from([8, 4]),  # value head size (!= query head size: the padded path)
    st.integers(0, 4),  # suppression slots
    st.booleans(),  # causal
    st.booleans(),  # q_offset = prefix + extra (the explainer's shape) or smaller
    st.booleans(),  # suppression only among the own keys (the explainer's case)
    st.booleans(),  # tiny factors
)


@pytest.mark.parametrize("name", KERNELS)
@settings(max_examples=60)
@given(case=prefix_cases, seed=st.integers(0, 2**16), mode=st.sampled_from(MODES))
def test_kernel_prefix_matches_reference(name, case, seed, mode, small_query_chunks):
    """A shared prefix (on CPU: shared part, own part in query chunks, multiplicative's
    left-out keys, the fallbacks) equals the reference on prefix + own keys."""
    fn, device = kernel(name)
    b, hkv, g, sq, n_pre, extra, d, dv, n, causal, aligned, own_only, tiny = case
    gen = torch.Generator().manual_seed(seed)
    n_own = sq + extra
    sk = n_pre + n_own
    q = torch.randn(b, hkv * g, sq, d, generator=gen)
    k = torch.randn(b, hkv, n_own, d, generator=gen)
    v = torch.randn(b, hkv, n_own, dv, generator=gen)
    pk = torch.randn(1, hkv, n_pre, d, generator=gen) if n_pre else None
    pv = torch.randn(1, hkv, n_pre, dv, generator=gen) if n_pre else None
    off = (n_pre + extra if aligned
           else int(torch.randint(0, n_pre + extra + 1, (1,), generator=gen)))
    lo = n_pre if own_only else -1
    idx = torch.randint(max(lo, -1), sk, (b, n), generator=gen)
    fac = torch.rand(b, n, generator=gen) * 0.95 + 0.05
    if tiny:  # no cancellation however strong the suppression
        fac = fac * 1e-5 + 1e-7
    on = (lambda t: None if t is None else t.to(device))
    got = fn(*map(on, (q, k, v, idx, fac)), mode, causal, off, None, on(pk), on(pv))
    _check(name, got, q, k, v, idx, fac, mode, causal, off, pk, pv)


@pytest.mark.parametrize("device", DEVICES)
def test_op_strongest_suppression_wins_and_prefix_unchanged(device):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=gen).to(device) for _ in range(3))

    def op(idx, fac, mode):
        return torch.ops.aa.atman_attention(q, k, v, idx.to(device), fac.to(device), mode, True)

    for mode in MODES:
        a = op(torch.tensor([[2, 2]]), torch.tensor([[0.5, 0.1]]), mode)
        b = op(torch.tensor([[2]]), torch.tensor([[0.1]]), mode)
        plain = op(torch.empty(1, 0, dtype=torch.long), torch.empty(1, 0), mode)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a[:, :, :2], plain[:, :, :2], rtol=0, atol=0)
        assert (a[:, :, 2:] - plain[:, :, 2:]).abs().max() > 1e-3


@pytest.mark.parametrize("change, match", [
    ({"mode": "x"}, "mode"),
    ({"fac": torch.tensor([[0.0]])}, "suppress_factor"),
    ({"fac": torch.tensor([[1.5]])}, "suppress_factor"),
    ({"idx": torch.tensor([[9]])}, "suppress_idx"),
    ({"idx": torch.tensor([[1.0]])}, "suppress_idx"),
    ({"k": torch.randn(1, 3, 6, 8), "v": torch.randn(1, 3, 6, 8)}, "multiple"),
    ({"q_offset": -1}, "q_offset"),
    ({"pk": torch.randn(1, 2, 3, 8)}, "both prefix_k and prefix_v"),
    ({"pk": torch.randn(2, 2, 3, 8), "pv": torch.randn(2, 2, 3, 8)}, "prefix_k"),
    ({"pk": torch.randn(1, 1, 3, 8), "pv": torch.randn(1, 1, 3, 8)}, "prefix_k"),
    ({"pk": torch.randn(1, 2, 3, 8), "pv": torch.randn(1, 2, 4, 8)}, "agree"),
    ({"pk": torch.randn(1, 2, 3, 8).double(), "pv": torch.randn(1, 2, 3, 8)}, "prefix_k"),
    ({"pk": torch.randn(1, 2, 3, 8), "pv": torch.randn(1, 2, 3, 8), "idx": torch.tensor([[9]])},
     "suppress_idx"),
])
def test_op_bad_inputs(change, match):
    args = {"q": torch.randn(1, 2, 6, 8), "k": torch.randn(1, 2, 6, 8),
            "v": torch.randn(1, 2, 6, 8), "idx": torch.tensor([[1]]),
            "fac": torch.tensor([[0.5]]), "mode": "log_additive", "q_offset": 0,
            "pk": None, "pv": None}
    args.update(change)
    with pytest.raises(ValueError, match=match):
        torch.ops.aa.atman_attention(args["q"], args["k"], args["v"], args["idx"], args["fac"],
                                     args["mode"], True, args["q_offset"], None, args["pk"],
                                     args["pv"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("which", ["q", "k", "v", "prefix_k", "prefix_v"])
def test_op_last_dim_not_unit_stride_matches_reference(device, mode, which):
    """``stride(-1) != 1`` (transposed, made contiguous, transposed back): ATen's CPU flash
    kernel ignores that stride, so the op must not hand it such a tensor."""
    gen = torch.Generator().manual_seed(3)
    t = {name: torch.randn(*shape, generator=gen).to(device) for name, shape in
         (("q", (2, 4, 5, 8)), ("k", (2, 2, 5, 8)), ("v", (2, 2, 5, 8)),
          ("prefix_k", (1, 2, 3, 8)), ("prefix_v", (1, 2, 3, 8)))}
    t[which] = t[which].transpose(-1, -2).contiguous().transpose(-1, -2)
    assert t[which].stride(-1) != 1
    idx = torch.tensor([[4, -1], [3, 6]], device=device)
    fac = torch.tensor([[0.1, 1.0], [0.5, 0.2]], device=device)
    args = (t["q"], t["k"], t["v"], idx, fac, mode, True)
    kwargs = {"q_offset": 3, "prefix_k": t["prefix_k"], "prefix_v": t["prefix_v"]}
    got = torch.ops.aa.atman_attention(*args, **kwargs)
    want = reference.atman_attention(*args, 3, None, t["prefix_k"], t["prefix_v"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
