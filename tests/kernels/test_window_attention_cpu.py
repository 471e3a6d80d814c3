"""The CPU path (ATen flash over query blocks) and the device-generic blocked path of
aa::window_attention against the float64 dense reference: outputs, logsumexp, gradients."""

from __future__ import annotations

import dataclasses
import itertools

import hypothesis.strategies as st
import pytest
import torch
from aa_compile.kernels.window_attention import blocked, cpu, reference
from hypothesis import given, settings

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: OpenMP fork/join costs more than the work (10x slower with 2 threads on the
    loaded 2-core dev machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: normwise relative error bound, ||got - want|| / ||want||, for the half types (rounding of the
#: inputs, of P before the P @ V product, of the output; measured ~3x below these)
LOW_TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


@dataclasses.dataclass(frozen=True)
class Problem:
    lead: tuple
    hkv: int
    group: int
    t: int
    d: int
    docs: tuple | None  # document lengths (sum t) or None = one document
    window: int
    dtype: torch.dtype
    scale: float | None
    lse_grad: bool
    seed: int

    def offsets(self):
        if self.docs is None:
            return None
        return torch.tensor((0, *self.docs), dtype=torch.int64).cumsum(0)

    def make(self):
        g = torch.Generator().manual_seed(self.seed)
        hq = self.hkv * self.group

        def randn(h):
            return torch.randn(*self.lead, h, self.t, self.d, generator=g,
                               dtype=torch.float64).to(self.dtype)

        q, k, v = randn(hq), randn(self.hkv), randn(self.hkv)
        grad = randn(hq)
        grad_lse = (torch.randn(*self.lead, hq, self.t, generator=g, dtype=torch.float64)
                    .to(reference.compute_dtype(self.dtype)) if self.lse_grad else None)
        return q, k, v, self.offsets(), grad, grad_lse


@st.composite
def doc_lengths(draw, t):
    """A random split of t into documents: empty and one-token documents included."""
    if draw(st.integers(0, 4)) == 0:
        return None
    cuts = sorted(draw(st.lists(st.integers(0, t), max_size=6)))
    bounds = [0, *cuts, t]
    return tuple(b - a for a, b in itertools.pairwise(bounds))


@st.composite
def problems(draw, max_t=130, dtypes=DTYPES, lead=((), (2,), (1, 2))):
    t = draw(st.sampled_from([0, 1, 2, 7, 31, 64, max_t]))
    window = draw(st.sampled_from([1, 2, 5, 17, 64, t + 3]))
    return Problem(
        lead=draw(st.sampled_from(lead)),
        hkv=draw(st.sampled_from([1, 2])),
        group=draw(st.sampled_from([1, 2, 3])),
        t=t,
        d=draw(st.sampled_from([1, 3, 16, 33])),
        docs=draw(doc_lengths(t)),
        window=max(window, 1),
        dtype=draw(st.sampled_from(dtypes)),
        scale=draw(st.sampled_from([None, 0.7])),
        lse_grad=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def references(p: Problem, q, k, v, offs, grad, grad_lse):
    """float64 ``(out, lse, dq, dk, dv)`` and the same computed by the reference in p.dtype
    (``eager``: what dense PyTorch gets in that precision)."""
    def run(dtype):
        leaves = [x.detach().to(dtype).requires_grad_(True) for x in (q, k, v)]
        out, lse = reference.window_attention(*leaves, offs, p.window, p.scale)
        loss = (out * grad.to(dtype)).sum()
        if grad_lse is not None:
            loss = loss + (lse * grad_lse.to(lse.dtype)).sum()
        grads = torch.autograd.grad(loss, leaves) if loss.requires_grad else [
            torch.zeros_like(x) for x in leaves]
        return [out.detach(), lse.detach(), *grads]

    return run(torch.float64), run(p.dtype)


def check(got, want, eager, dtype, what):
    """float32/float64: at least as close to float64 as dense eager (plus a few ulps); half
    types: normwise relative error under LOW_TOL."""
    assert got.shape == want.shape, what
    assert not got.isnan().any(), what
    if got.numel() == 0:
        return
    err = (got.double() - want).abs()
    size = max(1.0, want.abs().max().item())
    if dtype in LOW_TOL:
        rel = err.norm().item() / max(want.norm().item(), 1e-30)
        # (or absolutely, on the scale of the values: gradients can cancel to near zero)
        assert rel <= LOW_TOL[dtype] or err.max().item() <= LOW_TOL[dtype] * size, (what, rel)
    else:
        eager_err = (eager.double() - want).abs().max().item()
        bound = 4 * eager_err + 64 * torch.finfo(dtype).eps * size
        assert err.max().item() <= bound, (what, err.max().item(), bound)


def run_and_check(p: Problem, forward, backward):
    q, k, v, offs, grad, grad_lse = p.make()
    want, eager = references(p, q, k, v, offs, grad, grad_lse)
    out, lse = forward(q, k, v, offs, p.window, p.scale)
    assert out.dtype == p.dtype and lse.dtype == reference.compute_dtype(p.dtype)
    dq, dk, dv = backward(grad, grad_lse, q, k, v, out, lse, offs, p.window, p.scale)
    for name, x in zip(("dq", "dk", "dv"), (dq, dk, dv)):
        assert x.dtype == p.dtype, name
    # lse is float32 for the half types, but from scores of half inputs: half tolerances
    got = (out, lse, dq, dk, dv)
    for name, g, w, e in zip(("out", "lse", "dq", "dk", "dv"), got, want, eager):
        check(g, w, e, p.dtype, name)


BLOCKS = st.sampled_from([3, 16, 256])


@settings(max_examples=30)
@given(problems(), BLOCKS)
def test_cpu_matches_float64_reference(p, block):
    run_and_check(
        p,
        lambda *a: cpu.forward(*a, block=block),
        lambda *a: cpu.backward(*a, block=block),
    )


@settings(max_examples=20)
@given(problems(), BLOCKS)
def test_blocked_matches_float64_reference(p, block):
    run_and_check(
        p,
        lambda *a: blocked.forward(*a, block=block),
        lambda *a: blocked.backward(*a, block=block),
    )


def test_documents_do_not_see_each_other():
    """Changing document 0's keys and values leaves document 1's outputs bit-identical."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 40, 8, generator=g) for _ in range(3))
    offs = torch.tensor([0, 17, 40])
    out1, _ = cpu.forward(q, k, v, offs, 30, None, block=8)
    k2, v2 = k.clone(), v.clone()
    k2[:, :17] += 5
    v2[:, :17] -= 3
    out2, _ = cpu.forward(q, k2, v2, offs, 30, None, block=8)
    assert torch.equal(out1[:, 17:], out2[:, 17:])
    assert not torch.equal(out1[:, :17], out2[:, :17])


def test_window_one_is_identity_on_values():
    q, k, v = (torch.randn(3, 21, 5) for _ in range(3))
    out, lse = cpu.forward(q, k, v, torch.tensor([0, 4, 21]), 1, 0.5)
    torch.testing.assert_close(out, v)
    torch.testing.assert_close(lse, 0.5 * (q * k).sum(-1))


def _memory(fn):
    """(largest single allocation, peak of the running sum) in bytes during ``fn()``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    running = peak = 0
    for _, n in events:
        running += n
        peak = max(peak, running)
    return max((n for _, n in events), default=0), peak


@pytest.mark.parametrize("path", ["cpu", "blocked"])
def test_memory_scales_with_window_not_t_squared(path):
    """T = 2048, window 32: forward + backward never hold anything near a [T, T] score matrix
    (16 MiB in float32 for one head; each input is 256 KiB, the block masks ~2.3 MiB)."""
    mod = cpu if path == "cpu" else blocked
    t, d, h = 2048, 16, 2
    q, k, v = (torch.randn(h, t, d) for _ in range(3))
    offs = torch.tensor([0, 1000, 4096])

    def step():
        out, lse = mod.forward(q, k, v, offs, 32, None)
        mod.backward(torch.ones_like(out), None, q, k, v, out, lse, offs, 32, None)

    largest, peak = _memory(step)
    tt = t * t * 4
    assert largest < tt / 4, largest
    assert peak < tt / 2, peak
