"""`aa::window_attention`: its kernels (``cpu``: ATen's flash kernel over query blocks;
``blocked``: the device-generic path; ``triton``: in the interpreter on CPU tensors without a
GPU, 16-row blocks there, so T up to 40 crosses block edges) and the op (autograd, gradcheck,
the HAT model's mask, bad inputs), each against the float64 dense reference over odd shapes,
empty inputs and every dtype it takes: outputs, logsumexp and gradients."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import itertools

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from aa_compile.kernels.window_attention import blocked, cpu, reference
from aa_compile.models.hat import sliding_window_mask
from aa_compile.ops.window_attention import attention

from .test_word_pool import DEVICE, on_device

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    from aa_compile.kernels.window_attention import triton_kernel

OP = torch.ops.aa.window_attention
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TRITON_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: normwise relative error bound, ||got - want|| / ||want||, for the half types (rounding of the
#: inputs, of P before the P @ V product, of the output; measured ~3x below these)
LOW_TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}

# Tiny shapes: OpenMP fork/join costs more than the work (10x slower with 2 threads on the
# loaded 2-core dev machine).
pytestmark = pytest.mark.usefixtures("one_thread")


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


def check(got, want, eager, dtype, what, terms=0.0):
    """float32/float64: at least as close to float64 as dense eager (plus a few ulps of the
    result and of ``terms``, the size of the terms that cancel in it); half types: normwise
    relative error under LOW_TOL."""
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
        bound = 4 * eager_err + torch.finfo(dtype).eps * (64 * size + 4 * terms)
        assert err.max().item() <= bound, (what, err.max().item(), bound)


def _score_grad_terms(p: Problem, q, k, v, grad) -> float:
    """The size of the terms of ``dS = P * (dO . v - delta)`` times a q or k entry: the flash
    kernels take ``delta`` from the rounded output, so where ``dS`` cancels to ~0 (a window of
    1: ``dq = dk = 0`` exactly) ``dq`` and ``dk`` keep rounding errors of this size."""
    if q.numel() == 0:
        return 0.0
    scale = p.scale if p.scale is not None else p.d ** -0.5
    rows = [x.double().norm(dim=-1).max().item() for x in (grad, v)]
    return scale * rows[0] * rows[1] * max(q.abs().max().item(), k.abs().max().item())


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
    terms = _score_grad_terms(p, q, k, v, grad)
    for name, g, w, e in zip(("out", "lse", "dq", "dk", "dv"), got, want, eager):
        check(g, w, e, p.dtype, name, terms if name in ("dq", "dk") else 0.0)


class ThroughOp:
    """``forward`` / ``backward`` for `run_and_check` through the op and autograd: the backward
    returns the gradients of the forward just run."""

    def forward(self, q, k, v, offs, window, scale):
        self.leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
        self.out, self.lse = OP(*self.leaves, offs, window, scale)
        return self.out.detach(), self.lse.detach()

    def backward(self, grad, grad_lse, *_):
        outputs, grads = [self.out], [grad]
        if grad_lse is not None:
            outputs.append(self.lse)
            grads.append(grad_lse)
        if self.out.numel() == 0:
            return [torch.zeros_like(x) for x in self.leaves]
        return torch.autograd.grad(outputs, self.leaves, grads)


def kernel(name: str, block: int | None = None):
    """``(forward, backward)`` of a kernel (``op``: the op through autograd); Triton on DEVICE,
    results back on the CPU."""
    if name == "triton":
        if not HAS_TRITON:
            pytest.skip("triton is not installed")
        return on_device(triton_kernel.forward), on_device(triton_kernel.backward)
    if name == "op":
        through = ThroughOp()
        return through.forward, through.backward
    if name == "reference":
        return reference.window_attention, None
    mod = cpu if name == "cpu" else blocked
    if block is None:
        return mod.forward, mod.backward
    return (functools.partial(mod.forward, block=block),
            functools.partial(mod.backward, block=block))


# --- every kernel and the op against the float64 reference ---------------------------------

BLOCKS = st.sampled_from([3, 16, 256])
#: per kernel: the problems (Triton: tiny shapes, no float64), the query blocks, the examples
PROPERTY = {
    "cpu": (problems(), BLOCKS, 30),
    "blocked": (problems(), BLOCKS, 20),
    "triton": (problems(max_t=40, dtypes=TRITON_DTYPES, lead=((), (2,))), st.none(),
               6 if DEVICE == "cpu" else 50),
    "op": (problems(max_t=70), st.none(), 15),
}


@pytest.mark.parametrize("name", list(PROPERTY))
def test_matches_float64_reference(name):
    strategy, blocks, examples = PROPERTY[name]

    @settings(max_examples=examples, deadline=None)
    @given(p=strategy, block=blocks)
    def run(p, block):
        run_and_check(p, *kernel(name, block))

    run()


@pytest.mark.parametrize("name, dtype", [(name, dtype) for name in ("cpu", "blocked", "triton")
                                         for dtype in DTYPES
                                         if name != "triton" or dtype in TRITON_DTYPES])
def test_gqa_documents_and_window_across_blocks(name, dtype):
    """Fixed case: 3 query heads per key head, a window crossing 16-row blocks, an empty and a
    one-token document, odd D, gradient of lse."""
    p = Problem((), 1, 3, 37, 20, (9, 0, 1, 27), 19, dtype, None, True, 7)
    run_and_check(p, *kernel(name, 16 if name != "triton" else None))


@pytest.mark.parametrize("name", ["cpu", "blocked", "triton"])
def test_documents_do_not_see_each_other(name):
    """Changing document 0's keys and values leaves document 1's outputs bit-identical."""
    forward, _ = kernel(name, 8 if name != "triton" else None)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 40, 8, generator=g) for _ in range(3))
    offs = torch.tensor([0, 17, 40])
    out1, _ = forward(q, k, v, offs, 30, None)
    k2, v2 = k.clone(), v.clone()
    k2[:, :17] += 5
    v2[:, :17] -= 3
    out2, _ = forward(q, k2, v2, offs, 30, None)
    assert torch.equal(out1[:, 17:], out2[:, 17:])
    assert not torch.equal(out1[:, :17], out2[:, :17])


@pytest.mark.parametrize("name", ["reference", "cpu", "blocked", "triton"])
def test_window_one_is_identity_on_values(name):
    forward, _ = kernel(name)
    q, k, v = (torch.randn(3, 21, 5) for _ in range(3))
    out, lse = forward(q, k, v, torch.tensor([0, 4, 21]), 1, 0.5)
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


@pytest.mark.parametrize("name", ["cpu", "blocked"])
def test_memory_scales_with_window_not_t_squared(name):
    """T = 2048, window 32: forward + backward never hold anything near a [T, T] score matrix
    (16 MiB in float32 for one head; each input is 256 KiB, the block masks ~2.3 MiB)."""
    forward, backward = kernel(name)
    t, d, h = 2048, 16, 2
    q, k, v = (torch.randn(h, t, d) for _ in range(3))
    offs = torch.tensor([0, 1000, 4096])

    def step():
        out, lse = forward(q, k, v, offs, 32, None)
        backward(torch.ones_like(out), None, q, k, v, out, lse, offs, 32, None)

    largest, peak = _memory(step)
    tt = t * t * 4
    assert largest < tt / 4, largest
    assert peak < tt / 2, peak


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_refuses_float64():
    q = torch.randn(2, 4, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match=r"^q: .*float64"):
        triton_kernel.forward(q, q, q, None, 2, None)


# --- the op ---------------------------------------------------------------------------------

def test_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(4, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    offs = torch.tensor([0, 1, 1, 6, 9])
    assert torch.autograd.gradcheck(lambda a, b, c: OP(a, b, c, offs, 3, None), (q, k, v))


def test_same_mask_as_the_hat_model():
    """The op's mask is the one `aa_compile.models.hat` builds from byte documents/positions."""
    offs = torch.tensor([0, 5, 5, 6, 30])
    doc = reference.doc_ids(offs, 30, "cpu")
    pos = torch.arange(30) - offs[doc]
    for window in (1, 4, 30):
        assert torch.equal(reference.mask(offs, 30, window, "cpu"),
                           sliding_window_mask(doc, pos, window))


def test_attention_helper_and_partial_grads():
    q, k, v = (torch.randn(2, 3, 9, 4) for _ in range(3))
    k.requires_grad_(True)
    out = attention(q, k, v, None, 4)
    want, _ = reference.window_attention(q, k.detach(), v, None, 4)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    assert k.grad is not None and k.grad.shape == k.shape


def test_empty_sequence():
    q = torch.randn(3, 0, 8, requires_grad=True)
    k = torch.randn(1, 0, 8, requires_grad=True)
    out, lse = OP(q, k, k, torch.tensor([0]), 5, None)
    assert out.shape == (3, 0, 8) and lse.shape == (3, 0)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


def _f(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


_OFFS = torch.tensor([0, 3, 6])


@pytest.mark.parametrize(
    "args, message",
    [
        ((_f(2, 6, 4, dtype=torch.int64), _f(2, 6, 4), _f(2, 6, 4), _OFFS, 2), "q must be"),
        ((_f(6, 4), _f(6, 4), _f(6, 4), _OFFS, 2), r"q must be \[..., H, T, D\]"),
        ((_f(2, 6, 4), _f(2, 6, 4).double(), _f(2, 6, 4), _OFFS, 2), "k must have q's dtype"),
        ((_f(2, 6, 4), _f(2, 6, 4), _f(2, 5, 4), _OFFS, 2), "v must have k's shape"),
        ((_f(2, 6, 4), _f(2, 6, 3), _f(2, 6, 3), _OFFS, 2), "k must be"),
        ((_f(1, 2, 6, 4), _f(2, 2, 6, 4), _f(2, 2, 6, 4), _OFFS, 2), "k must be"),
        ((_f(3, 6, 4), _f(2, 6, 4), _f(2, 6, 4), _OFFS, 2), "multiple of k's head count"),
        ((_f(2, 6, 0), _f(2, 6, 0), _f(2, 6, 0), _OFFS, 2), "non-empty head dimension"),
        ((_f(2, 6, 4), _f(2, 6, 4), _f(2, 6, 4), _OFFS, 0), "window must be an int >= 1"),
        ((_f(2, 6, 4), _f(2, 6, 4), _f(2, 6, 4), _OFFS.float(), 2), "doc_offsets must be an int"),
        ((_f(2, 6, 4), _f(2, 6, 4), _f(2, 6, 4), _OFFS[None], 2), r"doc_offsets must be 1-D"),
        ((_f(2, 6, 4), _f(2, 6, 4), _f(2, 6, 4), torch.tensor([1, 6]), 2), "start at 0"),
        ((_f(2, 6, 4), _f(2, 6, 4), _f(2, 6, 4), torch.tensor([0, 5]), 2), "end at T=6"),
        ((_f(2, 6, 4), _f(2, 6, 4), _f(2, 6, 4), torch.tensor([0, 4, 2, 6]), 2),
         "non-decreasing"),
    ],
)
def test_bad_inputs(args, message):
    with pytest.raises(ValueError, match=message):
        OP(*args)


def test_bad_scale():
    x = _f(2, 6, 4)
    with pytest.raises(ValueError, match="scale must be a finite"):
        OP(x, x, x, None, 2, float("nan"))


def test_backward_checks_lse():
    q = _f(2, 6, 4)
    out, lse = OP(q, q, q, None, 2, None)
    with pytest.raises(ValueError, match="lse must be"):
        torch.ops.aa.window_attention_backward(out, None, q, q, q, out, lse[:, :5], None, 2, None)


def test_projection_layout_inputs():
    """q, k, v as ``[B, T, H, D].transpose(1, 2)`` views (what projections give) work as is."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 30, 4, 8, generator=g).transpose(1, 2).requires_grad_(True)
    k = torch.randn(2, 30, 2, 8, generator=g).transpose(1, 2).requires_grad_(True)
    v = torch.randn(2, 30, 2, 8, generator=g).transpose(1, 2).requires_grad_(True)
    offs = torch.tensor([0, 11, 30])
    out = attention(q, k, v, offs, 6)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    want, _ = reference.window_attention(*leaves, offs, 6)
    want.backward(grad.double())
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    for got, ref in zip((q, k, v), leaves):
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=1e-5, rtol=1e-5)
